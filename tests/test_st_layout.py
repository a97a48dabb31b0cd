"""Model folders written by splade-obs load in sentence-transformers' ``SparseEncoder`` as trained (issue 33.1).

A real short training (splade-tiny, query/document lengths 16/32 tokens) writes ``final/``, ``best/`` and its
checkpoints' ``model/``; every one holds the sentence-transformers files. ``SparseEncoder(path)`` (the installed
sentence-transformers, a real import) loads ``final/`` through its ``modules.json`` (no fallback, no warning),
at the trained lengths, and ``encode_query`` / ``encode_document`` give the term weights of ``splade-obs encode``
(``encode_file``, the command's code) to 1e-5 in fp32: on demo texts (always) and on SciFact documents (skipped
when ../shared/data/scifact is absent). ``AutoModelForMaskedLM`` still loads the folder.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest

from splade_obs.encoding import encode_file, iter_records
from splade_obs.st_layout import st_files, trained_lengths
from tests._eval_utils import read_jsonl, write_beir

pytestmark = pytest.mark.timeout(600)

QUERY_LEN, DOC_LEN = 16, 32
#: the long ones are cut by both lengths: the cut must be where splade-obs cuts
DEMO = ["what is a sparse lexical representation?",
        "SPLADE expands queries and documents with weighted vocabulary terms; " * 6,
        "coffee",
        "which hormone controls blood sugar after a meal and how do the pancreas and the liver share that work?"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A real 4-step run with retrieval evaluation and ``--save-best-metric``: final/, best/, checkpoints."""
    from splade_obs.config import TrainConfig
    from splade_obs.run import run_training

    tmp = tmp_path_factory.mktemp("st")
    cfg = TrainConfig.from_mapping({
        "checkpoint": {"output_dir": str(tmp / "out"), "save_steps": 2},
        "optim": {"batch_size": 4, "max_steps": 4, "seed": 7, "mixed_precision": "no"},
        "model": {"max_query_length": QUERY_LEN, "max_doc_length": DOC_LEN},
        "eval": {"eval_data": str(write_beir(tmp / "beir")), "eval_steps": 2, "save_best_metric": "ndcg@10"},
        "tracking": {"enabled": False}, "tracing": {"exporter": "none"}, "logging": {"progress": "none"}})
    assert run_training(cfg).status == "FINISHED"
    return tmp / "out"


def _load_sparse_encoder(path: Path, caplog) -> tuple[object, list]:
    from sentence_transformers import SparseEncoder

    with caplog.at_level(logging.INFO, logger="sentence_transformers"), warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        model = SparseEncoder(str(path), device="cpu")
    return model, list(w)


def _st_weights(model, fn: str, texts: list[str]) -> np.ndarray:
    out = getattr(model, fn)(texts, convert_to_tensor=True, convert_to_sparse_tensor=False, batch_size=16)
    return out.float().cpu().numpy()


def _splade_obs_weights(model_dir: Path, tmp: Path, kind: str, texts: list[str] | None = None,
                        beir: Path | None = None, limit: int | None = None) -> tuple[list[str], np.ndarray]:
    """``splade-obs encode`` (``encode_file``, float JSONL) of ``texts`` or a BEIR folder, as a dense matrix."""
    from splade_obs.model import SpladeEncoder

    encoder = SpladeEncoder.from_pretrained(str(model_dir))
    src = tmp / f"{kind}-in.jsonl"
    if texts is None:  # the BEIR file's first lines as they are (documents keep their titles)
        with open(beir / f"{kind}.jsonl", encoding="utf-8") as f:
            src.write_text("".join(line for _, line in zip(range(limit), f)), encoding="utf-8")
        texts = [t for _, t in iter_records(src, kind)]
    else:
        src.write_text("".join(json.dumps({"_id": str(i), "text": t}) + "\n" for i, t in enumerate(texts)))
    out = tmp / f"{kind}-out.jsonl"
    encode_file(encoder, src, out, kind=kind, max_length=DOC_LEN if kind == "corpus" else QUERY_LEN)
    vocab = encoder.tokenizer.get_vocab()
    dense = np.zeros((len(texts), encoder.vocab_size), dtype=np.float32)
    for row, rec in enumerate(read_jsonl(out)):
        for term, weight in rec["vector"].items():
            dense[row, vocab[term]] = weight
    return texts, dense


