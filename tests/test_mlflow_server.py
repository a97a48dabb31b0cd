"""The MLflow sink against a real ``mlflow server`` on 127.0.0.1 (started here, killed after): metrics,
params and artifacts arrive over HTTP; killing the server mid-run blocks neither emit nor close, and every
point is either on the server or in the sink's local unsent record."""

from __future__ import annotations

import json
import logging
import time

import pytest

from splade_obs.events import StepDone
from splade_obs.sinks.mlflow import UNSENT_FILE
from tests._mlflow_utils import create_sink, make_cfg, metric_steps, mlflow_server, open_bus, run_events, stop_server

pytestmark = [pytest.mark.server, pytest.mark.timeout(600)]


@pytest.fixture
def bounded_http_env(monkeypatch):
    """The values the sink sets for http stores, set here so they are restored after the test."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def _wait_for_step(client, run_id: str, key: str, step: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if step in metric_steps(client, run_id, key):
            return
        time.sleep(0.2)
    raise AssertionError(f"{key} step {step} never reached the server")


def test_http_run_arrives_and_a_killed_server_blocks_nothing(tmp_path, bounded_http_env, caplog):
    from mlflow import MlflowClient

    with mlflow_server(tmp_path) as (url, proc, backend_db):
        # 1. a whole run over HTTP: params, stepped metrics, tags, artifacts (proxied), status
        cfg = make_cfg(tmp_path / "a", uri=url)
        sink = create_sink(cfg)
        assert sink is not None
        bus, ids = open_bus(sink)
        assert ids.tracking_uri == url and ids.mlflow_run_id == sink.run_id
        for e in run_events(cfg):
            bus.emit(e)
        with caplog.at_level(logging.INFO, logger="splade_obs.sinks.mlflow"):
            bus.close(timeout=60)
        # the run's page on the server, on its runs view ("Model training"), is the last word of the run
        page = f"{url}/#/experiments/{ids.mlflow_experiment_id}/runs/{sink.run_id}?workflowType=machine_learning"
        assert f"MLflow run: {page}" in caplog.messages
        http = MlflowClient(tracking_uri=url)
        run = http.get_run(sink.run_id)
        assert run.info.status == "FINISHED"
        assert run.data.params["optim.batch_size"] == "16"
        assert metric_steps(http, sink.run_id, "train/loss") == [1, 2, 4, 5, 6]
        assert run.data.metrics["eval/ndcg_at_10"] == pytest.approx(0.31)
        assert "config.yaml" in {f.path for f in http.list_artifacts(sink.run_id)}
        # errors in sight and one point per fact, on a server too (the synthetic run skipped one batch)
        assert run.data.metrics["errors/total"] == 1 and run.data.tags["splade.health"] == "degraded"
        assert run.data.tags["mlflow.note.content"].splitlines()[0].endswith("1 errors (DATA_ERROR: 1) · 1 skipped batches")
        assert "None" not in run.data.params.values() and not {"device", "amp_dtype"} & set(run.data.tags)
        assert http.get_experiment(ids.mlflow_experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
        # `runs compare` by the 8-character prefix it prints, against the server
        from click.testing import CliRunner
        from splade_obs_cli.main import cli
        shown = CliRunner().invoke(cli, ["runs", "compare", sink.run_id[:8], "--tracking-uri", url, "--all-params"])
        assert shown.exit_code == 0 and f"({sink.run_id[:8]})" in shown.output and "optim.batch_size" in shown.output

        # 2. the server dies mid-run
        cfg = make_cfg(tmp_path / "b", uri=url)
        sink = create_sink(cfg)
        bus, _ = open_bus(sink)
        events = run_events(cfg, steps=range(1, 13))
        steps = [e for e in events if isinstance(e, StepDone)]
        cut = events.index(steps[4])
        for e in events[:cut]:
            bus.emit(e)
        _wait_for_step(http, sink.run_id, "train/loss", steps[3].step)
        stop_server(proc)
        emit_seconds = []
        for e in events[cut:]:
            t0 = time.monotonic()
            bus.emit(e)
            emit_seconds.append(time.monotonic() - t0)
        t0 = time.monotonic()
        bus.close(timeout=15)
        close_seconds = time.monotonic() - t0

    assert max(emit_seconds) < 0.5, emit_seconds          # emit never waits on the network
    assert close_seconds < 17, close_seconds              # close keeps its bound with the server gone
    backend = MlflowClient(tracking_uri=f"sqlite:///{backend_db}")
    on_server = set(metric_steps(backend, sink.run_id, "train/loss"))
    lines = (cfg.log_dir / UNSENT_FILE).read_text().splitlines()
    unsent = {json.loads(x)["step"] for x in lines[1:] if json.loads(x)["key"] == "train/loss"}
    assert json.loads(lines[0])["dropped"] == 0
    assert {s.step for s in steps[:4]} <= on_server
    assert on_server | unsent == {s.step for s in steps}  # nothing lost: on the server or in the local record
    assert unsent  # the points emitted after the kill could not have reached the server


def test_real_training_goes_on_when_the_server_dies_mid_run(tmp_path, tiny_cfg, bounded_http_env):
    """The real trainer, tracked on a real server that is killed after step 2 (from a sink, to hit the
    middle of the run): training finishes every step, the local metrics file is complete, and every
    train/loss point is on the server or in the local unsent record."""
    from mlflow import MlflowClient

    from splade_obs.bus import RecordingSink, Sink
    from splade_obs.run import run_training

    with mlflow_server(tmp_path) as (url, proc, backend_db):
        class KillServerAtStep2(Sink):  # fault injection
            name, scope = "kill-server", "rank"

            def on_step_done(self, e):
                if e.step == 2:
                    stop_server(proc)

        cfg = tiny_cfg(optim={"max_steps": 5}, tracking={"enabled": True, "tracking_uri": url})
        rec = RecordingSink()
        result = run_training(cfg, extra_sinks=[KillServerAtStep2(), rec], close_timeout=30)
        assert proc.poll() is not None  # the server really died during the run

    assert result.status == "FINISHED"
    assert [e.step for e in rec.of(StepDone)] == [1, 2, 3, 4, 5]
    metrics = json.loads((cfg.log_dir / "training_metrics.json").read_text())
    assert metrics["status"] == "FINISHED" and metrics["metrics_by_epoch"]["1"]["train_loss"] > 0
    run_id = result.ids.mlflow_run_id
    on_server = set(metric_steps(MlflowClient(tracking_uri=f"sqlite:///{backend_db}"), run_id, "train/loss"))
    lines = (cfg.log_dir / UNSENT_FILE).read_text().splitlines()
    unsent = {json.loads(x)["step"] for x in lines[1:] if json.loads(x)["key"] == "train/loss"}
    assert on_server | unsent == {1, 2, 3, 4, 5}
    assert {3, 4, 5} <= unsent  # emitted after the kill: they could only be kept locally
