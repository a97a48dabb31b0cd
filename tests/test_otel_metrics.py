"""OpenTelemetry metrics of a real run: every instrument, its unit and its value as the events reported it
(an in-memory reader on the sink's own provider), the local metrics.jsonl (strict JSON), OTLP /v1/metrics
decoded by a real receiver, OTEL_METRICS_EXPORTER=none, and a bounded close with a collector that hangs."""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from opentelemetry.sdk.metrics.export import Histogram, InMemoryMetricReader, MetricsData

from splade_obs import __version__
from splade_obs.bus import Sink
from splade_obs.config import TrainConfig
from splade_obs.events import (CheckpointSaved, ErrorCaught, EvaluationDone, Event, RunFinished, RunStarted,
                               StepDone, metric_def)
from splade_obs.run import run_training
from splade_obs.sinks.otel.metric_export import build_otlp_metric_exporter
from splade_obs.sinks.otel.metrics import (COUNTED, MetricsOptions, OtelMetricsSink, instrument_name,
                                           instrument_unit)
from splade_obs_cli.main import cli
from tests._eval_utils import write_beir
from tests._fault_proxy import FaultProxy
from tests._mlflow_utils import sqlite_uri, step_event
from tests._otlp_receiver import OtlpReceiver
from tests.conftest import TINY_ARGS


def strict_json(text: str) -> Any:
    """json.loads that refuses NaN, Infinity and -Infinity (what a strict parser does)."""
    def refuse(token: str) -> Any:
        raise ValueError(f"non-standard JSON constant {token}")
    return json.loads(text, parse_constant=refuse)


class Recorder(Sink):
    """Keeps every event (a real sink on the same bus)."""

    name = "recorder"

    def __init__(self) -> None:
        self.events: list[Event] = []

    def handle(self, event: Event) -> None:
        self.events.append(event)


class FinalReader(InMemoryMetricReader):
    """The SDK's in-memory reader, which also keeps what it collects when the provider shuts down."""

    final: MetricsData | None = None

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self.final = self.get_metrics_data()


def by_name(data: MetricsData) -> tuple[dict[str, Any], dict[str, Any]]:
    """({instrument name: Metric}, resource attributes) of one collection."""
    (rm,) = data.resource_metrics
    return {m.name: m for sm in rm.scope_metrics for m in sm.metrics}, dict(rm.resource.attributes)


