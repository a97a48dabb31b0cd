"""Spans -> somewhere: exporters, the private tracer provider, bounded parallel shutdown.

:mod:`.sink` turns events into spans; this module decides where they go. Imported only when tracing is on.

Where spans go (``--otel-exporter`` / ``tracing.exporter``):

* ``file`` (default): JSON lines in ``<log-dir>/traces.jsonl`` (``traces.rank<N>.jsonl`` on rank N > 0),
  so every run has its trace offline. If ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or
  ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set, spans are *also* sent over OTLP.
* ``otlp``: the file plus OTLP (endpoint from the env vars above, default ``http://localhost:4318``).
* ``console``: the file plus one JSON document per span on stderr.
* ``none``: no tracing at all (also when ``OTEL_SDK_DISABLED=true``).

The OTLP exporters read ``OTEL_EXPORTER_OTLP_*`` (endpoint, headers, timeout, compression, certificates)
themselves, as the SDK documents; ``OTEL_EXPORTER_OTLP_PROTOCOL`` (or ``..._TRACES_PROTOCOL``) picks
``http/protobuf`` (default) or ``grpc``. Header values are never logged or written to files.

Each exporter gets its own ``BatchSpanProcessor`` so a dead collector never delays the local file, and a
counting wrapper so the sink can report how many spans were exported and how many were lost. The processors
honour ``OTEL_BSP_MAX_QUEUE_SIZE``, ``OTEL_BSP_SCHEDULE_DELAY``, ``OTEL_BSP_MAX_EXPORT_BATCH_SIZE`` and
``OTEL_BSP_EXPORT_TIMEOUT`` when set; :data:`BSP_DEFAULTS` applies only to the ones that are not
(:func:`bsp_settings`).
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_ON

log = logging.getLogger("splade_obs.sinks.otel")

ENDPOINT_ENV_VARS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
PROTOCOL_ENV_VARS = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
TIMEOUT_ENV_VARS = ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT")
#: Per-request timeout of our OTLP exporters unless the user set one: the export runs on the processor's
#: thread, so this only bounds how long a dead collector keeps that thread busy per batch.
DEFAULT_OTLP_TIMEOUT_S = 5.0
#: Shutdown wait for an exporter whose latest export failed (see Pipeline.shutdown).
DEAD_EXPORTER_GRACE_S = 2.0
#: Our BatchSpanProcessor settings, each used only when its environment variable is unset (the SDK's own defaults).
BSP_DEFAULTS: dict[str, int] = {"max_queue_size": 2048, "schedule_delay_millis": 5000,
                                "max_export_batch_size": 512, "export_timeout_millis": 30000}
BSP_ENV_VARS: dict[str, str] = {"max_queue_size": "OTEL_BSP_MAX_QUEUE_SIZE",
                                "schedule_delay_millis": "OTEL_BSP_SCHEDULE_DELAY",
                                "max_export_batch_size": "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
                                "export_timeout_millis": "OTEL_BSP_EXPORT_TIMEOUT"}
MLFLOW_EXPERIMENT_HEADER = "x-mlflow-experiment-id"
MLFLOW_RUN_HEADER = "x-mlflow-run-id"


def sdk_disabled(env: Mapping[str, str] = os.environ) -> bool:
    return env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"


def otlp_endpoint_configured(env: Mapping[str, str] = os.environ) -> bool:
    return any(env.get(k, "").strip() for k in ENDPOINT_ENV_VARS)


def otlp_protocol(env: Mapping[str, str] = os.environ) -> str:
    for key in PROTOCOL_ENV_VARS:
        value = env.get(key, "").strip().lower()
        if value:
            return value
    return "http/protobuf"


def bsp_settings(env: Mapping[str, str] = os.environ, **overrides: int | None) -> dict[str, int]:
    """``BatchSpanProcessor`` keyword arguments: an ``OTEL_BSP_*`` variable that is set wins, else
    ``overrides`` (a caller's explicit value), else :data:`BSP_DEFAULTS`.

    A value that is no positive integer is reported once and replaced by the default (the SDK would raise
    and the run would lose its trace); an export batch larger than the queue is cut to the queue's size.
    """
    out: dict[str, int] = {}
    for key, default in BSP_DEFAULTS.items():
        var, raw = BSP_ENV_VARS[key], env.get(BSP_ENV_VARS[key], "").strip()
        fallback = overrides.get(key) or default
        if not raw:
            out[key] = fallback
            continue
        try:
            value = int(raw)
        except ValueError:
            value = 0
        if value <= 0:
            _warn_once(f"{var}={raw!r} is not a positive integer; using {fallback}")
            value = fallback
        out[key] = value
    if out["max_export_batch_size"] > out["max_queue_size"]:
        _warn_once(f"the span export batch ({out['max_export_batch_size']}, OTEL_BSP_MAX_EXPORT_BATCH_SIZE) is larger "
                   f"than the span queue ({out['max_queue_size']}); using {out['max_queue_size']}")
        out["max_export_batch_size"] = out["max_queue_size"]
    return out


_warned: set[str] = set()


def _warn_once(text: str) -> None:
    if text not in _warned:
        _warned.add(text)
        log.warning(text)


# ------------------------------------------------------------------------------------------ exporters
class JsonLinesSpanExporter(SpanExporter):
    """One JSON object per span per line (the SDK's ``ReadableSpan.to_json`` layout, on one line)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self.path.open("a", encoding="utf-8")
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = "".join(s.to_json(indent=None) + "\n" for s in spans)   # indent=None: one line per span
        with self._lock:
            if self._fh.closed:
                return SpanExportResult.FAILURE
            self._fh.write(lines)
            self._fh.flush()
        return SpanExportResult.SUCCESS

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True

    def shutdown(self) -> None:
        with self._lock:
            if not self._fh.closed:
                self._fh.close()


class CountingExporter(SpanExporter):
    """Wraps an exporter and counts spans it exported and spans it failed to export."""

    def __init__(self, inner: SpanExporter, name: str) -> None:
        self.inner = inner
        self.name = name
        self.exported = 0
        self.failed = 0
        #: Result of the latest export: None before the first one.
        self.last_ok: bool | None = None
        #: time.monotonic() when the export now running began; None when idle.
        self.inflight_since: float | None = None

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.inflight_since = time.monotonic()
        try:
            result = self.inner.export(spans)
        except Exception as exc:  # noqa: BLE001 - an exporter must never raise into the processor
            log.warning("span exporter %s raised %s", self.name, type(exc).__name__)
            result = SpanExportResult.FAILURE
        finally:
            self.inflight_since = None
        if result is SpanExportResult.SUCCESS:
            self.exported += len(spans)
        else:
            self.failed += len(spans)
        self.last_ok = result is SpanExportResult.SUCCESS
        return result

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)

    def shutdown(self) -> None:
        self.inner.shutdown()

    def looks_dead(self, waited: float, grace: float) -> bool:
        """True when waiting longer for this exporter only buys retry back-off sleeps."""
        since = self.inflight_since
        if since is not None and time.monotonic() - since > grace:
            return True            # one export has been retrying for longer than a healthy request takes
        return self.last_ok is False and waited > grace


class MlflowOtlpExporter(SpanExporter):
    """OTLP/HTTP to an MLflow server's ``/v1/traces`` with the experiment and run headers.

    The ids come from the MLflow sink's :class:`~splade_obs.events.TrackingRunOpened` event (through the
    ``ids`` callable) and could change after the first spans end, so they are read at export time (on the
    processor's thread) and the inner exporter is rebuilt when they change. The server links the trace to
    the run when the request carrying the root span has the run id; the root span ends last, so that
    request sees the final ids.
    """

    def __init__(self, base_url: str, ids: Callable[[], tuple[str | None, str | None]],
                 timeout: float = DEFAULT_OTLP_TIMEOUT_S, wait_for_ids_s: float = 5.0) -> None:
        self.endpoint = base_url.rstrip("/") + "/v1/traces"
        self._ids = ids
        self._timeout = timeout
        self._wait = wait_for_ids_s
        self._inner: SpanExporter | None = None
        self._inner_ids: tuple[str | None, str | None] = (None, None)
        self._closed = threading.Event()
        exp_id, run_id = ids()
        if exp_id is not None:  # known already (the usual case): build now, not on the processor's first export
            self._inner, self._inner_ids = self._build(exp_id, run_id), (exp_id, run_id)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        deadline = time.monotonic() + self._wait
        exp_id, run_id = self._ids()
        while exp_id is None and time.monotonic() < deadline and not self._closed.wait(0.1):
            exp_id, run_id = self._ids()
        if exp_id is None:
            log.warning("no MLflow experiment id known; %d spans not sent to MLflow", len(spans))
            return SpanExportResult.FAILURE
        if self._inner is None or self._inner_ids != (exp_id, run_id):
            if self._inner is not None:
                self._inner.shutdown()
            self._inner = self._build(exp_id, run_id)
            self._inner_ids = (exp_id, run_id)
        return self._inner.export(spans)

    def _build(self, exp_id: str, run_id: str | None) -> SpanExporter:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        headers = _mlflow_auth_headers()
        headers[MLFLOW_EXPERIMENT_HEADER] = exp_id
        if run_id:
            headers[MLFLOW_RUN_HEADER] = run_id
        return OTLPSpanExporter(endpoint=self.endpoint, headers=headers, timeout=self._timeout)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True

    def shutdown(self) -> None:
        self._closed.set()
        if self._inner is not None:
            self._inner.shutdown()


def _mlflow_auth_headers() -> dict[str, str]:
    """The Authorization header MLflow's own OTLP exporter would send (token or basic auth), if any."""
    try:
        from mlflow.tracing.utils.otlp import build_otlp_headers
    except Exception:  # noqa: BLE001 - mlflow is optional for tracing
        return {}
    headers = build_otlp_headers("0")
    headers.pop(MLFLOW_EXPERIMENT_HEADER, None)
    return headers


def build_otlp_exporter(env: Mapping[str, str] = os.environ) -> SpanExporter:
    """The SDK's OTLP exporter for the protocol in the env; endpoint and headers are read from the env."""
    timeout = None if any(env.get(k) for k in TIMEOUT_ENV_VARS) else DEFAULT_OTLP_TIMEOUT_S
    protocol = otlp_protocol(env)
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter(timeout=timeout)
    if protocol not in ("http/protobuf", "http"):
        log.warning("OTEL_EXPORTER_OTLP_PROTOCOL=%s is not supported; using http/protobuf", protocol)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(timeout=timeout)


def trace_file_path(log_dir: Path, rank: int) -> Path:
    return Path(log_dir) / ("traces.jsonl" if rank == 0 else f"traces.rank{rank}.jsonl")


def build_exporters(exporter: str, log_dir: Path, rank: int,
                    env: Mapping[str, str] = os.environ) -> list[tuple[str, SpanExporter]]:
    """(name, exporter) pairs for ``tracing.exporter``; see the module docstring for the policy."""
    if exporter == "none":
        return []
    out: list[tuple[str, SpanExporter]] = [("file", JsonLinesSpanExporter(trace_file_path(log_dir, rank)))]
    if exporter == "otlp" or otlp_endpoint_configured(env):
        out.append(("otlp", build_otlp_exporter(env)))
    if exporter == "console":
        out.append(("console", ConsoleSpanExporter(out=sys.stderr)))
    return out


# ------------------------------------------------------------------------------------------ provider
class PresetIdGenerator(RandomIdGenerator):
    """Random ids, except that the first trace id and span id are chosen up front.

    That lets the sink announce the run's trace id and traceparent (``TraceOpened``, from ``Sink.open``)
    before the root span exists, so the other sinks (MLflow tags, ranks > 0) have them before the run starts.
    """

    def __init__(self) -> None:
        self.first_trace_id = super().generate_trace_id()
        self.first_span_id = super().generate_span_id()
        self._trace_used = False
        self._span_used = False

    def generate_trace_id(self) -> int:
        if not self._trace_used:
            self._trace_used = True
            return self.first_trace_id
        return super().generate_trace_id()

    def generate_span_id(self) -> int:
        if not self._span_used:
            self._span_used = True
            return self.first_span_id
        return super().generate_span_id()


#: This process's ``service.instance.id`` on spans and metrics (unless OTEL_RESOURCE_ATTRIBUTES sets one).
INSTANCE_ID = str(uuid.uuid4())


def build_resource(service_name: str | None, env: Mapping[str, str] = os.environ) -> Resource:
    """service.name: config > OTEL_SERVICE_NAME > "splade-obs"; service.instance.id: one per process;
    OTEL_RESOURCE_ATTRIBUTES merged by the SDK (it wins)."""
    from splade_obs import __version__

    attrs: dict[str, Any] = {"service.version": __version__, "host.name": socket.gethostname(),
                             "service.instance.id": INSTANCE_ID}
    name = service_name or env.get("OTEL_SERVICE_NAME") or None
    if name:
        attrs["service.name"] = name
    elif "service.name=" not in env.get("OTEL_RESOURCE_ATTRIBUTES", ""):
        attrs["service.name"] = "splade-obs"
    return safe_resource(Resource.create(attrs))


def safe_resource(resource: Resource) -> Resource:
    """``resource`` with secret-keyed attributes (``api_key=...`` in OTEL_RESOURCE_ATTRIBUTES) as ``***`` and
    secrets and URL credentials masked in the others: the resource rides on every span, metric and log."""
    from splade_obs.redaction import REDACTED, is_secret_key, safe_text

    attrs = {k: REDACTED if is_secret_key(k) else safe_text(v) if isinstance(v, str) else v
             for k, v in resource.attributes.items()}
    return Resource(attrs, resource.schema_url)


@dataclass
class Pipeline:
    """A private TracerProvider and the processors/counters behind it."""

    provider: TracerProvider
    id_generator: PresetIdGenerator
    processors: list[tuple[str, SpanProcessor, CountingExporter]] = field(default_factory=list)

    def add(self, name: str, exporter: SpanExporter, *, synchronous: bool = False,
            max_queue_size: int | None = None) -> CountingExporter:
        """``exporter`` behind its own processor; ``max_queue_size`` (like the other settings) only applies
        when ``OTEL_BSP_MAX_QUEUE_SIZE`` is unset (:func:`bsp_settings`)."""
        counted = CountingExporter(exporter, name)
        proc: SpanProcessor = (SimpleSpanProcessor(counted) if synchronous
                               else BatchSpanProcessor(counted, **bsp_settings(max_queue_size=max_queue_size)))
        self.provider.add_span_processor(proc)
        self.processors.append((name, proc, counted))
        return counted

    def counts(self) -> dict[str, dict[str, int]]:
        return {name: {"exported": c.exported, "failed": c.failed} for name, _, c in self.processors}

    def shutdown(self, timeout: float) -> bool:
        """Flush and stop every processor in parallel, returning within ``timeout`` seconds.

        ``BatchSpanProcessor.shutdown``/``force_flush`` can block for the exporter's whole retry budget when
        the collector is down, so each runs on a daemon thread that is joined against one deadline. Whatever
        is still stuck then gets its exporter shut down, which aborts the OTLP retry back-off. An exporter
        that looks dead (one export retrying for over ``DEAD_EXPORTER_GRACE_S``, or the latest export failed)
        is given up early: waiting longer would only add back-off sleeps to the end of the run.
        Returns True when everything finished in time.
        """
        start = time.monotonic()
        deadline = start + max(0.0, timeout)
        threads = []
        for name, proc, _ in self.processors:
            t = threading.Thread(target=_quiet_shutdown, args=(name, proc), name=f"otel-shutdown-{name}",
                                 daemon=True)
            t.start()
            threads.append((t, name))
        clean = True
        for (t, name), (_, _, counted) in zip(threads, self.processors):
            while t.is_alive() and time.monotonic() < deadline:
                if counted.looks_dead(time.monotonic() - start, DEAD_EXPORTER_GRACE_S):
                    break
                t.join(min(0.05, max(0.0, deadline - time.monotonic())))
            if t.is_alive():
                clean = False
                log.warning("span exporter %s did not finish (%.1fs, bound %.1fs); its remaining spans are "
                            "dropped", name, time.monotonic() - start, timeout)
                threading.Thread(target=_quiet_exporter_shutdown, args=(counted.inner,), daemon=True).start()
        return clean


def _quiet_shutdown(name: str, proc: SpanProcessor) -> None:
    try:
        proc.shutdown()
    except Exception as exc:  # noqa: BLE001 - shutdown must never raise into close()
        log.warning("span processor %s failed to shut down: %s", name, type(exc).__name__)


def _quiet_exporter_shutdown(exporter: SpanExporter) -> None:
    try:
        exporter.shutdown()
    except Exception:  # noqa: BLE001
        pass


def build_pipeline(resource: Resource) -> Pipeline:
    """A TracerProvider that is never installed globally and never registers an unbounded atexit hook.

    The sampler is ALWAYS_ON: which batches get spans is decided by :class:`BatchSampler` before a span is
    created; OTEL_TRACES_SAMPLER would otherwise drop random epochs or the root.
    """
    ids = PresetIdGenerator()
    provider = TracerProvider(sampler=ALWAYS_ON, resource=resource, shutdown_on_exit=False, id_generator=ids)
    return Pipeline(provider=provider, id_generator=ids)
