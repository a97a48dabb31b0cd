"""The event bus: sink isolation, degraded sinks, threaded sinks off the emit path, queue policy, ranks."""

from __future__ import annotations

import threading
import time

import pytest

import importlib
import inspect
import pkgutil

import splade_obs
from splade_obs.bus import HOOKS, EventBus, RecordingSink, RunIds, Sink
from splade_obs.events import (EVENT_TYPES, EpochDone, EpochStarted, ErrorCaught, RunFinished, RunStarted,
                               SinkDegraded, StepDone, TraceOpened, TrackingRunOpened)
from splade_obs.sinks.errors_file import ErrorsFileSink
from splade_obs.sinks.metrics_file import MetricsFileSink


def run_started(total: int = 10) -> RunStarted:
    return RunStarted(run_name="t", config={}, system_info={}, total_steps=total, num_epochs=1,
                      steps_per_epoch=total)


def step(n: int) -> StepDone:
    return StepDone(step=n, epoch=1, batch_index=n - 1, loss=1.0, parts={"base": 1.0}, learning_rate=1e-4,
                    grad_norm=1.0, batch_size=4, num_tokens=64, samples_per_second=10.0, tokens_per_second=160.0,
                    query_nnz=5.0, doc_nnz=9.0, retrieval_flops=1.0, total_steps=10)


def epoch_done(step_n: int) -> EpochDone:
    return EpochDone(epoch=1, num_epochs=1, step=step_n, duration_seconds=1.0, means={"epoch/loss": 1.0})


class RaisingSink(Sink):
    name = "raiser"
    scope = "rank"

    def __init__(self, threaded: bool = False) -> None:
        self.threaded = threaded
        self.calls = 0

    def handle(self, event):  # noqa: ANN001
        self.calls += 1
        raise RuntimeError("sink is broken")


class CountingSink(Sink):
    """Threaded sink that sleeps per event (a slow network exporter) and counts what it handled."""

    name = "slow"
    scope = "rank"
    threaded = True

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.handled = 0

    def handle(self, event):  # noqa: ANN001
        time.sleep(self.delay)
        self.handled += 1


@pytest.mark.parametrize("threaded", [False, True])
def test_failing_sink_is_isolated_and_degraded(threaded: bool) -> None:
    raiser, rec = RaisingSink(threaded), RecordingSink()
    bus = EventBus([raiser, rec], max_failures=3)
    events = [run_started(), EpochStarted(epoch=1, num_epochs=1, steps_in_epoch=10),
              *[step(i) for i in range(1, 11)], epoch_done(10), RunFinished(status="FINISHED", step=10,
                                                                           duration_seconds=1.0)]
    for ev in events:
        bus.emit(ev)  # must never raise
    bus.close(timeout=5)

    stats = bus.stats()
    assert stats["raiser"]["degraded"] is True
    assert stats["raiser"]["failures"] == 3           # skipped once degraded
    assert raiser.calls == 3
    assert stats["recording"] == {"failures": 0, "dropped": 0, "degraded": False}
    kinds = [e.kind for e in rec.events if not isinstance(e, SinkDegraded)]
    assert kinds == [e.kind for e in events]           # the healthy sink got every event, in order
    degraded = rec.of(SinkDegraded)
    assert len(degraded) == 1 and degraded[0].sink == "raiser" and degraded[0].failures == 3
    assert degraded[0].error_type == "RuntimeError" and "broken" in degraded[0].message


def test_slow_threaded_sink_does_not_slow_emit() -> None:
    slow, rec = CountingSink(delay=0.05), RecordingSink()
    bus = EventBus([slow, rec])
    n = 2000
    for i in range(1, n + 1):
        bus.emit(step(i))
    handled_when_emit_returned = slow.handled
    # 2,000 events at 50 ms each is 100 s of sink work; emit returning after a handful proves it did not wait
    assert len(rec.events) == n
    assert handled_when_emit_returned < n // 20, handled_when_emit_returned
    assert bus.stats()["slow"]["dropped"] == 0           # the queue (10,000) had room for all
    bus.close(timeout=0.3)
    assert slow.handled < n                               # close gave up at its deadline instead of draining
    slow.delay = 0.0                                      # let the orphaned worker finish quickly


