"""Nothing lost, ever: the MLflow sink against a real ``mlflow server`` behind a fault proxy
(``tests/_fault_proxy.py``) that refuses, answers 5xx / 429 / 404, hangs, closes connections or stops
listening, switched mid-run. For every fault: the points in the store plus the points in
``<log-dir>/mlflow_unsent.jsonl`` are exactly the points the run produced (none twice). Also: a hang at the
end keeps the documented shutdown bound; SIGTERM during a hung shutdown leaves a complete unsent file; an
outage is quiet on the console; no credential of the tracking URL reaches stdout or stderr."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from splade_obs.bus import EventBus, RunIds
from splade_obs.config import TrainConfig
from splade_obs.events import EpochDone, ErrorCaught, RunFinished
from splade_obs.sinks.mlflow import UNSENT_FILE, MlflowOptions, MlflowSink, failures
from tests._fault_proxy import FaultProxy
from tests._mlflow_utils import make_cfg, mlflow_server, options_for, run_events

pytestmark = [pytest.mark.server, pytest.mark.timeout(600)]

SECRET = "s3cret-pw"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One real ``mlflow server`` for the module: (url, backend sqlite uri)."""
    tmp = tmp_path_factory.mktemp("faults-server")
    with mlflow_server(tmp) as (url, _proc, db):
        yield url, f"sqlite:///{db}"


@pytest.fixture(autouse=True)
def _bounded_http(monkeypatch):
    """What the sink sets for http stores (restored after each test), and a fresh "View run" switch."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", raising=False)


def with_credentials(url: str) -> str:
    return url.replace("http://", f"http://user:{SECRET}@")


# ------------------------------------------------------------------------------------------- counting
def produced(events: list[Any]) -> list[tuple[str, int]]:
    """Every point the sink is given for ``events``, as (key, step): each event's ``metrics()`` at its step
    (a partial epoch is left to the local metrics file; the run's final counts are at its last step)."""
    out: list[tuple[str, int]] = []
    last = 0
    for e in events:
        if isinstance(e, EpochDone) and not e.complete:
            continue
        step = getattr(e, "step", None)
        if isinstance(e, ErrorCaught) and step is None:
            step = last
        if isinstance(e, RunFinished):
            step = max(e.step, last)
        if step is None:
            continue
        last = max(last, step)
        out += [(k, step) for k in e.metrics()]
    assert len(out) == len(set(out))
    return out


def in_store(backend_uri: str, run_id: str, keys: set[str]) -> list[tuple[str, int]]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=backend_uri)
    return [(k, m.step) for k in sorted(keys) for m in client.get_metric_history(run_id, k)]


def read_unsent(path: Path) -> tuple[list[dict[str, Any]], list[tuple[str, int]]]:
    """(headers, points) of an unsent file, ``sent_lines`` applied (a file left by a killed process)."""
    if not path.exists():
        return [], []
    headers, points = [], []
    section: list[tuple[str, int]] = []
    sent: set[int] = set()

    def close_section() -> None:
        points.extend(p for i, p in enumerate(section) if i not in sent)

    for raw in path.read_text().splitlines():
        obj = json.loads(raw)
        if "sent_lines" in obj:
            first, last = obj["sent_lines"]
            sent.update(range(first, last + 1))
        elif "key" not in obj:
            close_section()
            headers.append(obj)
            section, sent = [], set()
        else:
            assert set(obj) == {"key", "value", "step", "timestamp"}, obj
            assert isinstance(obj["timestamp"], int) and isinstance(obj["step"], int)
            section.append((obj["key"], obj["step"]))
    close_section()
    return headers, points


def assert_nothing_lost(events: list[Any], backend_uri: str, run_id: str, log_dir: Path) -> tuple[list, list]:
    want = produced(events)
    stored = in_store(backend_uri, run_id, {k for k, _ in want})
    headers, kept = read_unsent(log_dir / UNSENT_FILE)
    assert len(stored) == len(set(stored)), "a point is twice in the store"
    assert len(kept) == len(set(kept)), "a point is twice in the unsent file"
    assert not set(stored) & set(kept), "a point the store holds is also in the unsent file"
    assert sorted(stored + kept) == sorted(want), (len(want), len(stored), len(kept))
    for h in headers:
        assert h["run_id"] == run_id and SECRET not in json.dumps(h) and h["dropped"] == 0
    return stored, kept


