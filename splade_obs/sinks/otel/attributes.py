"""Span attribute names and values: the one naming rule for metrics, and what may leave the process.

Every metric an event carries (``Event.metrics()``, canonical names such as ``train/loss``) becomes an
attribute of its span named by :func:`attribute_name`: ``splade.`` + the canonical name with ``/`` as
``.`` (``train/loss`` -> ``splade.train.loss``, ``errors/DATA_ERROR`` -> ``splade.errors.DATA_ERROR``).
Other attributes (``splade.step``, ``splade.status``, ``error.category``...) are named where they are set.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Mapping

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from splade_obs.events import CheckpointSaved, EpochDone, EvaluationDone, Event, RunFinished, StepDone
from splade_obs.redaction import safe_text, secret_values

#: Longest string attribute value; longer text is cut.
MAX_STR = 1000

#: Which span carries the metrics of which event (the root also gets RunFinished's final metrics and counters).
METRIC_SPANS: dict[str, type[Event]] = {
    "batch": StepDone, "epoch": EpochDone, "evaluation": EvaluationDone, "checkpoint": CheckpointSaved,
    "train": RunFinished,
}


@lru_cache(maxsize=4096)
def attribute_name(canonical: str) -> str:
    """The span attribute of a canonical metric name: ``train/loss`` -> ``splade.train.loss``."""
    return "splade." + canonical.replace("/", ".")


def metric_attributes(metrics: Mapping[str, Any]) -> dict[str, float]:
    """``{canonical: value}`` -> ``{attribute_name(canonical): float(value)}`` (a value that is no number is left
    out: a metric attribute is always numeric, never the text of some object)."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        try:
            out[attribute_name(k)] = float(v)
        except (TypeError, ValueError):
            continue
    return out


def attrs(values: Mapping[str, Any], redact: bool = True) -> dict[str, Any]:
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
            text = safe_text(text, secrets)
        out[k] = text[:MAX_STR]
    return out


def error_status(description: str) -> Status:
    return Status(StatusCode.ERROR, safe_text(description, None)[:200])


def traceparent(ctx: trace.SpanContext) -> str:
    """The W3C ``traceparent`` header of a span context."""
    return f"00-{trace.format_trace_id(ctx.trace_id)}-{trace.format_span_id(ctx.span_id)}-{int(ctx.trace_flags):02x}"


def interval(start_ns: int, end_ns: int, fallback_end: int, duration_s: float = 0.0) -> tuple[int, int]:
    """(start, end) of a span from an event's times; missing ends fall back, never end before start."""
    end = end_ns or fallback_end
    start = start_ns or (end - int(duration_s * 1e9) if duration_s else end)
    return start, max(start, end)
