"""A real OTLP/HTTP receiver for the tests: ``POST /v1/traces``, ``/v1/metrics`` and ``/v1/logs`` on 127.0.0.1,
protobuf decoded with ``opentelemetry-proto``; spans, metric points, log records and request headers kept in memory.

    with OtlpReceiver() as rx:            # free port, background thread
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": rx.endpoint}
        ...
        rx.wait_for(lambda spans: any(s.name == "train" for s in spans), timeout=10)
        rx.wait_for_metrics(lambda ms: any(m.name == "splade.train.loss" for m in ms))
        rx.metric_snapshot()  # every ReceivedMetric, one per metric per request, in arrival order
        rx.log_snapshot()     # every ReceivedLog

    with OtlpReceiver(protocol="grpc") as rx:   # the same signals over OTLP/gRPC (a real grpc server)
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": rx.endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
"""

from __future__ import annotations

import gzip
import socket
import threading
import time
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest, ExportLogsServiceResponse
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)


def free_port() -> int:
    """A port that was free a moment ago (bind to 0, read it, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [_value(v) for v in any_value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in any_value.kvlist_value.values}
    return getattr(any_value, kind)


def _kv(attrs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in attrs}


@dataclass
class ReceivedSpan:
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    events: list[tuple[str, dict[str, Any]]]
    status_code: int            # 0 unset, 1 ok, 2 error
    status_message: str
    resource: dict[str, Any] = field(default_factory=dict)


@dataclass
class ReceivedMetric:
    """One metric of one export request: ``kind`` is gauge, sum or histogram; ``points`` are (attributes,
    value) pairs, the value a number (gauge, sum) or a dict with count, sum, bounds and counts (histogram)."""

    name: str
    unit: str
    description: str
    kind: str
    points: list[tuple[dict[str, Any], Any]]
    monotonic: bool | None = None
    temporality: int = 0        # 1 delta, 2 cumulative (sums and histograms)
    resource: dict[str, Any] = field(default_factory=dict)
    scope: str = ""


@dataclass
class ReceivedLog:
    body: Any
    severity_text: str
    severity_number: int
    attributes: dict[str, Any]
    trace_id: str               # "" when the record has none
    span_id: str
    time_ns: int
    resource: dict[str, Any] = field(default_factory=dict)
    scope: str = ""


def _number(point: Any) -> Any:
    return getattr(point, point.WhichOneof("value")) if point.WhichOneof("value") else None


def _metric(m: Any, resource: dict[str, Any], scope: str) -> ReceivedMetric:
    kind = m.WhichOneof("data") or ""
    data = getattr(m, kind) if kind else None
    points: list[tuple[dict[str, Any], Any]] = []
    if kind in ("gauge", "sum"):
        points = [(_kv(p.attributes), _number(p)) for p in data.data_points]
    elif kind == "histogram":
        points = [(_kv(p.attributes), {"count": p.count, "sum": p.sum, "bounds": list(p.explicit_bounds),
                                       "counts": list(p.bucket_counts)}) for p in data.data_points]
    return ReceivedMetric(name=m.name, unit=m.unit, description=m.description, kind=kind, points=points,
                          monotonic=data.is_monotonic if kind == "sum" else None,
                          temporality=int(getattr(data, "aggregation_temporality", 0) or 0),
                          resource=resource, scope=scope)


class OtlpReceiver:
    """Collects spans posted to ``/v1/traces``, metrics to ``/v1/metrics`` and log records to ``/v1/logs``;
    start()/stop() or use as a context manager."""

    #: path -> (request class, response class, name of the ingest method)
    SIGNALS = {"/v1/traces": (ExportTraceServiceRequest, ExportTraceServiceResponse, "_ingest"),
               "/v1/metrics": (ExportMetricsServiceRequest, ExportMetricsServiceResponse, "_ingest_metrics"),
               "/v1/logs": (ExportLogsServiceRequest, ExportLogsServiceResponse, "_ingest_logs")}
    #: OTLP/gRPC service (its one method is Export) -> the HTTP path of the same signal
    GRPC_SERVICES = {"opentelemetry.proto.collector.trace.v1.TraceService": "/v1/traces",
                     "opentelemetry.proto.collector.metrics.v1.MetricsService": "/v1/metrics",
                     "opentelemetry.proto.collector.logs.v1.LogsService": "/v1/logs"}

    def __init__(self, port: int | None = None, protocol: str = "http") -> None:
        assert protocol in ("http", "grpc")
        self.protocol = protocol
        self._grpc: Any = None
        self.port = port or free_port()
        self.spans: list[ReceivedSpan] = []
        self.metrics: list[ReceivedMetric] = []
        self.logs: list[ReceivedLog] = []
        self.requests: list[dict[str, str]] = []   # headers of every request (lower-cased names)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "OtlpReceiver":
        if self.protocol == "grpc":
            return self._start_grpc()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server API
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                signal = receiver.SIGNALS.get(self.path.rstrip("/"))
                if signal is None:
                    self.send_error(404)
                    return
                encoding = (self.headers.get("Content-Encoding") or "").lower()
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                try:
                    getattr(receiver, signal[2])(body, {k.lower(): v for k, v in self.headers.items()})
                except Exception:  # noqa: BLE001 - a malformed request is a 400, not a crash
                    self.send_error(400)
                    return
                payload = signal[1]().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="otlp-receiver", daemon=True)
        self._thread.start()
        return self

    def _start_grpc(self) -> "OtlpReceiver":
        """A real gRPC server on 127.0.0.1 with the three OTLP services; bodies are decoded as for HTTP."""
        from concurrent import futures

        import grpc

        def handler(path: str) -> Any:
            def export(body: bytes, context: Any) -> bytes:
                getattr(self, self.SIGNALS[path][2])(body, {k.lower(): v for k, v in context.invocation_metadata()})
                return self.SIGNALS[path][1]().SerializeToString()
            return grpc.unary_unary_rpc_method_handler(export)  # no (de)serializers: raw protobuf bytes

        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self._grpc.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(service, {"Export": handler(path)})
                                             for service, path in self.GRPC_SERVICES.items()])
        self._grpc.add_insecure_port(f"127.0.0.1:{self.port}")
        self._grpc.start()
        return self

    def stop(self) -> None:
        if self._grpc is not None:
            self._grpc.stop(grace=1).wait(5)
            self._grpc = None
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> "OtlpReceiver":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _ingest(self, body: bytes, headers: dict[str, str]) -> None:
        req = ExportTraceServiceRequest()
        req.ParseFromString(body)
        got = []
        for rs in req.resource_spans:
            resource = _kv(rs.resource.attributes)
            for ss in rs.scope_spans:
                for s in ss.spans:
                    got.append(ReceivedSpan(
                        name=s.name, trace_id=s.trace_id.hex(), span_id=s.span_id.hex(),
                        parent_span_id=s.parent_span_id.hex(), start_ns=s.start_time_unix_nano,
                        end_ns=s.end_time_unix_nano, attributes=_kv(s.attributes),
                        events=[(ev.name, _kv(ev.attributes)) for ev in s.events],
                        status_code=int(s.status.code), status_message=s.status.message, resource=resource))
        with self._lock:
            self.requests.append(headers)
            self.spans.extend(got)

    def _ingest_metrics(self, body: bytes, headers: dict[str, str]) -> None:
        req = ExportMetricsServiceRequest()
        req.ParseFromString(body)
        got = [_metric(m, _kv(rm.resource.attributes), sm.scope.name)
               for rm in req.resource_metrics for sm in rm.scope_metrics for m in sm.metrics]
        with self._lock:
            self.requests.append(headers)
            self.metrics.extend(got)

    def _ingest_logs(self, body: bytes, headers: dict[str, str]) -> None:
        req = ExportLogsServiceRequest()
        req.ParseFromString(body)
        got = []
        for rl in req.resource_logs:
            resource = _kv(rl.resource.attributes)
            for sl in rl.scope_logs:
                for r in sl.log_records:
                    got.append(ReceivedLog(body=_value(r.body), severity_text=r.severity_text,
                                           severity_number=int(r.severity_number), attributes=_kv(r.attributes),
                                           trace_id=r.trace_id.hex(), span_id=r.span_id.hex(),
                                           time_ns=r.time_unix_nano, resource=resource, scope=sl.scope.name))
        with self._lock:
            self.requests.append(headers)
            self.logs.extend(got)

    def snapshot(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self.spans)

    def metric_snapshot(self) -> list[ReceivedMetric]:
        with self._lock:
            return list(self.metrics)

    def log_snapshot(self) -> list[ReceivedLog]:
        with self._lock:
            return list(self.logs)

    def wait_for_metrics(self, predicate: Callable[[list[ReceivedMetric]], bool], timeout: float = 10.0) -> bool:
        return _poll(lambda: predicate(self.metric_snapshot()), timeout)

    def wait_for_logs(self, predicate: Callable[[list[ReceivedLog]], bool], timeout: float = 10.0) -> bool:
        return _poll(lambda: predicate(self.log_snapshot()), timeout)

    def wait_for(self, predicate: Callable[[list[ReceivedSpan]], bool], timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.snapshot()):
                return True
            time.sleep(0.05)
        return predicate(self.snapshot())


def _poll(check: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()
