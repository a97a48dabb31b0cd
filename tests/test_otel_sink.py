"""The OpenTelemetry sink: span tree, sampling, errors as span events, metric attribute names, the ids it
exchanges with other sinks by event, bounded shutdown.

First from synthetic event sequences (fast, exact), then from real short runs of splade-tiny through
``run_training`` with the SDK's ``InMemorySpanExporter`` injected.
"""

from __future__ import annotations

import ast
import json
import logging
import threading
import time
from pathlib import Path

import pytest
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode, format_span_id, format_trace_id

from splade_obs.config import TrainConfig
from splade_obs.bus import EventBus, RecordingSink, RunIds, Sink
from splade_obs.events import (DataLoaded, EpochDone, EpochStarted, ErrorCaught, EvaluationDone, CheckpointSaved,
                               ModelLoaded, RetryAttempt, RunFinished, RunStarted, SinkDegraded, StepDone,
                               TrackingRunOpened)
from splade_obs.redaction import redact
from splade_obs.sinks.otel import METRIC_SPANS, BatchSampler, MlflowOtlpExporter, OtelOptions, OtelSink, attribute_name
from splade_obs.sinks.otel.attributes import span_kind

MS = 1_000_000
#: RunStarted.config as the trainer sends it: the nested, redacted config
CONFIG = redact(TrainConfig().replace(optim={"batch_size": 4, "learning_rate": 2e-5}).to_dict())
OTEL_PACKAGE = Path(__file__).resolve().parents[1] / "splade_obs" / "sinks" / "otel"


def make_sink(tmp_path: Path, exporter: str = "none", *, rank: int = 0, world_size: int = 1, before=(), after=(),
              **options) -> tuple[OtelSink, InMemorySpanExporter, EventBus, RunIds]:
    """An opened bus with ``before`` sinks, the otel sink (memory exporter injected), ``after`` sinks, RunIds."""
    mem = InMemorySpanExporter()
    bus = EventBus(rank=rank)
    options.setdefault("to_mlflow", False)  # MLflow export is on by default; these tests ask for it when they test it
    sink = OtelSink.create(OtelOptions(exporter=exporter, **options), log_dir=tmp_path / "logs", rank=rank,
                           world_size=world_size, span_exporter=mem)
    assert sink is not None
    ids = RunIds()
    for s in (*before, sink, *after, ids):
        bus.add(s)
    bus.open()
    return sink, mem, bus, ids


class FakeTracking(Sink):
    """Announces an MLflow run when the bus opens (as the MLflow sink does), or later with ``announce``."""

    name = "fake_tracking"

    def __init__(self, uri: str = "sqlite:///mlruns.db", at_open: bool = True) -> None:
        self.uri, self.at_open, self.bus = uri, at_open, None

    def open(self, bus) -> None:
        self.bus = bus
        if self.at_open:
            self.announce()

    def announce(self) -> None:
        self.bus.emit(TrackingRunOpened(run_id="abc123", experiment_id="7", tracking_uri=self.uri))


def step(n: int, start: int, dur_ms: float = 10, epoch: int = 1) -> StepDone:
    return StepDone(step=n, epoch=epoch, batch_index=n - 1, loss=1.0 / n, parts={"base": 0.9 / n, "query_reg": 0.01},
                    learning_rate=1e-4, grad_norm=0.5, batch_size=4, num_tokens=100 + n, samples_per_second=40.0,
                    tokens_per_second=1000.0, query_nnz=20.0, doc_nnz=60.0, retrieval_flops=1.5, start_ns=start,
                    end_ns=start + int(dur_ms * MS), timings={"forward": 0.004, "backward": 0.005, "optimizer": 0.001},
                    lambda_q=5e-4, lambda_d=3e-4, time_ns=start + int(dur_ms * MS))


