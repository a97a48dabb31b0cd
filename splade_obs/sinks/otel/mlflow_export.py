"""The run's trace in MLflow, with or without a server: spans -> MLflow's own tracking-store API.

With an ``mlflow server`` the spans go to its OTLP endpoint ``/v1/traces`` (:class:`~.exporters.MlflowOtlpExporter`),
and :class:`MlflowServerFinalizer` then sets the trace's run link and name through the server's REST API (step 2
below). With a database store (the default ``sqlite:///<cwd>/mlruns/mlflow.db``, or postgresql/mysql/mssql) there is no
endpoint, so :class:`MlflowStoreExporter` does in this process what the server's handler does:

1. each batch of finished SDK spans is encoded as OTLP protobuf (the SDK's own encoder) and converted with
   ``mlflow.entities.Span.from_otel_proto`` — the server's conversion, so span ids, parents, times, status,
   events, attributes (JSON-encoded as MLflow stores them) and ``mlflow.traceRequestId`` are exactly what an
   OTLP-ingested trace has — then written with the store's ``log_spans(experiment_id, spans)``;
2. when the batch holds the root span (``train``, the last span of the run to end), the trace is finalized with
   the store's ``start_trace(TraceInfo)``, as MLflow's own exporter does after ``log_spans``: the run link
   (metadata ``mlflow.sourceRun``, which puts the trace in the run's Traces tab and fills the "Run name" column of
   the experiment's trace list), the trace name (tag ``mlflow.traceName`` = the run name), its state, times and a
   request/response preview (the root's ``mlflow.spanInputs`` / ``mlflow.spanOutputs``: run name, model,
   steps / status, final step, final metrics).

It runs behind its own ``BatchSpanProcessor``, on that processor's thread: the training loop never waits on the
store, and ``Pipeline.shutdown`` bounds the end of the run. A store that refuses the spans costs one warning; the
local ``traces.jsonl`` is written by its own processor and stays complete.

:func:`mlflow_trace_id` and :func:`mlflow_trace_ui_path` name the trace as MLflow stores it and as its UI opens it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import urllib.parse
from typing import Any, Callable, Mapping, Sequence

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import StatusCode, format_span_id, format_trace_id

from splade_obs.finite import json_safe
from splade_obs.redaction import safe_text

log = logging.getLogger("splade_obs.sinks.otel")

#: MLflow's prefix of trace ids derived from OpenTelemetry trace ids (``mlflow.tracing.constant``).
TRACE_ID_PREFIX = "tr-"
#: URI schemes whose store is MLflow's SqlAlchemyStore (written in process through its API).
DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
#: Root attributes shown as the trace's inputs (the "Input" column of the trace list) and outputs.
INPUT_KEYS = (("run_name", "splade.run_name"), ("model", "splade.model.name"),
              ("train_file", "splade.data.train_file"), ("total_steps", "splade.total_steps"),
              ("num_epochs", "splade.num_epochs"), ("batch_size", "splade.optim.batch_size"),
              ("learning_rate", "splade.optim.learning_rate"), ("resumed", "splade.resumed"))
OUTPUT_KEYS = (("status", "splade.status"), ("final_step", "splade.final_step"),
               ("duration_s", "splade.duration_s"), ("error", "error.category"))
#: Root metric attributes (RunFinished's final metrics and counters) that join the outputs.
OUTPUT_METRIC_PREFIXES = ("splade.epoch.", "splade.val.", "splade.eval.", "splade.errors.")
SPAN_INPUTS, SPAN_OUTPUTS = "mlflow.spanInputs", "mlflow.spanOutputs"
#: Longest request/response preview (MLflow's own limit for open-source stores).
PREVIEW_MAX_CHARS = 1000
#: Root attribute MLflow's ``log_spans`` reads as the trace tag ``mlflow.traceName`` (``mlflow.traceTag.<key>``
#: on the root span): the sink sets it to the run name, so a trace sent over OTLP to a server is named too.
TRACE_NAME_ATTRIBUTE = "mlflow.traceTag.mlflow.traceName"


# ------------------------------------------------------------------------------------------ names and links
def mlflow_trace_id(otel_trace_id_hex: str) -> str:
    """The id MLflow stores the trace under: ``tr-`` + the 32 lowercase hex digits of the OpenTelemetry trace id
    (``TraceOpened.trace_id`` / the run's ``otel.trace_id`` tag), as ``Span.from_otel_proto`` derives it."""
    digits = otel_trace_id_hex.strip().lower()
    if len(digits) != 32 or any(c not in "0123456789abcdef" for c in digits) or not int(digits, 16):
        raise ValueError(f"not an OpenTelemetry trace id (32 hex digits, not all zero): {otel_trace_id_hex!r}")
    return TRACE_ID_PREFIX + digits


def mlflow_trace_ui_path(experiment_id: str, otel_trace_id_hex: str) -> str:
    """The MLflow UI route (after the server's base URL) that opens the trace in the experiment's Traces tab.

    ``selectedEvaluationId`` and ``traceId`` are the query parameters the UI reads to open a trace (MLflow's own
    notebook renderer links with both); ``startTimeLabel=ALL`` keeps a trace older than the tab's default
    time range (last 7 days) in the list behind it. Prefix it with the server URL: ``http://host:5000/`` + path.
    """
    trace_id = mlflow_trace_id(otel_trace_id_hex)
    query = urllib.parse.urlencode({"selectedEvaluationId": trace_id, "traceId": trace_id, "startTimeLabel": "ALL"})
    return f"#/experiments/{urllib.parse.quote(str(experiment_id), safe='')}/traces?{query}"


def store_kind(tracking_uri: str | None) -> str | None:
    """How the trace reaches this tracking store: ``"server"`` (OTLP to ``/v1/traces``), ``"database"`` (the
    store API in this process), or None (a file store, Databricks, no store: not supported)."""
    if not tracking_uri:
        return None
    scheme = urllib.parse.urlsplit(tracking_uri).scheme.lower().split("+", 1)[0]
    if scheme in ("http", "https"):
        return "server"
    return "database" if scheme in DATABASE_SCHEMES else None


def absolute_store_uri(uri: str) -> str:
    """``uri`` with a relative sqlite path made absolute now (the store is opened later, on the export thread,
    whatever the working directory is then)."""
    prefix = "sqlite:///"
    path = uri[len(prefix):] if uri.startswith(prefix) else ""
    if path and not path.startswith("/") and not path.startswith(":memory:"):
        uri = prefix + os.path.abspath(path)
    return uri


# ------------------------------------------------------------------------------------------ conversion
def to_mlflow_spans(spans: Sequence[ReadableSpan]) -> list[Any]:
    """SDK spans -> ``mlflow.entities.Span``, the way MLflow's server ingests OTLP: the SDK's OTLP protobuf
    encoding, then ``Span.from_otel_proto`` with the resource (its attributes become trace tags)."""
    from mlflow.entities.span import Span
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    out = []
    for resource_spans in encode_spans(spans).resource_spans:
        for scope_spans in resource_spans.scope_spans:
            for proto in scope_spans.spans:
                out.append(Span.from_otel_proto(proto, resource=resource_spans.resource))
    return out


def root_inputs(attributes: Mapping[str, Any]) -> dict[str, Any]:
    return {k: json_safe(attributes[a]) for k, a in INPUT_KEYS if attributes.get(a) is not None}


def root_outputs(attributes: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: json_safe(attributes[a]) for k, a in OUTPUT_KEYS if attributes.get(a) is not None}
    for key in sorted(attributes):
        if key.startswith(OUTPUT_METRIC_PREFIXES):
            out[key.removeprefix("splade.").replace(".", "/", 1)] = json_safe(attributes[key])
    return out


def describe_root(span: Any, root: ReadableSpan) -> None:
    """Give the converted root its inputs and outputs (JSON-encoded once, as MLflow stores span attributes;
    the server sets its own extra root attributes the same way)."""
    attributes = root.attributes or {}
    span._span._attributes[SPAN_INPUTS] = json.dumps(root_inputs(attributes), allow_nan=False)
    span._span._attributes[SPAN_OUTPUTS] = json.dumps(root_outputs(attributes), allow_nan=False)


def _brief(exc: BaseException) -> str:
    """``Type: first line of the message`` (a REST error can carry a whole HTML page)."""
    lines = str(exc).strip().splitlines()
    first = lines[0][:200] if lines else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _preview(values: Mapping[str, Any]) -> str:
    text = json.dumps(values, allow_nan=False)
    return text if len(text) <= PREVIEW_MAX_CHARS else text[: PREVIEW_MAX_CHARS - 3] + "..."


def trace_info_for(root: ReadableSpan, experiment_id: str, run_id: str | None) -> Any:
    """The ``TraceInfo`` that finalizes the run's trace: run link, name, state, times, previews (as MLflow's
    exporter finalizes a trace when its root span ends)."""
    from mlflow.entities import TraceInfo, TraceLocation, TraceState

    attributes = root.attributes or {}
    metadata = {"mlflow.trace_schema.version": "3", "mlflow.source.name": "splade-obs train",
                "mlflow.source.type": "LOCAL"}
    if run_id:
        metadata["mlflow.sourceRun"] = run_id
    tags = {}
    run_name = attributes.get("splade.run_name")
    if run_name:
        tags["mlflow.traceName"] = str(run_name)
    start = root.start_time or time.time_ns()
    end = root.end_time or start
    state = TraceState.ERROR if root.status.status_code is StatusCode.ERROR else TraceState.OK
    return TraceInfo(trace_id=mlflow_trace_id(format_trace_id(root.context.trace_id)),
                     trace_location=TraceLocation.from_experiment_id(experiment_id),
                     request_time=start // 1_000_000, execution_duration=max(0, end - start) // 1_000_000,
                     state=state, request_preview=_preview(root_inputs(attributes)),
                     response_preview=_preview(root_outputs(attributes)), trace_metadata=metadata, tags=tags)


# ------------------------------------------------------------------------------------------ the exporters
class _TraceWriter(SpanExporter):
    """What both MLflow writers share: the run's ids (read on the export thread), the store (MLflow's store for
    the URI, opened on first use; tests inject a faulty one), one warning for the first failure."""

    def __init__(self, uri: str, ids: Callable[[], tuple[str | None, str | None]], *, store: Any = None,
                 wait_for_ids_s: float = 5.0, open_uri: str | None = None) -> None:
        self.uri = uri                     # without credentials: the one that is logged
        #: the one that is opened: the store's own URI (credentials and all) as the MLflow sink opened it
        self._open_uri = absolute_store_uri(open_uri or uri)
        self._ids = ids
        self._store = store
        self._wait = wait_for_ids_s
        self._closed = threading.Event()
        #: True once this writer logged its warning (the sink's closing summary then does not warn again)
        self.warned = False
        #: MLflow trace ids finalized (root span written and TraceInfo set)
        self.finalized: list[str] = []

    def _get_store(self) -> Any:
        if self._store is None:
            from mlflow.tracking._tracking_service.utils import _get_store

            self._store = _get_store(self._open_uri)
        return self._store

    def _wait_for_ids(self) -> tuple[str | None, str | None]:
        deadline = time.monotonic() + self._wait
        exp_id, run_id = self._ids()
        while exp_id is None and time.monotonic() < deadline and not self._closed.wait(0.1):
            exp_id, run_id = self._ids()
        return exp_id, run_id

    def _finalize(self, roots: Sequence[ReadableSpan], exp_id: str, run_id: str | None) -> None:
        for root in roots:
            info = self._get_store().start_trace(trace_info_for(root, exp_id, run_id))
            self.finalized.append(info.trace_id)

    def _warn_once(self, message: str) -> None:
        text = safe_text(message, None)
        if self.warned:
            log.debug("%s", text)
            return
        self.warned = True
        log.warning("%s", text)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True

    def shutdown(self) -> None:
        self._closed.set()


class MlflowStoreExporter(_TraceWriter):
    """Spans -> the MLflow tracking store of the run (a database store, written through MLflow's store API).

    ``ids`` gives ``(experiment_id, run_id)`` from the MLflow sink's ``TrackingRunOpened``. The first failure
    logs one warning (later ones are retried quietly); a store without span logging (``NotImplementedError``)
    is not asked again.
    """

    def __init__(self, uri: str, ids: Callable[[], tuple[str | None, str | None]], **kw: Any) -> None:
        super().__init__(uri, ids, **kw)
        self._unsupported = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if not spans:
            return SpanExportResult.SUCCESS
        if self._unsupported or self._closed.is_set():
            return SpanExportResult.FAILURE
        exp_id, run_id = self._wait_for_ids()
        if exp_id is None:
            self._warn_once(f"no MLflow experiment is known; {len(spans)} spans are not written to MLflow")
            return SpanExportResult.FAILURE
        try:
            store = self._get_store()
            converted = {(c._trace_id, c.span_id): c for c in to_mlflow_spans(spans)}
            roots = [s for s in spans if s.parent is None]
            for root in roots:
                key = (format_trace_id(root.context.trace_id), format_span_id(root.context.span_id))
                describe_root(converted[key], root)
            store.log_spans(exp_id, list(converted.values()))
            self._finalize(roots, exp_id, run_id)
        except NotImplementedError:
            self._unsupported = True
            self._warn_once(f"the MLflow store {self.uri} does not support span logging; the run's trace stays "
                            "in traces.jsonl only")
            return SpanExportResult.FAILURE
        except Exception as exc:  # noqa: BLE001 - a store failure must never reach the processor or the run
            self._warn_once(f"writing spans to the MLflow store {self.uri} failed ({_brief(exc)}); the run's trace "
                            "stays complete in traces.jsonl")
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS


class MlflowServerFinalizer(_TraceWriter):
    """Server path: ``inner`` (the OTLP exporter to ``/v1/traces``) delivers the spans; once the root span is
    there, the trace is finalized through the server's REST API (``start_trace``: run link, name, previews),
    as with a database store. A failure there costs one warning; the spans stay delivered."""

    def __init__(self, inner: SpanExporter, uri: str, ids: Callable[[], tuple[str | None, str | None]],
                 **kw: Any) -> None:
        super().__init__(uri, ids, **kw)
        self.inner = inner

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        result = self.inner.export(spans)
        roots = [s for s in spans if s.parent is None]
        if result is not SpanExportResult.SUCCESS or not roots or self._closed.is_set():
            return result
        exp_id, run_id = self._ids()
        if exp_id is not None:
            try:
                self._finalize(roots, exp_id, run_id)
            except Exception as exc:  # noqa: BLE001 - the spans are delivered; only the finishing touch failed
                self._warn_once(f"the run's trace is on the MLflow server {self.uri}, but its run link and name "
                                f"could not be set ({_brief(exc)})")
        return result

    def shutdown(self) -> None:
        super().shutdown()
        self.inner.shutdown()


def trace_exporter(uri: str, ids: Callable[[], tuple[str | None, str | None]], shutdown_timeout: float, *,
                   open_uri: str | None = None) -> SpanExporter | None:
    """The exporter that puts a trace in the MLflow store at ``uri`` (``ids`` gives its experiment and run):
    OTLP to a server's ``/v1/traces`` then :class:`MlflowServerFinalizer`, :class:`MlflowStoreExporter` for a
    database store, None (one info line) for a store that takes no traces."""
    from . import exporters as ex

    kind = store_kind(uri)
    if kind == "server":
        timeout = max(1.0, min(ex.DEFAULT_OTLP_TIMEOUT_S, shutdown_timeout))
        return MlflowServerFinalizer(ex.MlflowOtlpExporter(uri, ids, timeout=timeout), uri, ids)
    if kind == "database":
        return MlflowStoreExporter(uri, ids, open_uri=open_uri)
    log.info("the trace is not sent to MLflow: the tracking store %s does not take traces (it stays in "
             "traces.jsonl)", uri.split(":", 1)[0] if ":" in uri else uri)
    return None
