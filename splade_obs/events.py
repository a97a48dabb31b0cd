"""Typed run events and the bus that fans them out to sinks.

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

All timestamps are wall-clock ``time.time_ns()`` so spans can be rebuilt after the fact.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable

log = logging.getLogger("splade_obs.events")


def now_ns() -> int:
    return time.time_ns()


# --------------------------------------------------------------------------------------------- events
@dataclass(frozen=True)
class Event:
    kind: ClassVar[str] = "event"
    #: Lifecycle events are never dropped by a full sink queue (they wait a bounded time instead).
    lifecycle: ClassVar[bool] = True
    time_ns: int = field(default_factory=now_ns, kw_only=True)
    rank: int = field(default=0, kw_only=True)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["event"] = self.kind
        return d


@dataclass(frozen=True)
class RunStarted(Event):
    kind: ClassVar[str] = "run_started"
    run_name: str
    config: dict[str, Any]              # nested effective config (secrets already removed)
    system_info: dict[str, Any]
    total_steps: int                    # optimizer steps planned for the whole run
    num_epochs: int
    steps_per_epoch: int
    start_step: int = 0                 # > 0 when resumed
    resumed: bool = False
    output_dir: str = ""
    log_dir: str = ""
    world_size: int = 1
    #: MLflow run id to continue (from a checkpoint), if any; the MLflow sink fills ``run_ids``.
    tracking_run_id: str | None = None
    #: W3C traceparent of the run span to join (distributed ranks > 0), if any.
    traceparent: str | None = None


@dataclass(frozen=True)
class DataLoaded(Event):
    kind: ClassVar[str] = "data_loaded"
    split: str                          # "train" | "validation" | "eval"
    source: str                         # path
    num_examples: int
    digest: str                         # content hash of the file(s)
    num_skipped: int = 0
    start_ns: int = 0
    end_ns: int = 0
    fmt: str = ""                       # "jsonl" | "json" | "beir"


@dataclass(frozen=True)
class ModelLoaded(Event):
    kind: ClassVar[str] = "model_loaded"
    name: str
    path: str
    num_parameters: int
    device: str
    amp_dtype: str                      # "float32" | "float16" | "bfloat16"
    start_ns: int = 0
    end_ns: int = 0


@dataclass(frozen=True)
class EpochStarted(Event):
    kind: ClassVar[str] = "epoch_started"
    epoch: int                          # 1-based
    num_epochs: int
    steps_in_epoch: int


@dataclass(frozen=True)
class StepDone(Event):
    """One optimizer step (after gradient accumulation)."""

    kind: ClassVar[str] = "step_done"
    lifecycle: ClassVar[bool] = False
    step: int                           # global optimizer step, 1-based
    epoch: int
    batch_index: int                    # index of the last micro-batch of this step within the epoch
    loss: float
    parts: dict[str, float]             # {"base": .., "query_reg": .., "doc_reg": .., ...}
    learning_rate: float
    grad_norm: float
    batch_size: int                     # examples in the step (all micro-batches)
    num_tokens: int                     # non-padding tokens in the step
    samples_per_second: float
    tokens_per_second: float
    query_nnz: float                    # mean non-zero terms per query vector
    doc_nnz: float
    flops: float                        # FLOPS estimate of the step's batch
    start_ns: int = 0
    end_ns: int = 0
    timings: dict[str, float] = field(default_factory=dict)   # seconds: forward, backward, optimizer, data
    lambda_q: float = 0.0
    lambda_d: float = 0.0
    grad_scale: float | None = None
    total_steps: int = 0


@dataclass(frozen=True)
class ErrorCaught(Event):
    kind: ClassVar[str] = "error_caught"
    category: str                       # ErrorCategory name
    message: str
    error_type: str                     # class name of the ApplicationError
    exception_type: str | None          # class of the original exception, if any
    exception_message: str | None
    context: dict[str, Any]
    step: int | None = None
    epoch: int | None = None
    batch_index: int | None = None
    skipped_batch: bool = False         # the batch was dropped by the batch policy
    fatal: bool = False                 # the run stops because of it
    start_ns: int = 0                   # when the failing unit of work began (for the batch span)
    counts: dict[str, int] = field(default_factory=dict)   # running counters by category

    @classmethod
    def from_error(cls, err: Any, **kw: Any) -> "ErrorCaught":
        d = err.to_dict()
        orig = d.get("original_exception") or {}
        return cls(
            category=d["category"], message=d["message"], error_type=d["type"],
            exception_type=orig.get("type") or d["type"], exception_message=orig.get("message") or d["message"],
            context=d["context"], **kw,
        )


@dataclass(frozen=True)
class EpochDone(Event):
    kind: ClassVar[str] = "epoch_done"
    epoch: int
    num_epochs: int
    step: int
    train_loss: float
    learning_rate: float
    duration_seconds: float
    val_loss: float | None = None
    extra: dict[str, float] = field(default_factory=dict)  # loss parts, sparsity, skipped batches...
    start_ns: int = 0


@dataclass(frozen=True)
class EvaluationDone(Event):
    kind: ClassVar[str] = "evaluation_done"
    step: int
    epoch: int
    split: str
    metrics: dict[str, float]           # e.g. {"ndcg@10": .., "mrr@10": .., "query_nnz": ..}
    duration_seconds: float
    start_ns: int = 0
    is_best: bool = False


@dataclass(frozen=True)
class CheckpointSaved(Event):
    kind: ClassVar[str] = "checkpoint_saved"
    step: int
    epoch: int
    path: str
    reason: str                         # "save_steps" | "epoch_end" | "interrupt" | "error_budget" | "best" | "final"
    duration_seconds: float
    start_ns: int = 0


@dataclass(frozen=True)
class RetryAttempt(Event):
    kind: ClassVar[str] = "retry_attempt"
    operation: str
    attempt: int
    max_attempts: int
    delay_seconds: float
    category: str
    message: str


@dataclass(frozen=True)
class SinkDegraded(Event):
    kind: ClassVar[str] = "sink_degraded"
    sink: str
    failures: int
    error_type: str
    message: str


@dataclass(frozen=True)
class Message(Event):
    """A free-form note for humans (warnings about degraded options, collapse guard, ...)."""

    kind: ClassVar[str] = "message"
    level: str                          # "INFO" | "WARNING" | ...
    text: str
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RunFinished(Event):
    kind: ClassVar[str] = "run_finished"
    status: str                         # "FINISHED" | "FAILED" | "KILLED"
    step: int
    duration_seconds: float
    final_metrics: dict[str, float] = field(default_factory=dict)
    error: dict[str, Any] | None = None # ApplicationError.to_dict() when FAILED
    output_dir: str = ""
    model_path: str | None = None
    counters: dict[str, int] = field(default_factory=dict)  # errors by category, skipped batches


EVENT_TYPES: dict[str, type[Event]] = {
    c.kind: c for c in (RunStarted, DataLoaded, ModelLoaded, EpochStarted, StepDone, ErrorCaught, EpochDone,
                        EvaluationDone, CheckpointSaved, RetryAttempt, SinkDegraded, Message, RunFinished)
}


# ---------------------------------------------------------------------------------------------- sinks
class Sink:
    """Base class: ``handle`` dispatches to ``on_<kind>`` hooks that are no-ops by default."""

    name: str = "sink"
    #: "run": rank 0 only; "rank": every rank.
    scope: str = "run"
    #: True: the bus runs this sink on its own worker thread with a bounded queue.
    threaded: bool = False

    def handle(self, event: Event) -> None:
        hook = getattr(self, "on_" + event.kind, None)
        if hook is not None:
            hook(event)

    def close(self, timeout: float = 5.0) -> None:  # flush and release; bounded by ``timeout``
        pass


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
        #: Values that sinks publish for others to read (e.g. "mlflow.run_id", "otel.trace_id").
        self.shared: dict[str, Any] = {}
        self._listeners: list[Callable[[Event], None]] = []
        #: (event, runner that must not get it) produced on sink worker threads, delivered by the emitter.
        self._pending: list[tuple[Event, _Runner | None]] = []
        self._pending_lock = threading.Lock()
        for s in sinks:
            self.add(s)

    def add(self, sink: Sink) -> Sink:
        if sink.scope == "run" and self.rank != 0:
            return sink  # not attached on other ranks
        sink.bus = self  # type: ignore[attr-defined]
        self._runners.append(_Runner(sink, self, self.queue_size))
        return sink

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