def run_synthetic(bus: EventBus, *, steps: int = 4, fail_batch: int | None = None, status: str = "FINISHED",
                  slow_step: int | None = None) -> int:
    """A realistic run: data and model load, one epoch of ``steps`` steps, eval, checkpoint, finish."""
    t = time.time_ns()
    bus.emit(DataLoaded(split="train", source="demo.jsonl", num_examples=16, digest="d1", start_ns=t, end_ns=t + 5 * MS,
                        fmt="jsonl", time_ns=t + 5 * MS))
    bus.emit(RunStarted(run_name="r1", config=CONFIG, system_info={"device": "cpu"}, total_steps=steps, num_epochs=1,
                        steps_per_epoch=steps, model_name="splade-tiny", time_ns=t + 6 * MS))
    bus.emit(ModelLoaded(name="splade-tiny", path="/m", num_parameters=4_400_000, device="cpu", amp_dtype="float32",
                         start_ns=t + 6 * MS, end_ns=t + 9 * MS, time_ns=t + 9 * MS))
    t0 = t + 10 * MS
    bus.emit(EpochStarted(epoch=1, num_epochs=1, steps_in_epoch=steps, time_ns=t0))
    cur = t0
    for n in range(1, steps + 1):
        if fail_batch == n:
            bus.emit(ErrorCaught(category="TRAINING_ERROR", message="injected fault at batch 2",
                                 error_type="TrainingError", exception_type="RuntimeError", exception_message="boom",
                                 context={"batch": n, "api_token": "s3cr3t"}, step=n, epoch=1, batch_index=n - 1,
                                 batch=n, skipped_batch=True, start_ns=cur, time_ns=cur + 3 * MS,
                                 counts={"TRAINING_ERROR": 1}, skipped_batches=1))
            cur += 3 * MS
            continue
        dur = 100 if n == slow_step else 10
        bus.emit(step(n, cur, dur))
        cur += int(dur * MS)
    bus.emit(RetryAttempt(operation="mlflow.log_batch", attempt=1, max_attempts=3, delay_seconds=0.5,
                          category="DEPENDENCY_ERROR", message="503", time_ns=cur))
    bus.emit(EvaluationDone(step=steps, epoch=1, split="test", scores={"ndcg@10": 0.5}, duration_seconds=0.002,
                            start_ns=cur, time_ns=cur + 2 * MS))
    bus.emit(EpochDone(epoch=1, num_epochs=1, step=steps, duration_seconds=0.05, means={"epoch/loss": 0.7,
                       "epoch/lr": 1e-4}, val_loss=0.8, start_ns=t0, time_ns=cur + 3 * MS))
    bus.emit(CheckpointSaved(step=steps, epoch=1, path="/ckpt", reason="epoch_end", duration_seconds=0.001,
                             start_ns=cur + 3 * MS, time_ns=cur + 4 * MS))
    err = {"category": "TRAINING_ERROR", "message": "too many failed batches"} if status == "FAILED" else None
    counters = {"errors/TRAINING_ERROR": 1, "train/skipped_batches": 1} if fail_batch else {}
    bus.emit(RunFinished(status=status, step=steps, duration_seconds=0.1, error=err, time_ns=cur + 5 * MS,
                         final_metrics={"epoch/loss": 0.7, "val/loss": 0.8, "eval/ndcg_at_10": 0.5}, counters=counters))
    return t


def by_name(spans, name):
    """Spans of one kind: ``batch`` matches ``batch 17`` (batch spans are named by their step)."""
    return [s for s in spans if span_kind(s.name) == name]


# ------------------------------------------------------------------------------------------ synthetic
def test_span_tree_sampling_and_attributes(tmp_path):
    sink, mem, bus, ids = make_sink(tmp_path, trace_batches="every:2", before=[FakeTracking()])
    t = run_synthetic(bus, steps=4)
    bus.close()
    spans = mem.get_finished_spans()
    (root,) = by_name(spans, "train")
    (epoch,) = by_name(spans, "epoch")
    batches = by_name(spans, "batch")
    assert root.parent is None
    assert sorted(b.attributes["splade.step"] for b in batches) == [1, 2, 4]    # the first, then every:2
    assert sorted(b.name for b in batches) == ["batch 1", "batch 2", "batch 4"]  # named by their step
    # the checkpoint is saved after EpochDone, so it hangs off the root like the loads
    for child in (epoch, *by_name(spans, "data.load"), *by_name(spans, "model.load"), *by_name(spans, "checkpoint")):
        assert child.parent.span_id == root.context.span_id
    for child in (*batches, *by_name(spans, "evaluation")):
        assert child.parent.span_id == epoch.context.span_id
    assert {s.context.trace_id for s in spans} == {root.context.trace_id}
    # exact times come from the events: the data load happened before RunStarted and still sits inside the root
    (data,) = by_name(spans, "data.load")
    assert data.start_time == t and root.start_time == t
    b2 = next(b for b in batches if b.attributes["splade.step"] == 2)
    assert b2.end_time - b2.start_time == 10 * MS
    attrs = dict(b2.attributes)
    # context attributes keep their names; metrics are splade.<canonical name with / as .>
    assert attrs["splade.batch_size"] == 4 and attrs["splade.tokens"] == 102 and attrs["splade.epoch"] == 1
    assert attrs["splade.train.lr"] == 1e-4 and attrs["splade.train.loss"] == 0.5
    assert attrs["splade.train.forward_seconds"] == 0.004 and attrs["splade.train.base"] == pytest.approx(0.45)
    assert attrs["splade.train.retrieval_flops"] == 1.5 and attrs["splade.train.lambda_q"] == 5e-4
    assert attrs["splade.trace.keep_reason"] == "sampled"
    for old in ("splade.loss", "splade.lr", "splade.loss.base", "splade.time.forward_s", "splade.flops",
                "splade.lambda_q", "splade.grad_scale"):
        assert old not in attrs
    r = dict(root.attributes)
    assert r["splade.model.name"] == "splade-tiny" and r["splade.optim.batch_size"] == 4
    assert r["splade.optim.learning_rate"] == 2e-5 and r["splade.total_steps"] == 4
    assert r["splade.data.train_file"] == "demo" and r["splade.trace.batches"] == "every:2"
    assert r["splade.loss.lambda_q"] == 5e-4 and "splade.optim.max_steps" not in r      # None: no attribute
    assert r["mlflow.run_id"] == "abc123" and r["mlflow.experiment_id"] == "7"
    assert r["splade.rank"] == 0 and r["splade.status"] == "FINISHED"
    assert r["splade.trace.batches_kept"] == 3 and r["splade.trace.batches_sampled_out"] == 1
    # the run's final metrics on the root, by the same rule
    assert r["splade.epoch.loss"] == 0.7 and r["splade.val.loss"] == 0.8 and r["splade.eval.ndcg_at_10"] == 0.5
    assert r["splade.run.duration_seconds"] == 0.1
    assert not [k for k in r if k.startswith(("splade.final.", "splade.counter."))]
    e = dict(epoch.attributes)
    assert e["splade.val.loss"] == 0.8 and e["splade.epoch.loss"] == 0.7 and e["splade.epoch.lr"] == 1e-4
    assert e["splade.epoch.duration_seconds"] == 0.05 and e["splade.epoch.skipped_batches"] == 0
    assert "splade.epoch.complete" not in e and "splade.val_loss" not in e and "splade.train_loss" not in e
    (ev,) = by_name(spans, "evaluation")
    assert ev.attributes["splade.eval.ndcg_at_10"] == 0.5 and ev.attributes["splade.eval.duration_seconds"] == 0.002
    assert ev.attributes["splade.eval.split"] == "test" and "splade.duration_s" not in ev.attributes
    (ck,) = by_name(spans, "checkpoint")
    assert ck.attributes["splade.checkpoint.duration_seconds"] == 0.001
    assert ck.attributes["splade.checkpoint.reason"] == "epoch_end"
    assert root.status.status_code is StatusCode.UNSET
    assert [e.name for e in root.events] == ["splade.retry"]
    # the trace id and traceparent are announced (TraceOpened) for the other sinks (MLflow tag) and other ranks
    assert ids.trace_id == format_trace_id(root.context.trace_id)
    version, trace_id, span_id, flags = ids.traceparent.split("-")
    assert (version, trace_id, span_id) == ("00", format_trace_id(root.context.trace_id),
                                            format_span_id(root.context.span_id))
    assert int(flags, 16) & 0x01                                         # sampled
    assert sink.stats["dropped"] == {"injected": 0}


