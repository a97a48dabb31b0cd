"""Logs joined to traces and runs: every JSON log line (and every OTLP log record) carries the run's trace id,
the id of a span that encloses it and exists in traces.jsonl, and the MLflow run id.

One real short run (splade-tiny, sqlite MLflow store, a skipped batch, ``--otel-logs`` to the OTLP receiver) is
shared by the module; the dead-collector test configures logging alone.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest

from splade_obs.config import TrainConfig
from splade_obs.log_context import CONTEXT
from splade_obs.logging_setup import setup_logging, teardown_logging
from splade_obs.run import run_training
from tests._otlp_receiver import OtlpReceiver

FAILED_BATCH = 3


def _strict(line: str) -> Any:
    def refuse(value: str) -> Any:
        raise ValueError(f"non-finite constant {value} in {line[:80]}")

    return json.loads(line, parse_constant=refuse)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("logjoin")
    mp = pytest.MonkeyPatch()
    rx = OtlpReceiver().start()
    try:
        mp.setenv("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", f"{rx.endpoint}/v1/logs")  # logs only: spans stay in files
        mp.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
        mp.delenv("OTEL_SDK_DISABLED", raising=False)
        mp.setenv("OTEL_BLRP_SCHEDULE_DELAY", "200")
        uri = f"sqlite:///{root / 'mlflow.db'}"
        cfg = TrainConfig.from_mapping({
            "checkpoint": {"output_dir": str(root / "out")},
            "optim": {"batch_size": 4, "max_steps": 6, "seed": 7},
            "model": {"max_query_length": 16, "max_doc_length": 32},
            "tracking": {"tracking_uri": uri, "experiment_name": "logjoin"},
            "tracing": {"exporter": "file", "trace_batches": "every:4", "otel_logs": True},
            "logging": {"progress": "none", "json_logs": True, "log_every_steps": 2},
            "recovery": {"inject_faults": [f"batch:{FAILED_BATCH}:data"]},
        })
        result = run_training(cfg)
        log_dir = Path(cfg.log_dir)
        lines = [_strict(x) for x in (log_dir / "train_splade.jsonl").read_text().splitlines()]
        spans = [json.loads(x) for x in (log_dir / "traces.jsonl").read_text().splitlines()]
        rx.wait_for_logs(lambda logs: any("Run finished" in str(r.body) for r in logs), timeout=10)
        import mlflow

        runs = mlflow.MlflowClient(uri).search_runs(
            [mlflow.MlflowClient(uri).get_experiment_by_name("logjoin").experiment_id])
        yield {"result": result, "lines": lines, "spans": spans, "otlp": rx.log_snapshot(),
               "mlflow_run_ids": [r.info.run_id for r in runs], "log_dir": log_dir}
    finally:
        rx.stop()
        mp.undo()


def _span_ids(spans: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {s["context"]["span_id"].removeprefix("0x"): s for s in spans}


def _trace_ids(spans: list[dict[str, Any]]) -> set[str]:
    return {s["context"]["trace_id"].removeprefix("0x") for s in spans}


def _joined(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The lines from the first one that has the trace on (the run opened)."""
    first = next(i for i, d in enumerate(lines) if "trace_id" in d)
    return lines[first:]


def test_every_json_line_carries_the_trace_a_real_span_and_the_mlflow_run(run):
    assert run["result"].status == "FINISHED"
    (trace_id,) = _trace_ids(run["spans"])
    (run_id,) = run["mlflow_run_ids"]
    assert run["result"].ids.mlflow_run_id == run_id
    spans = _span_ids(run["spans"])
    joined = _joined(run["lines"])
    assert len(joined) >= 8 and len(joined) >= len(run["lines"]) - 2   # at most MLflow's own opening lines before
    for d in joined:
        assert d["trace_id"] == trace_id, d
        assert d["run_id"] == run_id, d
        assert d["span_id"] in spans, d                                   # never the id of a span never exported
    names = {spans[d["span_id"]]["name"] for d in joined}
    assert {"train", "epoch"} <= names
    epoch_line = next(d for d in joined if d["message"].startswith("Step "))
    assert spans[epoch_line["span_id"]]["name"] == "epoch"               # logged during the epoch's batches


