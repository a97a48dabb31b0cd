"""In-training retrieval evaluation (``--eval-data`` / ``--eval-steps`` / ``--save-best-metric``), per-step
sparsity: the real trainer on the real splade-tiny, a BEIR folder the test writes.
"""

from __future__ import annotations

import json

import pytest

from splade_obs.beir import load_beir
from splade_obs.evaluation import RetrievalEvaluator
from splade_obs.bus import RecordingSink
from splade_obs.events import CheckpointSaved, EvaluationDone, StepDone
from splade_obs.model import SpladeEncoder
from splade_obs.run import run_training

from tests._eval_utils import write_beir

OPTIM = {"learning_rate": 2e-3, "mixed_precision": "no"}


def test_evaluation_every_n_steps_and_at_the_end_reaches_the_sinks_and_keeps_the_best(tiny_cfg, tmp_path):
    data = write_beir(tmp_path / "beir", split="dev")
    rec = RecordingSink()
    cfg = tiny_cfg(optim={**OPTIM, "max_steps": 5},
                   eval={"eval_data": str(data), "eval_split": "dev", "eval_steps": 2, "save_best_metric": "ndcg@10"})
    res = run_training(cfg, extra_sinks=[rec])
    assert res.status == "FINISHED"

    evals = rec.of(EvaluationDone)
    assert [e.step for e in evals] == [2, 4, 5], "every --eval-steps, then once at the end"
    for e in evals:
        assert e.split == "dev" and e.scores["num_queries"] == 4 and e.scores["num_docs"] == 10
        for key in ("ndcg@10", "mrr@10", "recall@100", "map@100"):
            assert 0.0 <= e.scores[key] <= 1.0
        assert e.scores["query_nnz"] > 0 and e.scores["doc_nnz"] > 0 and e.scores["retrieval_flops"] > 0
    # is_best marks a new running maximum of the chosen metric (strictly better), the first one included
    best = None
    for e in evals:
        assert e.is_best == (best is None or e.scores["ndcg@10"] > best)
        best = e.scores["ndcg@10"] if e.is_best else best
    best_event = [e for e in evals if e.is_best][-1]
    assert [c.step for c in rec.of(CheckpointSaved) if c.reason == "best"] == [e.step for e in evals if e.is_best]

    # best/ holds the model of the best evaluation: scoring it again gives the same numbers
    best_dir = cfg.output_dir / "best"
    saved = json.loads((best_dir / "metrics.json").read_text(encoding="utf-8"))
    assert saved["step"] == best_event.step and saved["ndcg@10"] == pytest.approx(best_event.scores["ndcg@10"])
    again = RetrievalEvaluator(load_beir(data, "dev"), max_query_length=16, max_doc_length=32).evaluate(
        SpladeEncoder.from_pretrained(str(best_dir)))
    for key in ("ndcg@10", "mrr@10", "query_nnz", "doc_nnz"):
        assert again[key] == pytest.approx(best_event.scores[key], abs=1e-6), key

    # the metrics file has every evaluation, and the final metrics are the last evaluation's
    doc = json.loads((cfg.log_dir / "training_metrics.json").read_text(encoding="utf-8"))
    assert [(x["step"], x["split"], x["is_best"]) for x in doc["eval"]] == [(e.step, "dev", e.is_best) for e in evals]
    assert [x["metrics"]["ndcg_at_10"] for x in doc["eval"]] == pytest.approx([e.scores["ndcg@10"] for e in evals])
    assert res.result.final_metrics["eval/ndcg_at_10"] == pytest.approx(evals[-1].scores["ndcg@10"])
    assert doc["final_metrics"]["ndcg_at_10"] == pytest.approx(evals[-1].scores["ndcg@10"])

    # sparsity is tracked at every optimizer step, not only at evaluations; each step is reported before the
    # evaluation that follows it (a logging point comes before every evaluation)
    steps = rec.of(StepDone)
    assert [s.step for s in steps] == [1, 2, 3, 4, 5]
    assert all(s.query_nnz > 0 and s.doc_nnz > 0 and s.retrieval_flops > 0 for s in steps)
    order = [(type(e).__name__, e.step) for e in rec.events if isinstance(e, (StepDone, EvaluationDone))]
    assert order == [("StepDone", 1), ("StepDone", 2), ("EvaluationDone", 2), ("StepDone", 3), ("StepDone", 4),
                     ("EvaluationDone", 4), ("StepDone", 5), ("EvaluationDone", 5)]
    assert doc["metrics_by_epoch"]["1"]["query_nnz"] > 0 and doc["metrics_by_epoch"]["1"]["doc_nnz"] > 0


def test_idf_power_reaches_the_in_training_evaluator(tiny_cfg, tmp_path):
    from splade_obs.run import _build_evaluator

    data = write_beir(tmp_path / "beir", split="dev")
    cfg = tiny_cfg(eval={"eval_data": str(data), "eval_split": "dev", "eval_idf_power": 0.7})
    assert _build_evaluator(cfg).idf_power == 0.7
    assert _build_evaluator(tiny_cfg(eval={"eval_data": str(data), "eval_split": "dev"})).idf_power == 0.0


def test_a_negative_idf_power_is_a_config_error_before_training(tmp_path):
    from click.testing import CliRunner

    from splade_obs_cli.main import cli
    from splade_obs.errors import EXIT_CODES, ErrorCategory

    data = write_beir(tmp_path / "beir", split="dev")
    res = CliRunner().invoke(cli, ["train", "--no-mlflow", "--output-dir", str(tmp_path / "out"),
                                   "--eval-data", str(data), "--eval-idf-power", "-0.5"])
    assert res.exit_code == EXIT_CODES[ErrorCategory.CONFIG_ERROR], res.output
    assert "eval.eval_idf_power" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "out" / "final").exists()


