"""The OpenTelemetry sink: span tree, sampling, errors as span events, bounded shutdown.

First from synthetic event sequences (fast, exact), then from real short runs of splade-tiny through
``run_training`` with the SDK's ``InMemorySpanExporter`` injected.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode, format_span_id, format_trace_id

from splade_obs.config import TrainConfig
from splade_obs.events import (
    DataLoaded,
    EpochDone,
    EpochStarted,
    ErrorCaught,
    EvaluationDone,
    EventBus,
    CheckpointSaved,
    ModelLoaded,
    RetryAttempt,
    RunFinished,
    RunStarted,
    SinkDegraded,
    StepDone,
)
from splade_obs.sinks.otel_sink import OtelSink
from splade_obs.tracing import BatchSampler

MS = 1_000_000


def make_sink(tmp_path: Path, exporter: str = "none", **tracing) -> tuple[OtelSink, InMemorySpanExporter, EventBus]:
    cfg = TrainConfig().replace(tracing={"exporter": exporter, **tracing},
                                optim={"batch_size": 4, "learning_rate": 2e-5})
    mem = InMemorySpanExporter()
    bus = EventBus()
    sink = OtelSink.create(cfg, bus_shared=bus.shared, log_dir=tmp_path / "logs", span_exporter=mem)
    assert sink is not None
    bus.add(sink)
    return sink, mem, bus


def step(n: int, start: int, dur_ms: float = 10, epoch: int = 1) -> StepDone:
    return StepDone(step=n, epoch=epoch, batch_index=n - 1, loss=1.0 / n, parts={"base": 0.9 / n, "query_reg": 0.01},
                    learning_rate=1e-4, grad_norm=0.5, batch_size=4, num_tokens=100 + n, samples_per_second=40.0,
                    tokens_per_second=1000.0, query_nnz=20.0, doc_nnz=60.0, flops=1.5, start_ns=start,
                    end_ns=start + int(dur_ms * MS), timings={"forward": 0.004, "backward": 0.005, "optimizer": 0.001},
                    time_ns=start + int(dur_ms * MS))


def run_synthetic(bus: EventBus, *, steps: int = 4, fail_batch: int | None = None, status: str = "FINISHED",
                  slow_step: int | None = None) -> int:
    """A realistic run: data and model load, one epoch of ``steps`` steps, eval, checkpoint, finish."""
    t = time.time_ns()
    bus.emit(DataLoaded(split="train", source="demo.jsonl", num_examples=16, digest="d1", start_ns=t, end_ns=t + 5 * MS,
                        fmt="jsonl", time_ns=t + 5 * MS))
    bus.emit(RunStarted(run_name="r1", config={}, system_info={"device": "cpu"}, total_steps=steps, num_epochs=1,
                        steps_per_epoch=steps, time_ns=t + 6 * MS))
    bus.emit(ModelLoaded(name="splade-tiny", path="/m", num_parameters=4_400_000, device="cpu", amp_dtype="float32",
                         start_ns=t + 6 * MS, end_ns=t + 9 * MS, time_ns=t + 9 * MS))
    t0 = t + 10 * MS
    bus.emit(EpochStarted(epoch=1, num_epochs=1, steps_in_epoch=steps, time_ns=t0))
    cur = t0
    for n in range(1, steps + 1):
        if fail_batch == n:
            bus.emit(ErrorCaught(category="TRAINING_ERROR", message="injected fault at batch 2", error_type="TrainingError",
                                 exception_type="RuntimeError", exception_message="boom",
                                 context={"batch": n, "api_token": "s3cr3t"}, step=n - 1, epoch=1, batch_index=n - 1,
                                 skipped_batch=True, start_ns=cur, time_ns=cur + 3 * MS))
            cur += 3 * MS
            continue
        dur = 100 if n == slow_step else 10
        bus.emit(step(n, cur, dur))
        cur += int(dur * MS)
    bus.emit(RetryAttempt(operation="mlflow.log_batch", attempt=1, max_attempts=3, delay_seconds=0.5,
                          category="DEPENDENCY_ERROR", message="503", time_ns=cur))
    bus.emit(EvaluationDone(step=steps, epoch=1, split="test", metrics={"ndcg@10": 0.5}, duration_seconds=0.002,
                            start_ns=cur, time_ns=cur + 2 * MS))
    bus.emit(EpochDone(epoch=1, num_epochs=1, step=steps, train_loss=0.7, learning_rate=1e-4, duration_seconds=0.05,
                       val_loss=0.8, start_ns=t0, time_ns=cur + 3 * MS))
    bus.emit(CheckpointSaved(step=steps, epoch=1, path="/ckpt", reason="epoch_end", duration_seconds=0.001,
                             start_ns=cur + 3 * MS, time_ns=cur + 4 * MS))
    err = {"category": "TRAINING_ERROR", "message": "too many failed batches"} if status == "FAILED" else None
    bus.emit(RunFinished(status=status, step=steps, duration_seconds=0.1, error=err, time_ns=cur + 5 * MS))
    return t


def by_name(spans, name):
    return [s for s in spans if s.name == name]


# ------------------------------------------------------------------------------------------ synthetic
def test_span_tree_sampling_and_attributes(tmp_path):
    sink, mem, bus = make_sink(tmp_path, trace_batches="every:2")
    bus.shared["mlflow.run_id"] = "abc123"
    t = run_synthetic(bus, steps=4)
    bus.close()
    spans = mem.get_finished_spans()
    (root,) = by_name(spans, "train")
    (epoch,) = by_name(spans, "epoch")
    batches = by_name(spans, "batch")
    assert root.parent is None
    assert sorted(b.attributes["splade.step"] for b in batches) == [2, 4]       # every:2 over 4 steps
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
    assert attrs["splade.batch_size"] == 4 and attrs["splade.tokens"] == 102 and attrs["splade.lr"] == 1e-4
    assert attrs["splade.time.forward_s"] == 0.004 and attrs["splade.loss.base"] == pytest.approx(0.45)
    r = dict(root.attributes)
    assert r["splade.model.name"] == "splade-tiny" and r["splade.optim.batch_size"] == 4
    assert r["splade.optim.learning_rate"] == 2e-5 and r["splade.total_steps"] == 4
    assert r["mlflow.run_id"] == "abc123" and r["splade.rank"] == 0 and r["splade.status"] == "FINISHED"
    assert r["splade.trace.batches_kept"] == 2 and r["splade.trace.batches_sampled_out"] == 2
    assert dict(epoch.attributes)["splade.val_loss"] == 0.8
    assert root.status.status_code is StatusCode.UNSET
    assert [e.name for e in root.events] == ["splade.retry"]
    # the trace id and traceparent are published for the other sinks (MLflow tag) and other ranks
    assert bus.shared["otel.trace_id"] == format_trace_id(root.context.trace_id)
    version, trace_id, span_id, flags = bus.shared["otel.traceparent"].split("-")
    assert (version, trace_id, span_id) == ("00", format_trace_id(root.context.trace_id),
                                            format_span_id(root.context.span_id))
    assert int(flags, 16) & 0x01                                         # sampled
    assert sink.stats["dropped"] == {"injected": 0}


def test_trace_id_is_published_before_the_run_starts(tmp_path):
    """Sinks that start before RunStarted reaches the tracer (MLflow tags) can already read the trace id."""
    sink, mem, bus = make_sink(tmp_path)
    early = bus.shared["otel.trace_id"]
    run_synthetic(bus)
    bus.close()
    (root,) = by_name(mem.get_finished_spans(), "train")
    assert early == format_trace_id(root.context.trace_id)


def test_skipped_batch_gets_an_error_span_even_when_sampled_out(tmp_path):
    sink, mem, bus = make_sink(tmp_path, trace_batches="none")
    run_synthetic(bus, steps=4, fail_batch=2)
    bus.close()
    spans = mem.get_finished_spans()
    (failed,) = by_name(spans, "batch")                     # "none" keeps only the failed batch
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.status.description.startswith("TRAINING_ERROR")
    (ev,) = failed.events
    assert ev.name == "exception"
    a = dict(ev.attributes)
    assert a["error.category"] == "TRAINING_ERROR" and a["exception.type"] == "RuntimeError"
    assert a["exception.message"] == "boom" and a["splade.batch_index"] == 1
    assert a["splade.context.batch"] == 2 and a["splade.context.api_token"] == "***"   # secrets never leave
    (epoch,) = by_name(spans, "epoch")
    assert failed.parent.span_id == epoch.context.span_id
    (root,) = by_name(spans, "train")
    assert root.status.status_code is StatusCode.UNSET      # a skipped batch does not fail the run
    assert dict(root.attributes)["splade.trace.batches_kept_failed"] == 1


@pytest.mark.parametrize("status, description", [("FAILED", "TRAINING_ERROR: too many failed batches"),
                                                 ("KILLED", "killed")])
def test_failed_or_killed_run_has_an_error_root(tmp_path, status, description):
    sink, mem, bus = make_sink(tmp_path)
    run_synthetic(bus, status=status)
    bus.close()
    (root,) = by_name(mem.get_finished_spans(), "train")
    assert root.status.status_code is StatusCode.ERROR
    assert root.status.description == description
    assert dict(root.attributes)["splade.status"] == status


def test_fatal_error_outside_a_batch_marks_epoch_and_root(tmp_path):
    sink, mem, bus = make_sink(tmp_path)
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


def test_other_ranks_join_the_trace_of_rank_zero(tmp_path):
    parent_trace, parent_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    cfg = TrainConfig().replace(tracing={"exporter": "none"})
    mem = InMemorySpanExporter()
    bus = EventBus(rank=1)
    sink = OtelSink.create(cfg, bus_shared=bus.shared, log_dir=tmp_path, rank=1, world_size=2, span_exporter=mem)
    bus.add(sink)
    bus.emit(RunStarted(run_name="r", config={}, system_info={}, total_steps=1, num_epochs=1, steps_per_epoch=1,
                        world_size=2, traceparent=f"00-{parent_trace}-{parent_span}-01"))
    bus.emit(RunFinished(status="FINISHED", step=1, duration_seconds=0.1))
    bus.close()
    (root,) = mem.get_finished_spans()
    assert format_trace_id(root.context.trace_id) == parent_trace
    assert format_span_id(root.parent.span_id) == parent_span
    assert dict(root.attributes)["splade.rank"] == 1 and dict(root.attributes)["splade.world_size"] == 2
    assert bus.shared["otel.trace_id"] == parent_trace


def test_slow_batches_are_kept_and_memory_stays_flat(tmp_path):
    """every:1000 over 5,000 steps: 5 sampled + the one slow batch; nothing else is created."""
    sink, mem, bus = make_sink(tmp_path, trace_batches="every:1000", slow_batch_factor=3.0)
    run_synthetic(bus, steps=5000, slow_step=1234)
    bus.close()
    kept = sorted(b.attributes["splade.step"] for b in by_name(mem.get_finished_spans(), "batch"))
    assert kept == [1000, 1234, 2000, 3000, 4000, 5000]
    slow = next(b for b in by_name(mem.get_finished_spans(), "batch") if b.attributes["splade.step"] == 1234)
    assert slow.attributes["splade.trace.keep_reason"] == "slow"
    assert sink.stats["batches_sampled_out"] == 4994


def test_batch_sampler_policy():
    s = BatchSampler.from_spec("every:3", slow_factor=2.0)
    decisions = [s.decide(n, 0.01) for n in range(1, 10)]
    assert decisions == [None, None, "sampled", None, None, "sampled", None, None, "sampled"]
    assert s.decide(10, 0.05) == "slow"                 # 5x the typical 10 ms
    assert s.decide(11, 0.015) is None                  # the slow one did not inflate the baseline much
    assert BatchSampler.from_spec("all").decide(7, 0.0) == "sampled"
    assert BatchSampler.from_spec("none").decide(50, 0.01) is None
    with pytest.raises(ValueError):
        BatchSampler.from_spec("sometimes")


def test_default_file_exporter_writes_json_lines(tmp_path, monkeypatch):
    for var in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test")
    cfg = TrainConfig().replace(tracing={"trace_batches": "all", "service_name": "splade-ci"})
    for rank, name in ((0, "traces.jsonl"), (1, "traces.rank1.jsonl")):
        bus = EventBus(rank=rank)
        sink = OtelSink.create(cfg, bus_shared=bus.shared, log_dir=tmp_path / "logs", rank=rank)
        assert [n for n, _, _ in sink.pipeline.processors] == ["file"]
        bus.add(sink)
        run_synthetic(bus, steps=3)
        bus.close()
        lines = (tmp_path / "logs" / name).read_text().splitlines()
        spans = [json.loads(line) for line in lines]
        assert sorted(s["name"] for s in spans) == sorted(
            ["data.load", "train", "model.load", "epoch", "batch", "batch", "batch", "evaluation", "checkpoint"])
        res = spans[0]["resource"]["attributes"]
        assert res["service.name"] == "splade-ci" and res["deployment.environment"] == "test"
        assert "service.version" in res and "host.name" in res


def test_tracing_off(tmp_path, monkeypatch):
    cfg = TrainConfig()
    assert OtelSink.create(cfg.replace(tracing={"exporter": "none"}), bus_shared={}, log_dir=tmp_path) is None
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert OtelSink.create(cfg, bus_shared={}, log_dir=tmp_path) is None
    assert not (tmp_path / "traces.jsonl").exists()


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
    sink, mem, bus = make_sink(tmp_path, shutdown_timeout=1.0)
    hanging = _HangingExporter()
    sink.pipeline.add("hanging", hanging)
    run_synthetic(bus, steps=4)
    t0 = time.monotonic()
    sink.close(timeout=30.0)                      # the config's shutdown_timeout (1 s) wins
    elapsed = time.monotonic() - t0
    assert elapsed < 1.0 + 0.5
    assert sink.stats["dropped"]["hanging"] == sink.spans_ended > 0
    assert sink.stats["dropped"]["injected"] == 0 and not sink.stats["clean_shutdown"]


# ------------------------------------------------------------------------------------------ real runs
def _real_run(tiny_cfg, tmp_path, **sections):
    from splade_obs.run import run_training

    sink_cfg = tiny_cfg(**sections)
    mem = InMemorySpanExporter()
    sink = OtelSink.create(sink_cfg, bus_shared={}, log_dir=tmp_path / "otel", span_exporter=mem)
    outcome = run_training(sink_cfg, extra_sinks=[sink])
    return outcome, mem.get_finished_spans(), sink


def test_real_run_span_tree(tiny_cfg, tmp_path):
    outcome, spans, sink = _real_run(tiny_cfg, tmp_path, optim={"max_steps": 4, "batch_size": 4},
                                     tracing={"trace_batches": "every:2", "slow_batch_factor": 1000.0})
    assert outcome.status == "FINISHED"
    roots = [s for s in spans if s.parent is None]
    assert [r.name for r in roots] == ["train"]
    root = roots[0]
    epochs = by_name(spans, "epoch")
    assert len(epochs) == dict(root.attributes)["splade.num_epochs"] >= 1
    assert all(e.parent.span_id == root.context.span_id for e in epochs)
    batches = by_name(spans, "batch")
    assert sorted(b.attributes["splade.step"] for b in batches) == [2, 4]
    epoch_ids = {e.context.span_id: e for e in epochs}
    for b in batches:
        parent = epoch_ids[b.parent.span_id]
        assert parent.attributes["splade.epoch"] == b.attributes["splade.epoch"]
        assert parent.start_time <= b.start_time <= b.end_time <= parent.end_time
        assert b.attributes["splade.time.forward_s"] > 0 and b.attributes["splade.tokens"] > 0
    assert by_name(spans, "model.load") and by_name(spans, "data.load") and by_name(spans, "checkpoint")
    assert {s.context.trace_id for s in spans} == {root.context.trace_id}
    assert outcome.shared["otel.trace_id"] == format_trace_id(root.context.trace_id)
    assert root.status.status_code is StatusCode.UNSET


def test_real_run_batch_fault_is_an_event_on_its_batch_span(tiny_cfg, tmp_path):
    outcome, spans, sink = _real_run(tiny_cfg, tmp_path, optim={"max_steps": 3},
                                     recovery={"inject_faults": ("batch:1:exception",)},
                                     tracing={"trace_batches": "none", "slow_batch_factor": 1000.0})
    assert outcome.status == "FINISHED"                            # the run went on
    failed = [b for b in by_name(spans, "batch") if b.status.status_code is StatusCode.ERROR]
    assert len(failed) == 1
    (ev,) = [e for e in failed[0].events if e.name == "exception"]
    assert ev.attributes["error.category"] == "TRAINING_ERROR"
    assert ev.attributes["splade.batch_index"] == failed[0].attributes["splade.batch_index"]
    assert "injected" in ev.attributes["exception.message"]
    (root,) = by_name(spans, "train")
    assert root.status.status_code is StatusCode.UNSET
    assert dict(root.attributes)["splade.trace.batches_kept_failed"] == 1


def test_real_failing_run_has_error_root(tiny_cfg, tmp_path):
    outcome, spans, sink = _real_run(tiny_cfg, tmp_path, optim={"max_steps": 3},
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
    sink, mem, bus = make_sink(tmp_path)
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