def test_lines_about_the_failed_batch_carry_its_error_span(run):
    spans = _span_ids(run["spans"])
    failed = [d for d in run["lines"] if d.get("batch") == FAILED_BATCH and d.get("skipped_batch")]
    assert failed, "the skipped batch was not logged"
    for d in failed:
        span = spans[d["span_id"]]
        assert span["name"].startswith("batch ") and span["status"]["status_code"] == "ERROR", span
        assert span["attributes"]["splade.batch"] == FAILED_BATCH
    # the lines of healthy (sampled or not) batches never name a batch span: they were built after the batch
    others = [d for d in _joined(run["lines"]) if d not in failed]
    assert all(not spans[d["span_id"]]["name"].startswith("batch") for d in others)


def test_otlp_log_records_carry_the_same_ids(run):
    (trace_id,) = _trace_ids(run["spans"])
    (run_id,) = run["mlflow_run_ids"]
    spans = _span_ids(run["spans"])
    records = [r for r in run["otlp"] if r.trace_id]
    assert records, "no log record reached the receiver"
    json_by_message = {d["message"]: d for d in _joined(run["lines"])}
    seen = 0
    for r in records:
        assert r.trace_id == trace_id and r.span_id in spans, r
        assert r.attributes["mlflow.run_id"] == run_id
        if r.body in json_by_message:                                    # the same line in both: the same span
            assert json_by_message[r.body]["span_id"] == r.span_id
            seen += 1
    assert seen >= 5
    failed = [r for r in records if str(r.body).startswith("skipped batch")]
    assert failed and failed[0].severity_text == "WARN" and spans[failed[0].span_id]["name"].startswith("batch ")
    assert any(r.resource.get("service.name") for r in records)


def test_plain_log_file_is_unchanged(run):
    """The ids go to the JSON log and OTLP only: the plain log keeps its ``[LEVEL] time - name - message`` lines."""
    (trace_id,) = _trace_ids(run["spans"])
    text = (run["log_dir"] / "train_splade.log").read_text()
    assert "Epoch 1/1" in text and trace_id not in text
    assert all(line.startswith("[") for line in text.splitlines() if line and not line.startswith((" ", "\t")))


def test_otlp_log_shutdown_is_bounded_with_a_dead_collector(tmp_path, monkeypatch):
    rx = OtlpReceiver().start()
    endpoint = rx.endpoint
    rx.stop()                                                            # the collector is gone
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", f"{endpoint}/v1/logs")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "30")               # the exporter alone would retry 30 s
    monkeypatch.delenv("OTEL_SDK_DISABLED", raising=False)
    setup_logging("INFO", tmp_path / "logs", json_logs=True, otel_logs=True, otel_logs_timeout=1.0)
    try:
        CONTEXT.set_trace("00-" + "ab" * 16 + "-" + "cd" * 8 + "-01")
        for i in range(50):
            logging.getLogger("splade_obs.test").info("line %d", i)
    finally:
        t0 = time.monotonic()
        teardown_logging()
        took = time.monotonic() - t0
    assert took < 1.0 + 0.7, took
    lines = [_strict(x) for x in (tmp_path / "logs" / "train_splade.jsonl").read_text().splitlines()]
    assert lines[0]["trace_id"] == "ab" * 16 and lines[0]["span_id"] == "cd" * 8
    assert CONTEXT.ids() == {}                                           # teardown forgets the run's ids


def test_log_exporter_follows_the_otlp_protocol():
    from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter as Grpc
    from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter as Http

    from splade_obs.sinks.otel.logs import otlp_log_exporter

    assert isinstance(otlp_log_exporter({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}), Grpc)
    assert isinstance(otlp_log_exporter({"OTEL_EXPORTER_OTLP_LOGS_PROTOCOL": "grpc",
                                         "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}), Grpc)
    assert isinstance(otlp_log_exporter({}), Http)