def assert_sync_completes(out: "Outcome", backend_uri: str) -> None:
    """`splade-obs runs sync` (its library) makes the store complete, and a second sync sends nothing."""
    from splade_obs.sinks.mlflow.sync import sync_unsent

    first = sync_unsent(out.cfg.log_dir, tracking_uri=backend_uri)
    assert sum(r.sent for r in first.runs) > 0 and first.moved_to is not None
    stored, kept = assert_nothing_lost(out.events, backend_uri, out.sink.run_id, out.cfg.log_dir)
    assert kept == [] and sorted(stored) == sorted(produced(out.events))   # every point in the store, once
    again = sync_unsent(first.moved_to, tracking_uri=backend_uri)          # replaying the same file again
    assert sum(r.sent for r in again.runs) == 0
    assert sorted(in_store(backend_uri, out.sink.run_id, {k for k, _ in produced(out.events)})) == sorted(stored)


# ------------------------------------------------------------------------------------------ scenarios
@dataclasses.dataclass
class Outcome:
    cfg: TrainConfig
    sink: MlflowSink
    events: list[Any]
    close_seconds: float
    finish_seconds: float
    proxy: FaultProxy


def run_scenario(server, tmp_path: Path, actions: dict[Any, Callable[[FaultProxy], None]], *, steps: int = 40,
                 pace: float = 0.05, shutdown_timeout: float = 10.0, flush_interval: float = 0.2,
                 close_timeout: float = 60.0) -> Outcome:
    """A synthetic run (``run_events``) through a real bus and the sink, tracked through the proxy; before
    event ``i`` the test's ``actions[i](proxy)`` switches what the "server" does (``actions["end"]``: before
    ``RunFinished``)."""
    url, _ = server
    with FaultProxy(url) as proxy:
        cfg = make_cfg(tmp_path, uri=with_credentials(proxy.url), flush_interval=flush_interval,
                       shutdown_timeout=shutdown_timeout)
        sink = MlflowSink.create(dataclasses.replace(options_for(cfg), shutdown_timeout=shutdown_timeout))
        assert sink is not None
        bus = EventBus([RunIds(), sink])
        bus.open()
        events = run_events(cfg, steps=range(1, steps + 1))
        finish_at = 0.0
        for i, e in enumerate(events):
            if i in actions:
                actions[i](proxy)
            if isinstance(e, RunFinished):
                if "end" in actions:
                    actions["end"](proxy)
                finish_at = time.monotonic()
            bus.emit(e)
            time.sleep(pace)
        t0 = time.monotonic()
        bus.close(timeout=close_timeout)
        end = time.monotonic()
    return Outcome(cfg, sink, events, end - t0, end - finish_at, proxy)


def _mode(mode: str, **kw: Any) -> Callable[[FaultProxy], None]:
    return lambda proxy: proxy.set_mode(mode, **kw)


PASS = _mode("pass")
RECOVERING = {  # a fault from event 5 to event 30 (about 1.5 s), then the server answers again
    "503": {5: _mode("status", code=503), 30: PASS},
    "429": {5: _mode("status", code=429), 30: PASS},
    "500": {5: _mode("status", code=500), 30: PASS},
    "close": {5: _mode("close"), 30: PASS},
    "hang": {5: _mode("hang"), 30: PASS},
    "refuse": {5: _mode("refuse"), 30: PASS},
}


@pytest.mark.parametrize("fault", sorted(RECOVERING))
def test_a_fault_mid_run_loses_nothing_and_everything_arrives(server, tmp_path, capfd, fault):
    out = run_scenario(server, tmp_path, RECOVERING[fault])
    assert out.proxy.faulted > 0
    stored, kept = assert_nothing_lost(out.events, server[1], out.sink.run_id, out.cfg.log_dir)
    assert kept == [] and not (out.cfg.log_dir / UNSENT_FILE).exists()  # retried until they all arrived
    from mlflow import MlflowClient
    assert MlflowClient(server[1]).get_run(out.sink.run_id).info.status == "FINISHED"
    console = capfd.readouterr()
    assert SECRET not in console.out + console.err


