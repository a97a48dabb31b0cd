"""Replay ``<log-dir>/mlflow_unsent.jsonl`` into its MLflow run: the library behind ``splade-obs runs sync``.

The file (written by the transport, format in ``unsent.py``) holds header lines (``run_id``, the
credential-free ``tracking_uri``, counts, the ``status`` / ``end_time`` the run should end with, the ``tags``
/ ``params`` not sent), each followed by point lines ``{"key", "value", "step", "timestamp"}`` (``value`` may
be ``"nan"`` / ``"inf"`` / ``"-inf"``). A point belongs to the run of the header above it; a run's headers are
merged field by field, the latest winning; ``{"run_id", "sent_lines"}`` lines count as header updates;
repeated points count once. :func:`sync_unsent`, per run:

* **points, idempotent**: the run's history of each key in the file is read first; a point is sent (with its
  original step and timestamp, ``log_batch``, <= 1000 a call) only when no point with the same key, step,
  timestamp and value is there (NaN equals NaN; +-inf equals the +-max float a SQL store keeps for it). A
  second sync, or one after a sync cut off midway, sends nothing twice;
* **tags and params** listed as unsent: a tag whose value the run does not hold, a param the run lacks (a
  param it holds with another value is kept and counted); other calls (artifacts) are named, not replayed;
* **status**, only for a run still RUNNING: the header's ``status`` (FINISHED, FAILED, KILLED), else the
  ``splade.status`` tag (the file's or the run's) when final, else the final ``status`` of
  ``training_metrics.json`` beside the file when its ``run_name`` is the run's, else KILLED (the process
  ended without saying how). End time: the header's ``end_time``, else that file's, else the run's latest
  point (the file's or the store's);
* **the file**: after a complete sync ``mlflow_unsent.jsonl`` is renamed ``mlflow_unsent.synced-<UTC>.jsonl``
  (the record of what was replayed); a later sync of the folder has nothing to do. A file named on the
  command line (a ``.synced-`` one, say) is replayed, not renamed; one that changed during the sync is kept.

Errors: no file -> FILE_SYSTEM_ERROR; a bad line -> DATA_ERROR naming ``file:line`` (a line a killed writer
cut, the last one without its newline or one before a new section's header, is skipped and counted); store
unreachable or failing -> DEPENDENCY_ERROR; an unknown run -> FILE_SYSTEM_ERROR. Run it once the training
process has exited. Credentials come from the environment as MLflow reads them, never from the file.
"""
from __future__ import annotations

import datetime as dt
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

from ...errors import DataError, FileSystemError
from . import store
from .store import TrackingUnavailableError
from .transport import MAX_METRICS_PER_BATCH, UNSENT_FILE, is_transient

MAX_PARAMS_TAGS_PER_BATCH = 100       # mlflow.utils.validation.MAX_PARAMS_TAGS_PER_BATCH
FINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")
SYNCED_PREFIX = "mlflow_unsent.synced-"
METRICS_FILE = "training_metrics.json"
_CALL_ATTEMPTS = 3
_SYNC_HINT = ("start the tracking server or pass the store with --tracking-uri; nothing is lost: the file stays, "
              "sync again later (points already sent are not sent twice)")


class Point(NamedTuple):
    key: str
    value: float
    step: int
    timestamp: int

    def ident(self) -> tuple[str, int, int, Any]:
        """What makes two points the same point: key, step, timestamp and value (see :func:`value_key`)."""
        return (self.key, self.step, self.timestamp, value_key(self.value))


def value_key(value: float) -> Any:
    """A value as compared: NaN equals NaN; +-inf equals the +-max float a SQL store keeps in its place."""
    if math.isnan(value) or abs(value) >= sys.float_info.max:
        return "nan" if math.isnan(value) else "inf" if value > 0 else "-inf"
    return float(value)