def value(metric: Any, **attributes: Any) -> Any:
    points = [p for p in metric.data.data_points if dict(p.attributes or {}) == attributes]
    assert len(points) == 1, (metric.name, attributes, metric.data.data_points)
    return points[0].value if hasattr(points[0], "value") else points[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One real run: 8 steps, two injected batch faults (skipped), in-training evaluation, MLflow on sqlite,
    metrics exported to metrics.jsonl every 0.2 s, plus a second metrics sink with an in-memory reader."""
    tmp = tmp_path_factory.mktemp("metrics_run")
    beir = write_beir(tmp / "beir")
    cfg = TrainConfig.from_mapping({
        "checkpoint": {"output_dir": str(tmp / "out")},
        "optim": {"batch_size": 4, "max_steps": 8, "seed": 7},
        "model": {"max_query_length": 16, "max_doc_length": 32},
        "tracking": {"enabled": True, "tracking_uri": sqlite_uri(tmp / "mlruns.db"), "log_model": False,
                     "system_metrics": False},
        "tracing": {"exporter": "file", "trace_batches": "all"},
        "logging": {"progress": "none", "log_every_steps": 3},
        "recovery": {"inject_faults": ("batch:3:data", "batch:6:nan"), "max_skipped_fraction": 0.5},
        "eval": {"eval_data": str(beir), "eval_steps": 4},
    })
    recorder, reader = Recorder(), FinalReader()
    probe = OtelMetricsSink.create(MetricsOptions(exporter="none"), log_dir=None, extra_readers=[reader])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OTEL_METRIC_EXPORT_INTERVAL", "200")
        mp.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
        result = run_training(cfg, extra_sinks=[recorder, probe])
    assert result.status == "FINISHED"
    assert reader.final is not None
    return {"cfg": cfg, "result": result, "events": recorder.events, "final": reader.final, "probe": probe}


def expected_gauges(events: list[Event]) -> dict[str, tuple[float, str]]:
    """{instrument: (last value, canonical name)} for every canonical metric the run's events reported."""
    out: dict[str, tuple[float, str]] = {}
    for e in events:
        for canonical, v in e.metrics().items():
            if not canonical.startswith(COUNTED):
                out[instrument_name(canonical)] = (float(v), canonical)
    return out


def test_every_instrument_has_the_last_reported_value_and_its_unit(run):
    metrics, _ = by_name(run["final"])
    expected = expected_gauges(run["events"])
    for must in ("splade.train.loss", "splade.train.base", "splade.train.query_reg", "splade.train.doc_reg",
                 "splade.train.lr", "splade.train.grad_norm", "splade.train.samples_per_second",
                 "splade.train.tokens_per_second", "splade.train.query_nnz", "splade.train.doc_nnz",
                 "splade.train.retrieval_flops", "splade.eval.ndcg_at_10", "splade.eval.duration_seconds",
                 "splade.checkpoint.duration_seconds", "splade.epoch.loss", "splade.run.duration_seconds"):
        assert must in expected and must in metrics, must
    for name, (v, canonical) in expected.items():
        m = metrics[name]
        assert value(m) == v or (math.isnan(v) and math.isnan(value(m))), name
        assert m.unit == instrument_unit(canonical) == ((metric_def(canonical).unit or "1")), name
    assert metrics["splade.train.samples_per_second"].unit == "1/s"
    assert metrics["splade.checkpoint.duration_seconds"].unit == "s" and metrics["splade.train.loss"].unit == "1"
    steps = [e for e in run["events"] if isinstance(e, StepDone)]
    last = max(steps, key=lambda e: e.step)
    assert value(metrics["splade.train.loss"]) == last.loss
    assert value(metrics["splade.train.step"]) == last.step
    evals = [e for e in run["events"] if isinstance(e, EvaluationDone)]
    assert len(evals) >= 2 and value(metrics["splade.eval.ndcg_at_10"]) == evals[-1].scores["ndcg@10"]
    ckpts = [e for e in run["events"] if isinstance(e, CheckpointSaved)]
    assert value(metrics["splade.checkpoint.duration_seconds"]) == ckpts[-1].duration_seconds


def test_step_time_histogram_counts_every_step(run):
    metrics, _ = by_name(run["final"])
    steps = [e for e in run["events"] if isinstance(e, StepDone)]
    hist = metrics["splade.train.step.duration"]
    assert isinstance(hist.data, Histogram) and hist.unit == "s"
    (point,) = hist.data.data_points
    assert point.count == len(steps) == len({e.step for e in steps}) >= 6
    assert point.sum == pytest.approx(sum((e.end_ns - e.start_ns) / 1e9 for e in steps), rel=1e-9)
    assert sum(point.bucket_counts) == point.count and 0.1 in point.explicit_bounds


def test_errors_and_skipped_batches_are_counters_by_category(run):
    metrics, _ = by_name(run["final"])
    errors = [e for e in run["events"] if isinstance(e, ErrorCaught)]
    by_category = Counter(e.category for e in errors)
    assert len(by_category) == 2, by_category               # the data fault and the NaN loss differ
    errs = metrics["splade.errors"]
    assert errs.unit == "{error}" and errs.data.is_monotonic
    assert {p.attributes["error.category"]: p.value for p in errs.data.data_points} == dict(by_category)
    skipped = sum(e.skipped_batch for e in errors)
    (finished,) = [e for e in run["events"] if isinstance(e, RunFinished)]
    assert value(metrics["splade.train.skipped_batches"]) == skipped == finished.counters["train/skipped_batches"] == 2
    assert "splade.errors.total" not in metrics and not any(n.startswith("splade.errors.") for n in metrics)


def test_process_and_gpu_instruments(run):
    import torch

    metrics, _ = by_name(run["final"])
    assert metrics["process.memory.usage"].unit == "By" and value(metrics["process.memory.usage"]) > 50e6
    cpu = {p.attributes["cpu.mode"]: p.value for p in metrics["process.cpu.time"].data.data_points}
    assert cpu["user"] > 1.0 and set(cpu) == {"user", "system"}     # training took CPU seconds
    assert 0.0 <= value(metrics["process.cpu.utilization"]) <= 1.0 + 1e-6
    gpu = "splade.gpu.memory.allocated" in metrics
    assert gpu == (torch.cuda.is_available() and torch.cuda.is_initialized())


def test_resource_names_the_service_the_run_and_the_mlflow_run(run):
    _, resource = by_name(run["final"])
    (started,) = [e for e in run["events"] if isinstance(e, RunStarted)]
    assert resource["service.name"] == "splade-obs" and resource["service.version"] == __version__
    assert resource["service.instance.id"] and resource["splade.run_name"] == started.run_name
    assert resource["mlflow.run_id"] == run["result"].ids.mlflow_run_id is not None


def test_the_instrument_table_names_every_instrument_a_run_made(run):
    """docs/observability.md's instrument table (render_instruments) lists each instrument with its unit."""
    import re

    from splade_obs.sinks.otel.metrics import render_instruments

    rows = re.findall(r"^\| `([^`]+)` \| [a-z ]+ \| `([^`]+)` \|", render_instruments(), flags=re.M)
    table = [(re.compile("^" + re.sub(r"\\\{[a-z]+\\\}", "[A-Za-z0-9_]+", re.escape(name)) + "$"), unit)
             for name, unit in sorted(rows, key=lambda r: "{" in r[0])]     # exact names before families
    metrics, _ = by_name(run["final"])
    assert len(metrics) > 30
    for name, metric in metrics.items():
        units = [unit for pattern, unit in table if pattern.match(name)]
        assert units and units[0] == metric.unit, (name, units, metric.unit)


def test_metrics_file_is_strict_json_and_ends_with_the_final_values(run):
    path = run["cfg"].log_dir / "metrics.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) >= 2
    docs = [strict_json(line) for line in lines]
    last = docs[-1]["resource_metrics"][0]
    assert last["resource"]["attributes"]["mlflow.run_id"] == run["result"].ids.mlflow_run_id
    gauges = {m["name"]: m for sm in last["scope_metrics"] for m in sm["metrics"]}
    steps = [e for e in run["events"] if isinstance(e, StepDone)]
    assert gauges["splade.train.loss"]["data"]["data_points"][0]["value"] == steps[-1].loss
    assert gauges["splade.train.loss"]["unit"] == "1"


def test_non_finite_values_are_counted_not_recorded(tmp_path):
    sink = OtelMetricsSink.create(MetricsOptions(exporter="file", export_interval_ms=60_000), log_dir=tmp_path)
    sink.handle(RunStarted(run_name="nan-run", config={}, system_info={}, total_steps=3, num_epochs=1,
                           steps_per_epoch=3))
    sink.handle(step_event(1))
    sink.handle(step_event(2, loss=float("nan")))
    sink.handle(StepDone(**{**step_event(3).__dict__, "loss": float("inf"), "grad_norm": float("-inf")}))
    sink.close(5.0)
    (line,) = (tmp_path / "metrics.jsonl").read_text().splitlines()
    metrics = {m["name"]: m for m in strict_json(line)["resource_metrics"][0]["scope_metrics"][0]["metrics"]}
    points = {name: m["data"]["data_points"] for name, m in metrics.items()}
    assert points["splade.train.loss"][0]["value"] == step_event(1).loss      # the last finite value stays
    assert points["splade.train.grad_norm"][0]["value"] == step_event(2).grad_norm
    assert points["splade.train.step"][0]["value"] == 3
    dropped = {p["attributes"]["splade.metric"]: p["value"] for p in points["splade.metrics.nonfinite"]}
    assert dropped == {"splade.train.loss": 2, "splade.train.base": 1, "splade.train.grad_norm": 1}


# ---------------------------------------------------------------------------------------------- OTLP
def _cli_train(out: Path, env: dict[str, str], *extra: str) -> Any:
    args = ["train", *TINY_ARGS, "--max-steps", "6", "--output-dir", str(out), "--no-mlflow", "--progress", "none",
            "--otel-exporter", "otlp", "--trace-batches", "all", "--log-every-steps", "1", *extra]
    return CliRunner().invoke(cli, args, env={"OTEL_METRIC_EXPORT_INTERVAL": "300", "OTEL_SDK_DISABLED": "false",
                                              "OTEL_SERVICE_NAME": "splade-metrics-test", **env},
                              catch_exceptions=False)


def _batch_losses(traces: Path) -> dict[int, float]:
    """step -> splade.train.loss of the batch spans in traces.jsonl (the span sink's own record of the steps)."""
    out = {}
    for line in traces.read_text().splitlines():
        span = json.loads(line)
        attrs = span.get("attributes") or {}
        if span["name"].startswith("batch") and "splade.train.loss" in attrs:
            out[attrs["splade.step"]] = attrs["splade.train.loss"]
    return out


@pytest.mark.server
def test_otlp_metrics_reach_the_receiver_with_units_and_resource(tmp_path):
    with OtlpReceiver() as rx:
        result = _cli_train(tmp_path / "up", {"OTEL_EXPORTER_OTLP_ENDPOINT": rx.endpoint})
        assert result.exit_code == 0, result.output
        received = rx.metric_snapshot()       # close() made the final export before the command returned
        spans = rx.snapshot()
    assert spans and received
    names = {m.name for m in received}
    assert {"splade.train.loss", "splade.train.lr", "splade.train.step.duration", "process.memory.usage",
            "splade.checkpoint.duration_seconds"} <= names
    losses = _batch_losses(tmp_path / "up" / "logs" / "traces.jsonl")
    assert sorted(losses) == list(range(1, 7))
    loss_points = [m.points[0][1] for m in received if m.name == "splade.train.loss"]
    assert loss_points[-1] == losses[6]                      # the final export has the last step's loss
    assert set(loss_points) <= set(losses.values())          # every export had some step's exact value
    last = {m.name: m for m in received}
    assert last["splade.train.loss"].kind == "gauge" and last["splade.train.loss"].unit == "1"
    assert last["splade.train.tokens_per_second"].unit == "1/s"
    hist = last["splade.train.step.duration"]
    assert hist.kind == "histogram" and hist.unit == "s" and hist.points[0][1]["count"] == 6
    assert hist.temporality == 2                             # cumulative (the SDK's default)
    res = last["splade.train.loss"].resource
    assert res["service.name"] == "splade-metrics-test" and res["splade.run_name"] and res["service.instance.id"]
    assert {sp.resource["service.instance.id"] for sp in spans} == {res["service.instance.id"]}  # one process
    assert "mlflow.run_id" not in res                        # --no-mlflow


@pytest.mark.server
def test_otel_metrics_exporter_none_keeps_metrics_off_the_collector(tmp_path):
    with OtlpReceiver() as rx:
        result = _cli_train(tmp_path / "off", {"OTEL_EXPORTER_OTLP_ENDPOINT": rx.endpoint,
                                               "OTEL_METRICS_EXPORTER": "none"})
        assert result.exit_code == 0, result.output
        assert rx.snapshot() and not rx.metric_snapshot()   # spans yes, metrics no
    lines = (tmp_path / "off" / "logs" / "metrics.jsonl").read_text().splitlines()
    assert lines and all(strict_json(line)["resource_metrics"] for line in lines)   # the local copy stays


@pytest.mark.server
def test_spans_metrics_and_logs_reach_a_real_grpc_receiver(tmp_path):
    """OTEL_EXPORTER_OTLP_PROTOCOL=grpc: the three signals over OTLP/gRPC to a real grpc server, decoded."""
    with OtlpReceiver(protocol="grpc") as rx:
        result = _cli_train(tmp_path / "grpc", {"OTEL_EXPORTER_OTLP_ENDPOINT": rx.endpoint,
                                                "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "--otel-logs", "--json-logs")
        assert result.exit_code == 0, result.output
        spans, metrics, logs = rx.snapshot(), rx.metric_snapshot(), rx.log_snapshot()
    assert "train" in {s.name for s in spans}
    losses = _batch_losses(tmp_path / "grpc" / "logs" / "traces.jsonl")
    assert [m.points[0][1] for m in metrics if m.name == "splade.train.loss"][-1] == losses[6]
    assert {"splade.train.step.duration", "process.memory.usage"} <= {m.name for m in metrics}
    trace_ids = {s.trace_id for s in spans}
    assert logs and all(r.trace_id in trace_ids for r in logs if r.trace_id)
    assert any(str(r.body).startswith("Step 6/6") for r in logs)


def test_grpc_protocol_builds_the_grpc_exporter():
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as Grpc
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as Http

    assert isinstance(build_otlp_metric_exporter({"OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "grpc"}), Grpc)
    assert isinstance(build_otlp_metric_exporter({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}), Grpc)
    assert isinstance(build_otlp_metric_exporter({}), Http)


@pytest.mark.server
def test_close_is_bounded_when_the_collector_hangs(tmp_path, monkeypatch):
    with FaultProxy("http://127.0.0.1:9") as proxy:
        proxy.set_mode("hang")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", proxy.url)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "30")            # the exporter alone would wait 30 s
        sink = OtelMetricsSink.create(MetricsOptions(exporter="otlp", shutdown_timeout=2.0,
                                                     export_interval_ms=60_000), log_dir=tmp_path)
        sink.handle(RunStarted(run_name="hang", config={}, system_info={}, total_steps=3, num_epochs=1,
                               steps_per_epoch=3))
        for step in (1, 2, 3):
            sink.handle(step_event(step))
        t0 = time.monotonic()
        sink.close(timeout=10.0)
        took = time.monotonic() - t0
        assert proxy.wait_for(lambda p: p.faulted >= 1, timeout=2)     # the export did reach the collector
    assert took <= 2.0 + 0.7, took
    assert sink.stats["clean_shutdown"] is False
    (line,) = (tmp_path / "metrics.jsonl").read_text().splitlines()    # the file got the final export anyway
    gauges = {m["name"]: m for m in strict_json(line)["resource_metrics"][0]["scope_metrics"][0]["metrics"]}
    assert gauges["splade.train.loss"]["data"]["data_points"][0]["value"] == step_event(3).loss


@pytest.mark.server
def test_receiver_decodes_otlp_logs():
    import logging

    from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
    from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
    from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor
    from opentelemetry.sdk.trace import TracerProvider

    with OtlpReceiver() as rx:
        provider = LoggerProvider()
        provider.add_log_record_processor(SimpleLogRecordProcessor(OTLPLogExporter(endpoint=rx.endpoint + "/v1/logs")))
        logger = logging.getLogger("test_otel_metrics.logs")
        logger.propagate = False
        handler = LoggingHandler(logger_provider=provider)
        logger.addHandler(handler)
        tracer = TracerProvider().get_tracer("t")
        try:
            with tracer.start_as_current_span("work") as span:
                logger.warning("step %d done", 7)
                ctx = span.get_span_context()
        finally:
            logger.removeHandler(handler)
            provider.shutdown()
        assert rx.wait_for_logs(lambda logs: len(logs) == 1, timeout=5)
        (rec,) = rx.log_snapshot()
    assert rec.body == "step 7 done" and rec.severity_text == "WARN" and rec.severity_number == 13
    assert rec.trace_id == f"{ctx.trace_id:032x}" and rec.span_id == f"{ctx.span_id:016x}"