def test_attribute_name_rule():
    assert attribute_name("train/loss") == "splade.train.loss"
    assert attribute_name("epoch/loss") == "splade.epoch.loss"
    assert attribute_name("eval/ndcg_at_10") == "splade.eval.ndcg_at_10"
    assert attribute_name("errors/DATA_ERROR") == "splade.errors.DATA_ERROR"
    assert attribute_name("train/distill_margin_mse") == "splade.train.distill_margin_mse"
    assert METRIC_SPANS == {"batch": StepDone, "epoch": EpochDone, "evaluation": EvaluationDone,
                            "checkpoint": CheckpointSaved, "train": RunFinished}


def test_trace_id_is_announced_when_the_bus_opens(tmp_path):
    """Sinks that start before RunStarted reaches the tracer (MLflow tags) already have the trace id."""
    sink, mem, bus, ids = make_sink(tmp_path)
    early = ids.trace_id, ids.traceparent
    assert early[0] and early[1]
    run_synthetic(bus)
    bus.close()
    (root,) = by_name(mem.get_finished_spans(), "train")
    assert early[0] == format_trace_id(root.context.trace_id)
    assert early[1].split("-")[2] == format_span_id(root.context.span_id)
    assert (ids.trace_id, ids.traceparent) == early


def _short_run(bus: EventBus, middle=lambda: None) -> None:
    t = time.time_ns()
    bus.emit(DataLoaded(split="train", source="demo.jsonl", num_examples=16, digest="d1", start_ns=t, end_ns=t + MS,
                        time_ns=t + MS))
    bus.emit(RunStarted(run_name="r", config=CONFIG, system_info={}, total_steps=1, num_epochs=1, steps_per_epoch=1,
                        time_ns=t + 2 * MS))
    middle()
    bus.emit(RunFinished(status="FINISHED", step=1, duration_seconds=0.1, time_ns=t + 3 * MS))


@pytest.mark.parametrize("order", ["tracking sink first", "tracking sink last", "announced after RunStarted"])
def test_mlflow_run_links_whatever_the_sink_order(tmp_path, caplog, order):
    """The MLflow run announced by TrackingRunOpened reaches the root attributes and the MLflow OTLP exporter
    (its /v1/traces with x-mlflow-* headers: here a local OTLP receiver stands in for the server). The receiver
    has no REST API, so finishing the trace there (run link, name) fails: one warning, the spans are delivered."""
    from tests._otlp_receiver import OtlpReceiver

    with OtlpReceiver() as rx, caplog.at_level(logging.WARNING, logger="splade_obs.sinks.otel"):
        fake = FakeTracking(uri=rx.endpoint, at_open=order != "announced after RunStarted")
        where = {"before": [fake]} if order == "tracking sink first" else {"after": [fake]}
        sink, mem, bus, ids = make_sink(tmp_path, to_mlflow=True, **where)
        _short_run(bus, middle=fake.announce if not fake.at_open else lambda: None)
        bus.close()
        received = rx.snapshot()
    (root,) = by_name(mem.get_finished_spans(), "train")
    assert dict(root.attributes)["mlflow.run_id"] == "abc123"
    assert dict(root.attributes)["mlflow.experiment_id"] == "7"
    assert dict(root.attributes)["mlflow.traceTag.mlflow.traceName"] == "r"     # the trace's name at ingest
    assert [n for n, _, _ in sink.pipeline.processors] == ["injected", "mlflow"]
    assert [s.name for s in received].count("train") == 1
    assert rx.requests and all(h["x-mlflow-experiment-id"] == "7" and h["x-mlflow-run-id"] == "abc123"
                               for h in rx.requests)
    if fake.at_open:                                     # known before the first span: the whole trace went
        assert sorted(s.name for s in received) == ["data.load", "train"]
    finishing = [r for r in caplog.records if "run link and name could not be set" in r.getMessage()]
    assert len(finishing) == 1
    assert sink.stats["dropped"]["mlflow"] == (0 if fake.at_open else 1)   # data.load ended before the run was known


