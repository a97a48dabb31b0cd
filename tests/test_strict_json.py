"""Non-finite numbers never reach an output raw (issue 32, point 3; the rule is :mod:`splade_obs.finite`).

A real NaN-loss run (``--inject-fault batch:2:nan``: the trainer skips that step and goes on) writes every
output — traces.jsonl, the JSON and plain logs, training_metrics.json, errors.jsonl, system_info.json, the MLflow
run's tags and the trace MLflow stores — and each one is parsed with a strict JSON parser that refuses
``NaN`` / ``Infinity``. The NaN itself is still there, as the string ``"nan"``.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from splade_obs import finite
from splade_obs.bus import EventBus
from splade_obs.events import EpochDone, RunFinished, RunStarted
from splade_obs.logging_setup import JsonFormatter
from splade_obs.sinks.metrics_file import MetricsFileSink
from splade_obs.sinks.otel.attributes import span_kind
from tests.conftest import TINY_ARGS

BARE_NON_FINITE = re.compile(r"(?<![\w\"])-?(NaN|Infinity)(?![\w\"])")


def _refuse(token: str) -> Any:
    raise ValueError(f"non-standard JSON constant {token}")


def strict(text: str) -> Any:
    """``json.loads`` that refuses NaN, Infinity and -Infinity (as jq and JavaScript do)."""
    return json.loads(text, parse_constant=_refuse)


def strict_lines(path: Path) -> list[Any]:
    return [strict(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_strict_parser_refuses_what_python_writes_by_default():
    """The parser of these tests can fail: Python's own json.dumps output is refused."""
    with pytest.raises(ValueError):
        strict(json.dumps({"loss": float("nan")}))
    with pytest.raises(ValueError):
        strict(json.dumps([float("-inf")]))


# ------------------------------------------------------------------------------------------ one real run
@pytest.fixture(scope="module")
def nan_run(tmp_path_factory):
    from splade_obs_cli.main import cli

    root = tmp_path_factory.mktemp("strict")
    out, db = root / "out", root / "mlflow.db"
    args = ["train", *TINY_ARGS, "--max-steps", "4", "--output-dir", str(out), "--progress", "none",
            "--json-logs", "--trace-batches", "all", "--tracking-uri", f"sqlite:///{db}",
            "--inject-fault", "batch:2:nan"]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return {"logs": out / "logs", "db": db, "uri": f"sqlite:///{db}"}


def test_every_output_file_of_a_nan_loss_run_is_strict_json(nan_run):
    logs: Path = nan_run["logs"]
    names = {p.name for p in logs.iterdir()}
    assert {"traces.jsonl", "train_splade.jsonl", "training_metrics.json", "errors.jsonl",
            "system_info.json"} <= names
    parsed = 0
    for path in sorted(logs.rglob("*")):
        if path.suffix == ".jsonl":
            assert strict_lines(path), path
            parsed += 1
        elif path.suffix == ".json":
            strict(path.read_text(encoding="utf-8"))
            parsed += 1
        elif path.suffix == ".log":                 # plain text: still no bare NaN token that could be mistaken
            assert not BARE_NON_FINITE.search(path.read_text(encoding="utf-8")), path
    assert parsed >= 5
    # the trainer skipped the NaN step and the run went on
    metrics = strict((logs / "training_metrics.json").read_text())
    assert metrics["status"] == "FINISHED" and metrics["metrics_by_epoch"]["1"]["skipped_batches"] == 1


def test_the_nan_is_kept_as_text_where_it_is_reported(nan_run):
    """The NaN loss is the finding: errors.jsonl, the JSON log and the failed batch's span event say "nan"."""
    logs: Path = nan_run["logs"]
    (err,) = strict_lines(logs / "errors.jsonl")
    assert err["context"]["loss"] == "nan" and err["batch"] == 2 and err["skipped_batch"] is True
    (logged,) = [r for r in strict_lines(logs / "train_splade.jsonl") if r.get("event") == "error_caught"]
    assert logged["context"]["loss"] == "nan"
    spans = strict_lines(logs / "traces.jsonl")
    (failed,) = [s for s in spans if span_kind(s["name"]) == "batch" and s["status"]["status_code"] == "ERROR"]
    (ev,) = failed["events"]
    assert ev["name"] == "exception" and ev["attributes"]["splade.context.loss"] == "nan"


def test_mlflow_tags_and_stored_trace_are_strict(nan_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(nan_run["uri"])
    (exp,) = [e for e in client.search_experiments() if e.name != "Default"] or client.search_experiments()
    (run,) = client.search_runs([exp.experiment_id])
    tags = run.data.tags
    assert tags["splade.status"] == "FINISHED" and tags["splade.health"] == "degraded"
    for key, value in tags.items():
        assert not BARE_NON_FINITE.search(value), key
        if value[:1] in "{[":
            strict(value)
    with sqlite3.connect(nan_run["db"]) as con:
        rows = con.execute("SELECT content FROM spans").fetchall()
    assert rows                                     # the trace is in MLflow's store
    contents = [strict(content) for (content,) in rows]
    assert any("batch 2" == c.get("name") for c in contents)


# ------------------------------------------------------------------------------------------ each writer
def test_json_safe_words():
    doc = {"a": float("nan"), "b": [float("inf"), -math.inf, 1.5], "c": (1, {"d": float("-inf")}), "e": "NaN"}
    assert finite.json_safe(doc) == {"a": "nan", "b": ["inf", "-inf", 1.5], "c": [1, {"d": "-inf"}], "e": "NaN"}
    assert strict(finite.dumps(doc)) == finite.json_safe(doc)
    assert strict(finite.dumps({"p": Path("/x"), "n": 3})) == {"p": "/x", "n": 3}     # unknown types: text


def test_metrics_file_and_system_info_write_non_finite_as_text(tmp_path):
    sink = MetricsFileSink(tmp_path, interval=0.0)
    bus = EventBus([sink])
    bus.emit(RunStarted(run_name="r", config={}, system_info={"gpu_memory_gb": float("inf"), "cpus": 2},
                        total_steps=2, num_epochs=1, steps_per_epoch=2, log_dir=str(tmp_path)))
    bus.emit(EpochDone(epoch=1, num_epochs=1, step=2, duration_seconds=1.0,
                       means={"epoch/loss": float("nan"), "epoch/grad_norm": float("inf")}))
    bus.emit(RunFinished(status="FINISHED", step=2, duration_seconds=1.0, final_metrics={"epoch/loss": float("nan")}))
    bus.close()
    doc = strict((tmp_path / "training_metrics.json").read_text())
    assert doc["metrics_by_epoch"]["1"]["train_loss"] == "nan" and doc["metrics_by_epoch"]["1"]["grad_norm"] == "inf"
    assert doc["final_metrics"]["train_loss"] == "nan"
    assert strict((tmp_path / "system_info.json").read_text())["gpu_memory_gb"] == "inf"


def test_json_log_formatter_writes_non_finite_as_text():
    record = logging.LogRecord("splade_obs.train", logging.INFO, __file__, 1, "Step 1", (), None)
    record.metrics = {"train/loss": float("nan"), "train/grad_norm": float("-inf")}
    doc = strict(JsonFormatter().format(record))
    assert doc["metrics"] == {"train/loss": "nan", "train/grad_norm": "-inf"}
