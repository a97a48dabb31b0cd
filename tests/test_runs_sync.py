"""``splade-obs runs sync``: the unsent-points file replayed into its run, idempotently.

Unit tests on a sqlite store (points overlapping the run's history, NaN / inf, journals with several headers,
the status rule, chunking, typed errors), and one end-to-end test: a real training run tracked on a real
``mlflow server`` behind the fault proxy, answering 503 from the middle of the run on; every point produced
is then in the store or in the unsent file, ``runs sync`` completes the store and a second sync sends nothing.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from splade_obs.errors import DataError, FileSystemError
from splade_obs.sinks.mlflow import UNSENT_FILE
from splade_obs.sinks.mlflow.store import TrackingUnavailableError
from splade_obs.sinks.mlflow.sync import SYNCED_PREFIX, read_unsent, sync_unsent, value_key

T0 = 1_700_000_000_000  # ms


# ------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def store_template(tmp_path_factory) -> Path:
    """One migrated sqlite store, copied per test (creating one runs MLflow's migrations: seconds)."""
    from splade_obs.sinks.mlflow import store

    db = tmp_path_factory.mktemp("store") / "template.db"
    store.check_store(f"sqlite:///{db}")
    return db


@pytest.fixture
def uri(tmp_path, store_template) -> str:
    db = tmp_path / "m.db"
    shutil.copy(store_template, db)
    return f"sqlite:///{db}"


def new_run(uri: str, *, run_name: str = "run-a", tags: dict[str, str] | None = None) -> str:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("t")
    exp_id = exp.experiment_id if exp else client.create_experiment("t")
    return client.create_run(exp_id, run_name=run_name, tags=tags or {}).info.run_id


def log(uri: str, run_id: str, points: list[tuple[str, float, int, int]]) -> None:
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    MlflowClient(tracking_uri=uri).log_batch(run_id, metrics=[Metric(k, v, ts, s) for k, v, s, ts in points])


def history(uri: str, run_id: str, key: str) -> list[tuple[int, int, Any]]:
    """[(step, timestamp, value)] sorted, values compared as the sync compares them."""
    from mlflow import MlflowClient

    got = MlflowClient(tracking_uri=uri).get_metric_history(run_id, key)
    return sorted((m.step, m.timestamp, value_key(m.value)) for m in got)


def header(run_id: str, uri: str, **extra: Any) -> dict[str, Any]:
    return {"run_id": run_id, "tracking_uri": uri, "unsent": 0, "dropped": 0, "sent": 0, **extra}


def point(key: str, value: Any, step: int, ts: int) -> dict[str, Any]:
    return {"key": key, "value": value, "step": step, "timestamp": ts}


def write_unsent(log_dir: Path, lines: list[Any], *, tail: str = "") -> Path:
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / UNSENT_FILE
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + tail)
    return path


def run_info(uri: str, run_id: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri).get_run(run_id).info


def cli(*args: str) -> Any:
    from splade_obs_cli.main import cli as group

    return CliRunner().invoke(group, ["runs", "sync", *args], catch_exceptions=False)


# -------------------------------------------------------------------------------------------- unit
def test_sync_completes_the_history_once_with_original_steps_and_timestamps(tmp_path, uri):
    run_id = new_run(uri)
    already = [("train/loss", 1.0, 1, T0 + 1), ("train/loss", 0.9, 2, T0 + 2), ("train/lr", 1e-5, 1, T0 + 1)]
    log(uri, run_id, already)
    log_dir = tmp_path / "logs"
    write_unsent(log_dir, [
        header(run_id, uri, status="FAILED", end_time=T0 + 9_000),
        point("train/loss", 0.9, 2, T0 + 2),        # already in the run
        point("train/loss", 0.8, 3, T0 + 3),
        point("train/loss", 0.8, 3, T0 + 3),        # listed twice (a journal written twice)
        point("train/loss", 0.7, 4, T0 + 4),
        point("train/grad_norm", "nan", 4, T0 + 4),
        point("train/grad_norm", "inf", 5, T0 + 5),
        point("train/lr", 1e-5, 1, T0 + 1),         # already in the run
    ])

    report = sync_unsent(log_dir)
    [r] = report.runs
    assert (r.sent, r.present, r.repeated) == (4, 2, 1)
    assert r.status_before == "RUNNING" and r.status_set == "FAILED" and r.end_time == T0 + 9_000
    assert history(uri, run_id, "train/loss") == [(1, T0 + 1, 1.0), (2, T0 + 2, 0.9), (3, T0 + 3, 0.8),
                                                  (4, T0 + 4, 0.7)]
    assert history(uri, run_id, "train/grad_norm") == [(4, T0 + 4, "nan"), (5, T0 + 5, "inf")]
    assert history(uri, run_id, "train/lr") == [(1, T0 + 1, 1e-5)]
    info = run_info(uri, run_id)
    assert (info.status, info.end_time) == ("FAILED", T0 + 9_000)
    assert not (log_dir / UNSENT_FILE).exists()
    [synced] = log_dir.glob(f"{SYNCED_PREFIX}*.jsonl")
    assert report.moved_to == synced

    # the folder again: nothing to do, not an error
    again = sync_unsent(log_dir)
    assert again.runs == [] and "already synced" in again.nothing
    # the very same file replayed again (copied back): nothing sent, nothing changed
    shutil.copy(synced, log_dir / UNSENT_FILE)
    [r2] = sync_unsent(log_dir).runs
    assert (r2.sent, r2.present, r2.status_set, r2.status_before) == (0, 6, None, "FAILED")
    assert history(uri, run_id, "train/loss")[-1] == (4, T0 + 4, 0.7) and len(history(uri, run_id, "train/loss")) == 4
    assert len(history(uri, run_id, "train/grad_norm")) == 2
    assert run_info(uri, run_id).end_time == T0 + 9_000