@pytest.mark.parametrize("uri, to_mlflow, expected", [
    ("server", False, None),                             # --no-otel-to-mlflow: spans stay local
    ("server", True, "server"),                          # default: OTLP to the server, then the run link via REST
    ("sqlite", True, "database"),                        # default: the store API of the sqlite store
    ("sqlite", False, None),
    ("file", True, None),                                # a file store takes no spans: an info line, no warning
    (None, True, None),                                  # no MLflow run (--no-mlflow): nothing, not a word
])
def test_mlflow_exporter_policy(tmp_path, caplog, uri, to_mlflow, expected):
    """The run's trace goes to MLflow whenever the run is tracked there, unless --no-otel-to-mlflow."""
    from tests._otlp_receiver import free_port
    from splade_obs.sinks.otel import MlflowServerFinalizer, MlflowStoreExporter

    uris = {"server": f"http://127.0.0.1:{free_port()}", "sqlite": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "file": (tmp_path / "mlruns").as_uri()}   # never reached: no span is ended
    before = [FakeTracking(uri=uris[uri])] if uri else []
    with caplog.at_level(logging.INFO, logger="splade_obs.sinks.otel"):
        sink, mem, bus, ids = make_sink(tmp_path, before=before, to_mlflow=to_mlflow)
        bus.emit(RunStarted(run_name="r", config=CONFIG, system_info={}, total_steps=1, num_epochs=1,
                            steps_per_epoch=1))
    mlflow = [exp.inner for name, _, exp in sink.pipeline.processors if name == "mlflow"]
    kinds = {MlflowServerFinalizer: "server", MlflowStoreExporter: "database"}
    assert [kinds[type(e)] for e in mlflow] == ([expected] if expected else [])
    if expected == "server":
        assert isinstance(mlflow[0].inner, MlflowOtlpExporter) and mlflow[0].inner._ids() == ("7", "abc123")
    if expected:
        assert mlflow[0]._ids() == ("7", "abc123") and mlflow[0].uri == uris[uri]
    root_attrs = sink._root.attributes
    assert (root_attrs.get("mlflow.traceTag.mlflow.traceName") == "r") is to_mlflow
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    said = [r for r in caplog.records if "not sent to MLflow" in r.getMessage()]
    assert len(said) == (1 if uri == "file" and to_mlflow else 0)
    sink.pipeline.shutdown(1.0)


def test_skipped_batch_gets_an_error_span_even_when_sampled_out(tmp_path):
    sink, mem, bus, ids = make_sink(tmp_path, trace_batches="none")
    run_synthetic(bus, steps=4, fail_batch=2)
    bus.close()
    spans = mem.get_finished_spans()
    (failed,) = by_name(spans, "batch")                     # "none" keeps only the failed batch
    assert failed.name == "batch 2" and failed.attributes["splade.batch"] == 2
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.status.description.startswith("TRAINING_ERROR")
    assert failed.attributes["splade.trace.keep_reason"] == "failed" and failed.attributes["splade.skipped"]
    (ev,) = failed.events
    assert ev.name == "exception"
    a = dict(ev.attributes)
    assert a["error.category"] == "TRAINING_ERROR" and a["exception.type"] == "RuntimeError"
    assert a["exception.message"] == "boom" and a["splade.batch"] == 2 and a["splade.batch_in_epoch"] == 2
    assert a["splade.context.batch"] == 2 and a["splade.context.api_token"] == "***"   # secrets never leave
    assert a["splade.errors.TRAINING_ERROR"] == 1 and a["splade.train.skipped_batches"] == 1   # running counts
    (epoch,) = by_name(spans, "epoch")
    assert failed.parent.span_id == epoch.context.span_id
    (root,) = by_name(spans, "train")
    assert root.status.status_code is StatusCode.UNSET      # a skipped batch does not fail the run
    r = dict(root.attributes)
    assert r["splade.trace.batches_kept_failed"] == 1
    assert r["splade.errors.TRAINING_ERROR"] == 1 and r["splade.train.skipped_batches"] == 1   # final counters


