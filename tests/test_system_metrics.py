"""System metrics in the MLflow run's "System metrics" tab: MLflow's own monitor, sending through the sink.

Real parts: real training runs through the CLI (splade-tiny, sqlite store), the MLflow sink with synthetic
events on a sqlite store, a real ``mlflow server`` (alive, then killed). Mocks only inject faults into a sampler.
"""

from __future__ import annotations

import json
import logging
import statistics
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from splade_obs.config import TrainConfig
from splade_obs.sinks.mlflow import UNSENT_FILE, MlflowSink, env
from splade_obs.sinks.mlflow.env import resolve_options
from tests._mlflow_utils import make_cfg, mlflow_server, open_bus, run_events

CPU = "system/cpu_utilization_percentage"
#: what MLflow's CPU, disk and network samplers log on any machine
CORE = {CPU, "system/system_memory_usage_megabytes", "system/system_memory_usage_percentage",
        "system/disk_usage_percentage", "system/disk_available_megabytes", "system/network_receive_megabytes",
        "system/network_transmit_megabytes"}


def _no_mlflow_env() -> dict[str, str | None]:
    """CliRunner env: every MLflow variable this project reads unset (a developer's shell must not leak in)."""
    return {name: None for name in env.ENV_VARS}


def _train(tmp: Path, *extra: str, environ: dict[str, str | None] | None = None):
    from splade_obs_cli.main import cli
    from tests.conftest import TINY_ARGS

    args = ["train", "--max-steps", "2", *TINY_ARGS, "--otel-exporter", "none", "--progress", "none",
            "--no-log-model", "--output-dir", str(tmp / "out"), "--tracking-uri", f"sqlite:///{tmp}/m.db",
            "--experiment-name", "sm", *extra]
    res = CliRunner().invoke(cli, args, env={**_no_mlflow_env(), **(environ or {})}, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res


def _run(tmp: Path):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp}/m.db")
    (run,) = client.search_runs([client.get_experiment_by_name("sm").experiment_id])
    return client, run