@dataclass
class RunSection:
    """Everything the file holds for one run: its latest header, its points (de-duplicated), and the tags and
    params its writers could not send (the headers' ``tags`` / ``params``, later values winning)."""

    run_id: str
    header: dict[str, Any]
    header_line: int
    points: list[Point] = field(default_factory=list)
    repeated: int = 0                                       # points listed more than once in the file
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    dropped: int = 0          # points the writers lost (no file to keep them in): gone for good, summed
    _seen: set[tuple[str, int, int, Any]] = field(default_factory=set, repr=False)

    def update(self, obj: dict[str, Any], line_no: int) -> None:
        """A header line: its fields replace the earlier ones (the latest header wins, field by field)."""
        self.header = {**self.header, **obj}
        self.header_line = line_no
        for name, into in (("tags", self.tags), ("params", self.params)):
            if isinstance(obj.get(name), dict):
                into.update({str(k): str(v) for k, v in obj[name].items() if v is not None})
        if "tracking_uri" in obj:  # a section's own header (not a sent_lines update)
            self.dropped += _int_or_none(obj.get("dropped")) or 0

    def add(self, point: Point) -> None:
        if point.ident() in self._seen:
            self.repeated += 1
        else:
            self._seen.add(point.ident())
            self.points.append(point)


@dataclass
class UnsentFile:
    path: Path
    runs: dict[str, RunSection]
    torn_lines: int = 0         # lines cut off by a killed writer, skipped
    size: int = 0
    mtime_ns: int = 0


def _bad(path: Path, line_no: int, what: str) -> DataError:
    return DataError(what, file_path=str(path), line_number=line_no,
                     hint=f"every line of {UNSENT_FILE} is a JSON object: a header (run_id, tracking_uri) or a "
                          "point (key, value, step, timestamp); fix or delete that line and sync again")


def _parse_point(obj: dict[str, Any]) -> Point | None:
    key, value, step, ts = obj.get("key"), obj.get("value"), obj.get("step"), obj.get("timestamp")
    try:  # a number, or "nan" / "inf" / "-inf" as text
        value = float(value) if isinstance(value, (int, float, str)) and not isinstance(value, bool) else None
    except ValueError:
        value = None
    if not isinstance(key, str) or not key or value is None or type(step) is not int or type(ts) is not int:
        return None
    return Point(key, value, step, ts)


_NOT_JSON = object()


def _json_line(raw: bytes) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except ValueError:  # UnicodeDecodeError and JSONDecodeError both are
        return _NOT_JSON


def read_unsent(path: Path) -> UnsentFile:
    """Parse an unsent file (see the module doc); DATA_ERROR naming ``file:line`` on a bad line."""
    path = Path(path)
    try:
        st, data = path.stat(), path.read_bytes()
    except FileNotFoundError as exc:
        raise FileSystemError("unsent-points file not found", file_path=str(path), original_exception=exc) from exc
    except OSError as exc:
        raise FileSystemError(f"cannot read it: {exc.strerror or exc}", file_path=str(path),
                              original_exception=exc) from exc
    parsed = [(i + 1, _json_line(raw)) for i, raw in enumerate(data.split(b"\n")) if raw.strip()]
    result = UnsentFile(path=path, runs={}, size=st.st_size, mtime_ns=st.st_mtime_ns)
    current: RunSection | None = None
    for idx, (line_no, obj) in enumerate(parsed):
        if obj is _NOT_JSON:
            nxt = parsed[idx + 1][1] if idx + 1 < len(parsed) else None
            if (nxt is None and not data.endswith(b"\n")) or (isinstance(nxt, dict) and "tracking_uri" in nxt):
                result.torn_lines += 1  # where a killed writer leaves a cut line (then a new section's header)
                continue
            raise _bad(path, line_no, "not a JSON line")
        if not isinstance(obj, dict):
            raise _bad(path, line_no, f"expected a JSON object, got {type(obj).__name__}")
        if "key" not in obj and "run_id" in obj:  # a header (or a header-shaped update such as sent_lines)
            run_id = obj.get("run_id")
            if not isinstance(run_id, str) or not run_id:
                raise _bad(path, line_no, "header line without a run_id")
            current = result.runs.setdefault(run_id, RunSection(run_id=run_id, header={}, header_line=line_no))
            current.update(obj, line_no)
            continue
        point = _parse_point(obj)
        if point is None:
            raise _bad(path, line_no, "not a metric point: needs key (text), value (a number, or 'nan' / 'inf' / "
                                      "'-inf'), step (an integer) and timestamp (integer milliseconds)")
        if current is None:
            raise _bad(path, line_no, "metric point before any header line (no run to send it to)")
        current.add(point)
    return result