def test_partial_epoch_is_marked_incomplete(tmp_path):
    sink, mem, bus, ids = make_sink(tmp_path)
    t = time.time_ns()
    bus.emit(RunStarted(run_name="r", config=CONFIG, system_info={}, total_steps=10, num_epochs=1, steps_per_epoch=10,
                        time_ns=t))
    bus.emit(EpochStarted(epoch=1, num_epochs=1, steps_in_epoch=10, time_ns=t + MS))
    bus.emit(step(1, t + 2 * MS))
    bus.emit(EpochDone(epoch=1, num_epochs=1, step=1, duration_seconds=0.01, means={"epoch/loss": 1.0},
                       steps_completed=1, complete=False, start_ns=t + MS, time_ns=t + 20 * MS))
    bus.emit(RunFinished(status="KILLED", step=1, duration_seconds=0.02, time_ns=t + 21 * MS))
    bus.close()
    (epoch,) = by_name(mem.get_finished_spans(), "epoch")
    assert epoch.attributes["splade.epoch.complete"] is False and epoch.attributes["splade.epoch.loss"] == 1.0


@pytest.mark.parametrize("status, description", [("FAILED", "TRAINING_ERROR: too many failed batches"),
                                                 ("KILLED", "killed")])
def test_failed_or_killed_run_has_an_error_root(tmp_path, status, description):
    sink, mem, bus, ids = make_sink(tmp_path)
    run_synthetic(bus, status=status)
    bus.close()
    (root,) = by_name(mem.get_finished_spans(), "train")
    assert root.status.status_code is StatusCode.ERROR
    assert root.status.description == description
    assert dict(root.attributes)["splade.status"] == status


def test_fatal_error_outside_a_batch_marks_epoch_and_root(tmp_path):
    sink, mem, bus, ids = make_sink(tmp_path)
    bus.emit(RunStarted(run_name="r", config={}, system_info={}, total_steps=2, num_epochs=1, steps_per_epoch=2))
    bus.emit(EpochStarted(epoch=1, num_epochs=1, steps_in_epoch=2))
    bus.emit(ErrorCaught(category="FILE_SYSTEM_ERROR", message="disk full", error_type="FileSystemError",
                         exception_type="OSError", exception_message="No space left", context={"path": "/x"},
                         fatal=True))
    bus.emit(SinkDegraded(sink="mlflow", failures=5, error_type="ConnectionError", message="refused"))
    bus.emit(RunFinished(status="FAILED", step=1, duration_seconds=1.0,
                         error={"category": "FILE_SYSTEM_ERROR", "message": "disk full"}))
    bus.close()
    spans = mem.get_finished_spans()
    (epoch,) = by_name(spans, "epoch")
    (root,) = by_name(spans, "train")
    assert epoch.status.status_code is StatusCode.ERROR and root.status.status_code is StatusCode.ERROR
    assert dict(epoch.events[0].attributes)["error.category"] == "FILE_SYSTEM_ERROR"
    assert [e.name for e in root.events] == ["exception", "splade.sink_degraded"]


def test_failure_before_run_started_still_leaves_a_trace(tmp_path):
    sink, mem, bus, ids = make_sink(tmp_path)
    t = time.time_ns()
    bus.emit(DataLoaded(split="train", source="bad.jsonl", num_examples=0, digest="", start_ns=t, end_ns=t + MS,
                        time_ns=t + MS))
    bus.emit(RunFinished(status="FAILED", step=0, duration_seconds=0.01, time_ns=t + 2 * MS,
                         error={"category": "DATA_ERROR", "message": "bad data"}, counters={"errors/DATA_ERROR": 1}))
    bus.close()
    spans = mem.get_finished_spans()
    (root,) = by_name(spans, "train")
    assert by_name(spans, "data.load")[0].parent.span_id == root.context.span_id
    assert root.status.status_code is StatusCode.ERROR and root.attributes["splade.errors.DATA_ERROR"] == 1
    assert ids.trace_id == format_trace_id(root.context.trace_id)


def test_other_ranks_join_the_trace_of_rank_zero(tmp_path):
    parent_trace, parent_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    sink, mem, bus, ids = make_sink(tmp_path, rank=1, world_size=2)
    bus.emit(RunStarted(run_name="r", config={}, system_info={}, total_steps=1, num_epochs=1, steps_per_epoch=1,
                        world_size=2, traceparent=f"00-{parent_trace}-{parent_span}-01"))
    bus.emit(RunFinished(status="FINISHED", step=1, duration_seconds=0.1))
    bus.close()
    (root,) = mem.get_finished_spans()
    assert format_trace_id(root.context.trace_id) == parent_trace
    assert format_span_id(root.parent.span_id) == parent_span
    assert dict(root.attributes)["splade.rank"] == 1 and dict(root.attributes)["splade.world_size"] == 2
    # the joined trace is announced again: this rank's RunIds (and logs) name rank 0's trace
    assert ids.trace_id == parent_trace
    assert ids.traceparent.split("-")[2] == format_span_id(root.context.span_id)


def test_slow_batches_are_kept_and_memory_stays_flat(tmp_path):
    """every:1000 over 5,000 steps: the first, 5 sampled + the one slow batch; nothing else is created."""
    sink, mem, bus, ids = make_sink(tmp_path, trace_batches="every:1000", slow_batch_factor=3.0)
    run_synthetic(bus, steps=5000, slow_step=1234)
    bus.close()
    kept = sorted(b.attributes["splade.step"] for b in by_name(mem.get_finished_spans(), "batch"))
    assert kept == [1, 1000, 1234, 2000, 3000, 4000, 5000]
    slow = next(b for b in by_name(mem.get_finished_spans(), "batch") if b.attributes["splade.step"] == 1234)
    assert slow.attributes["splade.trace.keep_reason"] == "slow"
    assert sink.stats["batches_sampled_out"] == 4993


