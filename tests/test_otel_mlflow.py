"""Spans to a real ``mlflow server``: ``splade-obs train --otel-to-mlflow`` (the default when the run is tracked)
sends the run's trace to ``/v1/traces`` with the x-mlflow-* headers, then finishes it through the REST API (run
link ``mlflow.sourceRun``, trace name = run name, previews); ``mlflow.search_traces(run_id=...)`` finds it.
(The default sqlite store, no server: ``test_otel_mlflow_store.py``.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest
from click.testing import CliRunner

from splade_obs.sinks.otel import mlflow_trace_id
from splade_obs.sinks.otel.attributes import span_kind
from splade_obs_cli.main import cli
from tests._otlp_receiver import free_port
from tests.conftest import TINY_ARGS

pytestmark = pytest.mark.server


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    store = tmp_path / "server"
    store.mkdir()
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}", "--default-artifact-root",
           str(store / "artifacts"), "--workers", "1"]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    log = (store / "server.log").open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not come up: {(store / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield uri
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


def test_trace_is_found_with_the_mlflow_run(mlflow_server, tmp_path, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    for var in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(var, raising=False)
    out = tmp_path / "out"
    args = ["train", *TINY_ARGS, "--max-steps", "2", "--output-dir", str(out), "--progress", "none",
            "--tracking-uri", mlflow_server, "--experiment-name", "otel-link", "--otel-to-mlflow",
            "--trace-batches", "all"]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output

    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("otel-link")
    (run,) = client.search_runs([exp.experiment_id])
    otel_trace_id = run.data.tags["otel.trace_id"]               # the MLflow sink tagged the run
    mlflow.set_tracking_uri(mlflow_server)
    traces = []
    deadline = time.monotonic() + 20                             # the server links the trace on ingest
    while not traces and time.monotonic() < deadline:
        traces = mlflow.search_traces(run_id=run.info.run_id, locations=[exp.experiment_id], return_type="list")
        if not traces:
            time.sleep(0.5)
    assert len(traces) == 1
    trace = traces[0]
    assert otel_trace_id in trace.info.trace_id
    names = [s.name for s in trace.data.spans]
    assert names.count("train") == 1 and [span_kind(n) for n in names].count("batch") == 2 and "epoch" in names
    (root,) = [s for s in trace.data.spans if s.name == "train"]
    assert root.attributes["mlflow.run_id"] == run.info.run_id
    assert root.attributes["mlflow.experiment_id"] == exp.experiment_id
    assert all("splade.train.loss" in s.attributes for s in trace.data.spans if span_kind(s.name) == "batch")
    # finished through the REST API: listed with the run's name in the experiment's trace list
    info = client.get_trace(trace.info.trace_id).info
    assert info.trace_id == mlflow_trace_id(otel_trace_id)
    assert info.trace_metadata["mlflow.sourceRun"] == run.info.run_id
    assert info.tags["mlflow.traceName"] == run.info.run_name
    assert json.loads(info.request_preview)["run_name"] == run.info.run_name
    assert json.loads(info.response_preview)["status"] == "FINISHED"
    assert info.state.value == "OK" and info.execution_duration > 0
