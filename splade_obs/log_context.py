"""The ids that join a log line to the run's trace and MLflow run: ``trace_id``, ``span_id``, ``run_id``.

One process-wide holder, :data:`CONTEXT`, read by the JSON log formatter and the OTLP log handler on whatever
thread logs, written (under a lock) on the emitting thread from events:

* :class:`LogContextSink` (added first to the bus by ``run.run_training``, so it sees each event before every
  other sink, whatever the order of the others): ``TraceOpened`` -> trace id and run span id (from the
  traceparent); ``TrackingRunOpened`` -> the MLflow run id; ``EpochStarted`` -> it *reserves* a span id for the
  epoch span; ``ErrorCaught`` of a failed batch -> it reserves a span id for that batch's ERROR span; the
  epoch's id is dropped again at ``EpochDone``/``RunFinished``. A reserved id is used from the moment it is
  reserved: when there is a trace there is an OpenTelemetry sink, and it makes those spans with those ids.
* the OpenTelemetry sink builds its spans after the fact and takes the reserved ids for the epoch and the
  failed-batch spans (:meth:`LogContext.take_epoch` / :meth:`LogContext.take_batch`), so the ids a line
  carried are the ids of spans that are exported.

Which span a line gets: a line about a failed batch (a record whose ``batch`` field names it) the batch's
span; otherwise the open epoch's span, else the run span. Sampled batch spans are built only after their
batch (at the logging point), so no line carries them: a line logged during any healthy batch carries the
enclosing epoch span, which always exists. Without tracing (no ``TraceOpened``) nothing is reserved and a
line carries only ``run_id``.
"""

from __future__ import annotations

import random
import threading
from typing import Any

from .bus import Sink
from .events import EpochDone, EpochStarted, ErrorCaught, RunFinished, TraceOpened, TrackingRunOpened

#: failed-batch span ids remembered (oldest forgotten first)
MAX_BATCHES = 256


def failed_batch_gets_span(e: ErrorCaught) -> bool:
    """The one rule (shared with the OpenTelemetry sink) for an error that gets its own ERROR batch span."""
    return e.batch_index is not None and bool(e.skipped_batch or e.start_ns)


def _new_span_id() -> int:
    while True:
        value = random.getrandbits(64)
        if value:
            return value


class LogContext:
    """Thread-safe current ids; see the module docstring."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.clear()

    def clear(self) -> None:
        with self._lock:
            self.trace_id: str | None = None
            self.run_span_id: str | None = None
            self.run_id: str | None = None
            self._epoch: tuple[int, int] | None = None         # (epoch number, reserved span id)
            self._batches: dict[int, int] = {}                 # run-wide batch number -> reserved span id

    # writers (emitting thread) ----------------------------------------------------------------------------
    def set_trace(self, traceparent: str) -> None:
        parts = traceparent.split("-")
        if len(parts) >= 3 and len(parts[1]) == 32 and len(parts[2]) == 16:
            with self._lock:  # the latest wins: a rank > 0 root re-announces itself inside rank 0's trace
                self.trace_id, self.run_span_id = parts[1], parts[2]

    def set_run_id(self, run_id: str | None) -> None:
        with self._lock:
            self.run_id = run_id

    def reserve_epoch(self, epoch: int) -> None:
        with self._lock:
            if self.trace_id is not None:
                self._epoch = (epoch, _new_span_id())

    def end_epoch(self) -> None:
        with self._lock:
            self._epoch = None

    def reserve_batch(self, batch: int) -> None:
        with self._lock:
            if self.trace_id is None:
                return
            self._batches.setdefault(batch, _new_span_id())
            while len(self._batches) > MAX_BATCHES:
                self._batches.pop(next(iter(self._batches)))

    # the OpenTelemetry sink ------------------------------------------------------------------------------
    def take_epoch(self, epoch: int) -> int | None:
        """The span id reserved for ``epoch`` (the sink then uses it for the epoch span), or None."""
        with self._lock:
            if self._epoch is not None and self._epoch[0] == epoch:
                return self._epoch[1]
            return None

    def take_batch(self, batch: int | None) -> int | None:
        with self._lock:
            return None if batch is None else self._batches.get(batch)

    # readers (any thread) ---------------------------------------------------------------------------------
    def ids(self, batch: Any = None) -> dict[str, str]:
        """``trace_id`` / ``span_id`` / ``run_id`` for a line (only the known ones); ``batch``: the record's
        ``batch`` field, when the line is about one batch."""
        with self._lock:
            out: dict[str, str] = {}
            if self.trace_id is not None:
                out["trace_id"] = self.trace_id
                span: str | None = self.run_span_id
                if isinstance(batch, int) and not isinstance(batch, bool) and batch in self._batches:
                    span = f"{self._batches[batch]:016x}"
                elif self._epoch is not None:
                    span = f"{self._epoch[1]:016x}"
                if span is not None:
                    out["span_id"] = span
            if self.run_id is not None:
                out["run_id"] = self.run_id
            return out


#: the process's holder (one run at a time per process; ``logging_setup`` clears it at setup and teardown)
CONTEXT = LogContext()


class LogContextSink(Sink):
    """Keeps :data:`CONTEXT` current from events; must be the bus's first sink (``run.run_training``)."""

    name = "log_context"
    scope = "rank"
    threaded = False

    def __init__(self, context: LogContext = CONTEXT) -> None:
        self.context = context

    def on_trace_opened(self, e: TraceOpened) -> None:
        self.context.set_trace(e.traceparent)

    def on_tracking_run_opened(self, e: TrackingRunOpened) -> None:
        self.context.set_run_id(e.run_id)

    def on_epoch_started(self, e: EpochStarted) -> None:
        self.context.reserve_epoch(e.epoch)

    def on_error_caught(self, e: ErrorCaught) -> None:
        if failed_batch_gets_span(e) and e.batch is not None:
            self.context.reserve_batch(e.batch)

    def on_epoch_done(self, e: EpochDone) -> None:
        self.context.end_epoch()

    def on_run_finished(self, e: RunFinished) -> None:
        self.context.end_epoch()