def test_batch_sampler_policy():
    s = BatchSampler.from_spec("every:3", slow_factor=2.0)
    decisions = [s.decide(n, 0.01) for n in range(1, 10)]
    assert decisions == ["first", None, "sampled", None, None, "sampled", None, None, "sampled"]
    assert s.decide(10, 0.05) == "slow"                 # 5x the typical 10 ms
    assert s.decide(11, 0.015) is None                  # the slow one did not inflate the baseline much
    assert BatchSampler.from_spec("all").decide(7, 0.0) == "sampled"
    assert BatchSampler.from_spec("every:50").decide(101, 0.0) == "first"   # a resumed run's first batch too
    assert BatchSampler.from_spec("none").decide(50, 0.01) is None
    with pytest.raises(ValueError):
        BatchSampler.from_spec("sometimes")


def test_default_file_exporter_writes_json_lines(tmp_path, monkeypatch):
    for var in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test")
    options = OtelOptions(trace_batches="all", service_name="splade-ci")
    for rank, name in ((0, "traces.jsonl"), (1, "traces.rank1.jsonl")):
        bus = EventBus(rank=rank)
        sink = OtelSink.create(options, log_dir=tmp_path / "logs", rank=rank)
        assert [n for n, _, _ in sink.pipeline.processors] == ["file"]
        bus.add(sink)
        bus.open()
        run_synthetic(bus, steps=3)
        bus.close()
        lines = (tmp_path / "logs" / name).read_text().splitlines()
        spans = [json.loads(line) for line in lines]
        assert sorted(s["name"] for s in spans) == sorted(
            ["data.load", "train", "model.load", "epoch", "batch 1", "batch 2", "batch 3", "evaluation",
             "checkpoint"])
        res = spans[0]["resource"]["attributes"]
        assert res["service.name"] == "splade-ci" and res["deployment.environment"] == "test"
        assert "service.version" in res and "host.name" in res


def test_tracing_off(tmp_path, monkeypatch):
    assert OtelSink.create(OtelOptions(exporter="none"), log_dir=tmp_path) is None
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert OtelSink.create(OtelOptions(), log_dir=tmp_path) is None
    assert not (tmp_path / "traces.jsonl").exists()


def test_the_sink_reads_no_config():
    """The otel package consumes events only: none of its modules imports splade_obs.config or names TrainConfig."""
    modules = sorted(OTEL_PACKAGE.glob("*.py"))
    assert {m.name for m in modules} >= {"__init__.py", "sink.py", "exporters.py", "sampling.py"}
    for path in modules:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            imported: list[str] = []
            if isinstance(node, ast.Import):
                imported = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:                           # relative to splade_obs.sinks.otel
                    pkg = ["splade_obs", "sinks", "otel"][: 4 - node.level]
                    base = ".".join([*pkg, *([base] if base else [])])
                imported = [base, *(f"{base}.{a.name}" for a in node.names)]
            assert not [m for m in imported if m == "splade_obs.config" or m.startswith("splade_obs.config.")], \
                f"{path.name}:{node.lineno} imports the config"
            assert not (isinstance(node, ast.Name) and node.id == "TrainConfig"), f"{path.name} names TrainConfig"
        assert len(path.read_text(encoding="utf-8").splitlines()) <= 450, f"{path.name} is over 450 lines"


