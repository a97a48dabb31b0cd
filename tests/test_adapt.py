"""`splade-obs adapt`: masked-LM domain adaptation of the real splade-tiny on a corpus the tests write:
the loss goes down, only the transformer layers move, runs reproduce, bad corpora and failures are typed and
leave nothing half-written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from splade_obs_cli.main import cli
from splade_obs.adapt import AdaptSettings, adapt_model, masked_lm_loss, select_trainable
from splade_obs.errors import EXIT_CODES, ErrorCategory
from splade_obs.hub import sha256_file

SENTENCES = [
    "Mitochondrial oxidative phosphorylation produces most of the ATP in aerobic cells.",
    "Ribosomes translate messenger RNA into polypeptide chains in the cytoplasm.",
    "Statin therapy lowers LDL cholesterol and the risk of myocardial infarction.",
    "CRISPR Cas9 introduces double strand breaks at guide RNA target sites.",
    "Insulin resistance in skeletal muscle precedes type 2 diabetes mellitus.",
    "Tumour necrosis factor alpha drives inflammation in rheumatoid arthritis.",
]


@pytest.fixture
def corpus(tmp_path) -> Path:
    """A BEIR folder with a small in-domain corpus (no queries, no qrels: adaptation reads neither)."""
    folder = tmp_path / "beir"
    folder.mkdir()
    with open(folder / "corpus.jsonl", "w", encoding="utf-8") as f:
        for i in range(24):
            text = " ".join(SENTENCES[(i + k) % len(SENTENCES)] for k in range(3))
            f.write(json.dumps({"_id": f"d{i}", "title": f"Study {i}", "text": text}) + "\n")
    return folder


def _adapt(*args: str):
    return CliRunner().invoke(cli, ["adapt", *args])


def test_adapt_lowers_the_masked_lm_loss_and_moves_only_the_transformer_layers(corpus, tiny_model_path, tmp_path):
    out = tmp_path / "adapted"
    res = _adapt("--model", tiny_model_path, "--corpus", str(corpus), "--output", str(out), "--epochs", "3",
                 "--batch-size", "8", "--learning-rate", "1e-3", "--max-length", "64")
    assert res.exit_code == 0, res.output
    record = json.loads(res.stdout)
    assert record["mlm_loss_after"] < record["mlm_loss_before"] - 0.5
    assert [e["epoch"] for e in record["epochs"]] == [1, 2, 3] and all(e["steps"] == 3 for e in record["epochs"])
    assert record["documents"] == 24 and record["corpus"] == str(corpus / "corpus.jsonl")
    assert record["corpus_sha256"] == sha256_file(corpus / "corpus.jsonl")
    assert record["model_weights_sha256"] == sha256_file(Path(tiny_model_path) / "model.safetensors")
    assert json.loads((out / "adapted_from.json").read_text()) == {k: v for k, v in record.items() if k != "output"}

    before = load_file(str(Path(tiny_model_path) / "model.safetensors"))
    after = load_file(str(out / "model.safetensors"))
    assert set(before) == set(after)
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith("bert.encoder.layer.") for k in moved), sorted(moved)[:5]
    assert all(k in moved for k in before if k.startswith("bert.encoder.layer.") and before[k].is_floating_point())
    assert record["trainable_parameters"] == sum(before[k].numel() for k in moved)

    from splade_obs.model import SpladeEncoder

    enc = SpladeEncoder.from_pretrained(str(out))
    weights = enc.encode(["oxidative phosphorylation in mitochondria"], max_length=16)
    assert weights.shape[1] == enc.vocab_size and weights.nnz > 0


def test_train_part_all_moves_the_embeddings_and_head(corpus, tiny_model_path, tmp_path):
    settings = AdaptSettings(epochs=1, batch_size=8, learning_rate=1e-3, max_length=32, train_part="all")
    record = adapt_model(tiny_model_path, corpus, tmp_path / "all", settings)
    before = load_file(str(Path(tiny_model_path) / "model.safetensors"))
    after = load_file(str(tmp_path / "all" / "model.safetensors"))
    for key in ("bert.embeddings.word_embeddings.weight", "cls.predictions.transform.dense.weight"):
        assert not torch.equal(before[key], after[key]), key
    assert record["frozen_parameters"] == 0


def test_adapt_is_reproducible_for_a_seed(corpus, tiny_model_path, tmp_path):
    runs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        settings = AdaptSettings(epochs=1, batch_size=8, learning_rate=1e-3, max_length=32, seed=seed)
        adapt_model(tiny_model_path, corpus, tmp_path / name, settings)
        runs[name] = load_file(str(tmp_path / name / "model.safetensors"))
    key = "bert.encoder.layer.0.attention.self.query.weight"
    assert all(torch.equal(runs["a"][k], runs["b"][k]) for k in runs["a"])
    assert not torch.equal(runs["a"][key], runs["c"][key])


def test_masked_lm_loss_equals_the_full_logits_loss(tiny_model_path):
    """The loss computed on masked rows only equals transformers' MLM loss over every position."""
    from transformers import DataCollatorForLanguageModeling

    from splade_obs.model import SpladeEncoder

    enc = SpladeEncoder.from_pretrained(tiny_model_path)
    assert enc.fused_head
    enc.eval()
    ids = enc.tokenizer(SENTENCES, truncation=True, max_length=32)["input_ids"]
    batch = DataCollatorForLanguageModeling(enc.tokenizer, seed=1)([{"input_ids": x} for x in ids])
    batch = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    with torch.no_grad():
        ours = masked_lm_loss(enc, batch)
        reference = enc.mlm(**batch).loss
    assert torch.allclose(ours, reference, atol=1e-5), (ours, reference)