def test_full_queue_drops_step_events_but_keeps_lifecycle_events() -> None:
    gate = threading.Event()
    seen: list[str] = []

    class GatedSink(Sink):
        name = "gated"
        scope = "rank"
        threaded = True

        def handle(self, event):  # noqa: ANN001
            if event.kind == "step_done":
                gate.wait(10)
            seen.append(event.kind)

    bus = EventBus([GatedSink()], queue_size=5, lifecycle_put_timeout=10.0)
    bus.emit(run_started())
    n = 50
    for i in range(1, n + 1):
        bus.emit(step(i))
    dropped = bus.stats()["gated"]["dropped"]
    assert dropped >= n - 6                                # queue of 5 plus the one the worker holds
    threading.Timer(0.2, gate.set).start()                 # the worker frees room while the put waits
    bus.emit(epoch_done(n))
    bus.emit(RunFinished(status="FINISHED", step=n, duration_seconds=1.0))
    bus.close(timeout=10)

    assert bus.stats()["gated"]["dropped"] == dropped      # lifecycle events were not dropped
    assert seen[0] == "run_started" and seen[-2:] == ["epoch_done", "run_finished"]
    assert seen.count("step_done") + dropped == n


def test_rank_policy_attaches_run_sinks_on_rank_zero_only(tmp_path) -> None:
    class RunScoped(RecordingSink):
        name = "run-scoped"
        scope = "run"

    run_sink, rank_sink = RunScoped(), RecordingSink()
    metrics, errors = MetricsFileSink(tmp_path), ErrorsFileSink(tmp_path)
    bus = EventBus([run_sink, rank_sink, metrics, errors], rank=1)
    assert bus.sinks == [rank_sink, errors]
    bus.emit(run_started())
    bus.emit(ErrorCaught(category="DATA_ERROR", message="bad", error_type="DataError", exception_type=None,
                         exception_message=None, context={}, step=1, skipped_batch=True))
    bus.close(timeout=5)
    assert run_sink.events == []
    assert [e.rank for e in rank_sink.events] == [1, 1]     # the bus stamps its rank on every event
    assert (tmp_path / "errors.rank1.jsonl").exists() and not (tmp_path / "errors.jsonl").exists()
    assert not (tmp_path / "training_metrics.json").exists()

    rank0 = EventBus([RunScoped(), RecordingSink()], rank=0)
    assert [s.name for s in rank0.sinks] == ["run-scoped", "recording"]
    rank0.close()


def test_close_is_bounded_when_a_sink_hangs() -> None:
    release = threading.Event()

    class HangingSink(Sink):
        name = "hang"
        scope = "rank"
        threaded = True

        def handle(self, event):  # noqa: ANN001
            release.wait(60)

        def close(self, timeout: float = 5.0) -> None:
            release.wait(timeout)  # honours the time it is given

    bus = EventBus([HangingSink()], lifecycle_put_timeout=0.1)
    for i in range(1, 4):
        bus.emit(step(i))
    t0 = time.monotonic()
    bus.close(timeout=0.5)
    elapsed = time.monotonic() - t0
    release.set()
    assert elapsed < 5.0, f"close took {elapsed:.1f}s with a 0.5s timeout"


class ThreadRecordingSink(Sink):
    """Non-threaded sink that notes the thread of every delivery and whether it was already closed."""

    name = "thread-recorder"
    scope = "rank"

    def __init__(self) -> None:
        self.deliveries: list[tuple[str, threading.Thread, bool]] = []
        self.closed = False

    def handle(self, event):  # noqa: ANN001
        self.deliveries.append((event.kind, threading.current_thread(), self.closed))

    def close(self, timeout: float = 5.0) -> None:
        self.closed = True