def test_every_model_folder_holds_the_sentence_transformers_files(trained):
    folders = [trained / "final", trained / "best", *sorted(trained.glob("checkpoints/*/model"))]
    assert len(folders) >= 3
    expected = st_files(QUERY_LEN, DOC_LEN)
    for folder in folders:
        for rel, content in expected.items():
            assert json.loads((folder / rel).read_text()) == content, (folder, rel)
        assert trained_lengths(folder) == (QUERY_LEN, DOC_LEN)
    assert json.loads((trained / "final" / "modules.json").read_text())[1]["path"] == "1_SpladePooling"


def test_sparse_encoder_loads_without_fallback_at_the_trained_lengths(trained, caplog):
    model, caught = _load_sparse_encoder(trained / "final", caplog)
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("sentence_transformers")]
    assert any("Loading SparseEncoder model from" in m for m in messages), messages
    assert not any("No modules.json" in m or "No sparse-encoder model found" in m or "Converting" in m
                   for m in messages), messages
    assert not [r for r in caplog.records if r.name.startswith("sentence_transformers") and r.levelno >= logging.WARNING]
    assert not [w for w in caught if "sentence_transformers" in str(w.filename) or "sentence" in str(w.message)]
    assert model.max_seq_length == DOC_LEN
    assert model[0].query_length == QUERY_LEN and model[0].document_length == DOC_LEN
    assert type(model[1]).__name__ == "SpladePooling" and model[1].pooling_strategy == "max"
    assert model.similarity_fn_name == "dot"


def test_encode_query_and_document_equal_splade_obs_encode_on_demo_texts(trained, caplog, tmp_path):
    model, _ = _load_sparse_encoder(trained / "final", caplog)
    for kind, fn in (("queries", "encode_query"), ("corpus", "encode_document")):
        texts, ours = _splade_obs_weights(trained / "final", tmp_path, kind, texts=DEMO)
        theirs = _st_weights(model, fn, texts)
        assert theirs.shape == ours.shape
        assert (ours > 0).sum() > 10 * len(texts)  # real vectors, not empty ones
        assert float(np.abs(theirs - ours).max()) <= 1e-5, (kind, float(np.abs(theirs - ours).max()))
    # the lengths matter: at the document length, a long query's vector differs from encode_query's
    long_query = _st_weights(model, "encode_document", DEMO[1:2])
    assert float(np.abs(long_query - _st_weights(model, "encode_query", DEMO[1:2])).max()) > 1e-3


def test_encode_document_equals_splade_obs_encode_on_scifact(trained, caplog, tmp_path, scifact_dir):
    model, _ = _load_sparse_encoder(trained / "final", caplog)
    texts, ours = _splade_obs_weights(trained / "final", tmp_path, "corpus", beir=scifact_dir, limit=200)
    theirs = _st_weights(model, "encode_document", texts)
    assert float(np.abs(theirs - ours).max()) <= 1e-5
    texts, ours = _splade_obs_weights(trained / "final", tmp_path, "queries", beir=scifact_dir, limit=200)
    assert float(np.abs(_st_weights(model, "encode_query", texts) - ours).max()) <= 1e-5


def test_the_folder_is_still_a_hugging_face_masked_lm(trained):
    from transformers import AutoModelForMaskedLM

    import torch
    from splade_obs.model import SpladeEncoder, splade_pool_reference

    mlm = AutoModelForMaskedLM.from_pretrained(str(trained / "final")).eval()
    encoder = SpladeEncoder.from_pretrained(str(trained / "final"))
    batch = encoder.tokenize(DEMO, DOC_LEN)
    with torch.no_grad():
        plain = splade_pool_reference(mlm(**batch).logits, batch["attention_mask"]).numpy()
    assert float(np.abs(plain - encoder.encode(DEMO, max_length=DOC_LEN).toarray()).max()) <= 1e-5


def test_lengths_survive_a_reload_and_save_outside_training(trained, tmp_path):
    """``average`` / ``adapt`` load a trained folder and save a new one: the trained lengths go along."""
    from splade_obs.model import SpladeEncoder

    encoder = SpladeEncoder.from_pretrained(str(trained / "best"))
    assert encoder.max_lengths == (QUERY_LEN, DOC_LEN)
    encoder.save_pretrained(tmp_path / "copy")
    assert trained_lengths(tmp_path / "copy") == (QUERY_LEN, DOC_LEN)
    assert trained_lengths(tmp_path) is None  # a folder without the file says nothing