def test_a_journal_with_several_headers_and_runs(tmp_path, uri):
    """Points belong to the header above them; a run's latest header gives its status; one line per run."""
    a, b = new_run(uri, run_name="a"), new_run(uri, run_name="b")
    log_dir = tmp_path / "logs"
    write_unsent(log_dir, [
        header(a, uri), point("train/loss", 1.0, 1, T0 + 1),
        header(b, uri, status="KILLED"), point("train/loss", 5.0, 1, T0 + 10),
        header(a, uri, status="FINISHED", end_time=T0 + 50), point("train/loss", 0.5, 2, T0 + 2),
        point("train/loss", 1.0, 1, T0 + 1),
    ])
    report = sync_unsent(log_dir)
    by_id = {r.run_id: r for r in report.runs}
    assert (by_id[a].sent, by_id[a].repeated, by_id[a].status_set, by_id[a].end_time) == (2, 1, "FINISHED", T0 + 50)
    assert (by_id[b].sent, by_id[b].status_set, by_id[b].end_time) == (1, "KILLED", T0 + 10)
    assert history(uri, a, "train/loss") == [(1, T0 + 1, 1.0), (2, T0 + 2, 0.5)]
    assert history(uri, b, "train/loss") == [(1, T0 + 10, 5.0)]
    lines = report.lines()
    assert sum(line.startswith("run ") for line in lines) == 2


def test_the_transports_journal_format(tmp_path, uri):
    """What the sink writes (format 2): a killed process's section (write-ahead points, ``sent_lines``
    updates, a line cut mid-write), then a resumed process's compacted section with its final status and
    the tags / params it could not send."""
    run_id = new_run(uri, run_name="journal")
    log(uri, run_id, [("train/loss", 1.0, 1, T0 + 1)])           # line 0 reached the store later
    first = header(run_id, uri, format=2, status=None, end_time=None, terminated=False, tags={}, params={})
    second = header(run_id, uri, format=2, status="FINISHED", end_time=T0 + 77, terminated=False,
                    tags={"splade.status": "FINISHED", "splade.final_step": "4"},
                    params={"optim.seed": "7", "optim.batch_size": "999"}, calls_not_made=["log_artifact"])
    from mlflow import MlflowClient
    MlflowClient(tracking_uri=uri).log_param(run_id, "optim.batch_size", "4")
    log_dir = tmp_path / "logs"
    write_unsent(log_dir, [first, point("train/loss", 1.0, 1, T0 + 1), point("train/loss", 0.9, 2, T0 + 2),
                           {"run_id": run_id, "sent_lines": [0, 0]}], tail='{"key": "train/loss", "val\n')
    with open(log_dir / UNSENT_FILE, "a") as fh:
        for obj in (second, point("train/loss", 0.8, 3, T0 + 3), point("train/loss", 0.7, 4, T0 + 4)):
            fh.write(json.dumps(obj) + "\n")

    report = sync_unsent(log_dir)
    [r] = report.runs
    assert report.torn_lines == 1
    assert (r.sent, r.present, r.status_set, r.end_time) == (3, 1, "FINISHED", T0 + 77)
    assert (r.tags_sent, r.params_sent, r.params_conflicting, r.calls_not_made) == (2, 1, 1, ("log_artifact",))
    assert [s for s, _, _ in history(uri, run_id, "train/loss")] == [1, 2, 3, 4]
    run = MlflowClient(tracking_uri=uri).get_run(run_id)
    assert run.data.tags["splade.final_step"] == "4" and run.data.params["optim.seed"] == "7"
    assert run.data.params["optim.batch_size"] == "4"
    assert "calls not replayed: log_artifact" in report.lines()[0]

    # a line cut anywhere else is a DATA_ERROR naming it
    cut = '{"key": "x"\n' + json.dumps(point("x", 2.0, 2, T0)) + "\n"
    write_unsent(log_dir, [first, point("x", 1.0, 1, T0)], tail=cut)
    with pytest.raises(DataError) as err:
        read_unsent(log_dir / UNSENT_FILE)
    assert err.value.location == f"{log_dir / UNSENT_FILE}:3"


