"""``splade-obs fit`` end to end on a small BEIR folder the tests write: the dev split is held out of the teacher
and the trainer, the best checkpoint is chosen on dev, one MLflow run nests the seeds' runs, one trace holds every
stage, and a failed training stage resumes on the next ``fit`` without rebuilding the cached teacher file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from splade_obs.errors import EXIT_CODES, ErrorCategory
from splade_obs.fit_stages import dev_size
from splade_obs_cli.main import cli

DEMO = Path(__file__).resolve().parents[1] / "splade_obs" / "demo" / "retrieval"
SMALL = """
[model]
max_query_length = 16
max_doc_length = 48
[optim]
epochs = 1
batch_size = 8
"""


def _beir(root: Path) -> Path:
    """The demo retrieval set (101 queries over 253 documents) as train (70 queries) and test (31) splits."""
    root.mkdir(parents=True)
    shutil.copy(DEMO / "corpus.jsonl", root / "corpus.jsonl")
    shutil.copy(DEMO / "queries.jsonl", root / "queries.jsonl")
    head, *rows = (DEMO / "qrels" / "test.tsv").read_text().splitlines()
    (root / "qrels").mkdir()
    (root / "qrels" / "train.tsv").write_text("\n".join([head, *rows[:70]]) + "\n")
    (root / "qrels" / "test.tsv").write_text("\n".join([head, *rows[70:]]) + "\n")
    return root


def _fit(tmp_path: Path, *extra: str, config: str = SMALL):
    cfg = tmp_path / "small.toml"
    cfg.write_text(config)
    args = ["fit", "--data", str(tmp_path / "beir"), "--output-dir", str(tmp_path / "out"), "--config", str(cfg),
            "--dense-model", "none", "--progress", "none", "--tracking-uri",
            f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}", *extra]
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def _spans(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _client(tmp_path: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")


def test_dev_size_rule():
    assert [dev_size(n) for n in (2, 4, 5, 100, 809, 5000)] == [1, 1, 2, 25, 200, 200]


def test_fit_holds_dev_out_chooses_on_dev_and_reports_one_run_one_trace(tmp_path, tiny_model_path):
    _beir(tmp_path / "beir")
    result = _fit(tmp_path, "--seeds", "2")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    out = tmp_path / "out"
    state = json.loads((out / "fit_state.json").read_text())

    # the dev split: a quarter of the 70 train queries, never in the training qrels nor in the teacher file
    dev = set(state["stages"]["split"]["dev_queries"])
    assert len(dev) == dev_size(70) == 18
    train_qids = {line.split("\t")[0] for line in (out / "data" / "qrels" / "train.tsv").read_text().splitlines()[1:]}
    dev_qids = {line.split("\t")[0] for line in (out / "data" / "qrels" / "dev.tsv").read_text().splitlines()[1:]}
    assert dev_qids == dev and not train_qids & dev and len(train_qids) == 70 - 18
    texts = {str(q["_id"]): q["text"] for q in map(json.loads, (tmp_path / "beir" / "queries.jsonl").open())}
    teacher = [json.loads(line) for line in Path(report["teacher"]["file"]).open()]
    assert teacher and not {r["query"] for r in teacher} & {texts[q] for q in dev}
    assert {r["query"] for r in teacher} <= {texts[q] for q in train_qids}

    # each seed evaluated on dev during training, its best checkpoint kept; the choice is the best on dev
    for seed in ("seed-42", "seed-1"):
        best = json.loads((out / seed / "best" / "metrics.json").read_text())
        assert best["num_queries"] == len(dev)
        assert report["dev_ndcg@10_by_candidate"][seed] == pytest.approx(best["ndcg@10"])
    scores = report["dev_ndcg@10_by_candidate"]
    assert set(scores) == {"seed-42", "seed-1", "soup"}
    assert scores[report["chosen"]] == max(scores.values())
    assert (out / "model" / "model.safetensors").is_file()
    assert set(report["splits"]) == {"dev", "test"}
    for split in ("dev", "test"):
        assert set(report["splits"][split]["metrics"]) == {"fit", "zero-shot", "bm25-stemmed", "bm25"}
    assert report["splits"]["dev"]["metrics"]["fit"]["ndcg@10"] == pytest.approx(scores[report["chosen"]], abs=1e-6)

    # one MLflow run with the stages, its metrics and artifacts; a nested run per seed
    client = _client(tmp_path)
    parent = client.get_run(report["mlflow_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["splade.fit.chosen"] == report["chosen"]
    assert parent.data.params["fit.seeds"] == "2" and parent.data.params["fit.dense_model"] == "none"
    assert {k: v for k, v in parent.data.tags.items() if k.startswith("splade.fit.stage.")} == {
        "splade.fit.stage.split": "done", "splade.fit.stage.teacher": "built", "splade.fit.stage.train": "done",
        "splade.fit.stage.report": "done"}
    assert parent.data.metrics["test/fit/ndcg_at_10"] == pytest.approx(
        report["splits"]["test"]["metrics"]["fit"]["ndcg@10"])
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"fit_report.json", "fit_state.json"}
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in children) == sorted([f"{parent.info.run_name}-seed-42",
                                                               f"{parent.info.run_name}-seed-1"])
    assert all(r.data.params["eval.eval_split"] == "dev" for r in children)

    # one trace: the fit span, a span per stage, and each seed's run span under its train stage
    fit_spans = _spans(out / "logs" / "traces.jsonl")
    names = [s["name"] for s in fit_spans]
    assert sorted(names) == sorted(["fit", "fit.split", "fit.teacher", "fit.train", "fit.train", "fit.average",
                                    "fit.report"])
    trace_id = {s["context"]["trace_id"] for s in fit_spans}
    assert len(trace_id) == 1 and trace_id == {"0x" + report["trace_id"]}
    train_stages = {s["context"]["span_id"]: s["attributes"]["splade.fit.seed"] for s in fit_spans
                    if s["name"] == "fit.train"}
    for seed in (42, 1):
        root = next(s for s in _spans(out / f"seed-{seed}" / "logs" / "traces.jsonl") if s["name"] == "train")
        assert root["context"]["trace_id"] in trace_id and train_stages[root["parent_id"]] == seed


def test_a_failed_training_stage_resumes_reusing_the_cached_teacher(tmp_path, tiny_model_path):
    _beir(tmp_path / "beir")
    failing = SMALL + '[recovery]\ninject_faults = ["step:2:exception"]\n'
    first = _fit(tmp_path, config=failing)
    assert first.exit_code == EXIT_CODES[ErrorCategory.TRAINING_ERROR], first.output
    out = tmp_path / "out"
    state = json.loads((out / "fit_state.json").read_text())
    assert set(state["stages"]) == {"split", "teacher"} and not state["stages"]["teacher"]["reused"]
    teacher = Path(state["stages"]["teacher"]["file"])
    stamp = teacher.stat().st_mtime_ns
    failed_stage = next(s for s in _spans(out / "logs" / "traces.jsonl") if s["name"] == "fit.train")
    assert failed_stage["status"]["status_code"] == "ERROR"
    assert [e["attributes"]["error.category"] for e in failed_stage["events"]] == ["TRAINING_ERROR"]
    client = _client(tmp_path)
    assert client.get_run(state["mlflow_run_id"]).info.status == "FAILED"

    second = _fit(tmp_path)  # the fault gone: split and teacher are not redone
    assert second.exit_code == 0, second.output
    report = json.loads(second.stdout)
    assert report["teacher"]["reused"] is True and report["teacher"]["file"] == str(teacher)
    assert teacher.stat().st_mtime_ns == stamp
    assert report["mlflow_run_id"] == state["mlflow_run_id"]  # the same fit run, finished now
    run = client.get_run(state["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["splade.fit.stage.teacher"] == "reused"


def test_fit_refuses_a_folder_without_train_judgements_and_a_dev_split_that_leaves_nothing(tmp_path):
    root = _beir(tmp_path / "beir")
    kept = (root / "qrels" / "train.tsv").read_text()
    (root / "qrels" / "train.tsv").unlink()
    result = _fit(tmp_path)
    assert result.exit_code == EXIT_CODES[ErrorCategory.DATA_ERROR], result.output
    assert "qrels/train.tsv" in result.output and "Traceback" not in result.output
    (root / "qrels" / "train.tsv").write_text(kept)
    result = _fit(tmp_path, "--dev-queries", "70")
    assert result.exit_code == EXIT_CODES[ErrorCategory.DATA_ERROR], result.output
    assert "--dev-queries 70" in result.output and "Traceback" not in result.output
