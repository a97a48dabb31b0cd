"""OpenTelemetry sink: turns run events into one trace per run.

Span tree (every span carries exact times from the events' ``*_ns`` fields, so it is built after the fact
on the training thread without timing anything itself)::

    train                      RunStarted .. RunFinished; key config, mlflow.run_id, the run's outcome
    ├── data.load              DataLoaded.start_ns .. end_ns
    ├── model.load             ModelLoaded.start_ns .. end_ns
    ├── epoch                  EpochStarted .. EpochDone
    │   ├── batch <step>       StepDone.start_ns .. end_ns (first batch, every Nth step, failed and slow ones)
    │   ├── evaluation         EvaluationDone (start_ns .. time_ns); children encode (docs, queries), retrieve
    │   └── checkpoint         CheckpointSaved (start_ns .. time_ns; ``splade.epoch``: the epoch it closes)
    └── ...

Numbers follow :class:`splade_obs.batch_policy.Where` (steps and batches from 1); non-finite values are written
as ``"nan"`` / ``"inf"`` / ``"-inf"`` (:mod:`splade_obs.finite`, through :func:`~.attributes.attrs`).

Metrics are attributes named by one rule (:func:`~.attributes.attribute_name`: ``train/loss`` ->
``splade.train.loss``), from ``Event.metrics()`` of StepDone (batch), EpochDone (epoch), EvaluationDone
(evaluation), CheckpointSaved (checkpoint) and RunFinished (root, with its final metrics and counters).

Errors become ``exception`` span events as the OTel semantic conventions name them (``exception.type``: the
fully qualified class of the original exception, ``exception.message``, ``exception.stacktrace``, redacted)
plus ``error.category`` and ``splade.context.<k>``, on the span where they happened — a skipped batch gets its
own ERROR ``batch <step>`` span. The root records the outcome: ERROR when the run failed or was killed, and
:func:`~.attributes.run_outcome` (health, ``splade.degraded``, skipped batches, errors by category); retries
and degraded sinks are events on the root.

The sink learns everything from events: settings come as :class:`OtelOptions`, the MLflow run as
``TrackingRunOpened``; it announces the trace as ``TraceOpened`` (:meth:`OtelSink.open`). Epoch and failed-batch
spans take the ids :mod:`splade_obs.log_context` reserved (log lines carry them). ``close`` is bounded.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from opentelemetry import trace
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.trace import Span, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from splade_obs import __version__
from splade_obs.bus import EventBus, Sink
from splade_obs.log_context import CONTEXT, failed_batch_gets_span
from splade_obs.events import (AlertRaised, CheckpointSaved, DataLoaded, EpochDone, EpochStarted, ErrorCaught,
                               EvaluationDone, Event, Message, ModelLoaded, RetryAttempt, RunFinished, RunStarted,
                               SinkDegraded, StepDone, TraceOpened, TrackingRunOpened, metric_name)
from splade_obs.redaction import is_secret_key

from . import exporters as ex, mlflow_export as mx
from .logs import PresetNextSpanId
from .attributes import (alert_attributes, attrs, batch_span_name, degraded_attributes, error_status, eval_phase_span,
                         interval, metric_attributes, retry_attributes, run_outcome, traceparent)
from .sampling import BatchSampler

log = logging.getLogger("splade_obs.sinks.otel")

#: Events that arrive before RunStarted are replayed once the root span exists (bounded).
MAX_PENDING = 1000
#: Root attributes taken from RunStarted.config: splade.<section>.<key>.
ROOT_CONFIG_KEYS = (("model", "max_query_length"), ("model", "max_doc_length"), ("optim", "batch_size"),
                    ("optim", "learning_rate"), ("optim", "epochs"), ("optim", "max_steps"),
                    ("optim", "gradient_accumulation_steps"), ("optim", "mixed_precision"), ("optim", "seed"),
                    ("loss", "lambda_q"), ("loss", "lambda_d"))


@dataclass(frozen=True)
class OtelOptions:
    """The sink's own settings (``run.build_sinks`` fills them from the ``tracing`` config section)."""

    exporter: str = "file"              # file | otlp | console | none
    trace_batches: str = "every:50"     # all | none | every:N (failed and slow batches always kept)
    slow_batch_factor: float = 3.0
    #: the run's trace also in MLflow when the run is tracked there (--no-otel-to-mlflow: not): OTLP to a
    #: server's /v1/traces, MLflow's store API for a database store (see :mod:`.mlflow_export`)
    to_mlflow: bool = True
    shutdown_timeout: float = 5.0
    service_name: str | None = None