class _HangingExporter(SpanExporter):
    """Fault injection: an exporter whose export never returns (a collector that accepts and stalls)."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def export(self, spans):
        self.release.wait(60)
        return SpanExportResult.FAILURE

    def shutdown(self):
        self.release.set()


def test_close_is_bounded_when_the_exporter_hangs(tmp_path):
    sink, mem, bus, ids = make_sink(tmp_path, shutdown_timeout=1.0)
    hanging = _HangingExporter()
    sink.pipeline.add("hanging", hanging)
    run_synthetic(bus, steps=4)
    t0 = time.monotonic()
    sink.close(timeout=30.0)                      # the options' shutdown_timeout (1 s) wins
    elapsed = time.monotonic() - t0
    assert elapsed < 1.0 + 0.5
    assert sink.stats["dropped"]["hanging"] == sink.spans_ended > 0
    assert sink.stats["dropped"]["injected"] == 0 and not sink.stats["clean_shutdown"]


# ------------------------------------------------------------------------------------------ real runs
def _real_run(tiny_cfg, tmp_path, options: OtelOptions = OtelOptions(exporter="none"), **sections):
    from splade_obs.run import run_training

    cfg = tiny_cfg(**sections)
    mem = InMemorySpanExporter()
    sink = OtelSink.create(options, log_dir=tmp_path / "otel", span_exporter=mem)
    rec = RecordingSink()
    outcome = run_training(cfg, extra_sinks=[sink, rec])
    return outcome, mem.get_finished_spans(), rec


def test_real_run_span_tree(tiny_cfg, tmp_path):
    outcome, spans, rec = _real_run(tiny_cfg, tmp_path, OtelOptions(exporter="none", trace_batches="every:2",
                                                                    slow_batch_factor=1000.0),
                                    optim={"max_steps": 4, "batch_size": 4})
    assert outcome.status == "FINISHED"
    roots = [s for s in spans if s.parent is None]
    assert [r.name for r in roots] == ["train"]
    root = roots[0]
    epochs = by_name(spans, "epoch")
    assert len(epochs) == dict(root.attributes)["splade.num_epochs"] >= 1
    assert all(e.parent.span_id == root.context.span_id for e in epochs)
    batches = by_name(spans, "batch")
    assert sorted(b.attributes["splade.step"] for b in batches) == [1, 2, 4]
    epoch_ids = {e.context.span_id: e for e in epochs}
    for b in batches:
        parent = epoch_ids[b.parent.span_id]
        assert parent.attributes["splade.epoch"] == b.attributes["splade.epoch"]
        assert parent.start_time <= b.start_time <= b.end_time <= parent.end_time
        assert b.attributes["splade.train.forward_seconds"] > 0 and b.attributes["splade.tokens"] > 0
    assert by_name(spans, "model.load") and by_name(spans, "data.load") and by_name(spans, "checkpoint")
    assert {s.context.trace_id for s in spans} == {root.context.trace_id}
    assert outcome.ids.trace_id == format_trace_id(root.context.trace_id)
    assert outcome.ids.traceparent.split("-")[2] == format_span_id(root.context.span_id)
    r = dict(root.attributes)
    assert r["splade.model.name"] == "splade-tiny" and r["splade.optim.batch_size"] == 4
    assert r["splade.optim.max_steps"] == 4 and r["splade.model.max_query_length"] == 16
    assert r["splade.data.train_file"] == "demo" and r["splade.trace.batches"] == "every:2"
    assert root.status.status_code is StatusCode.UNSET


#: attributes that are not metrics, by span (everything else on these spans must be a metric by the rule)
NON_METRIC = {
    "batch": {"splade.step", "splade.epoch", "splade.batch_in_epoch", "splade.batch_size", "splade.tokens",
              "splade.trace.keep_reason"},
    "epoch": {"splade.epoch", "splade.num_epochs", "splade.steps_in_epoch", "splade.step", "splade.epoch.complete"},
    "evaluation": {"splade.step", "splade.epoch", "splade.eval.split", "splade.eval.is_best"},
    "checkpoint": {"splade.step", "splade.epoch", "splade.checkpoint.path", "splade.checkpoint.reason"},
    "train": {"splade.run_name", "splade.rank", "splade.world_size", "splade.total_steps", "splade.num_epochs",
              "splade.steps_per_epoch", "splade.start_step", "splade.resumed", "splade.loss.lambda_q",
              "splade.loss.lambda_d", "splade.data.train_file", "splade.output_dir", "splade.log_dir",
              "splade.device", "splade.amp_dtype", "splade.status", "splade.final_step", "splade.duration_s",
              "splade.health", "splade.degraded", "splade.skipped_batches", "splade.errors_by_category"},
}
ROOT_NON_METRIC_PREFIXES = ("splade.model.", "splade.optim.", "splade.system.", "splade.trace.", "mlflow.", "error.")


def _is_metric(span_name: str, key: str) -> bool:
    if key in NON_METRIC[span_name]:
        return False
    return not (span_name == "train" and key.startswith(ROOT_NON_METRIC_PREFIXES))


def test_real_run_metric_attributes_follow_the_one_rule(tiny_cfg, tmp_path):
    """Every metric attribute on the spans of a real run is attribute_name(k) of a key k of the metrics() of
    the event behind the span (with its value), and every such metric is there."""
    from tests._eval_utils import write_beir

    beir = write_beir(tmp_path / "beir", split="dev")
    outcome, spans, rec = _real_run(
        tiny_cfg, tmp_path, OtelOptions(exporter="none", trace_batches="all", slow_batch_factor=1000.0),
        optim={"max_steps": 4}, checkpoint={"save_steps": 2}, recovery={"inject_faults": ("batch:1:exception",)},
        eval={"eval_data": str(beir), "eval_split": "dev", "eval_steps": 2})
    assert outcome.status == "FINISHED"

    def expected(span) -> dict[str, float]:
        a = span.attributes
        if span_kind(span.name) == "batch":
            (e,) = [e for e in rec.of(StepDone) if e.step == a["splade.step"]]
            return e.metrics()
        if span.name == "epoch":
            (e,) = [e for e in rec.of(EpochDone) if e.epoch == a["splade.epoch"]]
            return e.metrics()
        if span.name == "evaluation":
            (e,) = [e for e in rec.of(EvaluationDone) if e.step == a["splade.step"]]
            return e.metrics()
        if span.name == "checkpoint":
            (e,) = [e for e in rec.of(CheckpointSaved)
                    if (e.step, e.reason) == (a["splade.step"], a["splade.checkpoint.reason"])]
            return e.metrics()
        (e,) = rec.of(RunFinished)
        return {**e.final_metrics, **e.counters, **e.metrics()}

    checked = set()
    for span in spans:
        kind = span_kind(span.name)
        if kind not in METRIC_SPANS or span.attributes.get("splade.trace.keep_reason") == "failed":
            continue
        got = {k: v for k, v in span.attributes.items() if _is_metric(kind, k)}
        want = {attribute_name(k): float(v) for k, v in expected(span).items()}
        assert got == pytest.approx(want), span.name
        assert want, span.name
        checked.add(kind)
    assert checked == set(METRIC_SPANS)
    # the error counters on the failed batch's exception event follow the same rule
    (failed,) = [s for s in by_name(spans, "batch") if s.attributes["splade.trace.keep_reason"] == "failed"]
    (err,) = [e for e in rec.of(ErrorCaught) if e.skipped_batch]
    (ev,) = failed.events
    assert {k: v for k, v in ev.attributes.items() if k.startswith(("splade.errors.", "splade.train."))} == \
        {attribute_name(k): float(v) for k, v in err.metrics().items()}


def test_real_run_batch_fault_is_an_event_on_its_batch_span(tiny_cfg, tmp_path):
    outcome, spans, rec = _real_run(tiny_cfg, tmp_path, OtelOptions(exporter="none", trace_batches="none",
                                                                    slow_batch_factor=1000.0),
                                    optim={"max_steps": 3}, recovery={"inject_faults": ("batch:1:exception",)})
    assert outcome.status == "FINISHED"                            # the run went on
    failed = [b for b in by_name(spans, "batch") if b.status.status_code is StatusCode.ERROR]
    assert len(failed) == 1
    (ev,) = [e for e in failed[0].events if e.name == "exception"]
    assert ev.attributes["error.category"] == "TRAINING_ERROR"
    assert ev.attributes["splade.batch"] == failed[0].attributes["splade.batch"] == 1   # batch:1
    assert failed[0].name == "batch 1" and ev.attributes["splade.step"] == 1           # the step it was part of
    assert "injected" in ev.attributes["exception.message"]
    (root,) = by_name(spans, "train")
    assert root.status.status_code is StatusCode.UNSET
    assert dict(root.attributes)["splade.trace.batches_kept_failed"] == 1
    assert dict(root.attributes)["splade.errors.TRAINING_ERROR"] == 1


def test_real_failing_run_has_error_root(tiny_cfg, tmp_path):
    outcome, spans, rec = _real_run(tiny_cfg, tmp_path, optim={"max_steps": 3},
                                    recovery={"inject_faults": ("batch:1:exception",), "max_skipped_batches": 0})
    assert outcome.status == "FAILED"
    (root,) = by_name(spans, "train")
    assert root.status.status_code is StatusCode.ERROR
    assert dict(root.attributes)["splade.status"] == "FAILED"
    assert root.status.description


def test_secret_env_values_and_url_credentials_are_masked_in_spans(tmp_path, monkeypatch):
    """Every text an event carries (errors, context, retries, degraded sinks, messages, the failure) is
    redacted before it becomes a span attribute, an event attribute or a status description."""
    from splade_obs.events import Message

    secret = "sk-planted-9876543"
    monkeypatch.setenv("MY_SERVICE_API_KEY", secret)
    cred = "https://user:hunter2@example.invalid/"
    sink, mem, bus, ids = make_sink(tmp_path)
    t = time.time_ns()
    bus.emit(RunStarted(run_name="r1", config={}, system_info={}, total_steps=2, num_epochs=1, steps_per_epoch=2,
                        output_dir=f"/out/{secret}", time_ns=t))
    bus.emit(EpochStarted(epoch=1, num_epochs=1, steps_in_epoch=2, time_ns=t + MS))
    bus.emit(ErrorCaught(category="DEPENDENCY_ERROR", message=f"store {cred} refused key {secret}",
                         error_type="DependencyError", exception_type="RuntimeError",
                         exception_message=f"401 for key {secret}", context={"url": cred, "detail": [secret]},
                         step=1, epoch=1, batch_index=0, skipped_batch=True, start_ns=t + MS, time_ns=t + 2 * MS))
    bus.emit(RetryAttempt(operation="mlflow.log_batch", attempt=1, max_attempts=3, delay_seconds=0.1,
                          category="DEPENDENCY_ERROR", message=f"retrying {cred} with {secret}", time_ns=t + 3 * MS))
    bus.emit(SinkDegraded(sink="x", failures=5, error_type="RuntimeError", message=f"rejected {secret}",
                          time_ns=t + 4 * MS))
    bus.emit(Message(level="WARNING", text=f"token {secret} at {cred}", time_ns=t + 5 * MS))
    bus.emit(ErrorCaught(category="DEPENDENCY_ERROR", message=f"fatal: key {secret}", error_type="DependencyError",
                         exception_type=None, exception_message=None, context={}, step=1, epoch=1, fatal=True,
                         time_ns=t + 6 * MS))
    bus.emit(RunFinished(status="FAILED", step=1, duration_seconds=0.1, time_ns=t + 7 * MS,
                         error={"category": "DEPENDENCY_ERROR", "message": f"fatal: key {secret} via {cred}"}))
    bus.close(timeout=5)

    spans = mem.get_finished_spans()
    dump = "\n".join(s.to_json() for s in spans)
    for needle in ("splade.sink_degraded", "splade.retry", "splade.message", "exception", "***@example.invalid"):
        assert needle in dump
    assert secret not in dump and "hunter2" not in dump
    root = by_name(spans, "train")[0]
    assert root.status.status_code is StatusCode.ERROR and "***" in root.status.description
