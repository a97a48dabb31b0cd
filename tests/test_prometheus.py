"""Prometheus pull: the ``--prometheus-port`` endpoint read with prometheus_client's own parser, a busy port
refused before the run, and a real Prometheus (Debian's ``prometheus`` package) scraping a real run, whose
HTTP API then gives back the loss of the run's steps exactly as MLflow recorded them."""

from __future__ import annotations

import dataclasses
import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from splade_obs.events import ErrorCaught, RunFinished, RunStarted, TrackingRunOpened
from splade_obs.sinks.otel.metrics import MetricsOptions, OtelMetricsSink
from splade_obs_cli.main import cli
from tests._mlflow_utils import step_event
from tests._otlp_receiver import free_port
from tests.conftest import TINY_ARGS

pytestmark = pytest.mark.server


def get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def families(text: str) -> dict[str, Any]:
    from prometheus_client.parser import text_string_to_metric_families

    return {f.name: f for f in text_string_to_metric_families(text)}


def test_endpoint_serves_the_runs_values_then_closes(tmp_path):
    port = free_port()
    sink = OtelMetricsSink.create(MetricsOptions(exporter="none", prometheus_port=port), log_dir=tmp_path)
    assert sink is not None and get(f"http://127.0.0.1:{port}/metrics") == ""   # bound before the run, empty
    sink.handle(TrackingRunOpened(run_id="r" * 32, experiment_id="7", tracking_uri="sqlite:///x.db"))
    sink.handle(RunStarted(run_name="prom-run", config={}, system_info={}, total_steps=3, num_epochs=1,
                           steps_per_epoch=3))
    t0 = time.time_ns()
    for step in (1, 2, 3):                                        # steps of 0.1, 0.2 and 0.3 s
        sink.handle(dataclasses.replace(step_event(step), start_ns=t0, end_ns=t0 + step * 100_000_000))
    sink.handle(ErrorCaught(category="DATA_ERROR", message="bad", error_type="DataError", exception_type=None,
                            exception_message=None, context={}, step=3, batch_index=2, skipped_batch=True))
    fam = families(get(f"http://127.0.0.1:{port}/metrics"))
    (loss,) = fam["splade_train_loss"].samples
    assert loss.value == step_event(3).loss
    assert loss.labels["mlflow_run_id"] == "r" * 32 and loss.labels["splade_run_name"] == "prom-run"
    assert "otel_scope_name" in loss.labels
    hist = {s.name: s.value for s in fam["splade_train_step_duration_seconds"].samples if not s.labels.get("le")}
    assert fam["splade_train_step_duration_seconds"].type == "histogram"
    assert hist["splade_train_step_duration_seconds_count"] == 3
    assert hist["splade_train_step_duration_seconds_sum"] == pytest.approx(0.6)
    errors = [s for s in fam["splade_errors"].samples if s.name == "splade_errors_total"]
    assert [(s.labels["error_category"], s.value) for s in errors] == [("DATA_ERROR", 1.0)]
    assert fam["process_memory_usage_bytes"].samples[0].value > 1e6
    info = fam["target_info"].samples[0].labels                   # the resource
    assert info["service_name"] == "splade-obs" and info["mlflow_run_id"] == "r" * 32
    sink.handle(RunFinished(status="FINISHED", step=3, duration_seconds=1.5))
    sink.close(5.0)
    with pytest.raises(OSError):
        get(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_a_busy_port_stops_the_run_before_it_starts(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = tmp_path / "out"
        result = CliRunner().invoke(cli, ["train", *TINY_ARGS, "--max-steps", "2", "--output-dir", str(out),
                                          "--no-mlflow", "--progress", "none", "--prometheus-port", str(port)])
    assert result.exit_code != 0
    assert f"127.0.0.1:{port}" in result.output and "--prometheus-port" in result.output
    assert not (out / "checkpoints").exists() and not (out / "final").exists()


# ------------------------------------------------------------------------------------------ real Prometheus
@pytest.fixture
def prometheus(tmp_path):
    """A real Prometheus on 127.0.0.1 scraping 127.0.0.1:<target port> every second: (API url, target port)."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("no prometheus binary (Debian package 'prometheus'; .ci/run installs it when it can)")
    target, api = free_port(), free_port()
    conf = tmp_path / "prometheus.yml"
    conf.write_text("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n"
                    f"  - job_name: splade\n    static_configs:\n      - targets: ['127.0.0.1:{target}']\n")
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen([binary, f"--config.file={conf}", f"--web.listen-address=127.0.0.1:{api}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{api}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if "Ready" in get(f"{url}/-/ready", timeout=1):
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"prometheus did not start: {(tmp_path / 'prometheus.log').read_text()[-2000:]}")
            time.sleep(0.2)
        yield url, target
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


def query(url: str, promql: str) -> list[dict[str, Any]]:
    doc = json.loads(get(f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})))
    assert doc["status"] == "success", doc
    return doc["data"]["result"]


@pytest.mark.slow
def test_real_prometheus_scrapes_the_loss_of_a_real_run(prometheus, tmp_path):
    import mlflow

    url, port = prometheus
    out = tmp_path / "out"
    args = ["train", *TINY_ARGS, "--max-steps", "30", "--log-every-steps", "1", "--output-dir", str(out),
            "--progress", "none", "--prometheus-port", str(port), "--prometheus-linger", "6"]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (series,) = query(url, "splade_train_loss[10m]")           # raw samples, one series
    samples = [float(v) for _, v in series["values"]]
    run_id = series["metric"]["mlflow_run_id"]
    assert series["metric"]["job"] == "splade" and series["metric"]["splade_run_name"]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{Path.cwd() / 'mlruns' / 'mlflow.db'}")
    history = {m.step: m.value for m in client.get_metric_history(run_id, "train/loss")}
    assert sorted(history) == list(range(1, 31))
    assert len(samples) >= 3, samples
    assert set(samples) <= set(history.values())                # every scrape saw some step's exact loss
    assert samples[-1] == history[30]                           # and the last ones the final step's
    (steps,) = query(url, "max_over_time(splade_train_step[10m])")
    assert float(steps["value"][1]) == 30
    (count,) = query(url, "max_over_time(splade_train_step_duration_seconds_count[10m])")
    assert float(count["value"][1]) == 30
