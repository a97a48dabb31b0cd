"""The default sqlite store survives concurrency, half-finished migrations and a read-only working directory.

* N real ``splade-obs train`` processes started together in an empty directory all land in the one store
  they create there (its creation and migration are serialised by ``mlruns/mlflow.db.lock``);
* a store half-migrated (leftover ``_alembic_tmp_*`` tables, an older schema) is repaired by the next run,
  its runs kept; one that cannot be repaired safely is set aside when it holds no runs, or reported with the
  file, what is wrong and the fix (the file left as it was) when it does, by the sink and by ``runs list``;
* a working directory where ``mlruns`` cannot be created costs the run its tracking (one warning), not the run.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from splade_obs.errors import ErrorCategory
from splade_obs.sinks.mlflow import MlflowOptions, MlflowSink, sqlite_store, store
from tests.conftest import TINY_ARGS

pytestmark = pytest.mark.timeout(900)

SPLADE_OBS = Path(sys.executable).parent / "splade-obs"
TRAIN_ARGS = ["train", "--max-steps", "2", *TINY_ARGS, "--otel-exporter", "none", "--progress", "none"]


def _client(uri: str):
    from mlflow import MlflowClient
    return MlflowClient(tracking_uri=uri)


def _tables(db: Path) -> set[str]:
    with sqlite3.connect(db) as con:
        return {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def _sql(db: Path, *statements: str) -> None:
    con = sqlite3.connect(db)
    try:
        for s in statements:
            con.execute(s)
        con.commit()
    finally:
        con.close()


def _new_store(db: Path, *, runs: int = 0) -> str:
    """A store created by MLflow itself (at this MLflow's schema), with ``runs`` finished runs in it."""
    uri = f"sqlite:///{db}"
    store.prepare_sqlite_store(uri)
    client = _client(uri)
    if runs:
        exp = client.create_experiment("old", artifact_location=(db.parent / "artifacts" / "old").as_uri())
        for i in range(runs):
            run = client.create_run(exp, run_name=f"old-{i}")
            client.log_metric(run.info.run_id, "train/loss", 1.0 / (i + 1), step=1)
            client.set_terminated(run.info.run_id)
    return uri


def _one_run(uri: str) -> str:
    """A run as the MLflow sink makes one: the store checked first (``check_store``: prepared under its lock,
    repaired if need be), then a run created, a metric logged, the run finished; its run id."""
    store.check_store(uri)
    client = _client(uri)
    exp = client.get_experiment_by_name("t")
    exp_id = exp.experiment_id if exp else client.create_experiment(
        "t", artifact_location=store.artifact_location_for(uri, "t"))
    run_id = client.create_run(exp_id, run_name="next").info.run_id
    client.log_metric(run_id, "train/loss", 0.5, step=1)
    client.set_terminated(run_id)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["train/loss"] == 0.5
    return run_id


def _train(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run([str(SPLADE_OBS), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and r.name == "splade_obs.sinks.mlflow"]


# --------------------------------------------------------------------------------------------- concurrency
@pytest.mark.slow
def test_concurrent_first_runs_in_an_empty_directory_all_land(tmp_path, tiny_model_path):
    """The issue's reproduction: N runs started at once where no store exists yet."""
    n = 4
    cwd = tmp_path / "empty"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    procs = [subprocess.Popen([str(SPLADE_OBS), *TRAIN_ARGS, "--output-dir", f"o{i}"], cwd=cwd, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(1, n + 1)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
        assert "tracking disabled" not in out and "_alembic_tmp" not in out, out[-3000:]

    db = cwd / "mlruns" / "mlflow.db"
    assert (cwd / "mlruns" / "mlflow.db.lock").exists()
    assert not {t for t in _tables(db) if t.startswith(sqlite_store.ALEMBIC_TMP_PREFIX)}
    client = _client(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("splade-obs")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == n and {r.info.status for r in runs} == {"FINISHED"}
    assert {r.data.tags["splade.output_dir"].rsplit("/", 1)[-1] for r in runs} == {f"o{i}" for i in range(1, n + 1)}
    for r in runs:
        assert [m.step for m in client.get_metric_history(r.info.run_id, "train/loss")] == [1, 2]
        assert "epoch/loss" in r.data.metrics

    listed = subprocess.run([str(SPLADE_OBS), "runs", "list"], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=300)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    rows = [line for line in listed.stdout.splitlines() if " FINISHED " in line]
    assert len(rows) == n and {r.info.run_id[:8] for r in runs} == {row.split()[0] for row in rows}


def test_the_lock_serialises_and_a_held_lock_times_out_with_a_precise_error(tmp_path):
    from filelock import FileLock

    db = tmp_path / "mlruns" / "mlflow.db"
    db.parent.mkdir()
    with FileLock(str(sqlite_store.store_lock_path(db))):  # another process creating the store
        with pytest.raises(store.TrackingUnavailableError) as info:
            store.prepare_sqlite_store(f"sqlite:///{db}", timeout=0.3)
    assert str(db) in info.value.message and "mlflow.db.lock" in info.value.message
    assert info.value.exit_code == 10 and "released when its process exits" in info.value.hint
    assert not db.exists()  # nothing was touched without the lock
    store.prepare_sqlite_store(f"sqlite:///{db}")  # free again: created and migrated
    assert {"experiments", "runs", "alembic_version"} <= _tables(db)


# ----------------------------------------------------------------------------------- half-migrated stores
def test_leftover_alembic_tmp_table_is_dropped_and_the_next_run_lands(tmp_path, caplog):
    """What two concurrent first runs left behind before the lock: ``_alembic_tmp_tags`` next to ``tags``."""
    db = tmp_path / "mlruns" / "mlflow.db"
    uri = _new_store(db, runs=1)
    _sql(db, "CREATE TABLE _alembic_tmp_tags AS SELECT * FROM tags")

    with caplog.at_level(logging.WARNING, logger="splade_obs.sinks.mlflow"):
        run_id = _one_run(uri)
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "_alembic_tmp_tags" in warnings[0] and "repaired" in warnings[0], warnings
    assert "_alembic_tmp_tags" not in _tables(db)
    backups = list(db.parent.glob("mlflow.db.bak-*"))
    assert len(backups) == 1 and "_alembic_tmp_tags" in _tables(backups[0])  # the file as it was is kept
    client = _client(uri)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert len(client.search_runs([client.get_experiment_by_name("old").experiment_id])) == 1  # nothing lost


@pytest.mark.slow
def test_next_train_repairs_a_half_migrated_default_store_and_lands(tmp_path, tiny_model_path):
    cwd = tmp_path / "work"
    db = cwd / "mlruns" / "mlflow.db"
    uri = _new_store(db, runs=1)
    _sql(db, "CREATE TABLE _alembic_tmp_tags AS SELECT * FROM tags")

    res = _train(cwd, *TRAIN_ARGS, "--output-dir", "o1")
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert "tracking disabled" not in out and out.count("repaired") == 1, out[-3000:]
    assert "_alembic_tmp_tags" not in _tables(db)
    client = _client(uri)
    runs = client.search_runs([client.get_experiment_by_name("splade-obs").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")] == [1, 2]
    assert len(client.search_runs([client.get_experiment_by_name("old").experiment_id])) == 1


def test_store_stopped_in_an_older_schema_is_upgraded_with_its_runs(tmp_path, caplog):
    """A real half-migration: the schema one revision behind, plus the leftover of the step that stopped."""
    from alembic import command
    from mlflow.store.db.utils import _get_alembic_config, create_sqlalchemy_engine

    db = tmp_path / "mlruns" / "mlflow.db"
    uri = _new_store(db, runs=2)
    sqlite_store._forget_open_store(uri)
    engine = create_sqlalchemy_engine(uri)
    try:
        config = _get_alembic_config(uri)
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.downgrade(config, "-1")
    except Exception as exc:  # noqa: BLE001 - depends on this MLflow's newest migration
        pytest.skip(f"this MLflow's newest migration cannot be downgraded: {exc}")
    finally:
        engine.dispose()
    _sql(db, "CREATE TABLE _alembic_tmp_tags AS SELECT * FROM tags")
    before = sqlite_store.inspect_sqlite_store(db)
    assert before.version != sqlite_store._head_revision() and before.leftovers == ["_alembic_tmp_tags"]

    with caplog.at_level(logging.WARNING, logger="splade_obs.sinks.mlflow"):
        _one_run(uri)
    after = sqlite_store.inspect_sqlite_store(db)
    assert after.version == sqlite_store._head_revision() and not after.leftovers
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and before.version in warnings[0] and "repaired" in warnings[0], warnings
    client = _client(uri)
    old = client.search_runs([client.get_experiment_by_name("old").experiment_id])
    assert len(old) == 2 and all(r.data.metrics["train/loss"] > 0 for r in old)


def test_unrepairable_store_without_runs_is_set_aside_and_recreated(tmp_path, caplog):
    """A leftover copy whose table is gone cannot be dropped safely; with no runs, a fresh store it is."""
    db = tmp_path / "mlruns" / "mlflow.db"
    uri = _new_store(db)
    _sql(db, "ALTER TABLE tags RENAME TO _alembic_tmp_tags")

    with caplog.at_level(logging.WARNING, logger="splade_obs.sinks.mlflow"):
        _one_run(uri)
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "set aside" in warnings[0] and "no runs" in warnings[0], warnings
    aside = list(db.parent.glob("mlflow.db.broken-*"))
    assert len(aside) == 1 and "_alembic_tmp_tags" in _tables(aside[0]) and "tags" not in _tables(aside[0])
    assert "tags" in _tables(db) and not sqlite_store.inspect_sqlite_store(db).leftovers
    assert not list(db.parent.glob("mlflow.db.bak-*"))


def test_unrepairable_store_with_runs_is_reported_precisely_and_left_as_it_was(tmp_path, caplog):
    db = tmp_path / "mlruns" / "mlflow.db"
    uri = _new_store(db, runs=1)
    _sql(db, "ALTER TABLE tags RENAME TO _alembic_tmp_tags")
    before = sqlite_store.inspect_sqlite_store(db)

    with pytest.raises(store.TrackingUnavailableError) as info:  # --require-tracking
        MlflowSink.create(MlflowOptions(tracking_uri=uri, require=True))
    err = info.value
    assert err.category is ErrorCategory.DEPENDENCY_ERROR and err.exit_code == 10
    assert str(db) in err.message and "half-migrated" in err.message and "_alembic_tmp_tags" in err.message
    assert "table tags is missing" in err.message and "left as it was" in err.message
    assert f"mlflow db upgrade {uri}" in err.hint and f"mv {db} {db}.broken" in err.hint
    assert sqlite_store.inspect_sqlite_store(db) == before  # untouched: runs, leftover and version as they were
    assert not list(db.parent.glob("mlflow.db.bak-*")) and not list(db.parent.glob("mlflow.db.broken-*"))

    with caplog.at_level(logging.WARNING, logger="splade_obs.sinks.mlflow"):  # without: one warning
        assert MlflowSink.create(MlflowOptions(tracking_uri=uri)) is None
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and str(db) in warnings[0] and "half-migrated" in warnings[0]

    from splade_obs_cli.main import cli
    res = CliRunner().invoke(cli, ["runs", "list", "--tracking-uri", uri])
    assert res.exit_code == 10, res.output
    assert "half-migrated" in res.output and str(db) in res.output and "mlflow db upgrade" in res.output


def test_runs_list_repairs_a_half_migrated_default_store(tmp_path):
    db = tmp_path / "mlruns" / "mlflow.db"  # the default store of the working directory (tmp_path)
    _new_store(db, runs=1)
    _sql(db, "CREATE TABLE _alembic_tmp_runs AS SELECT * FROM runs")
    from splade_obs_cli.main import cli
    res = CliRunner().invoke(cli, ["runs", "list", "--experiment-name", "old"])
    assert res.exit_code == 0, res.output
    assert "old-0" in res.output and "_alembic_tmp_runs" not in _tables(db)


def test_a_file_that_is_not_an_mlflow_store_is_reported_and_kept(tmp_path):
    db = tmp_path / "other.db"
    _sql(db, "CREATE TABLE notes (body TEXT)", "INSERT INTO notes VALUES ('mine')")
    with pytest.raises(store.TrackingUnavailableError) as info:
        store.prepare_sqlite_store(f"sqlite:///{db}")
    assert "not an MLflow store" in info.value.message and str(db) in info.value.message
    assert _tables(db) == {"notes"}
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database" * 100)
    with pytest.raises(store.TrackingUnavailableError) as info:
        store.prepare_sqlite_store(f"sqlite:///{garbage}")
    assert "cannot be read as an SQLite database" in info.value.message and "mv " in info.value.hint


# -------------------------------------------------------------------------------- read-only working directory
def _unwritable_cwd(tmp_path: Path, how: str) -> Path:
    """A working directory where ``mlruns`` cannot be created.

    ``readonly``: chmod 0555, the real thing; it does not stop root (tests often run as root in containers),
    so it is skipped when a probe write still succeeds. ``mlruns-is-a-file``: ``mlruns`` exists as a plain
    file, so creating the folder fails for root too, through the same code path (mkdir raises OSError).
    """
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    if how == "mlruns-is-a-file":
        (cwd / "mlruns").write_text("not a folder")
        return cwd
    cwd.chmod(0o555)
    probe = cwd / ".probe"
    try:
        probe.write_text("x")
    except OSError:
        return cwd
    probe.unlink()
    cwd.chmod(0o755)
    pytest.skip("chmod 0555 does not stop writes for this user (root); the mlruns-is-a-file case covers it")


@pytest.fixture(params=["readonly", "mlruns-is-a-file"])
def unwritable_cwd(request, tmp_path, monkeypatch):
    cwd = _unwritable_cwd(tmp_path, request.param)
    monkeypatch.chdir(cwd)
    yield cwd
    cwd.chmod(0o755)


def test_unwritable_working_directory_degrades_the_sink_with_one_warning(unwritable_cwd, caplog):
    uri = store.default_tracking_uri()  # does not raise
    assert uri == f"sqlite:///{unwritable_cwd.resolve()}/mlruns/mlflow.db"
    with caplog.at_level(logging.WARNING, logger="splade_obs.sinks.mlflow"):
        assert MlflowSink.create(MlflowOptions()) is None
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "not writable" in warnings[0] and "mlruns" in warnings[0], warnings
    with pytest.raises(store.TrackingUnavailableError) as info:
        MlflowSink.create(MlflowOptions(require=True))
    assert info.value.category is ErrorCategory.DEPENDENCY_ERROR and "writable directory" in info.value.hint


@pytest.mark.slow
def test_unwritable_working_directory_train_goes_on_untracked(unwritable_cwd, tmp_path, tiny_model_path):
    from splade_obs_cli.main import cli

    out = tmp_path / "out"
    res = CliRunner().invoke(cli, [*TRAIN_ARGS, "--output-dir", str(out)])
    assert res.exit_code == 0, res.output
    assert (out / "final").is_dir() and res.output.count("MLflow tracking disabled") <= 1
    res = CliRunner().invoke(cli, [*TRAIN_ARGS, "--output-dir", str(tmp_path / "out2"), "--require-tracking"])
    assert res.exit_code == 10, res.output