@pytest.mark.parametrize("degrade_during", ["run", "close"])
def test_threaded_sink_degrading_reaches_other_sinks_only_on_the_emitting_thread(degrade_during: str) -> None:
    """A worker thread never calls a non-threaded sink: its SinkDegraded waits for the next emit (or close)."""
    raiser, receiver = RaisingSink(threaded=True), ThreadRecordingSink()
    bus = EventBus([raiser, receiver], max_failures=3)
    main = threading.current_thread()
    bus.emit(run_started())
    for i in range(1, 3):
        bus.emit(step(i))                                   # 3 events: the raiser degrades on its worker
    if degrade_during == "run":
        deadline = time.monotonic() + 10
        while not bus.stats()["raiser"]["degraded"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert bus.stats()["raiser"]["degraded"]
        time.sleep(0.05)                                    # before the fix the worker delivered it by now
        for i in range(3, 6):
            bus.emit(step(i))
    bus.close(timeout=10)

    got = [(kind, t, closed) for kind, t, closed in receiver.deliveries if kind == "sink_degraded"]
    assert len(got) == 1, receiver.deliveries
    assert all(t is main for _, t, _ in receiver.deliveries), {t.name for _, t, _ in receiver.deliveries}
    assert got[0][2] is False                               # delivered before the receiver was closed
    kinds = [k for k, _, _ in receiver.deliveries]
    if degrade_during == "run":                              # delivered at the first emit after degrading
        assert kinds.index("sink_degraded") == kinds.index("step_done") + 2
    assert raiser.calls == 3


def test_events_emitted_from_a_sink_worker_are_delivered_on_the_emitting_thread() -> None:
    """A threaded sink that emits (e.g. a retry notice from its client) does not call other sinks itself."""
    from splade_obs.events import Message

    class Chatty(Sink):
        name = "chatty"
        scope = "rank"
        threaded = True

        def open(self, bus: EventBus) -> None:
            self.bus = bus

        def on_run_started(self, event):  # noqa: ANN001
            self.bus.emit(Message(level="WARNING", text="retrying the store"))

    receiver = ThreadRecordingSink()
    bus = EventBus([Chatty(), receiver])
    bus.open()
    main = threading.current_thread()
    bus.emit(run_started())
    time.sleep(0.1)                                         # the worker emits meanwhile
    bus.emit(step(1))
    bus.close(timeout=10)
    kinds = [k for k, _, _ in receiver.deliveries]
    assert kinds == ["run_started", "message", "step_done"], kinds
    assert all(t is main for _, t, _ in receiver.deliveries)


# ------------------------------------------------------------------------------------ declared hooks
def _all_sink_classes() -> list[type[Sink]]:
    """Every Sink subclass defined in the package (each module imported, optional SDKs included)."""
    for mod in pkgutil.walk_packages(splade_obs.__path__, "splade_obs."):
        if mod.name.startswith("splade_obs.demo"):
            continue
        importlib.import_module(mod.name)
    found, todo = [], [Sink]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            todo.append(sub)
            if sub.__module__.startswith("splade_obs."):
                found.append(sub)
    return found


def test_the_sink_base_declares_one_documented_hook_per_event_kind() -> None:
    assert set(HOOKS) == set(EVENT_TYPES)
    for kind, hook in HOOKS.items():
        fn = getattr(Sink, hook, None)
        assert fn is not None, f"Sink has no {hook} for {kind}"
        assert inspect.getdoc(fn), f"Sink.{hook} has no docstring"
        params = list(inspect.signature(fn).parameters.values())
        assert params[1].annotation in (EVENT_TYPES[kind].__name__, EVENT_TYPES[kind]), (hook, params[1])
    assert not [n for n in vars(Sink) if n.startswith("on_") and n not in HOOKS.values()]


def test_every_sink_in_the_package_defines_only_hooks_that_match_an_event() -> None:
    classes = _all_sink_classes()
    names = {c.__name__ for c in classes}
    assert {"LogSink", "MetricsFileSink", "ErrorsFileSink", "ProgressSink", "MlflowSink", "OtelSink",
            "RunIds"} <= names, names
    for cls in classes:
        hooks = [n for klass in cls.__mro__ if klass is not object for n in vars(klass) if n.startswith("on_")]
        stray = sorted(set(hooks) - set(HOOKS.values()))
        assert not stray, f"{cls.__module__}.{cls.__qualname__} defines {stray}, which match no event"


def test_a_misspelled_hook_is_refused_when_the_class_is_made() -> None:
    with pytest.raises(TypeError, match="on_step_don"):
        class Typo(Sink):  # noqa: F841 - the class statement itself must fail
            def on_step_don(self, e):  # noqa: ANN001
                pass


def test_hooks_fire_for_their_event_kind_only() -> None:
    seen = []

    class Two(Sink):
        scope = "rank"

        def on_step_done(self, e: StepDone) -> None:
            seen.append(("step", e.step))

        def on_epoch_done(self, e: EpochDone) -> None:
            seen.append(("epoch", e.step))

    bus = EventBus([Two()])
    for ev in (run_started(), step(1), step(2), epoch_done(2), RunFinished(status="FINISHED", step=2,
                                                                            duration_seconds=1.0)):
        bus.emit(ev)
    bus.close()
    assert seen == [("step", 1), ("step", 2), ("epoch", 2)]


# ------------------------------------------------------------------------------------ ids as events
class _Announcer(Sink):
    """Creates an id in open() (as the MLflow and OTel sinks do) and records what it hears."""

    scope = "rank"

    def __init__(self, event) -> None:  # noqa: ANN001
        self.event = event
        self.heard: list[str] = []

    def open(self, bus: EventBus) -> None:
        bus.emit(self.event)

    def on_tracking_run_opened(self, e: TrackingRunOpened) -> None:
        self.heard.append(f"run:{e.run_id}")

    def on_trace_opened(self, e: TraceOpened) -> None:
        self.heard.append(f"trace:{e.trace_id}")

    def on_run_started(self, e: RunStarted) -> None:
        self.heard.append("run_started")


@pytest.mark.parametrize("reverse", [False, True])
def test_ids_reach_every_sink_before_run_started_whatever_the_order(reverse: bool) -> None:
    run = _Announcer(TrackingRunOpened(run_id="r1", experiment_id="e1", tracking_uri="sqlite:///x.db"))
    trace = _Announcer(TraceOpened(trace_id="ab" * 16, traceparent="00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"))
    ids = RunIds()
    sinks = [ids, run, trace]
    bus = EventBus(list(reversed(sinks)) if reverse else sinks)
    bus.open()
    bus.emit(run_started())
    bus.close()
    for sink in (run, trace):
        assert sorted(sink.heard[:2]) == ["run:r1", "trace:" + "ab" * 16] and sink.heard[2] == "run_started"
    assert (ids.mlflow_run_id, ids.mlflow_experiment_id, ids.trace_id) == ("r1", "e1", "ab" * 16)


def test_every_metric_an_event_reports_is_declared() -> None:
    from splade_obs.events import metric_def

    events = [step(1), epoch_done(1), RunFinished(status="FINISHED", step=1, duration_seconds=1.0,
                                                   counters={"errors/DATA_ERROR": 1, "train/skipped_batches": 1})]
    for ev in events:
        for name in ev.metrics():
            assert metric_def(name) is not None, name
    assert metric_def("train/no_such") is not None  # a loss part family...
    assert metric_def("nope/loss") is None           # ...but no undeclared section


def test_barrier_delivers_everything_emitted_so_far_then_lets_each_sink_persist() -> None:
    """Before a checkpoint the trainer calls bus.barrier(): a threaded sink has handled every earlier event
    (however slow) and made it durable (persist) by the time barrier() returns."""
    class SlowDurable(Sink):
        name, scope, threaded = "slow", "rank", True

        def __init__(self) -> None:
            self.seen: list[int] = []
            self.durable: list[int] = []

        def on_step_done(self, e: StepDone) -> None:
            time.sleep(0.05)
            self.seen.append(e.step)

        def persist(self) -> None:
            self.durable = list(self.seen)

    sink = SlowDurable()
    bus = EventBus([sink])
    for n in range(1, 6):
        bus.emit(step(n))
    assert bus.barrier(timeout=10) is True
    assert sink.durable == [1, 2, 3, 4, 5]
    for n in range(6, 46):
        bus.emit(step(n))
    assert bus.barrier(timeout=0.2) is False   # 40 slow events cannot be handled in 0.2 s: bounded, reported
    assert bus.barrier(timeout=10) is True and sink.durable == list(range(1, 46))
    bus.close()