@pytest.mark.parametrize("code", [500, 503])
def test_a_server_failing_to_the_end_leaves_the_rest_in_the_unsent_file(server, tmp_path, capfd, caplog, code):
    with caplog.at_level(logging.WARNING):
        out = run_scenario(server, tmp_path, {15: _mode("status", code=code)}, shutdown_timeout=3.0)
    assert out.finish_seconds < 3.0 + 2.0, out.finish_seconds        # the documented bound (+ slack)
    stored, kept = assert_nothing_lost(out.events, server[1], out.sink.run_id, out.cfg.log_dir)
    assert stored and kept
    (header,) = read_unsent(out.cfg.log_dir / UNSENT_FILE)[0]
    assert header["status"] == "FINISHED" and header["terminated"] is False and isinstance(header["end_time"], int)
    assert header["tracking_uri"] == out.proxy.url and header["unsent"] == len(kept)
    assert header["tags"]["splade.status"] == "FINISHED"                # what a later sync still has to set
    end = [r.getMessage() for r in caplog.records if "runs sync" in r.getMessage()]
    assert len(end) == 1 and f"splade-obs runs sync {out.cfg.log_dir}" in end[0] and str(len(kept)) in end[0]
    console = capfd.readouterr()
    assert SECRET not in console.out + console.err
    assert_sync_completes(out, server[1])


def test_a_batch_refused_for_good_is_kept_not_dropped(server, tmp_path, caplog):
    """404 on log-batch (a proxy that lost the route): the refused points go to the unsent file (one warning),
    the later ones reach the store once the route is back."""
    with caplog.at_level(logging.WARNING, logger="splade_obs.sinks.mlflow"):
        out = run_scenario(server, tmp_path, {8: _mode("status", code=404, paths="log-batch"), 20: PASS})
    stored, kept = assert_nothing_lost(out.events, server[1], out.sink.run_id, out.cfg.log_dir)
    assert kept and stored
    (header,) = read_unsent(out.cfg.log_dir / UNSENT_FILE)[0]
    assert header["rejected"] == len(kept) and header["terminated"] is True
    refused = [r.getMessage() for r in caplog.records if "refused log_batch" in r.getMessage()]
    assert len(refused) == 1 and "HTTP 404" in refused[0]
    assert_sync_completes(out, server[1])


def test_a_hang_at_the_end_keeps_the_shutdown_bound(server, tmp_path):
    out = run_scenario(server, tmp_path, {"end": _mode("hang")}, shutdown_timeout=2.0)
    assert out.finish_seconds < 2.0 + 2.0, out.finish_seconds
    stored, kept = assert_nothing_lost(out.events, server[1], out.sink.run_id, out.cfg.log_dir)
    assert ("run/duration_seconds", 40) in kept                       # the last points wait on disk
    (header,) = read_unsent(out.cfg.log_dir / UNSENT_FILE)[0]
    assert header["status"] == "FINISHED" and header["terminated"] is False
    assert_sync_completes(out, server[1])


