"""Client calls to the tracking store, and every metric point on its way there: nothing lost, nothing waits.

* **One sender thread.** Metric points wait in a bounded buffer and are sent with ``log_batch`` (<= 1000
  a call) every ``flush_interval`` seconds or 1000 points; tags, params, artifacts and the final status are
  queued operations sent by the same thread, after the points that are due. No sink hook waits on the
  network (only opening the run, before training, does).
* **Retried, never dropped.** Transient failures (connection refused or reset, timeouts, HTTP 5xx, 408,
  429) are retried with backoff: the circuit breaker's cool-down doubles from 2 s to 60 s, and the points
  stay buffered. A batch the store refuses for good (another 4xx) is logged once and its points are kept
  in the unsent file. A full buffer spills its oldest points to the unsent file.
* **Write-ahead unsent file** ``<log_dir>/mlflow_unsent.jsonl`` (``unsent.py``): the points pending for
  longer than one journal interval (``max(flush_interval, 0.5 s)``) are appended to it, points appended
  there that reach the store later get a ``sent_lines`` line, so a SIGKILL loses at most about one
  interval. When the run finishes the file is compacted (atomic rewrite: header with the final status, then
  only unsent points) before any final network call, and again at close; removed when everything arrived.
* **Quiet** (``failures.py``): one warning when the store stops answering, one when it answers again, a
  reminder with counts now and then; a refusal is logged once per kind of call.
* **Bounded end.** :meth:`Transport.drain` sends what it can until a deadline; :meth:`Transport.shutdown`
  then stops the threads (a call hung in the network is abandoned) and writes the final unsent file.

Everything sent (tags, params) is masked first: secret environment values and URL credentials.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable

from ...errors import ApplicationError
from ...recovery import retry
from ...redaction import is_secret_key, safe_text, secret_values
from .failures import Breaker, Health, describe, is_transient, quiet_run_url_print
from .sender import FINISH_MAX_WAIT_S, MAX_METRICS_PER_BATCH, SenderThreads, _Op
from .store import strip_credentials
from .unsent import UNSENT_FILE, UNSENT_FORMAT, Point, UnsentFile

__all__ = ["FINISH_MAX_WAIT_S", "MAX_METRICS_PER_BATCH", "UNSENT_FILE", "UNSENT_FORMAT", "Transport",
           "describe", "is_transient"]

log = logging.getLogger("splade_obs.sinks.mlflow")

MAX_PARAMS_TAGS_PER_BATCH = 100       # mlflow.utils.validation.MAX_PARAMS_TAGS_PER_BATCH
MAX_PARAM_VAL_LENGTH = 6000           # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MAX_TAG_VAL_LENGTH = 8000
PENDING_LIMIT = 50_000                # metric points kept in memory while the store lags or is down (~9 MB at
                                      # 180 B a point; beyond it the oldest go to the unsent file, nothing is lost)
SPILL_FRACTION = 0.05                 # of PENDING_LIMIT written to the unsent file at once when the buffer is full
DEFAULT_SHUTDOWN_TIMEOUT = 10.0       # tracking.shutdown_timeout
MIN_JOURNAL_INTERVAL_S = 0.5          # the unsent file's write-ahead interval when flush_interval is smaller
SYNC_COMMAND = "splade-obs runs sync"


def truncate(text: str, limit: int) -> str:
    marker = "... [truncated, whole value in config.yaml]"
    return text if len(text) <= limit else text[: limit - len(marker)] + marker


class Transport(SenderThreads):
    """One run's connection to the store: ``MlflowClient`` with an explicit run id (no fluent globals)."""

    def __init__(self, tracking_uri: str, *, flush_interval: float = 2.0,
                 shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT) -> None:
        from mlflow import MlflowClient

        quiet_run_url_print(tracking_uri)
        self.tracking_uri = tracking_uri
        self.safe_uri = strip_credentials(tracking_uri)
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self.run_id = ""
        self.flush_interval = max(0.0, float(flush_interval))
        self.journal_interval = max(MIN_JOURNAL_INTERVAL_S, self.flush_interval)
        self.shutdown_timeout = max(0.0, float(shutdown_timeout))
        self.flush_every = MAX_METRICS_PER_BATCH
        self.breaker = Breaker()
        #: params already in the run (resume): unchanged ones are not sent again, changed ones become a tag
        self.existing_params: dict[str, str] = {}
        self.produced_points = 0
        self.sent_points = 0
        self.rejected_points = 0       # refused for good by the store (4xx): kept in the unsent file
        self.spilled_points = 0        # written to the unsent file because the buffer was full
        self.dropped_points = 0        # lost: no log folder to write them to, or the file could not be written
        self.refused_ops: list[str] = []
        #: the run's end as the sink knows it: written to the unsent file's header for a later sync
        self.status: str | None = None
        self.end_time: int | None = None
        self.terminated = False
        self.unsent_file: UnsentFile | None = None
        self._lock = threading.Condition(threading.RLock())
        self._pending: collections.deque[Point] = collections.deque()
        self._orphans: list[Point] = []   # refused or spilled before any log folder was known
        self._ops: collections.deque[_Op] = collections.deque()
        self._inflight: list[Point] = []
        self._seq = 0
        self._journaled_upto = 0             # every pending point below this seq is in the unsent file
        self._flush_requested = False
        self._finishing = False
        self._busy = False
        self._closed = False
        self._last_send = time.monotonic()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.health = Health(self.safe_uri)
        self._noise_held = False
        self._spill_noted = False
        self._marks: collections.deque[tuple[float, int]] = collections.deque()  # (time, next seq) per tick

    # ------------------------------------------------------------------------------------ client calls
    def call(self, op: str, fn: Callable[..., Any], *args: Any, attempts: int = 3, **kw: Any) -> Any:
        """One synchronous client call with bounded retries on transient faults (opening the run only)."""

        def once() -> Any:
            try:
                return fn(*args, **kw)
            except Exception as exc:  # noqa: BLE001 - re-raised typed, retryable only when transient
                raise ApplicationError(f"MLflow {op} failed: {describe(exc)}", original_exception=exc,
                                       retryable=is_transient(exc), operation=f"mlflow.{op}") from exc

        return retry(max_attempts=attempts, delay=0.5, backoff_factor=2.0, max_delay=2.0,
                     operation=f"mlflow.{op}")(once)()

    def submit(self, name: str, fn: Callable[..., Any], *args: Any, kind: str = "call", payload: Any = None,
               on_done: Callable[[Any], None] | None = None, **kw: Any) -> None:
        """Queue one client call for the sender thread; retried while the store is away, never blocking."""
        op = _Op(name, (lambda: fn(*args, **kw)) if (args or kw) else fn, kind, payload, on_done)
        with self._lock:
            if self._closed:
                return
            self._ops.append(op)
            self._start_threads()
            self._lock.notify_all()

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        secrets = secret_values()
        values = {k: truncate(safe_text(str(v), secrets), MAX_TAG_VAL_LENGTH) for k, v in tags.items() if v is not None}
        items = list(values.items())
        for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            chunk = dict(items[i:i + MAX_PARAMS_TAGS_PER_BATCH])
            self.submit("set_tags", self._log_batch, tags=[RunTag(k, v) for k, v in chunk.items()], kind="tags",
                        payload=chunk)

    def log_params(self, params: dict[str, str]) -> dict[str, str]:
        """Queue the params not in the run yet (<= 100 a call, long values truncated); returns the ones whose
        value differs from the run's (a resumed run: params are immutable, the caller records them as a tag)."""
        from mlflow.entities import Param

        fresh, changed = {}, {}
        secrets = secret_values()
        for key, value in params.items():
            text = "***" if is_secret_key(key) else truncate(safe_text(str(value), secrets), MAX_PARAM_VAL_LENGTH)
            old = self.existing_params.get(key)
            if old is None:
                fresh[key] = text
            elif old != text:
                changed[key] = text
        self.existing_params.update(fresh)
        items = list(fresh.items())
        for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            chunk = dict(items[i:i + MAX_PARAMS_TAGS_PER_BATCH])
            self.submit("log_params", self._log_batch, params=[Param(k, v) for k, v in chunk.items()],
                        kind="params", payload=chunk)
        return changed

    def terminate(self, status: str, end_time_ms: int) -> None:
        """Queue the final status (after every point due); the unsent file's header carries it meanwhile."""
        with self._lock:
            self.status, self.end_time = status, int(end_time_ms)

        def done(_: Any) -> None:
            self.terminated = True

        self.submit("set_terminated", self.client.set_terminated, self.run_id, status=status,
                    end_time=int(end_time_ms), kind="terminate", payload={"status": status}, on_done=done)

    def _log_batch(self, **kw: Any) -> Any:
        return self.client.log_batch(self.run_id, **kw)

    # ----------------------------------------------------------------------------------------- metrics
    def add(self, key: str, value: Any, step: int, time_ns: int) -> None:
        """Queue one point; when the buffer is full its oldest points go to the unsent file first."""
        try:
            v = float(value)
        except (TypeError, ValueError):
            return
        with self._lock:
            if self._closed:
                self.dropped_points += 1
                return
            if len(self._pending) >= PENDING_LIMIT:
                self._spill(max(1, int(PENDING_LIMIT * SPILL_FRACTION)))
            self._pending.append(Point(self._seq, key, v, int(step), time_ns // 1_000_000))
            self._seq += 1
            self.produced_points += 1
            self._start_threads()
            n = len(self._pending)
            if n == 1 or n % self.flush_every == 0 or self.flush_interval == 0:
                self._lock.notify_all()  # the sender sleeps until it has something to do

    def request_flush(self) -> None:
        """Send the pending points now (without waiting for the flush interval); returns at once."""
        with self._lock:
            if self._pending:
                self._flush_requested = True
                self._lock.notify_all()

    def unsent(self) -> list[Any]:
        """The points still in memory (not sent, not yet moved to the unsent file), oldest first."""
        with self._lock:
            return [p.metric() for p in self._pending]

    def wait_idle(self, timeout: float) -> bool:
        """Wait until everything queued was sent (or refused); False when ``timeout`` came first."""
        deadline = time.monotonic() + timeout
        with self._lock:
            self.request_flush()
            while self._pending or self._ops or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(min(left, 0.1))
            return True

    # ------------------------------------------------------------------------------- the unsent file
    def set_log_dir(self, log_dir: Path) -> None:
        with self._lock:
            if self.unsent_file is None:
                self.unsent_file = UnsentFile(Path(log_dir) / UNSENT_FILE)
                if self._orphans:
                    self._to_file(self._orphans)
                    self._orphans = []

    def header(self) -> dict[str, Any]:
        """The first line of this process's section of the unsent file (``unsent`` is set when written)."""
        tags: dict[str, str] = {}
        params: dict[str, str] = {}
        pending_calls = []
        for op in self._ops:
            if op.kind == "tags":
                tags.update(op.payload)
            elif op.kind == "params":
                params.update(op.payload)
            elif op.kind != "terminate":
                pending_calls.append(op.name)
        return {"run_id": self.run_id, "tracking_uri": self.safe_uri, "format": UNSENT_FORMAT,
                "written_at": int(time.time() * 1000), "status": self.status, "end_time": self.end_time,
                "terminated": self.terminated, "unsent": 0, "sent": self.sent_points,
                "rejected": self.rejected_points, "spilled": self.spilled_points, "dropped": self.dropped_points,
                "tags": tags, "params": params, "calls_not_made": pending_calls}

    def _to_file(self, points: list[Point], leaving: bool = False) -> None:
        """Write the points not in the file yet (lock held). ``leaving``: they leave memory (spilled or
        refused), so points that cannot be written are lost, and counted as dropped."""
        todo = [p for p in points if p.line is None]
        if not todo:
            return
        if self.unsent_file is None:
            if not leaving:
                return  # still in memory; written once the log folder is known
            room = max(0, PENDING_LIMIT - len(self._orphans))
            self._orphans.extend(todo[:room])
            self.dropped_points += len(todo) - len(todo[:room])
            return
        if not self.unsent_file.append(self.header(), todo) and leaving:
            self.dropped_points += len(todo)

    def _spill(self, n: int) -> None:
        """The oldest ``n`` points leave memory for the unsent file (the buffer is full)."""
        out = [self._pending.popleft() for _ in range(min(n, len(self._pending)))]
        self.spilled_points += len(out)
        self._to_file(out, leaving=True)
        if out and not self._spill_noted:
            self._spill_noted = True
            log.warning("MLflow sink: the metric buffer is full (%d points); the oldest go to %s until the "
                        "store answers", PENDING_LIMIT, self._file_name())

    def journal_tick(self, now: float | None = None) -> None:
        """Write-ahead: the points pending for longer than one journal interval go to the unsent file."""
        now = time.monotonic() if now is None else now
        with self._lock:
            if self._closed or self.unsent_file is None:
                return
            self._marks.append((now, self._seq))
            upto = None
            while self._marks and self._marks[0][0] <= now - self.journal_interval:
                upto = self._marks.popleft()[1]
            self._journal_upto(upto)

    def journal_all(self) -> None:
        """Write-ahead now: every point neither sent nor journaled yet goes to the unsent file (the trainer is
        about to write a checkpoint: a kill after it must not lose a step the resume will not make again)."""
        with self._lock:
            if not self._closed and self.unsent_file is not None:
                self._journal_upto(self._seq)

    def _journal_upto(self, upto: int | None) -> None:
        """Journal the pending points numbered below ``upto`` that are not journaled yet (lock held)."""
        if upto is None or not self._pending or upto <= self._journaled_upto:
            return
        first = self._pending[0].seq
        lo, hi = max(0, self._journaled_upto - first), max(0, upto - first)
        if hi > lo:
            self._to_file(list(itertools.islice(self._pending, lo, hi)))
        self._journaled_upto = upto

    def write_ahead(self) -> None:
        """Everything not sent yet, with the run's final status, goes to the unsent file now (before the
        final network calls): a kill during them leaves a complete file."""
        with self._lock:
            if self._closed or self.unsent_file is None:
                return
            self.unsent_file.compact(self.header(), list(self._pending) + self._inflight_extra(), keep_section=True)
            self._journaled_upto = self._seq

    def _inflight_extra(self) -> list[Point]:
        """Points of the batch on the wire that already left the buffer (spilled meanwhile)."""
        ids = {id(p) for p in self._pending}
        return [p for p in self._inflight if id(p) not in ids and p.line is not None]

    def _file_name(self) -> str:
        return str(self.unsent_file.path) if self.unsent_file else f"<log-dir>/{UNSENT_FILE}"

    # ------------------------------------------------------------------------------------------ closing
    def drain(self, deadline: float, hurry: threading.Event | None = None) -> bool:
        """Send everything queued (points first, then the calls) until ``deadline``; True when all went.
        A store that failed gets one try at once, then retries at most a second apart."""
        with self._lock:
            if self._closed:
                return False
            self._finishing = True
            self.breaker.close_for_last_try()
            self._flush_requested = bool(self._pending)
            self._lock.notify_all()
            while self._pending or self._ops or self._busy:
                left = deadline - time.monotonic()
                if left <= 0 or (hurry is not None and hurry.is_set()):
                    return False
                if not self._threads:
                    self._start_threads()
                self._lock.wait(min(left, 0.05))
            return True

    def shutdown(self) -> int:
        """Stop the threads (a call still on the wire is abandoned) and write the final unsent file.
        Returns the number of points in it (this process's section)."""
        with self._lock:
            if self._closed:
                return 0
            self._closed = True
            self._stop_threads()
            unsent = 0
            lost_end = self.status is not None and not self.terminated
            if self.unsent_file is not None:
                live = list(self._pending) + self._inflight_extra()
                leftovers = bool(self._ops and any(op.kind in ("tags", "params", "terminate") for op in self._ops))
                unsent = self.unsent_file.compact(self.header(), live, keep_section=lost_end or leftovers)
            elif self._pending or self._orphans:
                self.dropped_points += len(self._pending) + len(self._orphans)
        return unsent
