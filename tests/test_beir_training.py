"""Plain ``train`` on a BEIR folder (splade_obs/beir.py, splade_obs/beir_negatives.py, data.with_demo_defaults):
one example per (query, positive) pair, BM25 hard negatives mined unless the data has its own or they are
turned off, and a run length that adapts to the data size."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from click.testing import CliRunner

from splade_obs.beir_negatives import MAX_BEIR_EPOCHS, MIN_BEIR_STEPS, beir_epochs, count_beir_pairs
from splade_obs.collate import PairCollator
from splade_obs.config import TrainConfig
from splade_obs.data import load_training_data, with_demo_defaults
from splade_obs.errors import ConfigError
from splade_obs_cli.main import cli

from .conftest import TINY_ARGS

DOCS = {
    "d0": ("Coffee brewing", "Coffee is brewed from roasted coffee beans and hot water."),
    "d1": ("Espresso", "Espresso is coffee brewed under pressure."),
    "d2": ("Coffee trade", "Coffee beans are traded worldwide and coffee prices rise."),
    "d3": ("Coffee plant", "The coffee plant grows in the tropics."),
    "d4": ("Tea", "Tea is brewed from leaves in hot water."),
    "d5": ("Insulin", "Insulin is a hormone that lowers blood sugar."),
    "d6": ("Diabetes", "Diabetes is high blood sugar from missing insulin."),
    "d7": ("Glucose", "Blood glucose is the sugar carried in the blood."),
    "d8": ("Hormones", "Hormones are chemical messengers carried in the blood."),
    "d9": ("Jupiter", "Jupiter is the largest planet."),
    "d10": ("Saturn", "Saturn is a planet with rings, the second largest planet."),
    "d11": ("Mars", "Mars is a small red planet."),
}
QUERIES = {"q1": "how is coffee brewed", "q2": "hormone that controls blood sugar", "q3": "which planet is the largest",
           "q4": "coffee prices", "q5": ""}
#: (query, doc, label): a judged non-relevant row (q1, d4), a document missing from the corpus (q2, dX) and a
#: query without text (q5) give no example.
QRELS = [("q1", "d0", 2), ("q1", "d1", 1), ("q1", "d4", 0), ("q2", "d5", 2), ("q2", "d6", 1), ("q2", "dX", 1),
         ("q3", "d9", 1), ("q4", "d2", 1), ("q5", "d3", 1)]
PAIRS = [("q1", "d0"), ("q1", "d1"), ("q2", "d5"), ("q2", "d6"), ("q3", "d9"), ("q4", "d2")]


def _folder(tmp_path: Path) -> Path:
    root = tmp_path / "beir"
    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").write_text("".join(json.dumps({"_id": d, "title": t, "text": x}) + "\n"
                                               for d, (t, x) in DOCS.items()), encoding="utf-8")
    (root / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": t}) + "\n" for q, t in QUERIES.items()),
                                        encoding="utf-8")
    (root / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"{q}\t{d}\t{rel}\n" for q, d, rel in QRELS), encoding="utf-8")
    return root


def _text(doc_id: str) -> str:
    title, text = DOCS[doc_id]
    return f"{title} {text}"


def test_plain_train_on_a_beir_folder_yields_one_example_per_pair(tmp_path):
    root = _folder(tmp_path)
    loaded = load_training_data(str(root), split="train", beir_negatives="none")
    assert len(loaded.examples) == len(PAIRS) == 6  # 4 queries; label 0, a dangling doc, an empty query: none
    assert [(e.query, e.positives) for e in loaded.examples] == [(QUERIES[q], (_text(d),)) for q, d in PAIRS]
    assert all(not e.negatives for e in loaded.examples)
    line = {q: i for i, q in enumerate(QUERIES, 1)}  # each example names its query's line, and its document
    assert [e.location for e in loaded.examples] == [f"{root / 'queries.jsonl'}:{line[q]} [doc {d}]" for q, d in PAIRS]
    assert count_beir_pairs(root, "train") == 7  # read without the corpus: the dangling row counts


def test_bm25_negatives_are_mined_and_never_a_judged_positive(tmp_path, caplog):
    root = _folder(tmp_path)
    with caplog.at_level(logging.INFO, logger="splade_obs.beir"):
        loaded = load_training_data(str(root), split="train", beir_negatives_depth=3)
    assert any(r.getMessage().startswith("BM25 hard negatives (data.beir_negatives=bm25): mined 4 queries over 12 "
                                         "documents") for r in caplog.records)
    judged = {q: {_text(d) for qq, d, rel in QRELS if qq == q and rel > 0 and d in DOCS} for q in QUERIES}
    qid = {t: q for q, t in QUERIES.items()}
    for ex in loaded.examples:
        assert 1 <= len(ex.negatives) <= 3, ex.location
        assert not set(ex.negatives) & judged[qid[ex.query]], ex.location  # never a judged positive of the query
    coffee = [ex for ex in loaded.examples if ex.query == QUERIES["q1"]]
    assert coffee[0].negatives == coffee[1].negatives  # the query's pool, for each of its pairs
    assert set(coffee[0].negatives) <= {_text(d) for d in ("d2", "d3", "d4")}  # the coffee/brewed documents
    sugar = [ex for ex in loaded.examples if ex.query == QUERIES["q2"]]
    assert _text("d6") not in sugar[0].negatives and _text("d5") not in sugar[1].negatives  # its other positive
    assert _text("d7") in sugar[0].negatives  # blood sugar, not judged: a hard negative
    assert load_training_data(str(root), split="train", beir_negatives_depth=3).examples == loaded.examples


def test_each_pair_draws_its_negatives_reproducibly(tmp_path):
    """The collator's draw is keyed by (seed, epoch, pair): the same on a resumed run, new each epoch, and two
    pairs of one query draw apart."""
    loaded = load_training_data(str(_folder(tmp_path)), split="train")
    coffee = [ex for ex in loaded.examples if ex.query == QUERIES["q1"]]
    assert len(coffee[0].negatives) == 3
    a, b = PairCollator(None, 16, 32, num_negatives=1, seed=42), PairCollator(None, 16, 32, num_negatives=1, seed=42)
    draws = [a.choose(coffee[0], 1, a._rng(epoch, coffee[0]))[1] for epoch in range(8)]
    assert draws == [b.choose(coffee[0], 1, b._rng(epoch, coffee[0]))[1] for epoch in range(8)]
    assert len({tuple(d) for d in draws}) > 1  # a fresh draw from the pool each epoch
    assert a._rng(0, coffee[0]).random() != a._rng(0, coffee[1]).random()


def test_data_with_negatives_is_untouched_and_the_switch_turns_mining_off(tmp_path):
    records = [{"query": "how is coffee brewed", "positive": _text("d0"), "negatives": ["Tea is a drink."]},
               {"query": "largest planet", "positive": _text("d6")}]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    loaded = load_training_data(str(path))  # a file's negatives are the data's: nothing mined, nothing added
    assert [e.negatives for e in loaded.examples] == [("Tea is a drink.",), ()]
    off = load_training_data(str(_folder(tmp_path)), split="train", beir_negatives="none")
    assert off.examples and all(not e.negatives for e in off.examples)
    cfg = TrainConfig.from_mapping({"data.beir_negatives": "none"})
    assert cfg.data.beir_negatives == "none" and cfg.params()["data.beir_negatives"] == "none"
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_mapping({"data.beir_negatives": "splade"})
    assert "data.beir_negatives" in str(info.value)


def test_run_length_adapts_to_the_data_size(tmp_path):
    root = _folder(tmp_path)
    assert beir_epochs(919, 16) == 4  # SciFact's train split: 57 steps an epoch -> 228 steps
    assert beir_epochs(919, 16) * (919 // 16) >= MIN_BEIR_STEPS > (beir_epochs(919, 16) - 1) * (919 // 16)
    assert beir_epochs(500_000, 16) == 1 and beir_epochs(8, 4) == MAX_BEIR_EPOCHS
    assert beir_epochs(919, 8, gradient_accumulation_steps=2) == 4
    base = {"data.train_file": str(root), "data.train_split": "train"}
    filled = with_demo_defaults(TrainConfig.from_mapping({**base, "optim.batch_size": 4}))
    assert filled.optim.epochs == beir_epochs(7, 4) == MAX_BEIR_EPOCHS
    assert filled.params()["optim.epochs"] == str(MAX_BEIR_EPOCHS)
    assert with_demo_defaults(filled) == filled
    assert with_demo_defaults(TrainConfig.from_mapping({**base, "optim.epochs": 2})).optim.epochs == 2  # given: kept
    assert with_demo_defaults(TrainConfig.from_mapping({**base, "optim.max_steps": 5})).optim.epochs == 1
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text(json.dumps({"query": "q", "positive": "p"}) + "\n", encoding="utf-8")
    assert with_demo_defaults(TrainConfig.from_mapping({"data.train_file": str(jsonl)})).optim.epochs == 1
    shown = CliRunner().invoke(cli, ["config", "show", "--train-file", str(root), "--batch-size", "4",
                                     "--format", "params"])
    assert shown.exit_code == 0, shown.output
    assert f"optim.epochs={MAX_BEIR_EPOCHS}\n" in shown.output and "data.beir_negatives=bm25\n" in shown.output


def test_plain_train_on_a_beir_folder_end_to_end(tmp_path, tiny_model_path):
    """The real trainer with the data's defaults: 6 pairs at batch 4 = 1 step an epoch, so MAX_BEIR_EPOCHS
    epochs, on BM25 negatives."""
    root = _folder(tmp_path)
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", "--train-file", str(root), *TINY_ARGS, "--output-dir", str(out),
                                      "--model", tiny_model_path, "--no-mlflow", "--otel-exporter", "none",
                                      "--progress", "none"])
    assert result.exit_code == 0, result.output
    log_text = (out / "logs" / "train_splade.log").read_text(encoding="utf-8")
    assert "BM25 hard negatives (data.beir_negatives=bm25): mined 4 queries" in log_text
    metrics = json.loads((out / "logs" / "training_metrics.json").read_text(encoding="utf-8"))
    assert (metrics["status"], metrics["num_epochs"], metrics["steps_per_epoch"], metrics["last_step"]) == (
        "FINISHED", MAX_BEIR_EPOCHS, 1, MAX_BEIR_EPOCHS)
    assert f"Starting training for {MAX_BEIR_EPOCHS} epochs" in log_text
    assert "Building index" not in log_text  # bm25s's own debug lines stay out of the run's log


def test_beir_negatives_none_reaches_the_trainer(tmp_path, tiny_model_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", "--train-file", str(_folder(tmp_path)), *TINY_ARGS, "--max-steps", "2",
                                      "--beir-negatives", "none", "--output-dir", str(out), "--model", tiny_model_path,
                                      "--no-mlflow", "--otel-exporter", "none", "--progress", "none"])
    assert result.exit_code == 0, result.output
    log_text = (out / "logs" / "train_splade.log").read_text(encoding="utf-8")
    assert "Loaded 6 train examples" in log_text and "BM25 hard negatives" not in log_text