def _history(client, run_id: str, key: str):
    return sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One real run with the defaults (10 s interval), then its resume with a 0.3 s interval (same run)."""
    tmp = tmp_path_factory.mktemp("sysmetrics")
    _train(tmp, "--run-name", "sm-run")
    client, run = _run(tmp)
    first = {k: _history(client, run.info.run_id, k) for k in run.data.metrics if k.startswith("system/")}
    first_tags = dict(run.data.tags)
    _train(tmp, "--resume", "auto", "--max-steps", "16",  # 14 more steps: long enough for several 0.3 s samples
           environ={"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.3"})
    client, resumed = _run(tmp)
    return client, run.info.run_id, first, first_tags, resumed


@pytest.mark.slow
def test_a_short_real_run_has_every_system_metric_with_points(trained):
    """Default settings: even a run of a few seconds (shorter than the 10 s interval) fills the tab."""
    _, _, first, tags, _ = trained
    assert CORE <= set(first), sorted(first)
    for key in CORE:
        steps = [m.step for m in first[key]]
        assert len(steps) >= 1 and steps == list(range(len(steps))), (key, steps)  # MLflow's 0, 1, 2... steps
    assert 0 <= first[CPU][-1].value <= 100 * 1024  # percent of all cores
    assert first[CPU][0].value > 0, "the first CPU sample says nothing (psutil not primed in the sampler thread)"
    assert tags["splade.system_metrics"] == "every 10s"


@pytest.mark.slow
def test_resume_continues_the_system_steps_at_the_variables_interval(trained):
    client, run_id, first, _, resumed = trained
    assert resumed.info.run_id == run_id and resumed.info.status == "FINISHED"
    history = _history(client, run_id, CPU)
    steps = [m.step for m in history]
    assert steps == list(range(len(steps))), steps           # continued after the first part: no step twice
    second = history[len(first[CPU]):]
    assert len(second) >= 3, steps                          # a 0.3 s interval over a run of a few seconds
    gaps = [(b.timestamp - a.timestamp) / 1000 for a, b in zip(second, second[1:])]
    assert statistics.median(gaps) < 2.0, gaps              # MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL, not 10 s
    assert resumed.data.tags["splade.system_metrics"] == "every 0.3s"
    assert "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL" in resumed.data.tags["splade.mlflow_env"].split(",")


@pytest.mark.slow
def test_no_system_metrics_flag_beats_the_variable(tmp_path):
    _train(tmp_path, "--no-system-metrics", environ={"MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "true"})
    _, run = _run(tmp_path)
    assert "train/loss" in run.data.metrics
    assert not [k for k in run.data.metrics if k.startswith("system/")]
    assert run.data.tags["splade.system_metrics"] == "off"


# ------------------------------------------------------------------------- the sink, synthetic events
@pytest.fixture(scope="module")
def store_uri(tmp_path_factory) -> str:
    """One sqlite store for the sink tests of this module (creating one costs seconds); one run each."""
    return f"sqlite:///{tmp_path_factory.mktemp('sm-store') / 'm.db'}"


def _sink_run(tmp_path: Path, cfg: TrainConfig, environ: dict[str, str], *, hold_s: float = 0.0):
    """The MLflow sink as ``build_sinks`` makes it for ``cfg`` and ``environ``, fed a synthetic run."""
    sink = MlflowSink.create(resolve_options(cfg.tracking, log_dir=str(cfg.log_dir), environ=environ))
    assert sink is not None
    bus, _ = open_bus(sink)
    events = run_events(cfg)
    for e in events[:-1]:
        bus.emit(e)
    time.sleep(hold_s)
    bus.emit(events[-1])
    bus.close(timeout=30)
    from mlflow import MlflowClient
    client = MlflowClient(cfg.tracking.tracking_uri)
    return sink, client, client.get_run(sink.run_id)


def _system_keys(run) -> set[str]:
    return {k for k in run.data.metrics if k.startswith("system/")}


@pytest.mark.parametrize("flag, variable, on", [(None, "false", False), (None, "0", False), (None, "TRUE", True),
                                                 (True, "false", True), (False, "true", False), (None, None, True)])
def test_on_off_flag_wins_over_the_variable_which_wins_over_on(tmp_path, store_uri, flag, variable, on):
    cfg = make_cfg(tmp_path, uri=store_uri, system_metrics=flag)
    environ = {} if variable is None else {"MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": variable}
    _, _, run = _sink_run(tmp_path, cfg, environ)
    assert bool(_system_keys(run)) is on, sorted(run.data.metrics)
    if on:
        assert CORE <= _system_keys(run)
    assert (run.data.tags["splade.system_metrics"] == "off") is not on


def test_the_variables_set_the_monitor(tmp_path, store_uri):
    cfg = make_cfg(tmp_path, uri=store_uri)
    environ = {"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.1", "MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING": "2",
               "MLFLOW_SYSTEM_METRICS_NODE_ID": "box7"}
    sink, client, run = _sink_run(tmp_path, cfg, environ, hold_s=1.0)
    monitor = sink._system
    assert (monitor.sampling_interval, monitor.samples_before_logging, monitor.node_id) == (0.1, 2, "box7")
    keys = _system_keys(run)
    assert keys and all(k.startswith("system/box7/") for k in keys), sorted(keys)
    points = client.get_metric_history(run.info.run_id, "system/box7/cpu_utilization_percentage")
    assert monitor.samples >= 6 and len(points) == monitor.points
    assert monitor.points <= monitor.samples // 2 + 1          # two samples averaged into each point
    assert run.data.tags["splade.system_metrics"] == "every 0.1s, 2 samples a point, node box7"


def test_a_failing_sampler_is_reported_once_and_the_others_go_on(tmp_path, store_uri, caplog, monkeypatch):
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor

    def broken(self):  # injected fault: the CPU sampler fails at every sample
        raise OSError("sensor gone")

    monkeypatch.setattr(CPUMonitor, "collect_metrics", broken)
    cfg = make_cfg(tmp_path, uri=store_uri)
    caplog.set_level(logging.INFO)
    sink, _, run = _sink_run(tmp_path, cfg, {"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.1"}, hold_s=0.8)
    assert sink._system.samples >= 5
    failures = [r for r in caplog.records if "sensor gone" in r.getMessage()]
    assert len(failures) == 1, [r.getMessage() for r in failures]      # not one warning per sample
    keys = _system_keys(run)
    assert "system/disk_usage_percentage" in keys and "system/network_receive_megabytes" in keys
    assert not [k for k in keys if "cpu" in k or "memory" in k]        # the CPU sampler's metrics only are missing
    assert run.info.status == "FINISHED" and "train/loss" in run.data.metrics


def test_a_sampler_warning_at_every_sample_is_shown_once(tmp_path, store_uri, caplog, monkeypatch):
    """MLflow's GPU sampler warns at every sample when an NVML query fails (power on some GPUs): shown once."""
    from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor

    original = DiskMonitor.collect_metrics

    def warns(self):  # injected fault, the way gpu_monitor.py reports one: a warning, and the sample goes on
        logging.getLogger(type(self).__module__).warning("Encountered error Not Supported when trying to collect "
                                                         "disk metrics.")
        original(self)

    monkeypatch.setattr(DiskMonitor, "collect_metrics", warns)
    caplog.set_level(logging.INFO)
    sink, _, run = _sink_run(tmp_path, make_cfg(tmp_path, uri=store_uri),
                             {"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.1"}, hold_s=0.8)
    assert sink._system.samples >= 5 and "system/disk_usage_percentage" in _system_keys(run)
    shown = [r for r in caplog.records if "Not Supported" in r.getMessage()]
    assert len(shown) == 1, len(shown)


