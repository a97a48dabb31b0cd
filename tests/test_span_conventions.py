"""Spans that follow the OTel conventions and read well (issue 32, point 3).

* exception events: ``exception`` with a fully qualified ``exception.type``, ``exception.message``, a redacted
  ``exception.stacktrace`` and ``error.category``;
* batch spans named by their step (``batch 3``); the first batch is kept under ``every:N``;
* one batch numbering, 1-based, in the flag, the console, the spans and ``errors.jsonl``;
* the root records the outcome (ERROR on failure; health, degraded marker, skipped batches, errors by category);
* the epoch-end checkpoint span names the epoch it closes;
* ``OTEL_BSP_*`` are honoured when set, our defaults apply only when unset.

One real CLI run of splade-tiny over one whole (short) epoch with a batch fault serves most tests (module-scoped).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import StatusCode

from splade_obs.bus import EventBus
from splade_obs.errors import ErrorCategory, classify
from splade_obs.events import ErrorCaught, RunFinished, RunStarted, StepDone
from splade_obs.sinks.otel import OtelOptions, OtelSink
from splade_obs.sinks.otel.attributes import span_kind
from splade_obs.sinks.otel.exporters import BSP_DEFAULTS, bsp_settings, build_pipeline, build_resource
from tests.conftest import TINY_ARGS

DEMO = Path(__file__).resolve().parents[1] / "splade_obs" / "demo" / "train.jsonl"
EXAMPLES, BATCH = 24, 4                      # one epoch = 6 batches; batch 3 fails, so 5 optimizer steps
FAULT_BATCH = 3


class Boom(Exception):
    """A project-foreign exception class: its qualified name is this module's."""


# ------------------------------------------------------------------------------------------ one real run
@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """``splade-obs train`` over one whole epoch of 24 demo examples, ``--inject-fault batch:3:exception``,
    default ``--trace-batches`` (every:50), tracing to traces.jsonl, no MLflow."""
    from splade_obs_cli.main import cli

    root = tmp_path_factory.mktemp("conventions")
    train = root / "train.jsonl"
    train.write_text("".join(DEMO.read_text().splitlines(keepends=True)[:EXAMPLES]))
    out = root / "out"
    args = ["train", *TINY_ARGS, "--batch-size", str(BATCH), "--train-file", str(train), "--epochs", "1",
            "--output-dir", str(out), "--no-mlflow", "--progress", "none", "--json-logs",
            "--inject-fault", f"batch:{FAULT_BATCH}:exception"]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    logs = out / "logs"
    spans = [json.loads(line) for line in (logs / "traces.jsonl").read_text().splitlines()]
    errors = [json.loads(line) for line in (logs / "errors.jsonl").read_text().splitlines()]
    return {"output": result.output, "spans": spans, "errors": errors, "logs": logs}


def _kind(spans, kind):
    return [s for s in spans if span_kind(s["name"]) == kind]


def test_batch_spans_are_named_by_step_and_the_first_is_kept(real_run):
    """Under the default every:50 a 5-step run still shows its first batch, and the failed one."""
    batches = _kind(real_run["spans"], "batch")
    assert sorted(b["name"] for b in batches) == ["batch 1", f"batch {FAULT_BATCH}"]
    for b in batches:
        assert b["name"] == f"batch {b['attributes']['splade.step']}"
    (first,) = [b for b in batches if b["attributes"]["splade.trace.keep_reason"] == "first"]
    assert first["attributes"]["splade.batch_in_epoch"] == 1 and first["attributes"]["splade.train.loss"] > 0


def test_one_batch_numbering_in_flag_console_spans_and_errors_file(real_run):
    """``batch:3`` is batch 3 everywhere: the console line, errors.jsonl, the failed span and its event."""
    (err,) = real_run["errors"]
    assert (err["batch"], err["step"], err["batch_index"]) == (FAULT_BATCH, FAULT_BATCH, FAULT_BATCH - 1)
    assert err["context"]["batch"] == FAULT_BATCH
    lines = [line for line in real_run["output"].splitlines() if "skipped batch [TRAINING_ERROR]" in line]
    assert len(lines) == 1 and f"(step {FAULT_BATCH}, batch {FAULT_BATCH})" in lines[0], lines
    (failed,) = [b for b in _kind(real_run["spans"], "batch") if b["status"]["status_code"] == "ERROR"]
    a = failed["attributes"]
    assert failed["name"] == f"batch {FAULT_BATCH}" and a["splade.batch"] == FAULT_BATCH
    assert a["splade.batch_in_epoch"] == FAULT_BATCH and a["splade.step"] == FAULT_BATCH
    (ev,) = failed["events"]
    assert ev["attributes"]["splade.batch"] == FAULT_BATCH
    # the JSON log carries the same number
    records = [json.loads(line) for line in (real_run["logs"] / "train_splade.jsonl").read_text().splitlines()]
    (logged,) = [r for r in records if r.get("event") == "error_caught"]
    assert logged["batch"] == FAULT_BATCH and logged["step"] == FAULT_BATCH


