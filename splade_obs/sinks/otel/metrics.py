"""OpenTelemetry metrics sink: run events -> OTel instruments with units (OTLP, Prometheus, metrics.jsonl).

The sink records only what events carry (no call in the training loop): every quantity an event reports
(``Event.metrics()``, canonical names such as ``train/loss``) becomes an instrument named by one rule,
:func:`instrument_name`, the spans' attribute rule (``train/loss`` -> ``splade.train.loss``) with any
character OpenTelemetry does not allow in an instrument name written ``_``:

* a **gauge** (last value) per canonical name of StepDone, EpochDone, EvaluationDone, CheckpointSaved and
  RunFinished (``splade.train.loss``, ``splade.train.lr``, ``splade.eval.ndcg_at_10``,
  ``splade.checkpoint.duration_seconds``, ...), unit from the vocabulary's ``MetricDef.unit`` (``"1"`` where
  it has none); except
* the error counts, which are **counters** fed one by one from ErrorCaught: ``errors/{CATEGORY}`` is
  ``splade.errors`` with an ``error.category`` attribute (``errors/total`` is their sum, not an instrument),
  ``train/skipped_batches`` is ``splade.train.skipped_batches``.

And a few instruments of their own (:data:`EXTRA_INSTRUMENTS`): the step-time histogram
``splade.train.step.duration``, the current step ``splade.train.step``, the process's RSS and CPU
(observable, psutil) and, where CUDA is in use, the GPU memory torch holds.

A non-finite value (a NaN loss) is not recorded (the SDK refuses it): the gauge keeps its previous value
and ``splade.metrics.nonfinite`` counts it, by instrument.

Resource: service.name / version as for spans, plus service.instance.id, the run name and the MLflow run id
(:func:`~.metric_export.run_resource`). A provider's resource cannot change, so the provider is created at
``RunStarted``, when both are known (the MLflow sink announces its run, ``TrackingRunOpened``, from
``Sink.open``, before the run starts; a resumed run's id also comes in ``RunStarted``); the few events
before it are kept and replayed.
Rank 0 only (``scope = "run"``).
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics.export import MetricReader

from splade_obs import __version__
from splade_obs.bus import Sink
from splade_obs.sysinfo import loaded_cuda
from splade_obs.events import (AlertRaised, CheckpointSaved, EpochDone, ErrorCaught, EvaluationDone, Event,
                               ModelLoaded, RunFinished, RunStarted, StepDone, TrackingRunOpened, metric_def)

from . import metric_export as mx
from .attributes import attribute_name
from .exporters import sdk_disabled

log = logging.getLogger("splade_obs.sinks.otel")

MAX_PENDING = 1000
_BAD_INSTRUMENT_CHARS = re.compile(r"[^A-Za-z0-9_./\-]")
#: Step-time histogram bucket bounds (seconds).
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
ERRORS_INSTRUMENT = "splade.errors"
SKIPPED_INSTRUMENT = "splade.train.skipped_batches"
NONFINITE_INSTRUMENT = "splade.metrics.nonfinite"
ALERTS_INSTRUMENT = "splade.alerts"
#: canonical names that are counters here (fed from ErrorCaught / AlertRaised), or not instruments at all
COUNTED = ("errors/", "train/skipped_batches", "alerts/")

#: Instruments that are not named from a canonical metric: (name, kind, unit, attributes, meaning).
EXTRA_INSTRUMENTS: tuple[tuple[str, str, str, str, str], ...] = (
    (ERRORS_INSTRUMENT, "counter", "{error}", "error.category", "errors caught, by category (the canonical "
     "errors/{CATEGORY}; errors/total is their sum)"),
    (SKIPPED_INSTRUMENT, "counter", "{batch}", "-", "batches skipped by the batch-error policy"),
    (ALERTS_INSTRUMENT, "counter", "{alert}", "alert.category", "training-health alerts raised, by category (the "
     "canonical alerts/{category}; once per episode)"),
    ("splade.train.step.duration", "histogram", "s", "-", "wall time of each optimizer step"),
    ("splade.train.step", "gauge", "{step}", "-", "the latest optimizer step (1-based)"),
    (NONFINITE_INSTRUMENT, "counter", "{value}", "splade.metric (the instrument)", "non-finite values "
     "(NaN, Inf) not recorded: the gauge kept its previous value"),
    ("process.memory.usage", "observable gauge", "By", "-", "resident memory (RSS) of the process"),
    ("process.cpu.time", "observable counter", "s", "cpu.mode (user, system)", "CPU time of the process"),
    ("process.cpu.utilization", "observable gauge", "1", "-", "CPU time since the previous observation over "
     "wall time and CPUs"),
    ("splade.gpu.memory.allocated", "observable gauge", "By", "gpu.device", "GPU memory held by tensors (CUDA "
     "only)"),
    ("splade.gpu.memory.reserved", "observable gauge", "By", "gpu.device", "GPU memory reserved by torch's "
     "caching allocator (CUDA only)"),
)


def instrument_name(canonical: str) -> str:
    """The instrument of a canonical metric: ``train/loss`` -> ``splade.train.loss`` (the span attribute
    name, :func:`~.attributes.attribute_name`, with characters outside ``[A-Za-z0-9_./-]`` as ``_``)."""
    if canonical.startswith("errors/"):
        return ERRORS_INSTRUMENT
    return _BAD_INSTRUMENT_CHARS.sub("_", attribute_name(canonical))[:255]


def instrument_unit(canonical: str) -> str:
    """The vocabulary's unit of ``canonical`` (UCUM), ``"1"`` (dimensionless) where it declares none."""
    m = metric_def(canonical)
    return (m.unit if m is not None and m.unit else "1")