def test_the_default_shutdown_bound_is_documented_and_at_most_ten_seconds():
    assert TrainConfig().tracking.shutdown_timeout == MlflowOptions().shutdown_timeout <= 10.0
    doc = (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text()
    assert "tracking.shutdown_timeout" in doc


def test_points_waiting_during_an_outage_are_on_disk_within_about_one_flush_interval(server, tmp_path):
    """What a SIGKILL would leave: while the store is down, every point older than about one flush interval
    is already in the unsent file (read here while the run goes on)."""
    url, backend = server
    with FaultProxy(url) as proxy:
        cfg = make_cfg(tmp_path, uri=proxy.url, flush_interval=0.5)
        sink = MlflowSink.create(options_for(cfg))
        bus = EventBus([RunIds(), sink])
        bus.open()
        events = run_events(cfg, steps=range(1, 31))
        proxy.set_mode("status", code=503)
        emitted_at: list[tuple[float, Any]] = []
        for e in events[:-1]:
            bus.emit(e)
            emitted_at.append((time.monotonic(), e))
            time.sleep(0.05)
        horizon = time.monotonic() - 0.5 * 1.25 - 0.3     # one interval, the tick granularity, some slack
        _, on_disk = read_unsent(cfg.log_dir / UNSENT_FILE)
        old = produced([e for t, e in emitted_at if t < horizon])
        assert old and set(old) <= set(on_disk), (len(old), len(on_disk))
        assert len(old) < len(produced(events[:-1]))              # a real horizon: the newest may still wait
        proxy.set_mode("pass")
        bus.emit(events[-1])
        bus.close(timeout=60)
    assert_nothing_lost(events, backend, sink.run_id, cfg.log_dir)
    assert not (cfg.log_dir / UNSENT_FILE).exists()                  # all sent in the end: compacted away


def test_an_outage_is_quiet(server, tmp_path, caplog, monkeypatch):
    """One warning when the store goes, a reminder with counts now and then, one when it is back; nothing
    from urllib3 or MLflow; short lines."""
    monkeypatch.setattr(failures, "REMINDER_INTERVAL_S", 1.5)
    with caplog.at_level(logging.DEBUG):
        out = run_scenario(server, tmp_path, {3: _mode("close"), 40: _mode("status", code=503), 110: PASS},
                           steps=120, pace=0.05)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    mine = [r.getMessage() for r in warnings if r.name == "splade_obs.sinks.mlflow"]
    assert [r.name for r in warnings if r.name != "splade_obs.sinks.mlflow"] == []
    assert sum("is not answering" in m for m in mine) == 1
    assert sum("answers again" in m for m in mine) == 1
    reminders = [m for m in mine if "still not answering" in m]
    assert 1 <= len(reminders) <= 3 and all("points waiting" in m for m in reminders)
    assert len(mine) <= 5 and all(len(m) < 400 for m in mine), mine
    assert all(SECRET not in m for m in mine)
    assert_nothing_lost(out.events, server[1], out.sink.run_id, out.cfg.log_dir)


def test_mlflow_does_not_print_the_run_url_with_credentials(server, tmp_path, capfd):
    """MLflow prints "View run ... at: <tracking url>" when a run on a server ends; the sink turns it off."""
    out = run_scenario(server, tmp_path, {}, steps=3, pace=0.0)
    assert out.sink.transport.terminated
    console = capfd.readouterr()
    assert SECRET not in console.out + console.err and "View run" not in console.out
    assert os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] == "true"


# ------------------------------------------------------------------------------------- the real CLI
def _train_cmd(tmp_path: Path, uri: str, steps: int, shutdown_timeout: float) -> list[str]:
    from tests.conftest import TINY_ARGS

    conf = tmp_path / "run.toml"
    conf.write_text(f"[tracking]\nflush_interval = 0.2\nshutdown_timeout = {shutdown_timeout}\n")
    return [str(Path(sys.executable).parent / "splade-obs"), "train", "--config", str(conf), *TINY_ARGS,
            "--max-steps", str(steps), "--log-every-steps", "1", "--progress", "none", "--otel-exporter", "none",
            "--output-dir", str(tmp_path / "out"), "--tracking-uri", uri, "--experiment-name", "faults"]


