"""OpenTelemetry sink: turns run events into one trace per run.

Span tree (every span carries exact times from the events' ``*_ns`` fields, so it is built after the fact
on the training thread without timing anything itself)::

    train                      RunStarted .. RunFinished; key config, mlflow.run_id, splade.rank
    ├── data.load              DataLoaded.start_ns .. end_ns
    ├── model.load             ModelLoaded.start_ns .. end_ns
    ├── epoch                  EpochStarted .. EpochDone
    │   ├── batch              StepDone.start_ns .. end_ns (sampled; failed and slow batches always kept)
    │   ├── evaluation         EvaluationDone (start_ns .. time_ns)
    │   └── checkpoint         CheckpointSaved (start_ns .. time_ns)
    └── ...

Errors become ``exception`` span events (``error.category``, ``exception.type``, ``exception.message``,
``splade.context.<k>``) on the span where they happened — a skipped batch gets its own ERROR ``batch``
span — and a failed or killed run gets an ERROR root. Retries and degraded sinks are events on the root.
The attribute namespace is documented in docs/tracing.md.

The per-batch cost is one sampler decision (O(1)); only kept batches create a span, and spans are handed
to ``BatchSpanProcessor`` queues that export on their own threads. ``close`` is bounded even when the
collector is unreachable.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

from opentelemetry import trace
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.trace import Span, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from splade_obs import __version__
from splade_obs.config import TrainConfig, is_secret_key, redact_url_credentials
from splade_obs.events import (
    CheckpointSaved,
    DataLoaded,
    EpochDone,
    EpochStarted,
    ErrorCaught,
    EvaluationDone,
    Event,
    Message,
    ModelLoaded,
    RetryAttempt,
    RunFinished,
    RunStarted,
    Sink,
    SinkDegraded,
    StepDone,
)
from splade_obs import tracing
from splade_obs.logging_setup import redact_text, secret_values

log = logging.getLogger("splade_obs.sinks.otel")

#: Events that arrive before RunStarted are replayed once the root span exists (bounded).
MAX_PENDING = 1000
MAX_STR = 1000


def _clean(text: str, secrets: list[str] | None) -> str:
    """Event text as it may leave the process: secret env values and URL credentials masked.

    ``secrets`` None means "read the environment now" (as the logging filter does, so a secret set after
    the sink was built is still caught); an explicit list skips that scan.
    """
    return redact_url_credentials(redact_text(text, secret_values() if secrets is None else secrets))


def _attrs(values: Mapping[str, Any], redact: bool = True) -> dict[str, Any]:
    """OTel attribute values must be str/bool/int/float: drop None, stringify the rest.

    Every string is redacted (errors, messages and paths come from event text and go to traces.jsonl,
    collectors and MLflow); ``redact=False`` only for the per-batch span, whose only string is a fixed word.
    """
    out: dict[str, Any] = {}
    secrets: list[str] | None = None
    for k, v in values.items():
        if v is None:
            continue
        if isinstance(v, (bool, int, float)):
            out[k] = v
            continue
        text = v if isinstance(v, str) else str(v)
        if redact:
            if secrets is None:
                secrets = secret_values()
            text = _clean(text, secrets)
        out[k] = text[:MAX_STR]
    return out


def _status(description: str) -> Status:
    return Status(StatusCode.ERROR, _clean(description, None)[:200])


def _traceparent(ctx: trace.SpanContext) -> str:
    return f"00-{trace.format_trace_id(ctx.trace_id)}-{trace.format_span_id(ctx.span_id)}-{int(ctx.trace_flags):02x}"


def _interval(start_ns: int, end_ns: int, fallback_end: int, duration_s: float = 0.0) -> tuple[int, int]:
    end = end_ns or fallback_end
    start = start_ns or (end - int(duration_s * 1e9) if duration_s else end)
    return start, max(start, end)


class OtelSink(Sink):
    name = "otel"
    scope = "rank"
    threaded = False

    def __init__(self, cfg: TrainConfig, pipeline: tracing.Pipeline, *, bus_shared: dict, rank: int = 0,
                 world_size: int = 1) -> None:
        self.cfg = cfg
        self.pipeline = pipeline
        self.shared = bus_shared
        self.rank = rank
        self.world_size = world_size
        self.sampler = tracing.BatchSampler.from_spec(cfg.tracing.trace_batches, cfg.tracing.slow_batch_factor)
        self._tracer = pipeline.provider.get_tracer("splade_obs", __version__)
        self._root: Span | None = None
        self._root_ctx: Any = None
        self._epoch: Span | None = None
        self._epoch_num: int | None = None
        self._epoch_ctx: Any = None
        self._pending: list[Event] = []
        self._finished = False
        self._closed = False
        self.spans_ended = 0
        self.stats: dict[str, Any] = {}
        ids = pipeline.id_generator
        self._publish(trace.SpanContext(ids.first_trace_id, ids.first_span_id, is_remote=False,
                                        trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED)))

    # -------------------------------------------------------------------------------------- building
    @classmethod
    def create(cls, cfg: TrainConfig, *, bus_shared: dict, log_dir: Path, rank: int = 0, world_size: int = 1,
               span_exporter: SpanExporter | None = None) -> "OtelSink | None":
        """The sink for ``cfg.tracing``, or None when tracing is off (``none`` or ``OTEL_SDK_DISABLED``).

        ``span_exporter`` (tests) is added with a synchronous processor next to the configured exporters.
        """
        exporters = [] if tracing.sdk_disabled() else tracing.build_exporters(cfg.tracing.exporter, log_dir, rank)
        if not exporters and span_exporter is None:
            return None
        pipeline = tracing.build_pipeline(tracing.build_resource(cfg.tracing.service_name))
        for name, exp in exporters:
            pipeline.add(name, exp)
        if span_exporter is not None:
            pipeline.add("injected", span_exporter, synchronous=True)
        return cls(cfg, pipeline, bus_shared=bus_shared, rank=rank, world_size=world_size)

    def _maybe_add_mlflow(self) -> None:
        """OTLP to the MLflow server when asked (--otel-to-mlflow) or when tracking goes to an MLflow server."""
        if self.rank != 0:
            return  # the MLflow sink (and its ids) live on rank 0 only
        uri = str(self.shared.get("mlflow.tracking_uri") or self.cfg.tracking.tracking_uri or "")
        is_server = uri.startswith(("http://", "https://"))
        if not (self.cfg.tracing.to_mlflow or (is_server and self.cfg.tracking.enabled)):
            return
        if not is_server:
            log.warning("--otel-to-mlflow needs an MLflow server tracking URI (http[s]://...); the tracking "
                        "store is %s, so spans are not sent to MLflow", uri.split(":", 1)[0] or "not set")
            return
        timeout = max(1.0, min(tracing.DEFAULT_OTLP_TIMEOUT_S, self.cfg.tracing.shutdown_timeout))
        exporter = tracing.MlflowOtlpExporter(
            uri, lambda: (self.shared.get("mlflow.experiment_id"), self.shared.get("mlflow.run_id")),
            timeout=timeout)
        self.pipeline.add("mlflow", exporter)

    # -------------------------------------------------------------------------------------- dispatch
    def handle(self, event: Event) -> None:
        if self._closed:
            return
        if self._root is None and not isinstance(event, (RunStarted, RunFinished)):
            if len(self._pending) < MAX_PENDING:
                self._pending.append(event)
            return
        super().handle(event)

    def _parent(self) -> Any:
        return self._epoch_ctx if self._epoch is not None else self._root_ctx

    def _span(self, name: str, start: int, end: int, attributes: Mapping[str, Any], parent: Any = None,
              redact: bool = True) -> Span:
        span = self._tracer.start_span(name, context=parent if parent is not None else self._parent(),
                                       start_time=start, attributes=_attrs(attributes, redact))
        return span

    def _end(self, span: Span, end: int | None) -> None:
        span.end(end_time=end)
        self.spans_ended += 1

    # -------------------------------------------------------------------------------------- root
    def on_run_started(self, e: RunStarted) -> None:
        bus = getattr(self, "bus", None)   # set by EventBus.add: publish where the other sinks read
        if bus is not None and isinstance(getattr(bus, "shared", None), dict) and bus.shared is not self.shared:
            self.shared = bus.shared
        parent = None
        if e.traceparent:
            parent = TraceContextTextMapPropagator().extract({"traceparent": e.traceparent})
        starts = [ev_start for ev_start in (getattr(p, "start_ns", 0) or p.time_ns for p in self._pending) if ev_start]
        start = min([e.time_ns, *starts])
        o, m = self.cfg.optim, self.cfg.model
        attrs = {
            "splade.run_name": e.run_name, "splade.rank": self.rank, "splade.world_size": e.world_size or self.world_size,
            "splade.total_steps": e.total_steps, "splade.num_epochs": e.num_epochs,
            "splade.steps_per_epoch": e.steps_per_epoch, "splade.start_step": e.start_step, "splade.resumed": e.resumed,
            "splade.model.name": m.name, "splade.model.max_query_length": m.max_query_length,
            "splade.model.max_doc_length": m.max_doc_length,
            "splade.optim.batch_size": o.batch_size, "splade.optim.learning_rate": o.learning_rate,
            "splade.optim.epochs": o.epochs, "splade.optim.max_steps": o.max_steps,
            "splade.optim.gradient_accumulation_steps": o.gradient_accumulation_steps,
            "splade.optim.mixed_precision": o.mixed_precision, "splade.optim.seed": o.seed,
            "splade.loss.lambda_q": self.cfg.loss.lambda_q, "splade.loss.lambda_d": self.cfg.loss.lambda_d,
            "splade.data.train_file": self.cfg.data.train_file or "demo",
            "splade.trace.batches": self.cfg.tracing.trace_batches,
            "splade.output_dir": e.output_dir, "splade.log_dir": e.log_dir,
            "mlflow.run_id": self.shared.get("mlflow.run_id") or e.tracking_run_id,
            "mlflow.experiment_id": self.shared.get("mlflow.experiment_id"),
        }
        for key in ("device", "torch_version", "cuda_device_name", "hostname"):
            if key in e.system_info:
                attrs[f"splade.system.{key}"] = e.system_info[key]
        self._start_root(start, attrs, parent)
        self._maybe_add_mlflow()
        self._replay()

    def _start_root(self, start: int, attrs: Mapping[str, Any], parent: Any = None) -> None:
        self._root = self._tracer.start_span("train", context=parent, start_time=start, attributes=_attrs(attrs))
        self._root_ctx = trace.set_span_in_context(self._root)
        self._publish(self._root.get_span_context())

    def _publish(self, ctx: trace.SpanContext) -> None:
        self.shared["otel.trace_id"] = trace.format_trace_id(ctx.trace_id)
        self.shared["otel.traceparent"] = _traceparent(ctx)

    def _replay(self) -> None:
        pending, self._pending = self._pending, []
        for ev in pending:
            super().handle(ev)

    def on_run_finished(self, e: RunFinished) -> None:
        if self._root is None:  # failed before RunStarted (e.g. bad data): still leave a trace
            starts = [getattr(p, "start_ns", 0) or p.time_ns for p in self._pending]
            self._start_root(min([e.time_ns - int(e.duration_seconds * 1e9), *starts]),
                             {"splade.rank": self.rank, "splade.world_size": self.world_size,
                              "splade.model.name": self.cfg.model.name})
            self._replay()
        assert self._root is not None
        self._close_epoch(e.time_ns)
        attrs: dict[str, Any] = {"splade.status": e.status, "splade.final_step": e.step,
                                 "splade.duration_s": e.duration_seconds,
                                 "mlflow.run_id": self.shared.get("mlflow.run_id"),
                                 "mlflow.experiment_id": self.shared.get("mlflow.experiment_id")}
        attrs.update({f"splade.final.{k}": v for k, v in e.final_metrics.items()})
        attrs.update({f"splade.counter.{k}": v for k, v in e.counters.items()})
        self._root.set_attributes(_attrs(attrs))
        if e.status == "FAILED":
            err = e.error or {}
            desc = f"{err.get('category', 'UNKNOWN_ERROR')}: {err.get('message', 'run failed')}"
            self._root.set_attributes(_attrs({"error.type": err.get("category"),
                                              "error.category": err.get("category")}))
            self._root.set_status(_status(desc))
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

    def _open_epoch(self, epoch: int, start: int, attrs: Mapping[str, Any]) -> None:
        self._epoch = self._span("epoch", start, start, {"splade.epoch": epoch, **attrs}, parent=self._root_ctx)
        self._epoch_num = epoch
        self._epoch_ctx = trace.set_span_in_context(self._epoch)

    def _close_epoch(self, end_ns: int | None) -> None:
        if self._epoch is not None:
            self._end(self._epoch, end_ns)
            self._epoch = self._epoch_ctx = self._epoch_num = None

    def on_epoch_done(self, e: EpochDone) -> None:
        if self._epoch is None or self._epoch_num != e.epoch:
            self._close_epoch(e.time_ns)
            start, _ = _interval(e.start_ns, e.time_ns, e.time_ns, e.duration_seconds)
            self._open_epoch(e.epoch, start, {"splade.num_epochs": e.num_epochs})
        assert self._epoch is not None
        attrs = {"splade.step": e.step, "splade.train_loss": e.train_loss, "splade.val_loss": e.val_loss,
                 "splade.lr": e.learning_rate, "splade.duration_s": e.duration_seconds}
        attrs.update({f"splade.epoch.{k}": v for k, v in e.extra.items()})
        self._epoch.set_attributes(_attrs(attrs))
        self._close_epoch(e.time_ns)

    def on_step_done(self, e: StepDone) -> None:
        duration = (e.end_ns - e.start_ns) / 1e9 if e.start_ns and e.end_ns else 0.0
        reason = self.sampler.decide(e.step, duration)
        if reason is None:
            return
        start, end = _interval(e.start_ns, e.end_ns, e.time_ns)
        attrs: dict[str, Any] = {
            "splade.step": e.step, "splade.epoch": e.epoch, "splade.batch_index": e.batch_index,
            "splade.batch_size": e.batch_size, "splade.tokens": e.num_tokens, "splade.loss": e.loss,
            "splade.lr": e.learning_rate, "splade.grad_norm": e.grad_norm, "splade.query_nnz": e.query_nnz,
            "splade.doc_nnz": e.doc_nnz, "splade.flops": e.flops, "splade.samples_per_second": e.samples_per_second,
            "splade.tokens_per_second": e.tokens_per_second, "splade.lambda_q": e.lambda_q,
            "splade.lambda_d": e.lambda_d, "splade.grad_scale": e.grad_scale, "splade.trace.keep_reason": reason,
        }
        attrs.update({f"splade.loss.{k}": v for k, v in e.parts.items()})
        attrs.update({f"splade.time.{k}_s": v for k, v in e.timings.items()})
        self._end(self._span("batch", start, end, attrs, redact=False), end)

    # -------------------------------------------------------------------------------------- other units of work
    def on_data_loaded(self, e: DataLoaded) -> None:
        start, end = _interval(e.start_ns, e.end_ns, e.time_ns)
        attrs = {"splade.data.split": e.split, "splade.data.source": e.source,
                 "splade.data.num_examples": e.num_examples, "splade.data.digest": e.digest,
                 "splade.data.num_skipped": e.num_skipped, "splade.data.format": e.fmt}
        self._end(self._span("data.load", start, end, attrs, parent=self._root_ctx), end)

    def on_model_loaded(self, e: ModelLoaded) -> None:
        start, end = _interval(e.start_ns, e.end_ns, e.time_ns)
        attrs = {"splade.model.name": e.name, "splade.model.path": e.path,
                 "splade.model.num_parameters": e.num_parameters, "splade.device": e.device,
                 "splade.amp_dtype": e.amp_dtype}
        self._end(self._span("model.load", start, end, attrs, parent=self._root_ctx), end)
        if self._root is not None:
            self._root.set_attributes(_attrs({"splade.device": e.device, "splade.amp_dtype": e.amp_dtype,
                                              "splade.model.num_parameters": e.num_parameters}))

    def on_evaluation_done(self, e: EvaluationDone) -> None:
        start, end = _interval(e.start_ns, e.time_ns, e.time_ns, e.duration_seconds)
        attrs: dict[str, Any] = {"splade.step": e.step, "splade.epoch": e.epoch, "splade.eval.split": e.split,
                                 "splade.eval.is_best": e.is_best, "splade.duration_s": e.duration_seconds}
        attrs.update({f"splade.eval.{k}": v for k, v in e.metrics.items()})
        self._end(self._span("evaluation", start, end, attrs), end)

    def on_checkpoint_saved(self, e: CheckpointSaved) -> None:
        start, end = _interval(e.start_ns, e.time_ns, e.time_ns, e.duration_seconds)
        attrs = {"splade.step": e.step, "splade.epoch": e.epoch, "splade.checkpoint.path": e.path,
                 "splade.checkpoint.reason": e.reason, "splade.duration_s": e.duration_seconds}
        self._end(self._span("checkpoint", start, end, attrs), end)

    # -------------------------------------------------------------------------------------- errors and notes
    def on_error_caught(self, e: ErrorCaught) -> None:
        attrs: dict[str, Any] = {
            "error.category": e.category, "exception.type": e.exception_type or e.error_type,
            "exception.message": e.exception_message or e.message, "splade.error.type": e.error_type,
            "splade.error.message": e.message, "splade.error.fatal": e.fatal,
            "splade.error.skipped_batch": e.skipped_batch, "splade.step": e.step, "splade.epoch": e.epoch,
            "splade.batch_index": e.batch_index,
        }
        attrs.update({f"splade.context.{k}": ("***" if is_secret_key(str(k)) else v) for k, v in e.context.items()})
        attrs.update({f"splade.errors.{k}": v for k, v in e.counts.items()})
        status = _status(f"{e.category}: {e.message}")
        if e.batch_index is not None and (e.skipped_batch or e.start_ns):
            self._failed_batch(e, attrs, status)
        else:
            target = self._epoch if self._epoch is not None else self._root
            assert target is not None
            target.add_event("exception", _attrs(attrs), timestamp=e.time_ns)
            target.set_status(status)
        if e.fatal and self._root is not None:
            if self._epoch is not None or e.batch_index is not None:
                self._root.add_event("exception", _attrs(attrs), timestamp=e.time_ns)
            self._root.set_status(status)

    def _failed_batch(self, e: ErrorCaught, attrs: Mapping[str, Any], status: Status) -> None:
        """A batch that failed always gets its own ERROR span, whatever the sampling."""
        self.sampler.record_failed()
        start, end = _interval(e.start_ns, e.time_ns, e.time_ns)
        span_attrs = {"splade.step": e.step, "splade.epoch": e.epoch, "splade.batch_index": e.batch_index,
                      "splade.skipped": e.skipped_batch, "error.type": e.category,
                      "splade.trace.keep_reason": "failed"}
        span = self._span("batch", start, end, span_attrs)
        span.add_event("exception", _attrs(attrs), timestamp=e.time_ns)
        span.set_status(status)
        self._end(span, end)

    def on_retry_attempt(self, e: RetryAttempt) -> None:
        assert self._root is not None
        self._root.add_event("splade.retry", _attrs({
            "splade.retry.operation": e.operation, "splade.retry.attempt": e.attempt,
            "splade.retry.max_attempts": e.max_attempts, "splade.retry.delay_s": e.delay_seconds,
            "error.category": e.category, "exception.message": e.message}), timestamp=e.time_ns)

    def on_sink_degraded(self, e: SinkDegraded) -> None:
        assert self._root is not None
        self._root.add_event("splade.sink_degraded", _attrs({
            "splade.sink.name": e.sink, "splade.sink.failures": e.failures, "exception.type": e.error_type,
            "exception.message": e.message}), timestamp=e.time_ns)

    def on_message(self, e: Message) -> None:
        if e.level.upper() in ("WARNING", "ERROR", "CRITICAL") and self._root is not None:
            self._root.add_event("splade.message", _attrs({"splade.message.level": e.level.upper(),
                                                           "splade.message.text": e.text}), timestamp=e.time_ns)

    # -------------------------------------------------------------------------------------- shutdown
    def close(self, timeout: float = 5.0) -> None:
        """End open spans, then flush and stop exporters within min(timeout, tracing.shutdown_timeout)."""
        if self._closed:
            return
        self._closed = True
        if self._root is None and self._pending:
            starts = [getattr(p, "start_ns", 0) or p.time_ns for p in self._pending]
            self._start_root(min(starts), {"splade.rank": self.rank, "splade.world_size": self.world_size})
            self._replay()
        if self._root is not None and not self._finished:
            self._close_epoch(None)
            self._root.set_attribute("splade.status", "INCOMPLETE")
            self._root.set_status(Status(StatusCode.ERROR, "run ended without a run_finished event"))
            self._finish_root(None)
        bound = max(0.0, min(timeout, self.cfg.tracing.shutdown_timeout))
        clean = self.pipeline.shutdown(bound)
        self._report(clean)

    def _report(self, clean: bool) -> None:
        counts = self.pipeline.counts()
        lost = {name: max(0, self.spans_ended - c["exported"]) for name, c in counts.items()}
        s = self.sampler
        self.stats = {"spans_ended": self.spans_ended, "batches_kept": s.kept, "batches_sampled_out": s.sampled_out,
                      "exporters": counts, "dropped": lost, "clean_shutdown": clean}
        dropped = ", ".join(f"{k}={v}" for k, v in lost.items()) or "none"
        level = logging.WARNING if any(lost.values()) else logging.INFO
        log.log(level, "tracing: %d spans (%d batch spans kept: %d sampled, %d slow, %d failed; %d batches not "
                "traced); dropped per exporter: %s", self.spans_ended, s.kept, s.kept_sampled, s.kept_slow,
                s.kept_failed, s.sampled_out, dropped)
