"""Client calls to the tracking store, kept bounded whatever the store does.

* every call goes through :func:`splade_obs.recovery.retry` (bounded attempts, backoff with jitter) and
  is re-raised typed; only connection trouble and MLflow "try again" codes are retried;
* a circuit breaker stops calling a store that just failed, for a cool-down that doubles (2 s .. 60 s);
* metric points wait in a bounded buffer (oldest dropped and counted when it is full) and are sent with
  ``log_batch`` (<= 1000 points a call) every ``flush_interval`` seconds or 1000 points;
* what is still unsent at the end goes to ``<log_dir>/mlflow_unsent.jsonl`` with one warning.

Everything sent (tags, params) is masked first: secret environment values and URL credentials.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import threading
import time
from pathlib import Path
from typing import Any, Callable

from ...errors import ApplicationError, classify
from ...recovery import retry
from ...redaction import is_secret_key, safe_text, secret_values
from .store import strip_credentials

log = logging.getLogger("splade_obs.sinks.mlflow")

MAX_METRICS_PER_BATCH = 1000          # mlflow.utils.validation.MAX_METRICS_PER_BATCH
MAX_PARAMS_TAGS_PER_BATCH = 100       # mlflow.utils.validation.MAX_PARAMS_TAGS_PER_BATCH
MAX_PARAM_VAL_LENGTH = 6000           # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MAX_TAG_VAL_LENGTH = 8000
PENDING_LIMIT = 200_000               # metric points kept while the store is down (~40 MB worst case)
UNSENT_FILE = "mlflow_unsent.jsonl"
#: What :meth:`Transport.attempt` returns when the call failed or was skipped (many client calls return None).
FAILED = object()


def truncate(text: str, limit: int) -> str:
    marker = "... [truncated, whole value in config.yaml]"
    return text if len(text) <= limit else text[: limit - len(marker)] + marker


def is_transient(exc: BaseException) -> bool:
    """Connection trouble anywhere in the cause chain, or an MLflow 'try again' error code."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if classify(cur).retryable:
            return True
        if getattr(cur, "error_code", None) in ("TEMPORARILY_UNAVAILABLE", "RESOURCE_EXHAUSTED",
                                                 "REQUEST_LIMIT_EXCEEDED"):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


class Breaker:
    """Stops calling a store that just failed, for a cool-down that doubles up to ``max_wait``."""

    def __init__(self, first_wait: float = 2.0, max_wait: float = 60.0) -> None:
        self.first_wait, self.max_wait = first_wait, max_wait
        self.wait = 0.0
        self.open_until = 0.0

    def is_open(self) -> bool:
        return time.monotonic() < self.open_until

    def failed(self) -> None:
        self.wait = min(self.max_wait, self.wait * 2 if self.wait else self.first_wait)
        self.open_until = time.monotonic() + self.wait

    def ok(self) -> None:
        self.wait, self.open_until = 0.0, 0.0

    def close_for_last_try(self) -> None:
        self.open_until = 0.0


