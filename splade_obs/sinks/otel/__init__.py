"""OpenTelemetry: run events -> one trace per run.

* :mod:`.sink` — :class:`OtelSink` (events -> spans) and its :class:`OtelOptions`;
* :mod:`.attributes` — :func:`attribute_name`, the one rule that names metric attributes
  (``train/loss`` -> ``splade.train.loss``), and which span carries which event's metrics;
* :mod:`.exporters` — where spans go (``traces.jsonl``, OTLP, MLflow ``/v1/traces``), the private tracer
  provider and its bounded parallel shutdown;
* :mod:`.mlflow_export` — the run's trace in MLflow: through MLflow's store API for a database store (the default
  sqlite one), the run link and name for a server; :func:`mlflow_trace_id` / :func:`mlflow_trace_ui_path` name
  and link the trace as MLflow stores and shows it;
* :mod:`.sampling` — :class:`BatchSampler`, which batches get a span.

Nothing here reads the run's config: the sink gets :class:`OtelOptions` and learns the rest from events.
"""

from .attributes import METRIC_SPANS, attribute_name
from .exporters import (
    CountingExporter,
    JsonLinesSpanExporter,
    MlflowOtlpExporter,
    Pipeline,
    PresetIdGenerator,
    build_exporters,
    build_pipeline,
    build_resource,
    sdk_disabled,
    trace_file_path,
)
from .mlflow_export import (
    MlflowServerFinalizer,
    MlflowStoreExporter,
    mlflow_trace_id,
    mlflow_trace_ui_path,
)
from .sampling import BatchSampler
from .sink import OtelOptions, OtelSink

__all__ = [
    "METRIC_SPANS", "BatchSampler", "CountingExporter", "JsonLinesSpanExporter", "MlflowOtlpExporter",
    "MlflowServerFinalizer", "MlflowStoreExporter", "OtelOptions", "OtelSink", "Pipeline", "PresetIdGenerator",
    "attribute_name", "build_exporters", "build_pipeline", "build_resource", "mlflow_trace_id",
    "mlflow_trace_ui_path", "sdk_disabled", "trace_file_path",
]
