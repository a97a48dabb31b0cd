"""The event bus that fans events out to sinks, and the ``Sink`` base with one declared hook per event.

The training loop only calls ``bus.emit(event)``. Sinks decide where facts go. The bus guarantees:

* isolation: an exception in a sink is caught, logged once, counted; after ``max_failures`` consecutive
  failures the sink is marked degraded, skipped from then on, and a :class:`SinkDegraded` event goes to
  the other sinks. Training never stops because a sink failed.
* off the step path: a sink with ``threaded = True`` gets its own worker thread and a bounded queue.
  ``emit`` never blocks on it: when the queue is full, step events are dropped (and counted) while
  lifecycle events wait a bounded time.
* one delivering thread: non-threaded sinks are only called from the emitting (training) thread. What a
  sink worker thread produces (the :class:`SinkDegraded` of a threaded sink, events emitted from inside a
  threaded sink such as retry notices) waits in a pending list that the next ``emit`` or ``close`` drains.
* rank policy: under torchrun only rank 0 feeds sinks whose ``scope`` is ``"run"``; sinks with scope
  ``"rank"`` (per-rank logs, spans) see every rank's events.
* ids by events: ``open()`` calls every sink's ``Sink.open`` once all are attached; the ids a sink creates
  there (MLflow run, trace) are emitted as events, so the order in which sinks are added does not matter.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from typing import Any, Iterable

from .events import (EVENT_TYPES, AlertRaised, CheckpointSaved, DataLoaded, EpochDone, EpochStarted, ErrorCaught, Event,
                     EvaluationDone, Message, ModelLoaded, RetryAttempt, RunFinished, RunStarted, SinkDegraded,
                     StepDone, TraceOpened, TrackingRunOpened)

log = logging.getLogger("splade_obs.bus")


class Sink:
    """Base class of every sink: one no-op hook per event kind, ``on_<kind>``; override the ones you need.

    ``handle`` calls the hook of the event's kind. A subclass that defines an ``on_*`` method matching no
    event kind is refused when the class is created (a misspelled hook would silently never fire).
    Sinks learn everything from events (never from the config object); ids that another sink creates
    arrive as :class:`TrackingRunOpened` / :class:`TraceOpened`.
    """

    name: str = "sink"
    #: "run": rank 0 only; "rank": every rank.
    scope: str = "run"
    #: True: the bus runs this sink on its own worker thread with a bounded queue.
    threaded: bool = False

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        unknown = sorted(n for n in vars(cls) if n.startswith("on_") and n not in HOOKS.values())
        if unknown:
            raise TypeError(f"{cls.__qualname__} defines {', '.join(unknown)}, which match(es) no event kind; "
                            f"hooks are {', '.join(sorted(HOOKS.values()))}")

    def open(self, bus: "EventBus") -> None:
        """Called once on the emitting thread after every sink is attached, before the run starts.

        A sink that creates ids other sinks need (an MLflow run, a trace) announces them here with
        ``bus.emit(...)``, so every sink has them before ``RunStarted``, whatever the order of the sinks.
        """

    def handle(self, event: Event) -> None:
        getattr(self, HOOKS.get(event.kind, "_ignore"))(event)

    def _ignore(self, event: Event) -> None:
        pass

    def close(self, timeout: float = 5.0) -> None:
        """Flush and release; must return within ``timeout`` seconds."""

    def persist(self) -> None:
        """Make what this sink has received durable on local disk now (``EventBus.barrier``: the trainer is
        about to write a checkpoint). Quick and local; no network."""

    # hooks -------------------------------------------------------------------------------------------
    def on_run_started(self, e: RunStarted) -> None:
        """The run begins: config, params, plan (steps, epochs), system info, resume point."""

    def on_tracking_run_opened(self, e: TrackingRunOpened) -> None:
        """The MLflow run's ids (emitted by the MLflow sink when the bus opens)."""

    def on_trace_opened(self, e: TraceOpened) -> None:
        """The run's trace id and traceparent (emitted by the OpenTelemetry sink)."""

    def on_data_loaded(self, e: DataLoaded) -> None:
        """A dataset was read and validated (train, validation or evaluation split)."""

    def on_model_loaded(self, e: ModelLoaded) -> None:
        """The model is on its device; the AMP dtype is known."""

    def on_epoch_started(self, e: EpochStarted) -> None:
        """An epoch begins."""

    def on_step_done(self, e: StepDone) -> None:
        """One optimizer step, with its metrics (delivered in bursts at each logging point)."""

    def on_error_caught(self, e: ErrorCaught) -> None:
        """An error was caught and classified: a skipped batch, a degraded option, or the fatal one."""

    def on_epoch_done(self, e: EpochDone) -> None:
        """An epoch ended (or a stopped run's partial epoch, ``complete=False``), with its aggregates."""

    def on_evaluation_done(self, e: EvaluationDone) -> None:
        """Retrieval evaluation finished."""

    def on_checkpoint_saved(self, e: CheckpointSaved) -> None:
        """A checkpoint, the best model or the final model was written."""

    def on_retry_attempt(self, e: RetryAttempt) -> None:
        """A transient fault is being retried."""

    def on_sink_degraded(self, e: SinkDegraded) -> None:
        """Another sink failed too often and is skipped from now on."""

    def on_message(self, e: Message) -> None:
        """A note for humans (degraded options, ...)."""

    def on_alert_raised(self, e: AlertRaised) -> None:
        """A training-health alert (loss spike, grad explosion, ...), once per episode (:mod:`splade_obs.health`)."""

    def on_run_finished(self, e: RunFinished) -> None:
        """The run ended: status, final metrics, counters, the error if it failed."""


