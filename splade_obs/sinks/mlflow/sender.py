"""The two threads behind a :class:`~.transport.Transport`: the sender (metric batches first, then the queued
calls, one at a time, with the circuit breaker's backoff) and the journal (the unsent file's write-ahead).

A mixin: it works on the transport's lock, buffer, call queue and unsent file (see ``transport.py``).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from .failures import hold_retry_noise, is_transient
from .unsent import Point

log = logging.getLogger("splade_obs.sinks.mlflow")

MAX_METRICS_PER_BATCH = 1000          # mlflow.utils.validation.MAX_METRICS_PER_BATCH
FINISH_MAX_WAIT_S = 1.0               # breaker cool-down cap once the run is finishing (the deadline bounds it)


@dataclass
class _Op:
    """A queued client call. ``kind`` and ``payload`` say what it carries, for the unsent file's header."""

    name: str
    fn: Callable[[], Any]
    kind: str = "call"                          # tags | params | terminate | artifact | call
    payload: Any = None
    on_done: Callable[[Any], None] | None = None


class SenderThreads:
    """Sending and write-ahead for :class:`~.transport.Transport` (which sets every attribute used here)."""

    _lock: threading.Condition
    _ops: Any
    _pending: Any
    _noise_held: bool

    # ------------------------------------------------------------------------------------------ threads
    def _start_threads(self) -> None:
        if self._threads or self._closed:
            return
        if self.tracking_uri.startswith(("http://", "https://")):
            hold_retry_noise(True)  # released by the sender thread when it ends (after a call it abandoned)
            self._noise_held = True
        for target, name in ((self._send_loop, "mlflow-send"), (self._journal_loop, "mlflow-journal")):
            t = threading.Thread(target=target, name=name, daemon=True)
            self._threads.append(t)
            t.start()

    def _stop_threads(self) -> None:
        """Tell both threads to stop (lock held); a call on the wire is abandoned (daemon threads)."""
        self._stop.set()
        self._lock.notify_all()

    def _journal_loop(self) -> None:
        while not self._stop.wait(self.journal_interval / 4):
            try:
                self.journal_tick()
            except Exception as exc:  # noqa: BLE001 - the write-ahead must not kill the thread
                log.warning("MLflow sink: unsent-file write failed: %s: %s", type(exc).__name__, exc)

    def _due(self, now: float) -> bool:
        return bool(self._pending) and (self._flush_requested or self._finishing or self.flush_interval == 0
                                        or len(self._pending) >= self.flush_every
                                        or now - self._last_send >= self.flush_interval)

    def _wait_s(self, now: float) -> float:
        if not self._pending and not self._ops:
            return 3600.0
        if self.breaker.is_open():
            return max(0.01, self.breaker.open_until - now)
        if self._ops or self._due(now):
            return 0.0
        return max(0.01, self._last_send + self.flush_interval - now)

    def _send_loop(self) -> None:
        try:
            self._sending()
        finally:
            if self._noise_held:
                self._noise_held = False
                hold_retry_noise(False)

    def _sending(self) -> None:
        while True:
            with self._lock:
                while True:
                    if self._closed or self._stop.is_set():
                        return
                    wait = self._wait_s(time.monotonic())
                    if wait <= 0:
                        break
                    self._lock.wait(wait)
                now = time.monotonic()
                if self._due(now):
                    batch = list(itertools.islice(self._pending, 0, MAX_METRICS_PER_BATCH))
                    self._inflight, op = batch, None
                    self._last_send = now
                else:
                    batch, op = [], self._ops[0]
                self._busy = True
            try:
                if batch:
                    self._send_batch(batch)
                else:
                    self._run_op(op)
            except Exception as exc:  # noqa: BLE001 - the sender must survive anything
                log.warning("MLflow sink: sender error: %s: %s", type(exc).__name__, exc)
            finally:
                with self._lock:
                    self._busy = False
                    self._inflight = []
                    self._lock.notify_all()

    def _send_batch(self, batch: list[Point]) -> None:
        try:
            self.client.log_batch(self.run_id, metrics=[p.metric() for p in batch])
        except Exception as exc:  # noqa: BLE001 - sorted below: retried, or kept for the unsent file
            with self._lock:
                if self._closed:
                    return
                if is_transient(exc):
                    self._failed("log_batch", exc)
                    return
                self._refused("log_batch", exc, f"; its {len(batch)} points are kept in {self._file_name()}")
                self.rejected_points += len(batch)
                self._to_file(batch, leaving=True)
                self._drop_front(batch[-1].seq)
            return
        with self._lock:
            if self._closed:
                return
            self._drop_front(batch[-1].seq)
            self.sent_points += len(batch)
            if self.unsent_file is not None:
                self.unsent_file.mark_sent([p.line for p in batch if p.line is not None])
            self._answered()

    def _drop_front(self, last_seq: int) -> None:
        while self._pending and self._pending[0].seq <= last_seq:
            self._pending.popleft()
        if not self._pending:
            self._flush_requested = False

    def _run_op(self, op: _Op) -> None:
        try:
            result = op.fn()
        except Exception as exc:  # noqa: BLE001 - retried when transient; else logged once and skipped
            with self._lock:
                if self._closed:
                    return
                if is_transient(exc):
                    self._failed(op.name, exc)
                    return
                self._refused(op.name, exc, "; not retried")
                self.refused_ops.append(op.name)
                if self._ops and self._ops[0] is op:
                    self._ops.popleft()
            return
        with self._lock:
            if self._ops and self._ops[0] is op:
                self._ops.popleft()
            self._answered()
        if op.on_done is not None:
            try:
                op.on_done(result)
            except Exception as exc:  # noqa: BLE001
                log.debug("MLflow %s: follow-up failed: %s", op.name, exc)

    def _failed(self, what: str, exc: BaseException) -> None:
        """A transient failure (lock held): back off (at most a second apart once finishing)."""
        self.breaker.failed(cap=FINISH_MAX_WAIT_S if self._finishing else None)
        self.health.failed(what, exc, waiting=len(self._pending), sent=self.sent_points, where=self._file_name())

    def _answered(self) -> None:
        self.breaker.ok()
        self.health.answered(len(self._pending))

    def _refused(self, what: str, exc: BaseException, kept: str) -> None:
        self.breaker.ok()
        self.health.refused(what, exc, kept)
