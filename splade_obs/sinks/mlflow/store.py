"""Where the tracking store is and whether it answers; readable run names; the source commit.

Shared by the MLflow sink and ``splade-obs runs``. Importing this module does not import mlflow (a second
and a half on a small machine); only the health check of a sqlite or an unusual store does, lazily.

A sqlite store is created, migrated and repaired only under a file lock beside it (``mlflow.db.lock``):
``check_store`` calls :func:`prepare_sqlite_store` (``sqlite_store.py``).
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable

from ...errors import DependencyError

#: Seconds the start-up probe of a tracking store may take before the store counts as unreachable.
HEALTH_TIMEOUT_S = 5.0

#: MLflow's own HTTP client retries 7 times over ~4 minutes by default; the sink retries on its own with
#: bounded backoff, so for http(s) stores these defaults are lowered (unless the user set them).
HTTP_CLIENT_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


class TrackingUnavailableError(DependencyError):
    """The tracking store cannot be reached or written (category DEPENDENCY_ERROR, exit code 10)."""

    def __init__(self, message: str, **kw: Any) -> None:
        kw.setdefault("hint", "start the tracking server or fix --tracking-uri / MLFLOW_TRACKING_URI; "
                              "without --require-tracking the run goes on with local files only")
        kw.setdefault("retryable", True)
        super().__init__(message, **kw)


# ------------------------------------------------------------------------------------------- URIs
def default_tracking_uri(cwd: Path | None = None) -> str:
    """``$MLFLOW_TRACKING_URI`` when set, else the embedded sqlite store ``<cwd>/mlruns/mlflow.db``."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    root = Path(cwd or Path.cwd()).resolve() / "mlruns"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass  # a read-only working directory: check_store reports it, and the run goes on untracked
    return f"sqlite:///{root / 'mlflow.db'}"


def scheme(uri: str) -> str:
    """``sqlite``, ``http``, ``https``, ``file``, ``postgresql``... (a bare path counts as ``file``)."""
    s = urllib.parse.urlparse(uri).scheme.lower()
    return s.split("+", 1)[0] if s and len(s) > 1 else "file"


def strip_credentials(uri: str) -> str:
    """The URI without ``user:password@`` (safe for tags, logs and events)."""
    parts = urllib.parse.urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    host = parts.netloc.rsplit("@", 1)[1]
    return urllib.parse.urlunsplit(parts._replace(netloc=host))


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for in-memory or other schemes)."""
    if scheme(uri) != "sqlite":
        return None
    path = uri.split(":///", 1)[1].split("?", 1)[0] if ":///" in uri else ""
    return Path(path) if path and path != ":memory:" else None


def artifact_location_for(uri: str, experiment_name: str) -> str | None:
    """Where a new experiment keeps its artifacts.

    For a sqlite store: ``<folder of the db>/artifacts/<experiment>`` (``mlruns/artifacts/...`` for the
    default store), so artifacts never land in whatever ``./mlruns`` the process happens to run in.
    For servers and other stores: None, the store decides.
    """
    db = sqlite_path(uri)
    if db is None:
        return None
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", experiment_name).strip("-") or "default"
    return (db.resolve().parent / "artifacts" / slug).as_uri()


def lower_http_retries_for(uri: str) -> None:
    """For http(s) stores, bound MLflow's own HTTP retries (see ``HTTP_CLIENT_DEFAULTS``); user values win."""
    if scheme(uri) in ("http", "https"):
        for name, value in HTTP_CLIENT_DEFAULTS.items():
            os.environ.setdefault(name, value)


