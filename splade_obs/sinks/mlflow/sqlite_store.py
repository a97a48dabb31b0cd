"""The sqlite tracking store: created, migrated and repaired one process at a time, under a lock beside it.

MLflow creates and migrates a sqlite store the first time a client opens it, and nothing stops a second
process from doing the same at the same moment: two runs started together in a new directory then both run
the ~100 migrations, and one of them fails (``table _alembic_tmp_tags already exists``), leaving a store
half-migrated that fails for every later run. :func:`prepare_sqlite_store` holds ``<db>.lock`` (a
:mod:`filelock` lock) around the first open, and repairs a store an earlier process left half done.
``store.check_store`` calls it for every ``sqlite:///`` URI, before the MLflow sink, ``runs`` or ``sync`` open
the store. Importing this module does not import mlflow.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import logging
import os
import sqlite3
from pathlib import Path
from typing import NamedTuple

from .store import TrackingUnavailableError, sqlite_path

log = logging.getLogger("splade_obs.sinks.mlflow")

#: Seconds a process waits for the lock of a sqlite store while another one creates or migrates it
#: (creating a store runs MLflow's ~100 migrations: a few seconds, longer on a loaded machine).
STORE_LOCK_TIMEOUT_S = 180.0

#: Alembic's batch mode rewrites a SQLite table through ``_alembic_tmp_<table>``: create it, copy the rows,
#: drop ``<table>``, rename. SQLite runs that DDL outside a transaction, so a migration that stops midway
#: leaves the temporary table behind and every later migration of that table fails on it.
ALEMBIC_TMP_PREFIX = "_alembic_tmp_"

#: Tables whose rows are a user's tracked work; a broken store without any can be set aside and recreated.
_USER_TABLES = ("runs", "registered_models", "trace_info", "logged_models")


class SqliteState(NamedTuple):
    """What a sqlite store file holds, read with :mod:`sqlite3` (no MLflow, nothing migrated)."""

    tables: frozenset[str]
    version: str | None  # alembic_version (the schema revision); None when there is none

    @property
    def leftovers(self) -> list[str]:
        """Tables an interrupted Alembic batch migration left behind."""
        return sorted(t for t in self.tables if t.startswith(ALEMBIC_TMP_PREFIX))


def store_lock_path(db: Path) -> Path:
    """The lock of a sqlite store: ``<db>.lock`` beside it (``mlruns/mlflow.db.lock`` for the default)."""
    return db.with_name(db.name + ".lock")


def prepare_sqlite_store(uri: str, timeout: float = STORE_LOCK_TIMEOUT_S) -> None:
    """Make the sqlite store of ``uri`` ready for MLflow, one process at a time.

    Under ``<db>.lock`` (a :mod:`filelock` lock; the OS releases it when its process exits, however it
    exits): read the file with :mod:`sqlite3`; repair it when it is half-migrated (see :func:`_repair`);
    then open it once with ``MlflowClient``. A new store is created and migrated by that open, here, under
    the lock, so every client opened later, in this process or another, finds it current and migrates
    nothing. Without the lock, two runs starting together in a new directory both run MLflow's migrations
    and can leave ``_alembic_tmp_*`` tables that break the store for every later run.

    Raises :class:`TrackingUnavailableError` naming the file, what is wrong and the fix when the store
    cannot be used: its lock held too long by another process, not an SQLite file or not an MLflow store,
    written by a newer MLflow, half-migrated with runs in it and not repairable automatically.
    Other sqlite URIs (in-memory) and other schemes: nothing to do.
    """
    db = sqlite_path(uri)
    if db is None:
        return
    db = db.absolute()
    from filelock import FileLock, Timeout

    lock_file = store_lock_path(db)
    lock = FileLock(str(lock_file), timeout=timeout)
    try:
        lock.acquire()
    except Timeout as exc:
        raise TrackingUnavailableError(
            f"MLflow store {db}: another process has held its lock {lock_file} for over {timeout:g}s "
            "(it is creating or migrating the store)", original_exception=exc, tracking_uri=uri,
            hint="wait for that process to get past its start and try again; the lock is released when its "
                 "process exits, so a lock file left behind by a killed process is harmless") from exc
    except OSError as exc:
        raise TrackingUnavailableError(f"MLflow store {db}: cannot take its lock {lock_file}: {exc.strerror or exc}",
                                       original_exception=exc, tracking_uri=uri, retryable=False) from exc
    try:
        state = inspect_sqlite_store(db)
        if state.tables:
            _check_is_mlflow_store(db, uri, state)
            head = _head_revision()
            problem = _problem(state, head)
            if problem:
                _repair(db, uri, state, problem)
        _open_store(db, uri)
    finally:
        lock.release()


def inspect_sqlite_store(db: Path) -> SqliteState:
    """Tables and schema version of ``db`` (none for a missing or empty file)."""
    if not db.exists() or db.stat().st_size == 0:
        return SqliteState(frozenset(), None)
    try:
        with contextlib.closing(sqlite3.connect(str(db), timeout=30)) as con:
            tables = frozenset(r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'"))
            version = None
            if "alembic_version" in tables:
                row = con.execute("SELECT version_num FROM alembic_version").fetchone()
                version = row[0] if row else None
    except sqlite3.DatabaseError as exc:
        raise TrackingUnavailableError(
            f"MLflow store {db} cannot be read as an SQLite database: {exc}", original_exception=exc,
            tracking_uri=f"sqlite:///{db}", retryable=isinstance(exc, sqlite3.OperationalError),
            hint=f"if it is damaged, move it aside (`mv {db} {db}.broken`) and the next run starts a fresh "
                 "store; or pass --tracking-uri / set MLFLOW_TRACKING_URI to another store") from exc
    return SqliteState(tables, version)


def count_user_rows(db: Path, tables: frozenset[str]) -> int:
    """Runs, registered models, traces and logged models in ``db``: a user's tracked work."""
    with contextlib.closing(sqlite3.connect(str(db), timeout=30)) as con:
        return sum(con.execute(f"SELECT COUNT(*) FROM {_quote(t)}").fetchone()[0] for t in _USER_TABLES if t in tables)


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _check_is_mlflow_store(db: Path, uri: str, state: SqliteState) -> None:
    if not ("experiments" in state.tables or "alembic_version" in state.tables or state.leftovers):
        raise TrackingUnavailableError(
            f"{db} is an SQLite database but not an MLflow store (no experiments or alembic_version table)",
            tracking_uri=uri, retryable=False,
            hint="pass --tracking-uri / set MLFLOW_TRACKING_URI to an MLflow store (a new file is created)")
    if state.version is not None and state.version != _head_revision() and not _known_revision(state.version):
        import mlflow
        raise TrackingUnavailableError(
            f"MLflow store {db} has schema version {state.version}, which this MLflow ({mlflow.__version__}, "
            f"schema {_head_revision()}) does not know: a newer MLflow wrote it", tracking_uri=uri, retryable=False,
            hint="upgrade MLflow here (`pip install -U mlflow`), or pass --tracking-uri / set MLFLOW_TRACKING_URI "
                 "to another store")