@dataclass(frozen=True)
class MetricsOptions:
    """The sink's own settings (``run.build_sinks`` fills them from the ``tracing`` config section)."""

    exporter: str = "file"              # file | otlp | console | none (as for spans)
    prometheus_port: int | None = None
    prometheus_host: str = "127.0.0.1"
    #: seconds the Prometheus endpoint keeps serving the final values after the run (within close's bound)
    prometheus_linger: float = 0.0
    shutdown_timeout: float = 5.0
    service_name: str | None = None
    #: export interval of the pushing readers in ms (None: OTEL_METRIC_EXPORT_INTERVAL, else 60000)
    export_interval_ms: float | None = None


class OtelMetricsSink(Sink):
    """Events -> instruments on a private MeterProvider (see the module docstring)."""

    name = "otel_metrics"
    scope = "run"
    threaded = False

    def __init__(self, options: MetricsOptions, *, log_dir: Path | None, prometheus: mx.PrometheusEndpoint | None,
                 extra_readers: Iterable[MetricReader] = (), rank: int = 0) -> None:
        self.options = options
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.prometheus = prometheus
        self.extra_readers = list(extra_readers)
        self.rank = rank
        self.pipeline: mx.MetricsPipeline | None = None
        self.resource: Any = None
        self.stats: dict[str, Any] = {}
        self._meter: Any = None
        self._gauges: dict[str, Any] = {}
        self._pending: list[Event] = []
        self._closed = False
        self._run_name: str | None = None
        self._mlflow_run_id: str | None = None
        self._mlflow_experiment_id: str | None = None
        self._device: str | None = None
        self._cpu_lock = threading.Lock()
        self._cpu_last: tuple[float, float] | None = None
        self._cpu_util = 0.0

    # -------------------------------------------------------------------------------------- building
    @classmethod
    def create(cls, options: MetricsOptions, *, log_dir: Path | None, rank: int = 0,
               extra_readers: Iterable[MetricReader] = ()) -> "OtelMetricsSink | None":
        """The sink, or None when it would record for nobody (no file, OTLP, Prometheus or extra reader) or the
        SDK is off (``OTEL_SDK_DISABLED=true``). A Prometheus port that cannot be bound is a ConfigError here,
        before the run starts."""
        extra = list(extra_readers)
        if sdk_disabled():
            if options.prometheus_port is not None:
                log.warning("OTEL_SDK_DISABLED=true: no Prometheus endpoint on port %s", options.prometheus_port)
            return None
        address = mx.prometheus_address(options.prometheus_port, options.prometheus_host)
        if options.exporter == "none" and address is None and not extra:
            return None
        prometheus = None
        if address is not None:
            from splade_obs.errors import ConfigError
            try:
                prometheus = mx.PrometheusEndpoint(*address)
            except ImportError as exc:
                raise ConfigError("--prometheus-port needs the opentelemetry-exporter-prometheus package",
                                  field="tracing.prometheus_port",
                                  hint="pip install opentelemetry-exporter-prometheus") from exc
            except OSError as exc:
                where = f"{address[0]}:{address[1]}"
                raise ConfigError(f"cannot serve Prometheus metrics on {where}: {exc.strerror or exc}",
                                  field="tracing.prometheus_port",
                                  hint="choose a free --prometheus-port (or --prometheus-host)") from exc
            log.info("Prometheus metrics at %s", prometheus.url)
        return cls(options, log_dir=log_dir, prometheus=prometheus, extra_readers=extra, rank=rank)

    def _start(self) -> None:
        """The provider, its readers and the fixed instruments (the resource is known now)."""
        o = self.options
        self.resource = mx.run_resource(o.service_name, run_name=self._run_name, mlflow_run_id=self._mlflow_run_id,
                                        mlflow_experiment_id=self._mlflow_experiment_id, rank=self.rank)
        pushed: list[tuple[str, Any]] = []
        if o.exporter != "none" and self.log_dir is not None:
            pushed.append(("file", mx.JsonLinesMetricExporter(mx.metrics_file_path(self.log_dir))))
        if mx.otlp_metrics_wanted(o.exporter):
            pushed.append(("otlp", mx.build_otlp_metric_exporter()))
        pulled = [*([self.prometheus.reader()] if self.prometheus is not None else []), *self.extra_readers]
        self.pipeline = mx.MetricsPipeline.build(self.resource, pushed, pulled, o.export_interval_ms)
        m = self._meter = self.pipeline.provider.get_meter("splade_obs", __version__)
        by_name = {e[0]: e for e in EXTRA_INSTRUMENTS}

        def make(name: str, factory: Callable[..., Any], **kw: Any) -> Any:
            return factory(name, unit=by_name[name][2], description=by_name[name][4], **kw)

        self._errors = make(ERRORS_INSTRUMENT, m.create_counter)
        self._skipped = make(SKIPPED_INSTRUMENT, m.create_counter)
        self._alerts = make(ALERTS_INSTRUMENT, m.create_counter)
        self._step_time = make("splade.train.step.duration", m.create_histogram,
                               explicit_bucket_boundaries_advisory=STEP_BUCKETS)
        self._step = make("splade.train.step", m.create_gauge)
        self._nonfinite = make(NONFINITE_INSTRUMENT, m.create_counter)
        make("process.memory.usage", m.create_observable_gauge, callbacks=[self._observe_rss])
        make("process.cpu.time", m.create_observable_counter, callbacks=[self._observe_cpu_time])
        make("process.cpu.utilization", m.create_observable_gauge, callbacks=[self._observe_cpu_util])
        if loaded_cuda() is not None:
            make("splade.gpu.memory.allocated", m.create_observable_gauge, callbacks=[self._observe_gpu(True)])
            make("splade.gpu.memory.reserved", m.create_observable_gauge, callbacks=[self._observe_gpu(False)])

    # -------------------------------------------------------------------------------------- dispatch
    def handle(self, event: Event) -> None:
        if self._closed:
            return
        if self.pipeline is None and not isinstance(event, (RunStarted, RunFinished, TrackingRunOpened)):
            if len(self._pending) < MAX_PENDING:
                self._pending.append(event)
            return
        super().handle(event)

    def _ensure_started(self) -> None:
        if self.pipeline is None:
            self._start()
            pending, self._pending = self._pending, []
            for ev in pending:
                super().handle(ev)

    def on_tracking_run_opened(self, e: TrackingRunOpened) -> None:
        self._mlflow_run_id, self._mlflow_experiment_id = e.run_id, e.experiment_id
        if self.pipeline is not None:
            log.debug("MLflow run %s announced after the metrics provider started; not on its resource", e.run_id)

    def on_run_started(self, e: RunStarted) -> None:
        self._run_name = e.run_name or None
        self._mlflow_run_id = self._mlflow_run_id or e.tracking_run_id
        self._ensure_started()

    def _set(self, metrics: dict[str, float]) -> None:
        """Every canonical metric as its gauge (the counted ones are fed by :meth:`on_error_caught`)."""
        for canonical, value in metrics.items():
            if canonical.startswith(COUNTED):
                continue
            gauge = self._gauges.get(canonical)
            if gauge is None:
                m = metric_def(canonical)
                gauge = self._gauges[canonical] = self._meter.create_gauge(
                    instrument_name(canonical), unit=instrument_unit(canonical),
                    description=m.description if m is not None else "")
            try:
                number = float(value)
            except (TypeError, ValueError):
                continue
            if math.isfinite(number):
                gauge.set(number)
            else:
                self._nonfinite.add(1, {"splade.metric": instrument_name(canonical)})

    def on_step_done(self, e: StepDone) -> None:
        self._set(e.metrics())
        self._step.set(e.step)
        if e.start_ns and e.end_ns >= e.start_ns:
            self._step_time.record((e.end_ns - e.start_ns) / 1e9)

    def on_error_caught(self, e: ErrorCaught) -> None:
        self._errors.add(1, {"error.category": e.category})
        if e.skipped_batch:
            self._skipped.add(1)

    def on_alert_raised(self, e: AlertRaised) -> None:
        self._alerts.add(1, {"alert.category": e.category})

    def on_epoch_done(self, e: EpochDone) -> None:
        self._set(e.metrics())

    def on_evaluation_done(self, e: EvaluationDone) -> None:
        self._set(e.metrics())

    def on_checkpoint_saved(self, e: CheckpointSaved) -> None:
        self._set(e.metrics())

    def on_model_loaded(self, e: ModelLoaded) -> None:
        self._device = e.device

    def on_run_finished(self, e: RunFinished) -> None:
        self._ensure_started()
        self._set(e.metrics())

    # -------------------------------------------------------------------------------------- observed
    def _observe_rss(self, options: CallbackOptions) -> Iterable[Observation]:
        import psutil

        return [Observation(psutil.Process().memory_info().rss)]

    def _observe_cpu_time(self, options: CallbackOptions) -> Iterable[Observation]:
        import psutil

        t = psutil.Process().cpu_times()
        return [Observation(t.user, {"cpu.mode": "user"}), Observation(t.system, {"cpu.mode": "system"})]

    def _observe_cpu_util(self, options: CallbackOptions) -> Iterable[Observation]:
        """CPU time over wall time and CPUs since the previous observation (by any reader; 0.2 s at least)."""
        import psutil

        t = psutil.Process().cpu_times()
        cpu, now = t.user + t.system, time.monotonic()
        with self._cpu_lock:
            last = self._cpu_last
            if last is None or now - last[1] >= 0.2:
                if last is not None:
                    self._cpu_util = (cpu - last[0]) / (now - last[1]) / (psutil.cpu_count() or 1)
                self._cpu_last = (cpu, now)
            return [Observation(self._cpu_util)]

    def _observe_gpu(self, allocated: bool) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            cuda = loaded_cuda()
            if cuda is None or not cuda.is_initialized():
                return []
            device = self._device if (self._device or "").startswith("cuda") else f"cuda:{cuda.current_device()}"
            value = cuda.memory_allocated(device) if allocated else cuda.memory_reserved(device)
            return [Observation(value, {"gpu.device": device})]
        return observe

    # -------------------------------------------------------------------------------------- shutdown
    def close(self, timeout: float = 5.0) -> None:
        """Export once more and stop, within ``timeout`` seconds; first keep the Prometheus endpoint serving the
        final values for ``prometheus_linger`` seconds (at most half of the bound)."""
        if self._closed:
            return
        t0 = time.monotonic()
        if self.pipeline is None and self._pending:     # the run never started: still count what happened
            self._ensure_started()
        self._closed = True
        try:
            if self.prometheus is not None and self.pipeline is not None and self.options.prometheus_linger > 0:
                time.sleep(max(0.0, min(self.options.prometheus_linger, timeout / 2)))
            clean = True
            if self.pipeline is not None:
                left = max(0.0, timeout - (time.monotonic() - t0))
                clean = self.pipeline.shutdown(min(left, self.options.shutdown_timeout))
        finally:
            if self.prometheus is not None:
                self.prometheus.stop()
        counts = self.pipeline.counts() if self.pipeline is not None else {}
        self.stats = {"exporters": counts, "clean_shutdown": clean, "instruments": len(self._gauges)}
        failed = {k: v["failed"] for k, v in counts.items() if v["failed"]}
        log.log(logging.WARNING if failed else logging.INFO,
                "metrics: %d gauges; exports per exporter: %s%s", len(self._gauges),
                ", ".join(f"{k}={v['exported']}" for k, v in counts.items()) or "none",
                f"; failed: {failed}" if failed else "")



def render_instruments() -> str:
    """The markdown table of every instrument: the vocabulary's names by the rule, then :data:`EXTRA_INSTRUMENTS`."""
    from splade_obs.events import METRIC_VOCABULARY

    lines = ["| instrument | kind | unit | attributes | from | meaning |", "|---|---|---|---|---|---|"]
    for cls, m in METRIC_VOCABULARY:
        if m.name.startswith(COUNTED):
            continue
        shown = attribute_name(m.name) if "{" in m.name else instrument_name(m.name)   # a family: its pattern
        lines.append(f"| `{shown}` | gauge | `{m.unit or '1'}` | - | `{m.name}` "
                     f"(`{cls.__name__}`) | {m.description} |")
    for name, kind, unit, attributes, meaning in EXTRA_INSTRUMENTS:
        key, _, note = attributes.partition(" ")
        attrs = "-" if key == "-" else f"`{key}`" + (f" {note}" if note else "")
        lines.append(f"| `{name}` | {kind} | `{unit}` | {attrs} | - | {meaning} |")
    return "\n".join(lines) + "\n"