# ------------------------------------------------------------------------------------------ health
def check_store(uri: str, timeout: float = HEALTH_TIMEOUT_S) -> None:
    """Raise :class:`TrackingUnavailableError` unless the store answers within ``timeout`` seconds.

    http(s): a GET of ``/health`` (any HTTP answer, even 401/404, proves the server is there).
    sqlite: the folder can be created and written, then :func:`prepare_sqlite_store` (created, migrated or
    repaired under its lock). file: the folder can be created and written. Other stores: a one-row search
    in a thread.
    """
    kind = scheme(uri)
    safe = strip_credentials(uri)
    if kind in ("http", "https"):
        _probe_http(safe, timeout)
    elif kind == "sqlite":
        db = sqlite_path(uri)
        if db is not None:
            _check_writable(db.parent, safe, hint="run from a writable directory, or pass --tracking-uri / set "
                                                  "MLFLOW_TRACKING_URI to a store you can write; without "
                                                  "--require-tracking the run goes on with local files only")
            prepare_sqlite_store(uri)
    elif kind == "file":
        _check_writable(Path(urllib.parse.urlparse(uri).path or uri), safe)
    elif kind != "databricks":
        _call_with_timeout(lambda: _search_one(uri), timeout, safe)


def _probe_http(uri: str, timeout: float) -> None:
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - the user's tracking URI
            resp.read(64)
    except urllib.error.HTTPError:
        return  # the server answered
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise TrackingUnavailableError(f"tracking server {uri} is unreachable: {_reason(exc)}",
                                       original_exception=exc, tracking_uri=uri) from exc


def _reason(exc: BaseException) -> str:
    return str(getattr(exc, "reason", None) or exc)


def _check_writable(folder: Path, uri: str, hint: str | None = None) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-probe-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        kw = {"hint": hint} if hint else {}
        raise TrackingUnavailableError(f"tracking store {uri} is not writable: {exc.strerror or exc}",
                                       original_exception=exc, tracking_uri=uri, retryable=False, **kw) from exc


def prepare_sqlite_store(uri: str, timeout: float | None = None) -> None:
    """Create, migrate or repair the sqlite store of ``uri`` under its lock ``<db>.lock`` (see
    :mod:`.sqlite_store`); a no-op for other stores."""
    from . import sqlite_store
    sqlite_store.prepare_sqlite_store(uri, sqlite_store.STORE_LOCK_TIMEOUT_S if timeout is None else timeout)


def _search_one(uri: str) -> None:
    from mlflow import MlflowClient
    MlflowClient(tracking_uri=uri).search_experiments(max_results=1)


def _call_with_timeout(fn: Callable[[], Any], timeout: float, uri: str) -> None:
    """Run ``fn`` on a daemon thread; a store that hangs cannot hold start-up longer than ``timeout``."""
    box: dict[str, BaseException] = {}

    def target() -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the caller below
            box["error"] = exc

    t = threading.Thread(target=target, name="mlflow-health", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TrackingUnavailableError(f"tracking store {uri} did not answer within {timeout:g}s", tracking_uri=uri)
    if "error" in box:
        exc = box["error"]
        raise TrackingUnavailableError(f"tracking store {uri} failed: {str(exc).splitlines()[0][:300]}",
                                       original_exception=exc, tracking_uri=uri) from exc


# --------------------------------------------------------------------------------------- run names
_ADJECTIVES = ("brisk", "calm", "clever", "crisp", "eager", "gentle", "bold", "quiet", "rapid", "sunny",
               "lucid", "nimble", "steady", "vivid", "witty", "amber", "silver", "golden", "keen", "merry")
_ANIMALS = ("otter", "heron", "lynx", "falcon", "badger", "marten", "ibis", "gecko", "panda", "wren",
            "koala", "puffin", "bison", "orca", "tapir", "raven", "fox", "lemur", "stoat", "crane")


def generate_run_name(seed: int | None = None) -> str:
    """A readable run name like ``brisk-otter-0427``; the same seed gives the same name."""
    rng = random.Random(seed)
    return f"{rng.choice(_ADJECTIVES)}-{rng.choice(_ANIMALS)}-{rng.randrange(10_000):04d}"


# ----------------------------------------------------------------------------------------- sources
def git_commit(cwd: Path | None = None) -> str | None:
    """HEAD's commit when ``cwd`` is in a git work tree (None otherwise; never raises)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=str(cwd or Path.cwd()), capture_output=True,
                             text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", sha) else None
