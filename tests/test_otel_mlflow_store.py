"""The run's trace in MLflow with the default sqlite store (no server): written through MLflow's own store API.

One module-scoped pair of real ``splade-obs train`` runs (CliRunner, splade-tiny, the default
``sqlite:///<cwd>/mlruns/mlflow.db``): one with the default (the trace goes to MLflow), one with
``--no-otel-to-mlflow``. Then a run against a store that refuses ``log_spans`` (fault injected) and a store
that hangs (the end of the run stays bounded), and the pure helpers (trace id, UI link, store policy).
"""

from __future__ import annotations

import json
import random
import sqlite3
import threading
import time
import urllib.parse
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from splade_obs.sinks.otel import OtelOptions, OtelSink, mlflow_trace_id, mlflow_trace_ui_path
from splade_obs.sinks.otel import mlflow_export as mx
from splade_obs.sinks.otel.attributes import span_kind
from splade_obs_cli.main import cli
from tests.conftest import TINY_ARGS

OTEL_ENV = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SDK_DISABLED",
            "MLFLOW_TRACKING_URI")
STEPS = 3
EXPERIMENT = "otel-store"


def _strict_json(text: str):
    """json.loads that refuses NaN/Infinity, as a browser's JSON.parse does."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


def _train(out: Path, run_name: str, *extra: str):
    args = ["train", *TINY_ARGS, "--max-steps", str(STEPS), "--output-dir", str(out), "--progress", "none",
            "--run-name", run_name, "--experiment-name", EXPERIMENT, "--trace-batches", "all", *extra]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def _local_spans(log_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (log_dir / "traces.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def store_runs(tmp_path_factory):
    """Two real runs in one default sqlite store: ``traced`` (the default) and ``untraced`` (--no-otel-to-mlflow)."""
    root = tmp_path_factory.mktemp("otel_store")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)                       # the default store: <cwd>/mlruns/mlflow.db
        for var in OTEL_ENV:
            mp.delenv(var, raising=False)
        _train(root / "traced", "otel-traced-run")
        _train(root / "untraced", "otel-untraced-run", "--no-otel-to-mlflow")
    from mlflow import MlflowClient

    uri = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    return SimpleNamespace(root=root, uri=uri, client=client, exp_id=exp.experiment_id, runs=runs)


def test_the_trace_is_in_the_default_store_linked_to_the_run(store_runs):
    s = store_runs
    run = s.runs["otel-traced-run"]
    traces = s.client.search_traces(locations=[s.exp_id], run_id=run.info.run_id)   # the run's Traces tab
    assert len(traces) == 1
    trace_id = traces[0].info.trace_id
    assert trace_id == mlflow_trace_id(run.data.tags["otel.trace_id"])              # the id the run page links to
    trace = s.client.get_trace(trace_id)
    info = trace.info
    assert info.trace_metadata["mlflow.sourceRun"] == run.info.run_id
    assert info.tags["mlflow.traceName"] == "otel-traced-run"
    assert info.state.value == "OK" and info.execution_duration > 0

    spans = trace.data.spans
    names = [sp.name for sp in spans]
    assert names.count("train") == 1 and names.count("epoch") == 1 and [span_kind(n) for n in names].count("batch") == STEPS
    assert {"data.load", "model.load", "checkpoint"} <= set(names)
    (root,) = [sp for sp in spans if sp.parent_id is None]
    (epoch,) = [sp for sp in spans if sp.name == "epoch"]
    assert root.name == "train" and epoch.parent_id == root.span_id
    assert all(sp.parent_id == epoch.span_id for sp in spans if span_kind(sp.name) == "batch")
    assert info.request_time == root.start_time_ns // 1_000_000
    assert root.attributes["mlflow.run_id"] == run.info.run_id
    assert root.attributes["splade.run_name"] == "otel-traced-run"
    assert root.inputs["run_name"] == "otel-traced-run" and root.inputs["total_steps"] == STEPS
    assert root.outputs["status"] == "FINISHED" and root.outputs["final_step"] == STEPS

    # every span of the local trace file is in MLflow, with the same values
    local = _local_spans(s.root / "traced" / "logs")
    assert sorted((d["name"], d["context"]["span_id"][2:]) for d in local) == \
        sorted((sp.name, sp.span_id) for sp in spans)
    by_id = {sp.span_id: sp for sp in spans}
    for d in local:
        if span_kind(d["name"]) == "batch":
            assert by_id[d["context"]["span_id"][2:]].attributes["splade.train.loss"] == \
                d["attributes"]["splade.train.loss"]


def test_the_stored_trace_is_what_the_ui_loads(store_runs):
    """The UI reads the trace info and each span's stored JSON: strict JSON, and the trace lists by run name
    (trace name, the Input preview) in the experiment's trace list."""
    s = store_runs
    (trace,) = s.client.search_traces(locations=[s.exp_id], filter_string="attributes.name = 'otel-traced-run'")
    info = trace.info
    assert _strict_json(info.request_preview)["run_name"] == "otel-traced-run"
    assert _strict_json(info.response_preview)["status"] == "FINISHED"
    with sqlite3.connect(s.root / "mlruns" / "mlflow.db") as con:
        rows = con.execute("SELECT content FROM spans WHERE trace_id = ?", (info.trace_id,)).fetchall()
    assert len(rows) == len(trace.data.spans)
    for (content,) in rows:
        span = _strict_json(content)
        for value in span["attributes"].values():      # MLflow keeps each attribute JSON-encoded
            _strict_json(value)