def test_status_rule_tag_then_metrics_file_then_killed(tmp_path, uri):
    # 1. no status in the file: the run's splade.status tag (set by the sink before set_terminated failed)
    a = new_run(uri, run_name="tagged", tags={"splade.status": "FAILED"})
    write_unsent(tmp_path / "a", [header(a, uri), point("x", 1.0, 1, T0 + 7)])
    [r] = sync_unsent(tmp_path / "a").runs
    assert (r.status_set, r.end_time) == ("FAILED", T0 + 7)        # no end time recorded: the last point's
    assert run_info(uri, a).status == "FAILED"

    # 2. then training_metrics.json beside the file, when it is this run's (same run name)
    b = new_run(uri, run_name="with-file")
    write_unsent(tmp_path / "b", [header(b, uri), point("x", 1.0, 1, T0 + 7)])
    (tmp_path / "b" / "training_metrics.json").write_text(json.dumps(
        {"status": "FINISHED", "run_name": "with-file", "end_time": "2023-11-14T22:13:30.500Z"}))
    [r] = sync_unsent(tmp_path / "b").runs
    assert (r.status_set, r.end_time) == ("FINISHED", 1_700_000_010_500)

    # ... but not another run's file
    c = new_run(uri, run_name="other")
    write_unsent(tmp_path / "c", [header(c, uri), point("x", 1.0, 1, T0 + 7)])
    (tmp_path / "c" / "training_metrics.json").write_text(json.dumps({"status": "FINISHED", "run_name": "zzz"}))
    [r] = sync_unsent(tmp_path / "c").runs
    assert (r.status_set, r.end_time) == ("KILLED", T0 + 7)           # 3. nothing says how it ended

    # a run that is not RUNNING keeps its status and end time
    from mlflow import MlflowClient
    d = new_run(uri, run_name="done")
    MlflowClient(tracking_uri=uri).set_terminated(d, status="FINISHED", end_time=T0 + 99)
    write_unsent(tmp_path / "d", [header(d, uri, status="KILLED", end_time=T0 + 5), point("x", 1.0, 1, T0)])
    [r] = sync_unsent(tmp_path / "d").runs
    assert (r.sent, r.status_set) == (1, None)
    assert (run_info(uri, d).status, run_info(uri, d).end_time) == ("FINISHED", T0 + 99)


def test_dry_run_sends_nothing_and_keeps_the_file(tmp_path, uri):
    run_id = new_run(uri)
    log(uri, run_id, [("x", 1.0, 1, T0)])
    write_unsent(tmp_path, [header(run_id, uri, status="FINISHED"), point("x", 1.0, 1, T0), point("x", 2.0, 2, T0)])
    res = cli(str(tmp_path), "--dry-run")
    assert res.exit_code == 0, res.output
    assert f"run {run_id} at {uri}: 1 points to send, 1 already present, status FINISHED would be set" in res.output
    assert history(uri, run_id, "x") == [(1, T0, 1.0)]
    assert run_info(uri, run_id).status == "RUNNING" and (tmp_path / UNSENT_FILE).exists()


def test_batches_of_at_most_1000_points(tmp_path, uri):
    from mlflow import MlflowClient

    run_id = new_run(uri)
    write_unsent(tmp_path, [header(run_id, uri), *(point("train/loss", i / 7, i, T0 + i) for i in range(1, 2501))])
    sizes: list[int] = []

    class Spy(MlflowClient):
        def log_batch(self, run_id, metrics=(), **kw):  # noqa: ANN001
            sizes.append(len(metrics))
            return super().log_batch(run_id, metrics=metrics, **kw)

    [r] = sync_unsent(tmp_path, client_factory=lambda u: Spy(tracking_uri=u)).runs
    assert r.sent == 2500 and sizes == [1000, 1000, 500]
    assert len(history(uri, run_id, "train/loss")) == 2500


