"""Metrics -> somewhere: the run's resource, the metric readers and exporters, bounded shutdown.

:mod:`.metrics` turns events into measurements; this module decides where they go. Imported only when
OpenTelemetry metrics are on (``tracing.metrics``, the default).

Where metrics go (the same ``--otel-exporter`` as spans):

* ``file`` / ``console`` (default ``file``): one JSON line per export in ``<log-dir>/metrics.jsonl``
  (the SDK's ``MetricsData.to_json`` layout; non-finite numbers written as the strings ``"nan"``,
  ``"inf"``, ``"-inf"``, so a strict JSON parser reads every line). OTLP too when
  ``OTEL_EXPORTER_OTLP_METRICS_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set.
* ``otlp``: the file plus OTLP to the spans' endpoint (``/v1/metrics``; http/protobuf, or grpc with
  ``OTEL_EXPORTER_OTLP_[METRICS_]PROTOCOL=grpc``); ``OTEL_METRICS_EXPORTER=none`` turns OTLP metrics off.
* ``none``: no file, no OTLP (a Prometheus endpoint is still served when asked for).
* Prometheus pull: ``--prometheus-port N`` (bound to ``--prometheus-host``, 127.0.0.1 by default), or
  ``OTEL_METRICS_EXPORTER`` naming ``prometheus`` (``OTEL_EXPORTER_PROMETHEUS_HOST`` / ``_PORT``, 9464).

The file and OTLP readers collect every ``OTEL_METRIC_EXPORT_INTERVAL`` ms (60000 by default) and once
more when the run closes. The provider is private (never the global one) and registers no atexit hook;
its shutdown runs on a daemon thread joined against one deadline, like the spans' ``Pipeline.shutdown``.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (MetricExporter, MetricExportResult, MetricReader, MetricsData,
                                              PeriodicExportingMetricReader)
from opentelemetry.sdk.resources import Resource

from splade_obs.finite import json_safe

from .exporters import DEAD_EXPORTER_GRACE_S, DEFAULT_OTLP_TIMEOUT_S, build_resource, safe_resource

log = logging.getLogger("splade_obs.sinks.otel")

METRICS_ENDPOINT_ENV_VARS = ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
METRICS_PROTOCOL_ENV_VARS = ("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
METRICS_TIMEOUT_ENV_VARS = ("OTEL_EXPORTER_OTLP_METRICS_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT")
DEFAULT_PROMETHEUS_PORT = 9464
#: Resource attributes copied onto every Prometheus series as labels (``mlflow_run_id``, ``splade_run_name``).
PROMETHEUS_RESOURCE_LABELS = ("mlflow.run_id", "splade.run_name")


def metrics_exporter_env(env: Mapping[str, str] = os.environ) -> set[str]:
    """The names in ``OTEL_METRICS_EXPORTER`` (comma-separated, lower case); empty when unset."""
    return {p.strip().lower() for p in env.get("OTEL_METRICS_EXPORTER", "").split(",") if p.strip()}


def otlp_metrics_wanted(exporter: str, env: Mapping[str, str] = os.environ) -> bool:
    """OTLP metrics for ``tracing.exporter``: with ``otlp``, or any exporter but ``none`` when an endpoint env
    var is set (as for spans); never when ``OTEL_METRICS_EXPORTER=none``."""
    names = metrics_exporter_env(env)
    if "none" in names or exporter == "none":
        return False
    return exporter == "otlp" or "otlp" in names or any(env.get(k, "").strip() for k in METRICS_ENDPOINT_ENV_VARS)


def metrics_file_path(log_dir: Path) -> Path:
    return Path(log_dir) / "metrics.jsonl"


def run_resource(service_name: str | None, *, run_name: str | None, mlflow_run_id: str | None,
                 mlflow_experiment_id: str | None, rank: int = 0,
                 env: Mapping[str, str] = os.environ) -> Resource:
    """The spans' resource (:func:`~.exporters.build_resource`, with ``service.instance.id``) plus
    ``splade.run_name``, ``splade.rank``, ``mlflow.run_id`` and ``mlflow.experiment_id`` when known."""
    base = build_resource(service_name, env)
    extra: dict[str, Any] = {"splade.rank": rank}
    for key, value in (("splade.run_name", run_name), ("mlflow.run_id", mlflow_run_id),
                       ("mlflow.experiment_id", mlflow_experiment_id)):
        if value:
            extra[key] = value
    return safe_resource(base.merge(Resource(extra)))  # a run name may quote a secret


# ------------------------------------------------------------------------------------------ exporters
class JsonLinesMetricExporter(MetricExporter):
    """One JSON object per export per line (``MetricsData.to_json`` on one line, strict JSON)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self.path.open("a", encoding="utf-8")
        self._lock = threading.Lock()

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any) -> MetricExportResult:
        doc = json_safe(json.loads(metrics_data.to_json(indent=None)))
        line = json.dumps(doc, allow_nan=False, separators=(",", ":")) + "\n"
        with self._lock:
            if self._fh.closed:
                return MetricExportResult.FAILURE
            self._fh.write(line)
            self._fh.flush()
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        with self._lock:
            if not self._fh.closed:
                self._fh.close()