def test_exception_event_follows_the_semantic_conventions(real_run):
    (failed,) = [b for b in _kind(real_run["spans"], "batch") if b["status"]["status_code"] == "ERROR"]
    (ev,) = failed["events"]
    a = ev["attributes"]
    assert ev["name"] == "exception"
    assert a["exception.type"] == "RuntimeError"                 # the original exception (a builtin: bare)
    assert a["exception.message"] == f"injected fault at batch {FAULT_BATCH}"
    assert a["error.category"] == "TRAINING_ERROR"
    trace = a["exception.stacktrace"]
    assert trace.startswith("Traceback (most recent call last)") and "faults.py" in trace
    assert "in before_batch" in trace and trace.rstrip().endswith(f"injected fault at batch {FAULT_BATCH}")
    (err,) = real_run["errors"]                                   # errors.jsonl has the same trace
    assert err["stacktrace"] == trace and err["exception_qualified_type"] == "RuntimeError"


def test_root_records_the_runs_outcome(real_run):
    (root,) = [s for s in real_run["spans"] if s["parent_id"] is None]
    a = root["attributes"]
    assert root["status"]["status_code"] == "UNSET"               # a skipped batch does not fail the run
    assert a["splade.health"] == "degraded" and a["splade.degraded"] is True
    assert a["splade.skipped_batches"] == 1 and a["splade.errors_by_category"] == "TRAINING_ERROR=1"


def test_epoch_end_checkpoint_names_the_epoch_it_closes(real_run):
    """A 1-epoch run: the epoch-end checkpoint resumes at epoch 2's start but closes epoch 1."""
    spans = real_run["spans"]
    (end,) = [s for s in _kind(spans, "checkpoint") if s["attributes"]["splade.checkpoint.reason"] == "epoch_end"]
    (epoch,) = _kind(spans, "epoch")
    assert end["attributes"]["splade.epoch"] == epoch["attributes"]["splade.epoch"] == 1
    assert end["attributes"]["splade.step"] == EXAMPLES // BATCH - 1      # every batch but the failed one stepped
    metrics = json.loads((real_run["logs"] / "training_metrics.json").read_text())
    assert [c["epoch"] for c in metrics["checkpoints"] if c["reason"] == "epoch_end"] == [1]


# ------------------------------------------------------------------------------------------ exception events
def _raise_boom(secret: str) -> None:
    raise Boom(f"cannot reach https://user:{secret}@example.invalid/x (token {secret})")


def _sink(tmp_path):
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    mem = InMemorySpanExporter()
    sink = OtelSink.create(OtelOptions(exporter="none", to_mlflow=False), log_dir=tmp_path, span_exporter=mem)
    bus = EventBus()
    bus.add(sink)
    bus.open()
    bus.emit(RunStarted(run_name="r", config={}, system_info={}, total_steps=2, num_epochs=1, steps_per_epoch=2))
    return bus, mem


def test_exception_stacktrace_is_qualified_and_redacted(tmp_path, monkeypatch):
    """A foreign exception, classified: qualified type of the original, its traceback, no secret in it."""
    secret = "sk-live-93fa0c1d77"
    monkeypatch.setenv("SPLADE_TEST_API_TOKEN", secret)
    try:
        _raise_boom(secret)
    except Boom as exc:
        err = classify(exc, ErrorCategory.DATA_ERROR, step=1)
    event = ErrorCaught.from_error(err, step=1, epoch=1, fatal=True)
    assert event.exception_qualified_type == "tests.test_span_conventions.Boom"
    assert "_raise_boom" in event.stacktrace                         # captured raw; sinks redact
    bus, mem = _sink(tmp_path)
    bus.emit(event)
    bus.emit(RunFinished(status="FAILED", step=1, duration_seconds=0.1, error=err.to_dict(),
                         counters={"errors/DATA_ERROR": 1}))
    bus.close()
    (root,) = [s for s in mem.get_finished_spans() if s.name == "train"]
    (ev,) = [e for e in root.events if e.name == "exception"]
    a = dict(ev.attributes)
    assert a["exception.type"] == "tests.test_span_conventions.Boom" and a["error.category"] == "DATA_ERROR"
    assert "_raise_boom" in a["exception.stacktrace"] and "Traceback" in a["exception.stacktrace"]
    for value in a.values():
        assert secret not in str(value)
    assert "https://***@example.invalid" in a["exception.stacktrace"]
    assert root.status.status_code is StatusCode.ERROR                 # the run failed: its root says so
    r = dict(root.attributes)
    assert r["splade.health"] == "failed" and r["splade.degraded"] is False and r["splade.skipped_batches"] == 0
    assert r["splade.errors_by_category"] == "DATA_ERROR=1"