def test_no_otel_to_mlflow_leaves_no_trace(store_runs):
    s = store_runs
    run = s.runs["otel-untraced-run"]
    assert s.client.search_traces(locations=[s.exp_id], run_id=run.info.run_id) == []
    all_traces = s.client.search_traces(locations=[s.exp_id])
    assert [t.info.tags.get("mlflow.traceName") for t in all_traces] == ["otel-traced-run"]
    local = _local_spans(s.root / "untraced" / "logs")                       # the local trace is still written
    assert [d["name"] for d in local].count("train") == 1
    assert "mlflow.traceTag.mlflow.traceName" not in next(d for d in local if d["name"] == "train")["attributes"]


def test_non_finite_metrics_stay_strict_json(store_runs):
    """A diverged run (NaN loss, infinite grad norm) still gives a trace the UI can parse."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    s = store_runs
    exp_id = s.client.create_experiment(f"nan-{random.getrandbits(32):x}")
    exporter = mx.MlflowStoreExporter(s.uri, lambda: (exp_id, None))
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("train", attributes={"splade.run_name": "diverged", "splade.status": "FAILED",
                                                            "splade.epoch.loss": float("nan")}):
        with tracer.start_as_current_span("batch", attributes={"splade.train.loss": float("nan"),
                                                               "splade.train.grad_norm": float("inf")}):
            pass
    provider.shutdown()
    (trace_id,) = exporter.finalized
    info = s.client.get_trace(trace_id).info
    assert _strict_json(info.response_preview)["epoch/loss"] == "nan"
    with sqlite3.connect(s.root / "mlruns" / "mlflow.db") as con:
        rows = con.execute("SELECT content FROM spans WHERE trace_id = ?", (trace_id,)).fetchall()
    assert len(rows) == 2
    for (content,) in rows:
        _strict_json(content)


def test_a_store_that_refuses_spans_costs_one_warning(tmp_path, monkeypatch):
    """Fault injected: the store refuses log_spans. The run finishes, one warning says so, traces.jsonl is whole."""
    from mlflow.exceptions import MlflowException
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    calls = []

    def refuse(self, location, spans, tracking_uri=None):
        calls.append(len(spans))
        raise MlflowException("(sqlite3.OperationalError) database is locked")

    monkeypatch.setattr(SqlAlchemyStore, "log_spans", refuse)
    for var in OTEL_ENV:
        monkeypatch.delenv(var, raising=False)
    _train(tmp_path / "out", "otel-refused-run")
    assert calls                                                     # the fault was hit
    log_lines = (tmp_path / "out" / "logs" / "train_splade.log").read_text().splitlines()
    warnings = [ln for ln in log_lines if ln.startswith("[WARNING]") and "splade_obs.sinks.otel" in ln]
    assert len(warnings) == 1 and "MLflow store" in warnings[0] and "database is locked" in warnings[0]
    (summary,) = [ln for ln in log_lines if "tracing: " in ln and "spans (" in ln]
    ended = int(summary.split("tracing: ", 1)[1].split(" ", 1)[0])
    local = _local_spans(tmp_path / "out" / "logs")
    assert len(local) == ended and [span_kind(d["name"]) for d in local].count("batch") == STEPS
    assert [d["name"] for d in local].count("train") == 1
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name(EXPERIMENT)
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert client.search_traces(locations=[exp.experiment_id]) == []


class _HangingStore:
    """Fault injection: a store whose log_spans never returns (a database locked by another process)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.called = threading.Event()

    def log_spans(self, location, spans, tracking_uri=None):
        self.called.set()
        self.release.wait(60)
        raise RuntimeError("released")