class CountingMetricExporter(MetricExporter):
    """Wraps a metric exporter: counts exports that succeeded and failed, and knows when one is running."""

    def __init__(self, inner: MetricExporter, name: str) -> None:
        super().__init__(preferred_temporality=inner._preferred_temporality,
                         preferred_aggregation=inner._preferred_aggregation)
        self.inner = inner
        self.name = name
        self.exported = 0
        self.failed = 0
        self.last_ok: bool | None = None
        self.inflight_since: float | None = None

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any) -> MetricExportResult:
        self.inflight_since = time.monotonic()
        try:
            result = self.inner.export(metrics_data, timeout_millis=timeout_millis)
        except Exception as exc:  # noqa: BLE001 - an exporter must never raise into the reader
            log.warning("metric exporter %s raised %s", self.name, type(exc).__name__)
            result = MetricExportResult.FAILURE
        finally:
            self.inflight_since = None
        ok = result is MetricExportResult.SUCCESS
        self.exported += ok
        self.failed += not ok
        self.last_ok = ok
        return result

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self.inner.force_flush(timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self.inner.shutdown(timeout_millis=timeout_millis)

    def looks_dead(self, waited: float, grace: float) -> bool:
        since = self.inflight_since
        if since is not None and time.monotonic() - since > grace:
            return True
        return self.last_ok is False and waited > grace


def build_otlp_metric_exporter(env: Mapping[str, str] = os.environ) -> MetricExporter:
    """The SDK's OTLP metric exporter for the protocol in the env (endpoint, headers, TLS, compression and
    temporality preference are read from ``OTEL_EXPORTER_OTLP_[METRICS_]*`` by the exporter itself)."""
    timeout = None if any(env.get(k) for k in METRICS_TIMEOUT_ENV_VARS) else DEFAULT_OTLP_TIMEOUT_S
    protocol = next((env[k].strip().lower() for k in METRICS_PROTOCOL_ENV_VARS if env.get(k, "").strip()),
                    "http/protobuf")
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcExporter

        return GrpcExporter(timeout=timeout)
    if protocol not in ("http/protobuf", "http"):
        log.warning("OTEL_EXPORTER_OTLP_PROTOCOL=%s is not supported for metrics; using http/protobuf", protocol)
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

    return OTLPMetricExporter(timeout=timeout)


# ------------------------------------------------------------------------------------------ Prometheus
class PrometheusEndpoint:
    """An HTTP endpoint for Prometheus to scrape, bound at once (a busy port fails before the run starts).

    It serves a private ``CollectorRegistry`` (never prometheus_client's global one); :meth:`reader` makes the
    OpenTelemetry reader that fills it, once the provider exists. Until then a scrape gets an empty page.
    """

    def __init__(self, host: str, port: int) -> None:
        from prometheus_client import CollectorRegistry, start_http_server

        self.host, self.port = host, port
        self.registry = CollectorRegistry(auto_describe=True)
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        self.port = self._server.server_port     # the real port when 0 was asked for
        self._reader: MetricReader | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def reader(self) -> MetricReader:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader

        self._reader = PrometheusMetricReader(registry=self.registry,
                                              resource_attribute_filter=PROMETHEUS_RESOURCE_LABELS.__contains__)
        return self._reader

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
            self._thread.join(2.0)


def prometheus_address(port: int | None, host: str, env: Mapping[str, str] = os.environ) -> tuple[str, int] | None:
    """(host, port) to serve: ``--prometheus-port``, else ``OTEL_METRICS_EXPORTER`` naming ``prometheus`` with
    ``OTEL_EXPORTER_PROMETHEUS_HOST`` / ``OTEL_EXPORTER_PROMETHEUS_PORT`` (default 9464); None: not served."""
    if port is not None:
        return host, port
    if "prometheus" not in metrics_exporter_env(env):
        return None
    return (env.get("OTEL_EXPORTER_PROMETHEUS_HOST") or host,
            int(env.get("OTEL_EXPORTER_PROMETHEUS_PORT") or DEFAULT_PROMETHEUS_PORT))


# ------------------------------------------------------------------------------------------ provider
@dataclass
class MetricsPipeline:
    """A private MeterProvider, its readers and the counted exporters behind the pushing ones."""

    provider: MeterProvider
    exporters: list[CountingMetricExporter] = field(default_factory=list)
    readers: list[MetricReader] = field(default_factory=list)

    @classmethod
    def build(cls, resource: Resource, pushed: Sequence[tuple[str, MetricExporter]],
              pulled: Sequence[MetricReader] = (), interval_ms: float | None = None) -> "MetricsPipeline":
        """One periodic reader per pushed exporter (the file first, so its last collection is never stuck
        behind a dead collector's), then the pull readers (Prometheus, tests' in-memory reader)."""
        counted = [CountingMetricExporter(exp, name) for name, exp in pushed]
        readers: list[MetricReader] = [PeriodicExportingMetricReader(c, export_interval_millis=interval_ms)
                                       for c in counted]
        readers.extend(pulled)
        provider = MeterProvider(metric_readers=readers, resource=resource, shutdown_on_exit=False)
        return cls(provider=provider, exporters=counted, readers=readers)

    def counts(self) -> dict[str, dict[str, int]]:
        return {c.name: {"exported": c.exported, "failed": c.failed} for c in self.exporters}

    def shutdown(self, timeout: float) -> bool:
        """Collect once more, export, and stop every reader, returning within ``timeout`` seconds.

        ``MeterProvider.shutdown`` shuts readers down one after the other, and an OTLP export to a dead
        collector retries for its whole timeout, so it runs on a daemon thread joined against one deadline.
        An exporter that looks dead (its export retrying for over ``DEAD_EXPORTER_GRACE_S``, or its latest
        export failed) is given up early, and whatever is still stuck gets its exporter shut down, which
        aborts the OTLP retry back-off. Returns True when everything finished in time.
        """
        start = time.monotonic()
        deadline = start + max(0.0, timeout)
        t = threading.Thread(target=_quiet, args=(self.provider.shutdown,), kwargs={"timeout_millis": timeout * 1000},
                             name="otel-metrics-shutdown", daemon=True)
        t.start()
        while t.is_alive() and time.monotonic() < deadline:
            if any(c.looks_dead(time.monotonic() - start, DEAD_EXPORTER_GRACE_S) for c in self.exporters):
                break
            t.join(min(0.05, max(0.0, deadline - time.monotonic())))
        finished = not t.is_alive()
        stuck = [c for c in self.exporters if c.inflight_since is not None]   # e.g. the SDK's join timed out
        if finished and not stuck:
            return True
        if not finished:
            stuck = stuck or [c for c in self.exporters if c.last_ok is False] or list(self.exporters)
            for c in stuck:
                threading.Thread(target=_quiet, args=(c.inner.shutdown,), daemon=True).start()
            t.join(min(0.2, max(0.0, deadline + 0.2 - time.monotonic())))
        log.warning("metric exporter(s) %s did not finish (%.1fs, bound %.1fs); their last metrics are dropped",
                    ", ".join(c.name for c in stuck), time.monotonic() - start, timeout)
        return False


def _quiet(fn: Any, **kwargs: Any) -> None:
    try:
        fn(**kwargs)
    except Exception as exc:  # noqa: BLE001 - shutdown must never raise into close()
        log.warning("metrics shutdown step failed: %s", type(exc).__name__)