def test_an_error_never_raised_has_no_stacktrace_attribute(tmp_path):
    """A non-finite loss is reported without a raise: no frames, so no (empty) stack trace attribute."""
    from splade_obs.errors import TrainingError

    event = ErrorCaught.from_error(TrainingError("non-finite loss", loss=float("nan"), batch=2), step=2, epoch=1,
                                   batch_index=1, skipped_batch=True, start_ns=time.time_ns())
    assert event.stacktrace is None and event.batch == 2
    assert event.exception_qualified_type == "splade_obs.errors.TrainingError"
    bus, mem = _sink(tmp_path)
    bus.emit(event)
    bus.close()
    (failed,) = [s for s in mem.get_finished_spans() if span_kind(s.name) == "batch"]
    (ev,) = failed.events
    assert "exception.stacktrace" not in ev.attributes
    assert ev.attributes["splade.context.loss"] == "nan"              # never a raw NaN (see test_strict_json)


# ------------------------------------------------------------------------------------------ OTEL_BSP_*
def test_bsp_settings_env_wins_over_defaults(monkeypatch):
    for var in ("OTEL_BSP_MAX_QUEUE_SIZE", "OTEL_BSP_SCHEDULE_DELAY", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
                "OTEL_BSP_EXPORT_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)
    assert bsp_settings() == BSP_DEFAULTS
    assert bsp_settings(max_queue_size=64)["max_queue_size"] == 64          # a caller's value, env unset
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "100000")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "250")
    got = bsp_settings(max_queue_size=64)
    assert got["max_queue_size"] == 100000 and got["schedule_delay_millis"] == 250   # the env wins
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "zero")                   # unreadable: the default, no crash
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "4096")            # larger than the queue: cut to it
    got = bsp_settings()
    assert got["max_queue_size"] == BSP_DEFAULTS["max_queue_size"]
    assert got["max_export_batch_size"] == BSP_DEFAULTS["max_queue_size"]


class _GatedExporter(SpanExporter):
    """Holds its first export until released (a slow collector); records the size of every export."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.gate = threading.Event()

    def export(self, spans):
        self.gate.wait(10)
        self.sizes.append(len(spans))
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.gate.set()


def _steps_through_gated_exporter(tmp_path, n: int) -> _GatedExporter:
    gated = _GatedExporter()
    pipeline = build_pipeline(build_resource(None))
    pipeline.add("gated", gated)                                              # a BatchSpanProcessor
    sink = OtelSink(OtelOptions(exporter="none", to_mlflow=False, trace_batches="all"), pipeline)
    bus = EventBus()
    bus.add(sink)
    bus.open()
    bus.emit(RunStarted(run_name="r", config={}, system_info={}, total_steps=n, num_epochs=1, steps_per_epoch=n))
    t = time.time_ns()
    for i in range(1, n + 1):
        bus.emit(StepDone(step=i, epoch=1, batch_index=i - 1, loss=1.0, parts={}, learning_rate=1e-4, grad_norm=1.0,
                          batch_size=4, num_tokens=10, samples_per_second=1.0, tokens_per_second=1.0, query_nnz=1.0,
                          doc_nnz=1.0, retrieval_flops=1.0, start_ns=t + i, end_ns=t + i + 1))
    time.sleep(0.3)                                          # the worker took its first batch and waits on the gate
    gated.gate.set()
    bus.emit(RunFinished(status="FINISHED", step=n, duration_seconds=0.1))
    bus.close()
    return gated


def test_otel_bsp_variables_reach_the_span_processor(tmp_path, monkeypatch):
    """With OTEL_BSP_MAX_QUEUE_SIZE=8 / MAX_EXPORT_BATCH_SIZE=4 / SCHEDULE_DELAY=50 and a stalled collector,
    exports hold at most 4 spans and most of 60 spans are dropped by the small queue; unset, all arrive."""
    for var in ("OTEL_BSP_MAX_QUEUE_SIZE", "OTEL_BSP_SCHEDULE_DELAY", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE"):
        monkeypatch.delenv(var, raising=False)
    roomy = _steps_through_gated_exporter(tmp_path / "a", 60)
    assert sum(roomy.sizes) == 61                                    # 60 batches + the root: the default queue
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "8")
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "4")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    tight = _steps_through_gated_exporter(tmp_path / "b", 60)
    assert tight.sizes and max(tight.sizes) <= 4
    assert sum(tight.sizes) <= 4 + 8 + 1                             # in flight + a full queue + the root