def test_stopping_a_hung_sampler_is_bounded(tmp_path, store_uri, monkeypatch):
    from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor

    release = threading.Event()
    original = DiskMonitor.collect_metrics

    def hung(self):  # injected fault: the disk query never returns (a dead network mount)
        release.wait(30)
        original(self)

    monkeypatch.setattr(DiskMonitor, "collect_metrics", hung)
    cfg = make_cfg(tmp_path, uri=store_uri)
    sink = MlflowSink.create(resolve_options(cfg.tracking, log_dir=str(cfg.log_dir),
                                             environ={"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.1"}))
    bus, _ = open_bus(sink)
    for e in run_events(cfg):
        bus.emit(e)
    time.sleep(1.3)                                     # the sampler is stuck in its first sample
    t0 = time.monotonic()
    bus.close(timeout=30)
    assert time.monotonic() - t0 < 8
    release.set()
    from mlflow import MlflowClient
    run = MlflowClient(cfg.tracking.tracking_uri).get_run(sink.run_id)
    assert run.info.status == "FINISHED" and not _system_keys(run)


# ------------------------------------------------------------------------------------ a real server
@pytest.mark.server
def test_system_metrics_reach_a_server_and_a_dead_one_costs_no_noise_nor_time(tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    environ = {"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.1"}
    with mlflow_server(tmp_path) as (url, proc, _db):
        cfg = make_cfg(tmp_path / "a", uri=url)
        sink, client, run = _sink_run(tmp_path, cfg, environ, hold_s=0.5)
        assert CORE <= _system_keys(run)
        assert len(client.get_metric_history(run.info.run_id, CPU)) >= 3

        cfg = make_cfg(tmp_path / "b", uri=url, shutdown_timeout=2.0)
        sink = MlflowSink.create(resolve_options(cfg.tracking, log_dir=str(cfg.log_dir), environ=environ))
        bus, _ = open_bus(sink)
        events = run_events(cfg)
        for e in events[:-1]:
            bus.emit(e)
        from tests._mlflow_utils import stop_server
        stop_server(proc)                               # the server dies while the run goes on
        caplog.set_level(logging.INFO)
        time.sleep(2.0)                                 # ~20 samples with the server away
        bus.emit(events[-1])
        t0 = time.monotonic()
        bus.close(timeout=30)
        assert time.monotonic() - t0 < 2.0 + 4.0        # tracking.shutdown_timeout, plus the monitor's stop
    assert sink._system.points >= 15
    noisy = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING
             and (r.name.startswith("mlflow.system_metrics") or "System metrics" in r.getMessage())]
    assert not noisy, noisy
    assert sum(r.levelno >= logging.WARNING for r in caplog.records) <= 6, [r.getMessage() for r in caplog.records]
    kept = [json.loads(line) for line in (cfg.log_dir / UNSENT_FILE).read_text().splitlines()]
    system = [p for p in kept if p.get("key", "").startswith("system/")]
    assert {p["key"] for p in system} >= CORE               # kept for `splade-obs runs sync`, not lost


# ------------------------------------------------------------------------------- multi-node torchrun
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_each_node_of_a_two_node_torchrun_reports_into_the_one_run(tmp_path):
    """Two torchrun "nodes" on this machine (static rendezvous on 127.0.0.1, one process each): rank 0 opens the
    run, the other node's first process gets its id and samples its machine as system/node_1/..."""
    from tests._mlflow_utils import free_port
    from tests._torchrun import node_logs, run_nodes, torchrun_env
    from tests.conftest import TINY_ARGS

    uri = f"sqlite:///{tmp_path}/m.db"
    environ = torchrun_env(drop=env.ENV_VARS, MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="0.5")
    args = ["train", "--max-steps", "3", *TINY_ARGS, "--mixed-precision", "no", "--otel-exporter", "none",
            "--progress", "none", "--no-log-model", "--output-dir", str(tmp_path / "out"), "--tracking-uri", uri,
            "--experiment-name", "sm", "--run-name", "two-nodes"]
    codes = run_nodes(tmp_path, free_port(), args, rdzv="static", env=environ, timeout=360)
    assert codes == [0, 0], node_logs(tmp_path)
    client, run = _run(tmp_path)
    keys = _system_keys(run)
    for node in (0, 1):
        assert {k.replace("system/", f"system/node_{node}/") for k in CORE} <= keys, sorted(keys)
    assert not [k for k in keys if not k.startswith(("system/node_0/", "system/node_1/"))], sorted(keys)
    assert run.data.tags["splade.system_metrics"] == "every 0.5s, node node_0"
    assert run.info.status == "FINISHED" and run.data.tags.get("splade.world_size") == "2"