def test_a_hanging_store_does_not_hold_up_the_end_of_the_run(tmp_path, monkeypatch):
    from tests.test_otel_sink import FakeTracking, run_synthetic
    from splade_obs.bus import EventBus

    store = _HangingStore()
    monkeypatch.setattr(mx._TraceWriter, "_get_store", lambda self: store)
    bus = EventBus()
    sink = OtelSink.create(OtelOptions(exporter="file", shutdown_timeout=1.0), log_dir=tmp_path / "logs")
    for s in (FakeTracking(uri=f"sqlite:///{tmp_path / 'mlflow.db'}"), sink):
        bus.add(s)
    bus.open()
    run_synthetic(bus)
    t0 = time.monotonic()
    bus.close(timeout=5.0)
    elapsed = time.monotonic() - t0
    store.release.set()
    assert store.called.is_set() and elapsed < 4.0
    assert len(_local_spans(tmp_path / "logs")) == sink.spans_ended                    # the local file is whole
    assert sink.stats["dropped"]["file"] == 0 and sink.stats["dropped"]["mlflow"] == sink.spans_ended


# ------------------------------------------------------------------------------------------ pure helpers
def test_trace_id_and_ui_link_are_mlflows():
    from mlflow.tracing.utils import generate_mlflow_trace_id_from_otel_trace_id

    otel = random.getrandbits(128) | 1
    hex_id = f"{otel:032x}"
    assert mlflow_trace_id(hex_id) == generate_mlflow_trace_id_from_otel_trace_id(otel)
    assert mlflow_trace_id(hex_id.upper()) == mlflow_trace_id(hex_id)
    for bad in ("xyz", "0" * 32, hex_id[:-1], ""):
        with pytest.raises(ValueError):
            mlflow_trace_id(bad)
    path = mlflow_trace_ui_path("12", hex_id)
    route, query = path.split("?", 1)
    assert route == "#/experiments/12/traces"
    params = dict(urllib.parse.parse_qsl(query))
    assert params == {"selectedEvaluationId": mlflow_trace_id(hex_id), "traceId": mlflow_trace_id(hex_id),
                      "startTimeLabel": "ALL"}


@pytest.mark.parametrize("uri, kind", [
    ("http://127.0.0.1:5000", "server"), ("https://mlflow.example.com/", "server"),
    ("sqlite:////tmp/mlruns/mlflow.db", "database"), ("postgresql+psycopg2://h/db", "database"),
    ("mysql://h/db", "database"), ("file:///tmp/mlruns", None), ("/tmp/mlruns", None), ("databricks", None),
    (None, None),
])
def test_store_kind(uri, kind):
    assert mx.store_kind(uri) == kind


def test_the_store_is_opened_with_the_sinks_uri_and_sqlite_paths_are_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert mx.absolute_store_uri("sqlite:///rel/mlflow.db") == f"sqlite:///{tmp_path / 'rel' / 'mlflow.db'}"
    assert mx.absolute_store_uri("sqlite:////abs/mlflow.db") == "sqlite:////abs/mlflow.db"
    full = "postgresql://user:pw@db.local/mlflow"
    exporter = mx.MlflowStoreExporter("postgresql://db.local/mlflow", lambda: (None, None), open_uri=full)
    assert exporter.uri == "postgresql://db.local/mlflow"                      # what a warning may show
    assert exporter._open_uri == full                                           # what is opened
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://other:secret@db.local/mlflow")
    assert mx.MlflowStoreExporter("postgresql://db.local/mlflow", lambda: (None, None))._open_uri \
        == "postgresql://db.local/mlflow", "the environment is not searched for credentials"


def test_build_sinks_hands_the_otel_sink_the_store_uri_the_mlflow_sink_opened(tmp_path):
    from splade_obs.config import TrainConfig
    from splade_obs.run import build_sinks
    from splade_obs.sinks.mlflow import MlflowSink
    from splade_obs.sinks.otel import OtelSink

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = TrainConfig.from_mapping({"checkpoint": {"output_dir": str(tmp_path / "out")},
                                    "tracking": {"tracking_uri": uri, "system_metrics": False},
                                    "tracing": {"metrics": False}})
    sinks = build_sinks(cfg, run_name="uri")
    try:
        (otel,) = [s for s in sinks if isinstance(s, OtelSink)]
        (ml,) = [s for s in sinks if isinstance(s, MlflowSink)]
        assert otel.store_uri == ml.transport.tracking_uri == uri
    finally:
        for sink in reversed(sinks):
            sink.close(5.0)