def test_layers_only_needs_an_embeddings_block():
    from transformers import BertConfig, BertForMaskedLM

    mlm = BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32))
    trainable, frozen = select_trainable(mlm, "layers")
    assert trainable > 0 and frozen > 0
    assert not mlm.bert.embeddings.word_embeddings.weight.requires_grad
    assert not mlm.cls.predictions.transform.dense.weight.requires_grad
    assert mlm.bert.encoder.layer[0].output.dense.weight.requires_grad

    class Flat(torch.nn.Module):  # no base model: nothing tells the layers from the embeddings
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(2, 2)

    from splade_obs.errors import ModelError

    with pytest.raises(ModelError, match="no base model") as caught:
        select_trainable(Flat(), "layers")
    assert "--train-part all" in caught.value.hint_text()


def test_bad_corpus_line_is_one_typed_line_naming_file_line_and_field(tmp_path, tiny_model_path):
    bad = tmp_path / "corpus.jsonl"
    bad.write_text('{"_id": "1", "text": "fine"}\n{"_id": "2", "text": 5}\n', encoding="utf-8")
    res = _adapt("--model", tiny_model_path, "--corpus", str(bad), "--output", str(tmp_path / "out"))
    assert res.exit_code == EXIT_CODES[ErrorCategory.DATA_ERROR]
    assert f"{bad}:2" in res.output and '"text"' in res.output and "Traceback" not in res.output
    assert not (tmp_path / "out").exists()

    res = _adapt("--model", tiny_model_path, "--corpus", str(tmp_path / "nowhere"), "--output", str(tmp_path / "out"))
    assert res.exit_code == EXIT_CODES[ErrorCategory.DATA_ERROR] and "hint:" in res.output


def test_a_failed_adaptation_leaves_the_previous_output_whole(corpus, tiny_model_path, tmp_path, monkeypatch):
    out = tmp_path / "adapted"
    settings = AdaptSettings(epochs=1, batch_size=8, learning_rate=1e-3, max_length=32)
    adapt_model(tiny_model_path, corpus, out, settings)
    kept = (out / "model.safetensors").read_bytes()

    import splade_obs.adapt as adapt_mod

    real = adapt_mod.masked_lm_loss
    calls = {"n": 0}

    def diverging(encoder, batch):  # fault injection: the loss diverges at the second training batch
        loss = real(encoder, batch)
        if encoder.training:
            calls["n"] += 1
            if calls["n"] == 2:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(adapt_mod, "masked_lm_loss", diverging)
    res = _adapt("--model", tiny_model_path, "--corpus", str(corpus), "--output", str(out), "--epochs", "1",
                 "--batch-size", "8", "--max-length", "32")
    assert res.exit_code == EXIT_CODES[ErrorCategory.TRAINING_ERROR], res.output
    assert "loss is nan" in res.output and "Traceback" not in res.output
    assert (out / "model.safetensors").read_bytes() == kept
    monkeypatch.setattr(adapt_mod, "masked_lm_loss", real)

    from splade_obs.model import SpladeEncoder

    def torn_write(self, path):  # fault injection: the disk fills up halfway through writing the model
        (Path(path) / "model.safetensors").write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(SpladeEncoder, "save_pretrained", torn_write)
    res = _adapt("--model", tiny_model_path, "--corpus", str(corpus), "--output", str(out), "--epochs", "1",
                 "--batch-size", "8", "--max-length", "32")
    assert res.exit_code == EXIT_CODES[ErrorCategory.FILE_SYSTEM_ERROR], res.output
    assert (out / "model.safetensors").read_bytes() == kept  # the old model is whole
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no staging folder left


def test_output_that_is_not_a_model_folder_is_refused_before_training(corpus, tiny_model_path, tmp_path):
    keep = tmp_path / "runs"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    res = _adapt("--model", tiny_model_path, "--corpus", str(corpus), "--output", str(keep))
    assert res.exit_code == EXIT_CODES[ErrorCategory.FILE_SYSTEM_ERROR], res.output
    assert "no config.json" in res.output and "adapt epoch" not in res.output  # refused before any training
    assert (keep / "notes.txt").read_text() == "mine"


def test_probe_masks_depend_on_neither_batch_size_nor_seed(tiny_model_path):
    """The before/after loss is measured on the same masked tokens whatever the run's batch size and seed."""
    from splade_obs.adapt import probe_batches
    from splade_obs.model import SpladeEncoder

    tok = SpladeEncoder.from_pretrained(tiny_model_path).tokenizer
    ids = tok(SENTENCES * 2, truncation=True, max_length=32)["input_ids"]

    def masked(batch_size: int, seed: int) -> list[tuple[int, ...]]:
        rows = []
        for b in probe_batches(tok, ids, AdaptSettings(batch_size=batch_size, seed=seed)):
            for inp, lab, att in zip(b["input_ids"], b["labels"], b["attention_mask"]):
                n = int(att.sum())
                rows.append(tuple(inp[:n].tolist()) + tuple(lab[:n].tolist()))
        return rows

    assert masked(1, 0) == masked(5, 0) == masked(12, 7)
    assert any(-100 != x for row in masked(3, 0) for x in row[len(row) // 2:])  # some tokens are masked