def _section(config: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = config.get(name)
    return value if isinstance(value, Mapping) else {}


class OtelSink(Sink):
    name = "otel"
    scope = "rank"
    threaded = False

    def __init__(self, options: OtelOptions, pipeline: ex.Pipeline, *, rank: int = 0, world_size: int = 1) -> None:
        self.options, self.pipeline = options, pipeline
        self.rank, self.world_size = rank, world_size
        self.sampler = BatchSampler.from_spec(options.trace_batches, options.slow_batch_factor)
        self._tracer = pipeline.provider.get_tracer("splade_obs", __version__)
        self._ids = self._tracer.id_generator = PresetNextSpanId(self._tracer.id_generator)  # reserved span ids
        self._bus: EventBus | None = None
        self._root: Span | None = None
        self._epoch: Span | None = None
        self._root_ctx = self._epoch_ctx = self._epoch_num = None  # span contexts; the open epoch's number
        self._pending: list[Event] = []
        self._finished = self._closed = False
        self._announced: str | None = None         # traceparent of the last TraceOpened
        self._errors: collections.Counter[str] = collections.Counter()   # errors caught, by category
        self._skipped = self._sinks_degraded = 0   # batches skipped, sinks lost
        self.mlflow_run_id: str | None = None      # the MLflow run, from TrackingRunOpened
        self.mlflow_experiment_id: str | None = None
        self.tracking_uri: str | None = None
        self.store_uri: str | None = None          # the store's URI, credentials too (set by run.build_sinks)
        self._mlflow_exporter = False
        self.spans_ended = 0
        self.stats: dict[str, Any] = {}
        ids = pipeline.id_generator
        flags = trace.TraceFlags.SAMPLED           # as the SDK will flag the root: sampled, random trace id (W3C 2)
        if hasattr(trace.TraceFlags, "RANDOM_TRACE_ID") and getattr(ids, "is_trace_id_random", lambda: False)():
            flags |= trace.TraceFlags.RANDOM_TRACE_ID
        self._first = trace.SpanContext(ids.first_trace_id, ids.first_span_id, is_remote=False,
                                        trace_flags=trace.TraceFlags(flags))

    # -------------------------------------------------------------------------------------- building
    @classmethod
    def create(cls, options: OtelOptions, *, log_dir: Path, rank: int = 0, world_size: int = 1,
               span_exporter: SpanExporter | None = None) -> "OtelSink | None":
        """The sink for ``options``, or None when tracing is off (exporter ``none`` or ``OTEL_SDK_DISABLED``).

        ``span_exporter`` (tests) is added with a synchronous processor next to the configured exporters.
        """
        exporters = [] if ex.sdk_disabled() else ex.build_exporters(options.exporter, log_dir, rank)
        if not exporters and span_exporter is None:
            return None
        pipeline = ex.build_pipeline(ex.build_resource(options.service_name))
        for name, exp in exporters:
            pipeline.add(name, exp)
        if span_exporter is not None:
            pipeline.add("injected", span_exporter, synchronous=True)
        return cls(options, pipeline, rank=rank, world_size=world_size)

    def open(self, bus: EventBus) -> None:
        """Announce the run's trace (preset ids: the root span does not exist yet)."""
        self._bus = bus
        self._announce(self._first)

    def _announce(self, ctx: trace.SpanContext) -> None:
        """``TraceOpened`` for ``ctx`` unless already announced (a rank > 0 root joins rank 0's trace)."""
        parent = traceparent(ctx)
        if self._bus is None or parent == self._announced:
            return
        self._announced = parent
        self._bus.emit(TraceOpened(trace_id=trace.format_trace_id(ctx.trace_id), traceparent=parent, rank=self.rank))

    def on_tracking_run_opened(self, e: TrackingRunOpened) -> None:
        self.mlflow_run_id, self.mlflow_experiment_id, self.tracking_uri = e.run_id, e.experiment_id, e.tracking_uri
        if self._root is not None:             # announced late: link what is still open
            self._root.set_attributes(attrs({"mlflow.run_id": e.run_id, "mlflow.experiment_id": e.experiment_id}))
            self._maybe_add_mlflow()

    def _maybe_add_mlflow(self) -> None:
        """The run's trace to MLflow, once the tracking run is known (rank 0 only: the MLflow run lives there).

        A server (``http[s]://``) gets OTLP on ``/v1/traces``, then the trace's run link and name through its REST
        API (:class:`~.mlflow_export.MlflowServerFinalizer`); a database store (the default sqlite one) gets the
        spans and the same finishing touch through MLflow's store API in this process
        (:class:`~.mlflow_export.MlflowStoreExporter`); other stores (a file store) keep the trace local, with
        one info line.
        """
        if self.rank != 0 or self._mlflow_exporter or not self.options.to_mlflow or not self.tracking_uri:
            return
        self._mlflow_exporter = True
        ids = lambda: (self.mlflow_experiment_id, self.mlflow_run_id)  # noqa: E731 - read on the export thread
        exporter = mx.trace_exporter(self.tracking_uri, ids, self.options.shutdown_timeout, open_uri=self.store_uri)
        if exporter is not None:
            self.pipeline.add("mlflow", exporter)

    # -------------------------------------------------------------------------------------- dispatch
    def handle(self, event: Event) -> None:
        if self._closed:
            return
        if self._root is None and not isinstance(event, (RunStarted, RunFinished, TrackingRunOpened, TraceOpened)):
            if len(self._pending) < MAX_PENDING:
                self._pending.append(event)
            return
        super().handle(event)

    def _parent(self) -> Any:
        return self._epoch_ctx if self._epoch is not None else self._root_ctx

    def _span(self, name: str, start: int, attributes: Mapping[str, Any], parent: Any = None,
              redact: bool = True) -> Span:
        return self._tracer.start_span(name, context=parent if parent is not None else self._parent(),
                                       start_time=start, attributes=attrs(attributes, redact))

    def _end(self, span: Span, end: int | None) -> None:
        span.end(end_time=end)
        self.spans_ended += 1

    def _pending_start(self, *candidates: int) -> int:
        starts = [getattr(p, "start_ns", 0) or p.time_ns for p in self._pending]
        return min([*candidates, *(s for s in starts if s)])

    # -------------------------------------------------------------------------------------- root
    def on_run_started(self, e: RunStarted) -> None:
        parent = None
        if e.traceparent:
            parent = TraceContextTextMapPropagator().extract({"traceparent": e.traceparent})
        cfg = e.config
        values: dict[str, Any] = {
            "splade.run_name": e.run_name, "splade.rank": self.rank,
            "splade.world_size": e.world_size or self.world_size, "splade.total_steps": e.total_steps,
            "splade.num_epochs": e.num_epochs, "splade.steps_per_epoch": e.steps_per_epoch,
            "splade.start_step": e.start_step, "splade.resumed": e.resumed,
            "splade.model.name": e.model_name or _section(cfg, "model").get("name"),
        }
        values.update({f"splade.{s}.{k}": _section(cfg, s).get(k) for s, k in ROOT_CONFIG_KEYS})
        if "data" in cfg:
            values["splade.data.train_file"] = _section(cfg, "data").get("train_file") or "demo"
        values.update({"splade.trace.batches": self.options.trace_batches, "splade.output_dir": e.output_dir,
                       "splade.log_dir": e.log_dir, "mlflow.run_id": self.mlflow_run_id or e.tracking_run_id,
                       "mlflow.experiment_id": self.mlflow_experiment_id})
        for key in ("device", "torch_version", "cuda_device_name", "hostname"):
            if key in e.system_info:
                values[f"splade.system.{key}"] = e.system_info[key]
        if self.options.to_mlflow and e.run_name:  # the trace's name in MLflow (read from the root at ingest)
            values[mx.TRACE_NAME_ATTRIBUTE] = e.run_name
        self._start_root(self._pending_start(e.time_ns), values, parent)
        self._maybe_add_mlflow()
        self._replay()

    def _start_root(self, start: int, values: Mapping[str, Any], parent: Any = None) -> None:
        self._root = self._tracer.start_span("train", context=parent, start_time=start, attributes=attrs(values))
        self._root_ctx = trace.set_span_in_context(self._root)
        self._announce(self._root.get_span_context())

    def _replay(self) -> None:
        pending, self._pending = self._pending, []
        for ev in pending:
            super().handle(ev)

    def on_run_finished(self, e: RunFinished) -> None:
        if self._root is None:  # failed before RunStarted (e.g. bad data): still leave a trace
            self._start_root(self._pending_start(e.time_ns - int(e.duration_seconds * 1e9)),
                             {"splade.rank": self.rank, "splade.world_size": self.world_size})
            self._replay()
        assert self._root is not None
        self._close_epoch(e.time_ns)
        values: dict[str, Any] = {"splade.status": e.status, "splade.final_step": e.step,
                                  "splade.duration_s": e.duration_seconds, "mlflow.run_id": self.mlflow_run_id,
                                  "mlflow.experiment_id": self.mlflow_experiment_id}
        values.update(metric_attributes({**e.final_metrics, **e.counters, **e.metrics()}))
        values.update(run_outcome(e, self._errors, self._skipped, self._sinks_degraded))
        self._root.set_attributes(attrs(values))
        if e.status == "FAILED":
            err = e.error or {}
            desc = f"{err.get('category', 'UNKNOWN_ERROR')}: {err.get('message', 'run failed')}"
            self._root.set_attributes(attrs({"error.type": err.get("category"), "error.category": err.get("category")}))
            self._root.set_status(error_status(desc))
        elif e.status == "KILLED":
            self._root.set_status(Status(StatusCode.ERROR, "killed"))
        self._finish_root(e.time_ns)

    def _finish_root(self, end_ns: int | None) -> None:
        assert self._root is not None
        self._root.set_attributes(self._trace_stats())
        self._end(self._root, end_ns)
        self._finished = True

    def _trace_stats(self) -> dict[str, int]:
        s = self.sampler
        failed = sum(c["failed"] for c in self.pipeline.counts().values())
        return {"splade.trace.batches_kept": s.kept, "splade.trace.batches_sampled_out": s.sampled_out,
                "splade.trace.batches_kept_sampled": s.kept_sampled, "splade.trace.batches_kept_slow": s.kept_slow,
                "splade.trace.batches_kept_failed": s.kept_failed, "splade.trace.spans_dropped": failed}

    # -------------------------------------------------------------------------------------- epochs and batches
    def on_epoch_started(self, e: EpochStarted) -> None:
        self._close_epoch(e.time_ns)
        self._open_epoch(e.epoch, e.time_ns, {"splade.num_epochs": e.num_epochs,
                                              "splade.steps_in_epoch": e.steps_in_epoch})

    def _open_epoch(self, epoch: int, start: int, values: Mapping[str, Any]) -> None:
        self._ids.preset(CONTEXT.take_epoch(epoch))
        self._epoch = self._span("epoch", start, {"splade.epoch": epoch, **values}, parent=self._root_ctx)
        self._epoch_num = epoch
        self._epoch_ctx = trace.set_span_in_context(self._epoch)

    def _close_epoch(self, end_ns: int | None) -> None:
        if self._epoch is not None:
            self._end(self._epoch, end_ns)
            self._epoch = self._epoch_ctx = self._epoch_num = None

    def on_epoch_done(self, e: EpochDone) -> None:
        if self._epoch is None or self._epoch_num != e.epoch:
            self._close_epoch(e.time_ns)
            start, _ = interval(e.start_ns, e.time_ns, e.time_ns, e.duration_seconds)
            self._open_epoch(e.epoch, start, {"splade.num_epochs": e.num_epochs})
        assert self._epoch is not None
        values: dict[str, Any] = {"splade.step": e.step, **metric_attributes(e.metrics())}
        if not e.complete:
            values["splade.epoch.complete"] = False
        self._epoch.set_attributes(attrs(values))
        self._close_epoch(e.time_ns)

    def on_step_done(self, e: StepDone) -> None:
        duration = (e.end_ns - e.start_ns) / 1e9 if e.start_ns and e.end_ns else 0.0
        reason = self.sampler.decide(e.step, duration)
        if reason is None:
            return
        start, end = interval(e.start_ns, e.end_ns, e.time_ns)
        values: dict[str, Any] = {
            "splade.step": e.step, "splade.epoch": e.epoch, "splade.batch_in_epoch": e.batch_index + 1,
            "splade.batch_size": e.batch_size, "splade.tokens": e.num_tokens, "splade.trace.keep_reason": reason,
            **metric_attributes(e.metrics())}
        self._end(self._span(batch_span_name(e.step), start, values, redact=False), end)

    # -------------------------------------------------------------------------------------- other units of work
    def on_data_loaded(self, e: DataLoaded) -> None:
        start, end = interval(e.start_ns, e.end_ns, e.time_ns)
        values = {"splade.data.split": e.split, "splade.data.source": e.source,
                  "splade.data.num_examples": e.num_examples, "splade.data.digest": e.digest,
                  "splade.data.num_skipped": e.num_skipped, "splade.data.format": e.fmt}
        self._end(self._span("data.load", start, values, parent=self._root_ctx), end)

    def on_model_loaded(self, e: ModelLoaded) -> None:
        start, end = interval(e.start_ns, e.end_ns, e.time_ns)
        values = {"splade.model.name": e.name, "splade.model.path": e.path,
                  "splade.model.num_parameters": e.num_parameters, "splade.device": e.device,
                  "splade.amp_dtype": e.amp_dtype}
        values.update(e.kernels())
        self._end(self._span("model.load", start, values, parent=self._root_ctx), end)
        if self._root is not None:
            self._root.set_attributes(attrs({"splade.device": e.device, "splade.amp_dtype": e.amp_dtype,
                                             "splade.model.num_parameters": e.num_parameters}))

    def on_evaluation_done(self, e: EvaluationDone) -> None:
        start, end = interval(e.start_ns, e.time_ns, e.time_ns, e.duration_seconds)
        values = {"splade.step": e.step, "splade.epoch": e.epoch, "splade.eval.split": e.split,
                  "splade.eval.is_best": e.is_best, **metric_attributes(e.metrics())}
        span = self._span("evaluation", start, values)
        for phase, (p_start, p_end) in e.phases.items():  # encode (documents, queries) / retrieve children
            name, values = eval_phase_span(phase, e.step)
            self._end(self._span(name, p_start, values, trace.set_span_in_context(span)), p_end)
        self._end(span, end)

    def on_checkpoint_saved(self, e: CheckpointSaved) -> None:
        start, end = interval(e.start_ns, e.time_ns, e.time_ns, e.duration_seconds)
        values = {"splade.step": e.step, "splade.epoch": e.epoch, "splade.checkpoint.path": e.path,
                  "splade.checkpoint.reason": e.reason, **metric_attributes(e.metrics())}
        self._end(self._span("checkpoint", start, values), end)

    # -------------------------------------------------------------------------------------- errors and notes
    def on_error_caught(self, e: ErrorCaught) -> None:
        self._errors[e.category] += 1
        self._skipped += e.skipped_batch
        where = {"splade.step": e.step, "splade.epoch": e.epoch, "splade.batch": e.batch,
                 "splade.batch_in_epoch": None if e.batch_index is None else e.batch_index + 1}
        values: dict[str, Any] = {
            "exception.type": e.exception_qualified_type or e.exception_type or e.error_type,
            "exception.message": e.exception_message or e.message, "exception.stacktrace": e.stacktrace,
            "error.category": e.category, "splade.error.type": e.error_type, "splade.error.message": e.message,
            "splade.error.fatal": e.fatal, "splade.error.skipped_batch": e.skipped_batch, **where}
        values.update({f"splade.context.{k}": ("***" if is_secret_key(str(k)) else v) for k, v in e.context.items()})
        # running counts of every category (errors/<CATEGORY>), then this event's own metrics
        counts = {metric_name(f"errors/{k}"): float(v) for k, v in e.counts.items()}
        values.update(metric_attributes({**counts, **e.metrics()}))
        status = error_status(f"{e.category}: {e.message}")
        if failed_batch_gets_span(e):
            self._failed_batch(e, where, values, status)
        else:
            target = self._epoch if self._epoch is not None else self._root
            assert target is not None
            target.add_event("exception", attrs(values), timestamp=e.time_ns)
            target.set_status(status)
        if e.fatal and self._root is not None:
            if self._epoch is not None or e.batch_index is not None:
                self._root.add_event("exception", attrs(values), timestamp=e.time_ns)
            self._root.set_status(status)

    def _failed_batch(self, e: ErrorCaught, where: Mapping[str, Any], values: Mapping[str, Any],
                      status: Status) -> None:
        """A batch that failed always gets its own ERROR span (named by its step), whatever the sampling."""
        self.sampler.record_failed()
        start, end = interval(e.start_ns, e.time_ns, e.time_ns)
        self._ids.preset(CONTEXT.take_batch(e.batch))
        span = self._span(batch_span_name(e.step), start, {
            **where, "splade.skipped": e.skipped_batch, "error.type": e.category, "splade.trace.keep_reason": "failed"})
        span.add_event("exception", attrs(values), timestamp=e.time_ns)
        span.set_status(status)
        self._end(span, end)

    def on_retry_attempt(self, e: RetryAttempt) -> None:
        assert self._root is not None, "retries happen inside the run"
        self._root.add_event("splade.retry", attrs(retry_attributes(e)), timestamp=e.time_ns)

    def on_sink_degraded(self, e: SinkDegraded) -> None:
        assert self._root is not None
        self._sinks_degraded += 1
        self._root.add_event("splade.sink_degraded", attrs(degraded_attributes(e)), timestamp=e.time_ns)

    def on_alert_raised(self, e: AlertRaised) -> None:
        """A ``splade.alert`` event on the open epoch's span (else the run's), tagged with its category."""
        if (target := self._epoch or self._root) is not None:
            target.add_event("splade.alert", attrs(alert_attributes(e)), timestamp=e.time_ns)

    def on_message(self, e: Message) -> None:
        if e.level.upper() in ("WARNING", "ERROR", "CRITICAL") and self._root is not None:
            values = {"splade.message.level": e.level.upper(), "splade.message.text": e.text}
            self._root.add_event("splade.message", attrs(values), timestamp=e.time_ns)

    # -------------------------------------------------------------------------------------- shutdown
    def close(self, timeout: float = 5.0) -> None:
        """End open spans, then flush and stop exporters within min(timeout, options.shutdown_timeout)."""
        if self._closed:
            return
        self._closed = True
        if self._root is None and self._pending:
            self._start_root(self._pending_start(), {"splade.rank": self.rank, "splade.world_size": self.world_size})
            self._replay()
        if self._root is not None and not self._finished:
            self._close_epoch(None)
            self._root.set_attribute("splade.status", "INCOMPLETE")
            self._root.set_status(Status(StatusCode.ERROR, "run ended without a run_finished event"))
            self._finish_root(None)
        clean = self.pipeline.shutdown(max(0.0, min(timeout, self.options.shutdown_timeout)))
        self._report(clean)

    def _report(self, clean: bool) -> None:
        counts = self.pipeline.counts()
        lost = {name: max(0, self.spans_ended - c["exported"]) for name, c in counts.items()}
        s = self.sampler
        self.stats = {"spans_ended": self.spans_ended, "batches_kept": s.kept, "batches_sampled_out": s.sampled_out,
                      "exporters": counts, "dropped": lost, "clean_shutdown": clean}
        dropped = ", ".join(f"{k}={v}" for k, v in lost.items()) or "none"
        # an exporter that already warned about its own failure (the MLflow store) is not warned about twice
        warned = {name for name, _, c in self.pipeline.processors if getattr(c.inner, "warned", False)}
        level = logging.WARNING if any(v for k, v in lost.items() if k not in warned) else logging.INFO
        log.log(level, "tracing: %d spans (%d batch spans kept: %d sampled, %d slow, %d failed; %d batches not "
                "traced); dropped per exporter: %s", self.spans_ended, s.kept, s.kept_sampled, s.kept_slow,
                s.kept_failed, s.sampled_out, dropped)