def test_a_file_that_changes_during_the_sync_is_kept(tmp_path, uri):
    """A writer still at work: the file is not renamed, and the next sync sends only what is new."""
    from mlflow import MlflowClient

    run_id = new_run(uri)
    path = write_unsent(tmp_path, [header(run_id, uri, status="FINISHED"), point("x", 1.0, 1, T0)])

    class Writer(MlflowClient):
        def log_batch(self, run_id, metrics=(), **kw):  # noqa: ANN001
            out = super().log_batch(run_id, metrics=metrics, **kw)
            if metrics:
                with open(path, "a") as fh:
                    fh.write(json.dumps(point("x", 2.0, 2, T0 + 1)) + "\n")
            return out

    report = sync_unsent(tmp_path, client_factory=lambda u: Writer(tracking_uri=u))
    assert report.changed and report.moved_to is None and path.exists()
    assert "changed during the sync" in report.lines()[-1]
    [r] = sync_unsent(tmp_path).runs
    assert (r.sent, r.present, r.status_set) == (1, 1, None) and not path.exists()
    assert history(uri, run_id, "x") == [(1, T0, 1.0), (2, T0 + 1, 2.0)]


def test_cli_output_tracking_uri_override_and_torn_last_line(tmp_path, uri):
    run_id = new_run(uri)
    # the file names another (unreachable) store; --tracking-uri overrides it; a cut-off last line is skipped
    write_unsent(tmp_path, [header(run_id, "http://127.0.0.1:9", status="FINISHED", end_time=T0 + 3),
                            point("x", 1.0, 1, T0)], tail='{"key": "x", "val')
    res = cli(str(tmp_path), "--tracking-uri", uri)
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0].startswith(f"run {run_id} at {uri}: 1 points sent, 0 already present, status FINISHED set "
                               "(was RUNNING; from the unsent file; end ")
    assert "skipped 1 cut-off line(s)" in res.output
    assert lines[-1].startswith(f"synced: {tmp_path / UNSENT_FILE} -> {SYNCED_PREFIX}")
    res = cli(str(tmp_path), "--tracking-uri", uri)
    assert res.exit_code == 0 and res.output.startswith("nothing to sync in")


def test_typed_errors(tmp_path, uri):
    # no such folder / no file: FILE_SYSTEM_ERROR naming it
    res = cli(str(tmp_path / "nope"))
    assert res.exit_code == 9 and f"error[FILE_SYSTEM_ERROR]: {tmp_path / 'nope'}" in res.output
    (tmp_path / "empty").mkdir()
    res = cli(str(tmp_path / "empty"))
    assert res.exit_code == 9 and str(tmp_path / "empty" / UNSENT_FILE) in res.output and "hint:" in res.output

    # a bad line: DATA_ERROR naming file:line
    run_id = new_run(uri)
    path = write_unsent(tmp_path / "bad", [header(run_id, uri), point("x", 1.0, 1, T0)], tail="not json\n")
    res = cli(str(tmp_path / "bad"))
    assert res.exit_code == 3 and f"error[DATA_ERROR]: {path}:3: not a JSON line" in res.output
    write_unsent(tmp_path / "bad", [header(run_id, uri), {"key": "x", "value": 1.0, "step": "one", "timestamp": 1}])
    with pytest.raises(DataError) as err:
        read_unsent(path)
    assert err.value.location == f"{path}:2"
    write_unsent(tmp_path / "bad", [point("x", 1.0, 1, T0)])
    with pytest.raises(DataError, match="before any header"):
        read_unsent(path)

    # a store that does not answer: DEPENDENCY_ERROR, and the file stays for a later sync
    from tests._mlflow_utils import free_port
    dead = f"http://127.0.0.1:{free_port()}"
    write_unsent(tmp_path / "down", [header(run_id, dead), point("x", 1.0, 1, T0)])
    res = cli(str(tmp_path / "down"))
    assert res.exit_code == 10 and "error[DEPENDENCY_ERROR]" in res.output and "hint:" in res.output
    assert (tmp_path / "down" / UNSENT_FILE).exists()
    with pytest.raises(TrackingUnavailableError):
        sync_unsent(tmp_path / "down", tracking_uri=f"sqlite:///{tmp_path / 'missing.db'}")

    # a run the store does not know
    write_unsent(tmp_path / "gone", [header("0" * 32, uri), point("x", 1.0, 1, T0)])
    with pytest.raises(FileSystemError, match="not found"):
        sync_unsent(tmp_path / "gone")