class Transport:
    """One run's connection to the store: ``MlflowClient`` with an explicit run id (no fluent globals)."""

    def __init__(self, tracking_uri: str, *, flush_interval: float = 2.0) -> None:
        from mlflow import MlflowClient

        self.tracking_uri = tracking_uri
        self.safe_uri = strip_credentials(tracking_uri)
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self.run_id = ""
        self.flush_interval = max(0.0, float(flush_interval))
        self.flush_every = MAX_METRICS_PER_BATCH
        self.breaker = Breaker()
        self.dropped_points = 0
        self.sent_points = 0
        #: params already in the run (resume): unchanged ones are not sent again, changed ones become a tag
        self.existing_params: dict[str, str] = {}
        self._pending: collections.deque[Any] = collections.deque()
        self._pending_lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._last_flush = time.monotonic()

    # ------------------------------------------------------------------------------------ client calls
    def call(self, op: str, fn: Callable[..., Any], *args: Any, attempts: int = 3, **kw: Any) -> Any:
        """One client call with bounded retries on transient faults; feeds the circuit breaker."""

        def once() -> Any:
            try:
                return fn(*args, **kw)
            except Exception as exc:  # noqa: BLE001 - re-raised typed, retryable only when transient
                first = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
                raise ApplicationError(f"MLflow {op} failed: {first}", original_exception=exc,
                                       retryable=is_transient(exc), operation=f"mlflow.{op}") from exc

        try:
            result = retry(max_attempts=attempts, delay=0.5, backoff_factor=2.0, max_delay=2.0,
                           operation=f"mlflow.{op}")(once)()
        except ApplicationError as err:
            if err.retryable:
                self.breaker.failed()
            raise
        self.breaker.ok()
        return result

    def attempt(self, op: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        """:meth:`call` that logs and returns :data:`FAILED` instead of raising: a hook never fails the bus
        over one tracking call (five in a row would degrade the sink and lose the rest of the run)."""
        if self.breaker.is_open():
            log.warning("MLflow %s skipped: the tracking store is not answering", op)
            return FAILED
        try:
            return self.call(op, fn, *args, **kw)
        except ApplicationError as err:
            log.warning("%s", err.message)
            return FAILED

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        secrets = secret_values()
        items = [RunTag(k, truncate(safe_text(str(v), secrets), MAX_TAG_VAL_LENGTH))
                 for k, v in tags.items() if v is not None]
        for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            self.attempt("set_tags", self.client.log_batch, self.run_id, tags=items[i:i + MAX_PARAMS_TAGS_PER_BATCH])

    def log_params(self, params: dict[str, str]) -> dict[str, str]:
        """Log the params not in the run yet (<= 100 a call, long values truncated); returns the ones whose
        value differs from the run's (a resumed run: params are immutable, the caller records them as a tag)."""
        from mlflow.entities import Param

        fresh, changed = [], {}
        secrets = secret_values()
        for key, value in params.items():
            text = "***" if is_secret_key(key) else truncate(safe_text(str(value), secrets), MAX_PARAM_VAL_LENGTH)
            old = self.existing_params.get(key)
            if old is None:
                fresh.append(Param(key, text))
            elif old != text:
                changed[key] = text
        for i in range(0, len(fresh), MAX_PARAMS_TAGS_PER_BATCH):
            chunk = fresh[i:i + MAX_PARAMS_TAGS_PER_BATCH]
            if self.attempt("log_params", self.client.log_batch, self.run_id, params=chunk) is not FAILED:
                self.existing_params.update({p.key: p.value for p in chunk})
        return changed

    # ----------------------------------------------------------------------------------------- metrics
    def add(self, key: str, value: Any, step: int, time_ns: int) -> None:
        """Queue one point; the oldest point is dropped (and counted) when the buffer is full."""
        from mlflow.entities import Metric

        try:
            v = float(value)
        except (TypeError, ValueError):
            return
        with self._pending_lock:
            if len(self._pending) >= PENDING_LIMIT:
                self._pending.popleft()
                self.dropped_points += 1
            self._pending.append(Metric(key, v, time_ns // 1_000_000, int(step)))

    def maybe_flush(self) -> None:
        due = time.monotonic() - self._last_flush >= self.flush_interval or len(self._pending) >= self.flush_every
        if due and not self.breaker.is_open():
            self.flush()

    def flush(self, deadline: float | None = None, attempts: int = 3) -> bool:
        """Send pending points in batches of <= 1000; True when nothing is left. Failed points stay queued."""
        if not self._send_lock.acquire(timeout=max(0.0, (deadline or time.monotonic() + 60) - time.monotonic())):
            return False
        try:
            self._last_flush = time.monotonic()
            while self._pending:
                if deadline is not None and time.monotonic() >= deadline:
                    return False
                with self._pending_lock:
                    batch = [self._pending[i] for i in range(min(MAX_METRICS_PER_BATCH, len(self._pending)))]
                try:
                    self.call("log_batch", self.client.log_batch, self.run_id, metrics=batch, attempts=attempts)
                except ApplicationError as err:
                    if not err.retryable:
                        log.warning("%s; dropping %d points of this batch", err.message, len(batch))
                        self._pop(len(batch), dropped=True)
                        continue
                    log.warning("MLflow unreachable, %d metric points kept for the next flush (%s)",
                                len(self._pending), err.message)
                    return False
                self._pop(len(batch))
            return True
        finally:
            self._send_lock.release()

    def _pop(self, n: int, dropped: bool = False) -> None:
        with self._pending_lock:
            for _ in range(min(n, len(self._pending))):
                self._pending.popleft()
        if dropped:
            self.dropped_points += n
        else:
            self.sent_points += n

    def unsent(self) -> list[Any]:
        with self._pending_lock:
            return list(self._pending)

    def write_unsent(self, log_dir: Path | None) -> None:
        """Everything still pending goes to ``<log_dir>/mlflow_unsent.jsonl``; one warning names the counts."""
        pending = self.unsent()
        if not pending and not self.dropped_points:
            return
        if log_dir is None:  # no RunStarted came: no log folder to write to
            log.warning("MLflow sink: %d metric points not sent to %s, %d dropped from the full buffer",
                        len(pending), self.safe_uri, self.dropped_points)
            return
        path = log_dir / UNSENT_FILE
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"run_id": self.run_id, "tracking_uri": self.safe_uri, "unsent": len(pending),
                                     "dropped": self.dropped_points, "sent": self.sent_points}) + "\n")
                for m in pending:
                    fh.write(json.dumps({"key": m.key, "value": m.value if math.isfinite(m.value) else str(m.value),
                                         "step": m.step, "timestamp": m.timestamp}) + "\n")
        except OSError as exc:
            log.warning("MLflow sink: could not write %s: %s", path, exc)
            return
        log.warning("MLflow sink: %d metric points not sent to %s (kept in %s), %d dropped from the full buffer",
                    len(pending), self.safe_uri, path, self.dropped_points)