#: event kind -> hook name
HOOKS: dict[str, str] = {kind: f"on_{kind}" for kind in EVENT_TYPES}


class RunIds(Sink):
    """The ids of the run's MLflow run and trace, as the id events announce them (trainer, callers, tests)."""

    name = "run_ids"
    scope = "rank"

    def __init__(self) -> None:
        self.mlflow_run_id: str | None = None
        self.mlflow_experiment_id: str | None = None
        self.tracking_uri: str | None = None
        self.trace_id: str | None = None
        self.traceparent: str | None = None

    def on_tracking_run_opened(self, e: TrackingRunOpened) -> None:
        self.mlflow_run_id, self.mlflow_experiment_id, self.tracking_uri = e.run_id, e.experiment_id, e.tracking_uri

    def on_trace_opened(self, e: TraceOpened) -> None:
        self.trace_id, self.traceparent = e.trace_id, e.traceparent


class _Runner:
    """Delivers events to one sink and keeps its health record."""

    def __init__(self, sink: Sink, bus: "EventBus", queue_size: int) -> None:
        self.sink = sink
        self.bus = bus
        self.failures = 0              # consecutive
        self.total_failures = 0
        self.dropped = 0
        self.degraded = False
        self._logged = False
        self._queue: queue.Queue[Event | None] | None = None
        self._thread: threading.Thread | None = None
        self._stopped = False          # the worker thread has exited: deliver on the caller's thread
        if sink.threaded:
            self._queue = queue.Queue(maxsize=queue_size)
            self._thread = threading.Thread(target=self._work, name=f"sink-{sink.name}", daemon=True)
            self._thread.start()

    # delivery --------------------------------------------------------------------------------------
    def submit(self, event: Event) -> None:
        if self.degraded:
            return
        if self._queue is None or self._stopped:
            self._deliver(event)
            return
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            if not event.lifecycle:
                self.dropped += 1
                return
            try:
                self._queue.put(event, timeout=self.bus.lifecycle_put_timeout)
            except queue.Full:
                self.dropped += 1

    def _work(self) -> None:
        assert self._queue is not None
        while True:
            event = self._queue.get()
            try:
                if event is None:
                    return
                if not self.degraded:
                    self._deliver(event)
            finally:
                self._queue.task_done()

    def _deliver(self, event: Event) -> None:
        try:
            self.sink.handle(event)
            self.failures = 0
        except Exception as exc:  # noqa: BLE001 - the one place sink failures are caught
            self.failures += 1
            self.total_failures += 1
            if not self._logged:
                self._logged = True
                log.warning("sink %s failed on %s: %s: %s (further failures are counted, not logged)",
                            self.sink.name, event.kind, type(exc).__name__, exc)
            if self.failures >= self.bus.max_failures and not self.degraded:
                self.degraded = True
                log.warning("sink %s degraded after %d consecutive failures; it is skipped from now on",
                            self.sink.name, self.failures)
                self.bus._on_degraded(self, exc)

    def wait_idle(self, deadline: float) -> bool:
        """True once the worker has handled every event queued so far (at once for an inline sink)."""
        if self._queue is None or self._stopped or self.degraded:
            return True
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._queue.all_tasks_done.wait(min(left, 0.05))
        return True

    # shutdown --------------------------------------------------------------------------------------
    def stop_worker(self, deadline: float) -> None:
        """Let the worker drain its queue and exit (bounded by ``deadline``)."""
        if self._queue is None or self._thread is None or self._stopped:
            return
        try:
            self._queue.put(None, timeout=max(0.0, deadline - time.monotonic()))
        except queue.Full:
            pass
        self._thread.join(timeout=max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            log.warning("sink %s did not drain before shutdown deadline (%d events pending)",
                        self.sink.name, self._queue.qsize())
        else:
            self._stopped = True

    def close(self, deadline: float) -> None:
        self.stop_worker(deadline)
        try:
            self.sink.close(timeout=max(0.1, deadline - time.monotonic()))
        except Exception as exc:  # noqa: BLE001
            log.warning("sink %s failed to close: %s: %s", self.sink.name, type(exc).__name__, exc)

    def stats(self) -> dict[str, Any]:
        return {"failures": self.total_failures, "dropped": self.dropped, "degraded": self.degraded}


class EventBus:
    """Fans events out to sinks; see the module docstring for the guarantees."""

    def __init__(self, sinks: Iterable[Sink] = (), *, rank: int = 0, max_failures: int = 5,
                 queue_size: int = 10_000, lifecycle_put_timeout: float = 2.0) -> None:
        self.rank = rank
        self.max_failures = max_failures
        self.lifecycle_put_timeout = lifecycle_put_timeout
        self.queue_size = queue_size
        self._runners: list[_Runner] = []
        self._lock = threading.Lock()
        self._closed = False
        self._opened = False
        #: (event, runner that must not get it) produced on sink worker threads, delivered by the emitter.
        self._pending: list[tuple[Event, _Runner | None]] = []
        self._pending_lock = threading.Lock()
        for s in sinks:
            self.add(s)

    def add(self, sink: Sink) -> Sink:
        if sink.scope == "run" and self.rank != 0:
            return sink  # not attached on other ranks
        self._runners.append(_Runner(sink, self, self.queue_size))
        return sink

    def open(self) -> None:
        """Let every attached sink announce its ids (``Sink.open``); call once, before the first event.

        A sink whose ``open`` raises is reported like any sink failure; an :class:`ApplicationError` that a
        sink raises on purpose (a tracking store the user required) propagates and stops the run.
        """
        if self._opened:
            return
        self._opened = True
        from .errors import ApplicationError
        for runner in list(self._runners):
            try:
                runner.sink.open(self)
            except ApplicationError:
                raise
            except Exception as exc:  # noqa: BLE001 - counted like a failure to handle an event
                log.warning("sink %s failed to open: %s: %s", runner.sink.name, type(exc).__name__, exc)

    @property
    def sinks(self) -> list[Sink]:
        return [r.sink for r in self._runners]

    def emit(self, event: Event) -> None:
        if self._closed:
            return
        if event.rank != self.rank:
            event = dataclasses.replace(event, rank=self.rank)
        if self._on_worker_thread():
            self._defer(event, None)  # never call non-threaded sinks from a sink's worker thread
            return
        self._drain_pending()
        self._fan_out(event, None)

    def _fan_out(self, event: Event, skip: _Runner | None) -> None:
        for runner in list(self._runners):
            if runner is not skip:
                runner.submit(event)

    def _on_worker_thread(self) -> bool:
        me = threading.current_thread()
        return any(r._thread is me for r in self._runners)

    def _defer(self, event: Event, skip: _Runner | None) -> None:
        with self._pending_lock:
            self._pending.append((event, skip))

    def _drain_pending(self) -> None:
        """Deliver what worker threads left for the emitting thread, oldest first."""
        if not self._pending:  # unlocked peek: a list read is atomic; a late append waits for the next call
            return
        with self._pending_lock:
            pending, self._pending = self._pending, []
        for event, skip in pending:
            self._fan_out(event, skip)

    def _on_degraded(self, runner: _Runner, exc: BaseException) -> None:
        """Tell the other sinks; from a worker thread only through the pending list (see ``emit``)."""
        ev = SinkDegraded(sink=runner.sink.name, failures=runner.failures, error_type=type(exc).__name__,
                          message=str(exc)[:500], rank=self.rank)
        if self._on_worker_thread():
            self._defer(ev, runner)
        else:
            self._fan_out(ev, runner)

    def stats(self) -> dict[str, dict[str, Any]]:
        return {r.sink.name: r.stats() for r in self._runners}

    def barrier(self, timeout: float = 10.0) -> bool:
        """Deliver every event emitted so far, then let each sink make it durable (``Sink.persist``), within
        ``timeout`` seconds. The trainer calls it before writing a checkpoint, so a process killed after the
        checkpoint has lost no fact that resuming from it will not produce again. False (with a warning) when
        a sink did not get there in time."""
        if self._closed:
            return False
        deadline = time.monotonic() + timeout
        self._drain_pending()
        ok = True
        for runner in list(self._runners):
            if not runner.wait_idle(deadline):
                ok = False
                log.warning("sink %s did not catch up within %.1fs before a checkpoint", runner.sink.name, timeout)
                continue
            if runner.degraded:
                continue
            try:
                runner.sink.persist()
            except Exception as exc:  # noqa: BLE001 - a sink that cannot persist must not stop the checkpoint
                log.warning("sink %s failed to persist: %s: %s", runner.sink.name, type(exc).__name__, exc)
                ok = False
        return ok

    def close(self, timeout: float = 10.0) -> None:
        """Drain threaded sinks and close all sinks, within ``timeout`` seconds overall."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + timeout
        self._drain_pending()
        for runner in self._runners:       # threaded sinks finish their queues (and may still degrade) ...
            runner.stop_worker(deadline)
        self._drain_pending()              # ... so what they left is delivered before any sink closes
        for runner in self._runners:
            runner.close(deadline)

    def __enter__(self) -> "EventBus":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class RecordingSink(Sink):
    """Keeps every event in memory; used by tests and by ``splade_obs`` callers that want the events."""

    name = "recording"
    scope = "rank"

    def __init__(self) -> None:
        self.events: list[Event] = []

    def handle(self, event: Event) -> None:
        self.events.append(event)

    def of(self, cls: type[Event]) -> list[Any]:
        return [e for e in self.events if isinstance(e, cls)]