def _wait_for(cond: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended (rc {proc.returncode}) before {what}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _log_text(log_dir: Path) -> str:
    p = log_dir / "train_splade.log"
    return p.read_text(errors="replace") if p.exists() else ""


def _header(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text().splitlines()[0])
    except (OSError, IndexError, ValueError):
        return None


def _covered_steps(backend_uri: str, run_id: str, log_dir: Path, key: str) -> list[int]:
    stored = [s for k, s in in_store(backend_uri, run_id, {key})]
    kept = [s for k, s in read_unsent(log_dir / UNSENT_FILE)[1] if k == key]
    assert not set(stored) & set(kept)
    return sorted(stored + kept)


def _sigterm_while_the_end_hangs(server, tmp_path: Path, *, steps: int, reached: str, status: str,
                                 stop_first: bool) -> tuple[subprocess.Popen, bytes, bytes, float, Path]:
    """``splade-obs train`` through the proxy until ``reached`` is in its log; then the server hangs (and, with
    ``stop_first``, a first SIGTERM stops training); once the write-ahead header says ``status``, one SIGTERM
    during the shutdown that waits on the hung server. Returns the process, its output, the seconds from that
    signal to its end, and the log folder."""
    url, _ = server
    with FaultProxy(url) as proxy:
        log_dir = tmp_path / "out" / "logs"
        proc = subprocess.Popen(_train_cmd(tmp_path, with_credentials(proxy.url), steps, 60.0),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        try:
            _wait_for(lambda: reached in _log_text(log_dir), 180, reached, proc)
            proxy.set_mode("hang")
            if stop_first:
                proc.send_signal(signal.SIGTERM)
            unsent = log_dir / UNSENT_FILE
            _wait_for(lambda: (_header(unsent) or {}).get("status") == status, 120, "the write-ahead", proc)
            time.sleep(1.0)                                   # the shutdown now waits on the hung server
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            stdout, stderr = proc.communicate(timeout=30)
            ended_after = time.monotonic() - t0
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return proc, stdout, stderr, ended_after, log_dir


def test_sigterm_twice_with_the_server_hung_leaves_a_complete_unsent_file(server, tmp_path):
    """``splade-obs train``: the server hangs, SIGTERM stops training cleanly (KILLED), a second SIGTERM
    arrives while the shutdown waits on the hung server: the process ends at once, and every train/loss
    point is in the store or in the unsent file, whose header has the status to set."""
    proc, stdout, stderr, ended_after, log_dir = _sigterm_while_the_end_hangs(
        server, tmp_path, steps=400, reached="Step 1/", status="KILLED", stop_first=True)
    assert ended_after < 10, ended_after
    assert proc.returncode == 130, (proc.returncode, stderr[-2000:])   # KILLED, as after one SIGTERM
    text = (stdout + stderr).decode(errors="replace")
    assert SECRET not in text
    headers, _ = read_unsent(log_dir / UNSENT_FILE)
    (header,) = headers
    assert header["status"] == "KILLED" and header["terminated"] is False
    last_step = json.loads((log_dir / "training_metrics.json").read_text())["last_step"]
    assert last_step >= 1
    assert _covered_steps(server[1], header["run_id"], log_dir, "train/loss") == list(range(1, last_step + 1))


def test_sigterm_during_a_hung_shutdown_of_a_finished_run(server, tmp_path):
    """The run finished; the server hangs from its last step; SIGTERM during the (60 s) shutdown wait ends it
    within seconds, exit 0 (the run's status stands), the unsent file complete; no credential printed."""
    proc, stdout, stderr, ended_after, log_dir = _sigterm_while_the_end_hangs(
        server, tmp_path, steps=6, reached="Step 6/6", status="FINISHED", stop_first=False)
    assert ended_after < 10, ended_after
    assert proc.returncode == 0, stderr[-2000:]
    text = (stdout + stderr).decode(errors="replace")
    assert SECRET not in text and "runs sync" in text
    (header,) = read_unsent(log_dir / UNSENT_FILE)[0]
    assert header["status"] == "FINISHED" and header["terminated"] is False
    assert _covered_steps(server[1], header["run_id"], log_dir, "train/loss") == list(range(1, 7))
    assert _covered_steps(server[1], header["run_id"], log_dir, "run/duration_seconds") == [6]


def test_a_healthy_cli_run_prints_no_credentials_and_leaves_no_unsent_file(server, tmp_path):
    url, backend = server
    with FaultProxy(url) as proxy:
        res = subprocess.run(_train_cmd(tmp_path, with_credentials(proxy.url), 3, 10.0), capture_output=True,
                             timeout=300)
    text = (res.stdout + res.stderr).decode(errors="replace")
    assert res.returncode == 0, text[-3000:]
    assert SECRET not in text and "View run" not in text
    assert not (tmp_path / "out" / "logs" / UNSENT_FILE).exists()