@functools.lru_cache(maxsize=1)
def _head_revision() -> str:
    from mlflow.store.db.utils import _get_latest_schema_revision
    return str(_get_latest_schema_revision())


def _known_revision(revision: str) -> bool:
    from alembic.script import ScriptDirectory
    from mlflow.store.db.utils import _get_alembic_config
    try:
        return ScriptDirectory.from_config(_get_alembic_config("")).get_revision(revision) is not None
    except Exception:  # noqa: BLE001 - alembic's CommandError and friends: not a revision of ours
        return False


def _problem(state: SqliteState, head: str) -> str | None:
    """What is wrong with a store that has tables, in words; None when it is current."""
    parts = []
    if state.leftovers:
        parts.append(f"leftover table{'s' if len(state.leftovers) > 1 else ''} {', '.join(state.leftovers)} "
                     "of an interrupted migration")
    if state.version is None:
        parts.append("no schema version (its creation stopped before the migrations finished)")
    elif state.version != head:
        parts.append(f"schema version {state.version}, where this MLflow's is {head}")
    return "; ".join(parts) or None


def _repair(db: Path, uri: str, state: SqliteState, problem: str) -> None:
    """Repair a half-migrated store, holding its lock; the file as it was is always kept.

    The rule: copy the file (``<db>.bak-<time>``, SQLite's backup API); drop each leftover
    ``_alembic_tmp_<t>`` whose table ``<t>`` still exists (the copy was never renamed over it, so ``<t>``
    holds the rows); run MLflow's upgrade (``mlflow db upgrade``) to this MLflow's schema; check the result.
    If any step fails (a leftover whose table is gone, a migration that half ran and fails when repeated):
    a store with no runs, models or traces is set aside as ``<db>.broken-<time>`` and a fresh one is created;
    a store with any is put back as it was and :class:`TrackingUnavailableError` says what to do.
    """
    try:
        user_rows = count_user_rows(db, state.tables)
        backup = _copy_db(db, _stamped(db, "bak"))
    except (OSError, sqlite3.Error) as exc:
        raise TrackingUnavailableError(
            f"MLflow store {db} has {problem}, and it could not be copied before a repair: {exc}",
            original_exception=exc, tracking_uri=uri, retryable=False, hint=_fix_hint(db, uri)) from exc
    _forget_open_store(uri)
    try:
        _drop_leftovers(db, state)
        _migrate(uri, initialize=state.version is None)
        left = _problem(inspect_sqlite_store(db), _head_revision())
        if left:
            raise RuntimeError(f"after the upgrade: {left}")
    except Exception as exc:  # noqa: BLE001 - every failure ends in one of the two outcomes below
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
        _forget_open_store(uri)
        if user_rows == 0:
            aside = backup.replace(_stamped(db, "broken"))
            _remove_db(db)
            log.warning("MLflow store %s had %s and no runs in it; the repair failed (%s), so it was set aside as "
                        "%s and a fresh store is created", db, problem, reason, aside)
            return
        _copy_db(backup, db)
        backup.unlink(missing_ok=True)
        raise TrackingUnavailableError(
            f"MLflow store {db} is half-migrated ({problem}) and not empty ({user_rows} runs, models and traces); "
            f"the automatic repair failed ({reason}), so the file was left as it was", original_exception=exc,
            tracking_uri=uri, retryable=False, hint=_fix_hint(db, uri)) from exc
    log.warning("MLflow store %s had %s; repaired (the file as it was is kept as %s)", db, problem, backup)


