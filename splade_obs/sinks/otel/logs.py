"""Log records over OTLP (``--otel-logs``), each joined to the run's trace, span and MLflow run.

:class:`OtlpLogHandler` is a :class:`logging.Handler` that ``logging_setup`` adds to the root logger (and removes
at teardown). It owns a private ``LoggerProvider`` (never installed globally, no atexit hook) with a
``BatchLogRecordProcessor`` (``OTEL_BLRP_*`` honoured by the SDK) and the SDK's ``OTLPLogExporter``: http/protobuf
or grpc by ``OTEL_EXPORTER_OTLP_LOGS_PROTOCOL`` / ``OTEL_EXPORTER_OTLP_PROTOCOL``; endpoint, headers and timeout
come from ``OTEL_EXPORTER_OTLP_*`` as the SDK reads them. Each record carries the trace id and span id that
:data:`splade_obs.log_context.CONTEXT` gives the line (the same as the JSON log's), ``mlflow.run_id``, the
record's structured fields as attributes (non-finite floats as ``"nan"``/``"inf"``, containers as JSON) and
``code.*``. Records of the OpenTelemetry libraries themselves are not exported (an export failure would
otherwise feed itself). :meth:`OtlpLogHandler.close` is bounded, even with a dead collector.

:class:`PresetNextSpanId` lets the OpenTelemetry sink give a span an id chosen beforehand (the ids the log
context reserved for epoch and failed-batch spans).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from typing import Any, Mapping

from opentelemetry import trace

from splade_obs import finite
from splade_obs.log_context import CONTEXT, LogContext

from .exporters import DEFAULT_OTLP_TIMEOUT_S, build_resource

log = logging.getLogger("splade_obs.sinks.otel.logs")

PROTOCOL_ENV_VARS = ("OTEL_EXPORTER_OTLP_LOGS_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
TIMEOUT_ENV_VARS = ("OTEL_EXPORTER_OTLP_LOGS_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT")
#: LogRecord attributes that are not structured fields
_STD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}
_SEVERITY_TEXT = {"WARNING": "WARN", "CRITICAL": "FATAL"}


class PresetNextSpanId:
    """Wraps a tracer's id generator: :meth:`preset` makes the next span id a chosen one (once)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self._next: int | None = None

    def preset(self, span_id: int | None) -> None:
        self._next = span_id

    def generate_span_id(self) -> int:
        value, self._next = self._next, None
        return value if value else self.inner.generate_span_id()

    def generate_trace_id(self) -> int:
        return self.inner.generate_trace_id()

    def is_trace_id_random(self) -> bool:
        return bool(getattr(self.inner, "is_trace_id_random", lambda: False)())

    def __getattr__(self, name: str) -> Any:  # first_trace_id, first_span_id...
        return getattr(self.inner, name)


def otlp_log_exporter(env: Mapping[str, str] = os.environ) -> Any:
    """The SDK's OTLP log exporter for the protocol in the env (http/protobuf unless grpc)."""
    protocol = next((env[k].strip().lower() for k in PROTOCOL_ENV_VARS if env.get(k, "").strip()), "http/protobuf")
    timeout = None if any(env.get(k) for k in TIMEOUT_ENV_VARS) else DEFAULT_OTLP_TIMEOUT_S
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter as GrpcLogExporter

        return GrpcLogExporter(timeout=timeout)
    if protocol not in ("http/protobuf", "http"):
        log.warning("OTEL_EXPORTER_OTLP_PROTOCOL=%s is not supported for logs; using http/protobuf", protocol)
    from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter

    return OTLPLogExporter(timeout=timeout)


def _attribute(value: Any) -> Any:
    """An OTel attribute value: str/bool/int/finite float as they are, a non-finite float as text, else JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return finite.finite_or_text(value)
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    try:
        return finite.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(value)


class OtlpLogHandler(logging.Handler):
    """Ships every record it gets to an OTLP endpoint; see the module docstring."""

    def __init__(self, service_name: str | None = None, exporter: Any = None, context: LogContext = CONTEXT,
                 level: int = logging.NOTSET) -> None:
        super().__init__(level)
        from opentelemetry.sdk._logs import LoggerProvider
        from opentelemetry.sdk._logs.export import BatchLogRecordProcessor

        self.context = context
        self.exporter = exporter if exporter is not None else otlp_log_exporter()
        self.provider = LoggerProvider(resource=build_resource(service_name), shutdown_on_exit=False)
        self.processor = BatchLogRecordProcessor(self.exporter)
        self.provider.add_log_record_processor(self.processor)
        self._logger = self.provider.get_logger("splade_obs")
        self._closed = False

    def emit(self, record: logging.LogRecord) -> None:
        if self._closed or record.name.startswith("opentelemetry") or \
                threading.current_thread().name.startswith("Otel"):
            return
        try:
            from opentelemetry.sdk._logs._internal import std_to_otel

            ids = self.context.ids(getattr(record, "batch", None))
            ctx = None
            if "trace_id" in ids and "span_id" in ids:
                sc = trace.SpanContext(int(ids["trace_id"], 16), int(ids["span_id"], 16), is_remote=False,
                                       trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED))
                ctx = trace.set_span_in_context(trace.NonRecordingSpan(sc))
            attributes: dict[str, Any] = {"code.function.name": record.funcName, "code.line.number": record.lineno,
                                          "code.file.path": record.pathname, "logger.name": record.name}
            for key, value in vars(record).items():
                if key not in _STD_ATTRS:
                    attributes[key] = _attribute(value)
            if "run_id" in ids:
                attributes["mlflow.run_id"] = ids["run_id"]
            if record.exc_info and not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            if record.exc_text:
                attributes["exception.stacktrace"] = record.exc_text
                if record.exc_info and record.exc_info[0] is not None:
                    exc_type = record.exc_info[0]
                    attributes["exception.type"] = f"{exc_type.__module__}.{exc_type.__qualname__}"
            self._logger.emit(timestamp=int(record.created * 1e9), context=ctx,
                              severity_number=std_to_otel(record.levelno),
                              severity_text=_SEVERITY_TEXT.get(record.levelname, record.levelname),
                              body=record.getMessage(), attributes={k: v for k, v in attributes.items()
                                                                    if v is not None})
        except Exception:  # noqa: BLE001 - logging's own contract
            self.handleError(record)

    def close(self, timeout: float = 5.0) -> None:  # type: ignore[override]
        """Flush and stop within ``timeout`` seconds; a dead collector's records are dropped, with one warning."""
        if self._closed:
            super().close()
            return
        self._closed = True
        start = time.monotonic()
        t = threading.Thread(target=self._quiet_shutdown, name="otel-logs-shutdown", daemon=True)
        t.start()
        t.join(max(0.0, timeout))
        if t.is_alive():
            threading.Thread(target=self._quiet, args=(self.exporter.shutdown,), daemon=True).start()
            log.warning("OTLP log export did not finish (%.1fs, bound %.1fs); the remaining log records are "
                        "dropped", time.monotonic() - start, timeout)
        super().close()

    def _quiet_shutdown(self) -> None:
        self._quiet(self.provider.shutdown)

    @staticmethod
    def _quiet(fn: Any) -> None:
        try:
            fn()
        except Exception:  # noqa: BLE001 - shutdown never raises into teardown
            pass