class _Store:
    """``MlflowClient`` calls with bounded retries on transient faults, failures raised typed."""

    def __init__(self, uri: str, client_factory: Callable[[str], Any] | None = None) -> None:
        self.uri = uri
        self.safe_uri = store.strip_credentials(uri)
        db = store.sqlite_path(uri)
        if db is not None and not db.is_file():
            raise TrackingUnavailableError(f"no MLflow store at {self.safe_uri} (the file does not exist)",
                                           tracking_uri=self.safe_uri, retryable=False,
                                           hint="pass the store the run was tracked in with --tracking-uri")
        store.lower_http_retries_for(uri)
        # no "View run ... at: <url>" from MLflow (credentials included) when a run on a server ends
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
        try:
            store.check_store(uri)
        except TrackingUnavailableError as err:
            err.hint = _SYNC_HINT
            raise
        if client_factory is None:
            from mlflow import MlflowClient
            client_factory = MlflowClient
        try:
            self.client = client_factory(uri)
        except Exception as exc:  # noqa: BLE001 - one line naming the store
            raise self._unavailable("open", exc) from exc

    def _unavailable(self, op: str, exc: BaseException) -> TrackingUnavailableError:
        first = (str(exc).splitlines() or [""])[0][:300] or type(exc).__name__
        return TrackingUnavailableError(f"MLflow {op} failed at {self.safe_uri}: {first}", original_exception=exc,
                                        tracking_uri=self.safe_uri, hint=_SYNC_HINT)

    def call(self, op: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        attempt = 1
        while True:
            try:
                return fn(*args, **kw)
            except Exception as exc:  # noqa: BLE001 - retried when transient (0.5 s, 1 s), re-raised typed
                if attempt == _CALL_ATTEMPTS or not is_transient(exc):
                    raise self._unavailable(op, exc) from exc
                time.sleep(0.5 * 2 ** (attempt - 1))
                attempt += 1

    def get_run(self, run_id: str) -> Any:
        try:
            run = self.call("get_run", self.client.get_run, run_id)
        except TrackingUnavailableError as err:
            if getattr(err.original_exception, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
                raise
            raise FileSystemError(f"run {run_id} not found at {self.safe_uri}", original_exception=err,
                                  hint="pass the store the run was tracked in with --tracking-uri") from err
        if run.info.lifecycle_stage != "active":
            raise FileSystemError(f"run {run_id} is deleted at {self.safe_uri}",
                                  hint=f"restore it first: mlflow runs restore --run-id {run_id}")
        return run

    def history(self, run_id: str, key: str) -> list[Any]:
        return list(self.call("get_metric_history", self.client.get_metric_history, run_id, key))


@dataclass
class RunSync:
    """What a sync did (or, with ``dry_run``, would do) for one run."""

    run_id: str
    tracking_uri: str
    sent: int = 0
    present: int = 0
    repeated: int = 0
    dropped: int = 0
    status_before: str = ""
    status_set: str | None = None
    status_source: str = ""
    end_time: int | None = None
    tags_sent: int = 0
    params_sent: int = 0
    params_conflicting: int = 0
    calls_not_made: tuple[str, ...] = ()

    def line(self, dry_run: bool = False) -> str:
        sent = "to send" if dry_run else "sent"
        status = (f"status {self.status_set} {'would be set' if dry_run else 'set'} (was {self.status_before}; "
                  f"from {self.status_source}; end {_when(self.end_time)})" if self.status_set
                  else f"status {self.status_before} kept")
        parts = [f"{self.sent} points {sent}", f"{self.present} already present",
                 self.repeated and f"{self.repeated} repeated in the file",
                 (self.tags_sent or self.params_sent) and f"{self.tags_sent} tags and {self.params_sent} params {sent}",
                 self.params_conflicting and f"{self.params_conflicting} params with another value in the run kept",
                 status, self.dropped and f"{self.dropped} points dropped during the run cannot be recovered",
                 self.calls_not_made and f"calls not replayed: {', '.join(sorted(set(self.calls_not_made)))}"]
        return f"run {self.run_id} at {self.tracking_uri}: " + ", ".join(x for x in parts if x)


@dataclass
class SyncReport:
    path: Path
    runs: list[RunSync] = field(default_factory=list)
    dry_run: bool = False
    moved_to: Path | None = None
    torn_lines: int = 0
    nothing: str | None = None      # why there was nothing to do (no file, already synced)
    changed: bool = False           # the file changed during the sync (kept)

    def lines(self) -> list[str]:
        if self.nothing:
            return [self.nothing]
        out = [r.line(self.dry_run) for r in self.runs]
        if not self.runs:
            out.append(f"{self.path}: no metric points in the file")
        if self.torn_lines:
            out.append(f"{self.path}: skipped {self.torn_lines} cut-off line(s) (a writer killed mid-line)")
        if self.moved_to is not None:
            out.append(f"synced: {self.path} -> {self.moved_to.name}")
        elif self.dry_run:
            out.append("dry run: nothing sent, no status set, file left as it is")
        elif self.changed:
            out.append(f"{self.path} changed during the sync (is a run still writing it?): kept; sync again later")
        return out


def _when(ms: int | None) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC") if ms else "-"


def resolve_target(target: Path | str) -> tuple[Path | None, str | None]:
    """The unsent file for ``target`` (a log folder, an output folder with ``logs/``, or the file itself),
    or ``(None, reason)`` when the folder was synced already; FILE_SYSTEM_ERROR when there is nothing."""
    target = Path(target)
    hint = "pass the run's log folder (<output-dir>/logs); the file exists only when MLflow missed something"
    if target.is_file():
        return target, None
    if not target.exists():
        raise FileSystemError("no such log folder or unsent-points file", file_path=str(target), hint=hint)
    folders = (target, target / "logs")
    for folder in folders:
        if (folder / UNSENT_FILE).is_file():
            return folder / UNSENT_FILE, None
    synced = sorted(p.name for folder in folders if folder.is_dir() for p in folder.glob(f"{SYNCED_PREFIX}*.jsonl"))
    if synced:
        return None, f"nothing to sync in {target}: no {UNSENT_FILE} (already synced: {', '.join(synced)})"
    raise FileSystemError(f"no {UNSENT_FILE} here: the runs logged to this folder sent every point",
                          file_path=str(target / UNSENT_FILE), hint=hint)


def sync_unsent(target: Path | str, *, tracking_uri: str | None = None, dry_run: bool = False,
                client_factory: Callable[[str], Any] | None = None) -> SyncReport:
    """Replay the unsent file of ``target`` into its runs (see the module doc); returns what was done.

    ``tracking_uri`` overrides the URI recorded in the file (credentials from the environment, as MLflow
    reads them). With ``dry_run`` the store is only read: nothing is sent, no status set, the file stays.
    """
    path, nothing = resolve_target(target)
    if path is None:
        return SyncReport(path=Path(target), dry_run=dry_run, nothing=nothing)
    unsent = read_unsent(path)
    report = SyncReport(path=path, dry_run=dry_run, torn_lines=unsent.torn_lines)
    stores: dict[str, _Store] = {}
    report.runs = [_sync_run(section, _store_for(section, tracking_uri, stores, client_factory, path),
                             path.parent, dry_run) for section in unsent.runs.values()]
    if dry_run or path.name != UNSENT_FILE:
        return report
    st = path.stat()
    if (st.st_size, st.st_mtime_ns) != (unsent.size, unsent.mtime_ns):
        report.changed = True  # a writer still at work: kept, the next sync sends only what is new
    else:
        report.moved_to = _mark_synced(path)
    return report


def _store_for(section: RunSection, override: str | None, stores: dict[str, _Store],
               client_factory: Callable[[str], Any] | None, path: Path) -> _Store:
    uri = override or section.header.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise DataError(f"the header of run {section.run_id} names no tracking_uri", file_path=str(path),
                        line_number=section.header_line, hint="pass the store with --tracking-uri")
    if uri not in stores:
        stores[uri] = _Store(uri, client_factory)
    return stores[uri]


def _sync_run(section: RunSection, st: _Store, log_dir: Path, dry_run: bool) -> RunSync:
    from mlflow.entities import Metric

    run = st.get_run(section.run_id)
    result = RunSync(run_id=section.run_id, tracking_uri=st.safe_uri, repeated=section.repeated,
                     dropped=section.dropped, status_before=run.info.status)
    history = [m for key in sorted({p.key for p in section.points}) for m in st.history(section.run_id, key)]
    present = {Point(m.key, float(m.value), int(m.step), int(m.timestamp)).ident() for m in history}
    todo = sorted((p for p in section.points if p.ident() not in present), key=lambda p: (p.timestamp, p.step, p.key))
    result.sent, result.present = len(todo), len(section.points) - len(todo)
    latest_ts = max([0, *(int(m.timestamp) for m in history), *(p.timestamp for p in section.points)])
    for i in range(0, 0 if dry_run else len(todo), MAX_METRICS_PER_BATCH):
        st.call("log_batch", st.client.log_batch, section.run_id,
                metrics=[Metric(p.key, p.value, p.timestamp, p.step) for p in todo[i:i + MAX_METRICS_PER_BATCH]])
    _sync_tags_params(section, run, st, result, dry_run)
    calls = section.header.get("calls_not_made")
    result.calls_not_made = tuple(str(c) for c in calls) if isinstance(calls, list) else ()
    if run.info.status == "RUNNING":
        status, source, end_time = _final_status(section, run, log_dir)
        result.status_set, result.status_source = status, source
        result.end_time = end_time or latest_ts or int(time.time() * 1000)
        if not dry_run:
            st.call("set_terminated", st.client.set_terminated, section.run_id, status=status,
                    end_time=result.end_time)
    return result


def _sync_tags_params(section: RunSection, run: Any, st: _Store, result: RunSync, dry_run: bool) -> None:
    """The tags and params the writers could not send: tags whose value the run does not hold, params the
    run does not have (a param is immutable: one the run holds with another value is left and counted)."""
    from mlflow.entities import Param, RunTag

    tags = {k: v for k, v in section.tags.items() if run.data.tags.get(k) != v}
    params = {k: v for k, v in section.params.items() if k not in run.data.params}
    result.params_conflicting = sum(1 for k, v in section.params.items()
                                    if k in run.data.params and run.data.params[k] != v)
    result.tags_sent, result.params_sent = len(tags), len(params)
    for what, items in (("tags", [RunTag(k, v) for k, v in tags.items()]),
                        ("params", [Param(k, v) for k, v in params.items()])):
        for i in range(0, 0 if dry_run else len(items), MAX_PARAMS_TAGS_PER_BATCH):
            st.call("log_batch", st.client.log_batch, section.run_id, **{what: items[i:i + MAX_PARAMS_TAGS_PER_BATCH]})


def _final_status(section: RunSection, run: Any, log_dir: Path) -> tuple[str, str, int | None]:
    """(status, where it came from, end time in ms or None); the rule is in the module doc."""
    header_end = _int_or_none(section.header.get("end_time"))
    status = str(section.header.get("status") or "").upper()
    if status in FINAL_STATUSES:
        return status, "the unsent file", header_end
    file_status, file_end = _metrics_file_status(log_dir, run)
    tag = str(section.tags.get("splade.status") or run.data.tags.get("splade.status") or "").upper()
    if tag in FINAL_STATUSES:
        return tag, "the splade.status tag", header_end or file_end
    if file_status:
        return file_status, METRICS_FILE, header_end or file_end
    return "KILLED", "no final status recorded", header_end


def _metrics_file_status(log_dir: Path, run: Any) -> tuple[str | None, int | None]:
    """The final status and end time of ``training_metrics.json`` beside the file, when it is this run's."""
    try:
        doc = json.loads((log_dir / METRICS_FILE).read_text(encoding="utf-8"))
        status = str(doc.get("status") or "").upper()
        if status not in FINAL_STATUSES or doc.get("run_name") not in (None, run.info.run_name):
            return None, None  # not final, or the folder's latest run is another one
        end = doc.get("end_time")
        return status, int(dt.datetime.fromisoformat(end.replace("Z", "+00:00")).timestamp() * 1000) if end else None
    except (OSError, ValueError, AttributeError, TypeError):
        return None, None


def _int_or_none(value: Any) -> int | None:
    return value if type(value) is int and value > 0 else None


def _mark_synced(path: Path) -> Path:
    """Rename the replayed file ``mlflow_unsent.synced-<UTC time>.jsonl`` (a fresh name, never overwriting)."""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    dest = next(d for n in range(1, 10_000) if not (d := path.with_name(
        f"{SYNCED_PREFIX}{stamp}{f'-{n}' if n > 1 else ''}.jsonl")).exists())
    try:
        os.replace(path, dest)
    except OSError as exc:
        raise FileSystemError(f"points synced, but the file could not be renamed: {exc.strerror or exc}",
                              file_path=str(path), original_exception=exc,
                              hint="a later sync sends nothing again (points already in the run are skipped)"
                              ) from exc
    return dest