# -------------------------------------------------------------------------------- end to end (server)
def _produced(events: list[Any]) -> set[tuple[str, int, int, Any]]:
    """Every point the MLflow sink is given for these events (its rules: a partial epoch is left to the
    local file; an error without a step and the final counts go at the last step seen; the checkpoints of one
    step are one point, their summed time, at the last one's time)."""
    from splade_obs.events import (CheckpointSaved, EpochDone, ErrorCaught, EvaluationDone, RunFinished,
                                   StepDone)

    out: set[tuple[str, int, int, Any]] = set()
    last = 0
    checkpoints: dict[int, tuple[float, int]] = {}
    for e in events:
        if isinstance(e, StepDone):
            last = max(last, e.step)
        if isinstance(e, EpochDone) and not e.complete:
            continue
        if isinstance(e, CheckpointSaved):
            seconds, _ = checkpoints.get(e.step, (0.0, 0))
            checkpoints[e.step] = (seconds + e.duration_seconds, e.time_ns)
            continue
        if isinstance(e, RunFinished):
            step = max(e.step, last)
        elif isinstance(e, ErrorCaught):
            step = e.step if e.step is not None else last
        elif isinstance(e, (StepDone, EpochDone, EvaluationDone)):
            step = e.step
        else:
            continue
        for k, v in e.metrics().items():
            out.add((k, int(step), e.time_ns // 1_000_000, value_key(float(v))))
    for step, (seconds, time_ns) in checkpoints.items():
        out.add(("checkpoint/duration_seconds", step, time_ns // 1_000_000, value_key(seconds)))
    return out


def _in_store(uri: str, run_id: str, keys: set[str]) -> set[tuple[str, int, int, Any]]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    return {(m.key, m.step, m.timestamp, value_key(m.value))
            for k in keys for m in client.get_metric_history(run_id, k)}


def _in_file(path: Path) -> set[tuple[str, int, int, Any]]:
    if not path.exists():
        return set()
    return {p.ident() for r in read_unsent(path).runs.values() for p in r.points}


@pytest.mark.server
@pytest.mark.timeout(600)
def test_503_from_mid_run_then_sync_completes_the_store(tmp_path, tiny_cfg, monkeypatch):
    from mlflow import MlflowClient

    from splade_obs.bus import RecordingSink, Sink
    from splade_obs.run import run_training
    from tests._fault_proxy import FaultProxy
    from tests._mlflow_utils import mlflow_server

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    with mlflow_server(tmp_path) as (url, _proc, backend_db), FaultProxy(url) as proxy:
        class Outage(Sink):  # the store answers 503 from step 3 to the end of the run
            name, scope = "outage", "rank"

            def on_step_done(self, e):  # noqa: ANN001
                if e.step == 3:
                    proxy.set_mode("status", code=503)

        cfg = tiny_cfg(optim={"max_steps": 6},
                       tracking={"enabled": True, "tracking_uri": proxy.url, "system_metrics": False},
                       logging={"progress": "none", "log_every_steps": 1})
        rec = RecordingSink()
        t0 = time.monotonic()
        result = run_training(cfg, extra_sinks=[Outage(), rec], close_timeout=30)
        seconds = time.monotonic() - t0
        assert proxy.faulted > 0 and result.status == "FINISHED"
        proxy.set_mode("pass")

        run_id = result.ids.mlflow_run_id
        backend = f"sqlite:///{backend_db}"
        produced = _produced(rec.events)
        keys = {p[0] for p in produced}
        unsent_path = cfg.log_dir / UNSENT_FILE
        stored, unsent = _in_store(backend, run_id, keys), _in_file(unsent_path)
        assert stored <= produced and unsent <= produced
        assert len(stored) + len(unsent - stored) == len(produced), (
            f"{len(produced - stored - unsent)} points lost: {sorted(produced - stored - unsent)[:5]}")
        assert unsent, "the outage should have left points in the unsent file"

        res = cli(str(cfg.log_dir))  # the store recorded in the file: the proxy, now passing
        assert res.exit_code == 0, res.output
        assert f"run {run_id} at {proxy.url}: {len(unsent - stored)} points sent" in res.output
        assert _in_store(backend, run_id, keys) == produced
        info = MlflowClient(tracking_uri=backend).get_run(run_id).info
        assert info.status == "FINISHED" and info.end_time

        # a second sync: nothing to do; the same file replayed again sends nothing
        assert cli(str(cfg.log_dir)).output.startswith("nothing to sync")
        [synced] = cfg.log_dir.glob(f"{SYNCED_PREFIX}*.jsonl")
        res = cli(str(synced))
        assert res.exit_code == 0 and f"run {run_id} at {proxy.url}: 0 points sent" in res.output
        assert _in_store(backend, run_id, keys) == produced
        assert seconds < 240, seconds