def _fix_hint(db: Path, uri: str) -> str:
    return (f"stop the runs using it, copy it, then run `mlflow db upgrade {uri}`; or move it aside "
            f"(`mv {db} {db}.broken`) so the next run starts a fresh store; without --require-tracking a run "
            "goes on with local files only")


def _stamped(db: Path, what: str) -> Path:
    return db.with_name(f"{db.name}.{what}-{dt.datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}")


def _copy_db(src: Path, dst: Path) -> Path:
    """Copy a database with SQLite's backup API (consistent even while another connection writes)."""
    with contextlib.closing(sqlite3.connect(str(src), timeout=30)) as s, \
            contextlib.closing(sqlite3.connect(str(dst), timeout=30)) as d:
        s.backup(d)
    return dst


def _remove_db(db: Path) -> None:
    for path in (db, *(db.with_name(db.name + suffix) for suffix in ("-journal", "-wal", "-shm"))):
        path.unlink(missing_ok=True)


def _drop_leftovers(db: Path, state: SqliteState) -> None:
    """Drop the leftover ``_alembic_tmp_<t>`` tables whose ``<t>`` exists; refuse when ``<t>`` is gone."""
    for tmp in state.leftovers:
        table = tmp[len(ALEMBIC_TMP_PREFIX):]
        if table not in state.tables:
            raise RuntimeError(f"table {table} is missing and {tmp} may hold its rows (a migration stopped "
                               "between dropping the table and renaming its copy)")
    with contextlib.closing(sqlite3.connect(str(db), timeout=30)) as con:
        for tmp in state.leftovers:
            con.execute(f"DROP TABLE {_quote(tmp)}")
        con.commit()


def _migrate(uri: str, *, initialize: bool) -> None:
    """MLflow's own migration of the store (what ``mlflow db upgrade`` runs), on an engine of its own."""
    from mlflow.store.db.utils import _initialize_tables, _upgrade_db, create_sqlalchemy_engine
    engine = create_sqlalchemy_engine(uri)
    try:
        (_initialize_tables if initialize else _upgrade_db)(engine)
    finally:
        engine.dispose()


def _forget_open_store(uri: str) -> None:
    """Drop this process's cached MLflow engines and stores for ``uri`` (best effort): a store replaced or
    repaired under them must be opened anew."""
    try:
        from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore as RegistryStore
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore as TrackingStore
        from mlflow.tracking._tracking_service.registry import TrackingStoreRegistry
    except Exception:  # noqa: BLE001 - private MLflow names; nothing cached then
        return
    for cls in (TrackingStore, RegistryStore):
        engine = getattr(cls, "_engine_map", {}).pop(uri, None)
        if engine is not None:
            engine.dispose()
    clear = getattr(TrackingStoreRegistry._get_store_with_resolved_uri, "cache_clear", None)
    if clear is not None:
        clear()


def _open_store(db: Path, uri: str) -> None:
    """Open the store once (a new one is created and migrated here); MLflow caches it for this process."""
    from mlflow import MlflowClient
    try:
        MlflowClient(tracking_uri=uri)
    except Exception as exc:  # noqa: BLE001 - reported with the file and the fix
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
        raise TrackingUnavailableError(f"MLflow store {db} cannot be opened: {first}", original_exception=exc,
                                       tracking_uri=uri, hint=_fix_hint(db, uri)) from exc
