"""Span attribute names and values: the one naming rule for metrics, and what may leave the process.

Every metric an event carries (``Event.metrics()``, canonical names such as ``train/loss``) becomes an
attribute of its span named by :func:`attribute_name`: ``splade.`` + the canonical name with ``/`` as
``.`` (``train/loss`` -> ``splade.train.loss``, ``errors/DATA_ERROR`` -> ``splade.errors.DATA_ERROR``).
Other attributes (``splade.step``, ``splade.status``, ``error.category``...) are named where they are set.

Values (:func:`attrs`): a non-finite float is written as the string ``"nan"`` / ``"inf"`` / ``"-inf"``
(:mod:`splade_obs.finite`), never as a bare ``NaN`` that makes the trace JSON invalid; every string is redacted
and cut at :data:`MAX_STR` characters (:data:`LONG_TEXT` keys, such as ``exception.stacktrace``, at
:data:`MAX_LONG_STR`, keeping the end: the innermost frames and the error line).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Mapping

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from splade_obs.events import (AlertRaised, CheckpointSaved, EpochDone, EvaluationDone, Event, RetryAttempt,
                               RunFinished, SinkDegraded, StepDone)
from splade_obs.finite import finite_or_text
from splade_obs.redaction import safe_text, secret_values

#: Longest string attribute value; longer text is cut.
MAX_STR = 1000
#: Attributes that hold long text (a stack trace), and how much of it is kept (its end).
LONG_TEXT = frozenset({"exception.stacktrace"})
MAX_LONG_STR = 8000

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
    """OTel attribute values must be str/bool/int/float: drop None, stringify the rest; a non-finite float
    becomes ``"nan"`` / ``"inf"`` / ``"-inf"`` (the rule of :mod:`splade_obs.finite`).

    Every string is redacted (errors, messages and paths come from event text and go to traces.jsonl,
    collectors and MLflow); ``redact=False`` only for the per-batch span, whose only string is a fixed word.
    """
    out: dict[str, Any] = {}
    secrets: list[str] | None = None
    for k, v in values.items():
        if v is None:
            continue
        if isinstance(v, float):
            out[k] = finite_or_text(v)
            continue
        if isinstance(v, (bool, int)):
            out[k] = v
            continue
        text = v if isinstance(v, str) else str(v)
        if redact:
            if secrets is None:
                secrets = secret_values()
            text = safe_text(text, secrets)
        out[k] = cut(text, MAX_LONG_STR) if k in LONG_TEXT else text[:MAX_STR]
    return out


def cut(text: str, limit: int) -> str:
    """``text`` within ``limit`` characters, keeping its end (where a stack trace names the error)."""
    if len(text) <= limit:
        return text
    marker = "...[cut]...\n"
    return marker + text[-(limit - len(marker)):]


def batch_span_name(step: int | None) -> str:
    """``batch 17``: a batch span is named by its optimizer step (a failed batch: the step it was part of)."""
    return "batch" if step is None else f"batch {step}"


def span_kind(name: str) -> str:
    """The kind of a span by its name (``batch 17`` -> ``batch``; other names are their own kind)."""
    return name.split(" ", 1)[0]


def run_outcome(e: RunFinished, errors: Mapping[str, int], skipped: int, sinks_degraded: int) -> dict[str, Any]:
    """The root's outcome attributes: ``splade.health`` (failed | stopped | degraded | ok, as MLflow's
    ``splade.health`` tag), ``splade.degraded`` (a batch was skipped), ``splade.skipped_batches`` and
    ``splade.errors_by_category`` (``DATA_ERROR=2,TRAINING_ERROR=1``), ``splade.alerts_by_category``
    (``loss_spike=1``, training-health alerts). The trainer's final counters win over
    what the sink counted from ``ErrorCaught`` events (a resumed run's counters include earlier errors)."""
    by_cat = dict(errors)
    for key, n in e.counters.items():
        if key.startswith("errors/") and key != "errors/total":
            cat = key.split("/", 1)[1]
            by_cat[cat] = max(by_cat.get(cat, 0), int(n))
    skipped = max(skipped, int(e.counters.get("train/skipped_batches", 0)))
    health = e.health(skipped, sinks_degraded + sum(by_cat.values()))  # errors only this sink counted, too
    summary = ",".join(f"{k}={v}" for k, v in sorted(by_cat.items()) if v)
    alerts = ",".join(f"{k}={v}" for k, v in sorted(e.alerts.items()) if v)
    return {"splade.health": health, "splade.degraded": skipped > 0, "splade.skipped_batches": skipped,
            "splade.errors_by_category": summary or None, "splade.alerts_by_category": alerts or None}


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


#: EvaluationDone.phases -> (child span name, attributes): the evaluation span's ``encode`` / ``retrieve`` children
EVAL_PHASE_SPANS: dict[str, tuple[str, dict[str, str]]] = {
    "encode_docs": ("encode", {"splade.eval.input": "documents"}),
    "encode_queries": ("encode", {"splade.eval.input": "queries"}),
    "retrieve": ("retrieve", {}),
}


def eval_phase_span(phase: str, step: int) -> tuple[str, dict[str, Any]]:
    """The child span of an evaluation phase: ``encode`` (documents or queries), ``retrieve``, else the phase's name."""
    name, values = EVAL_PHASE_SPANS.get(phase, (phase, {}))
    return name, {"splade.step": step, "splade.eval.phase": phase, **values}


# ------------------------------------------------------------------------------------------- span events
def alert_attributes(e: AlertRaised) -> dict[str, Any]:
    """The ``splade.alert`` span event of a training-health alert."""
    return {"alert.category": e.category, "splade.alert.message": e.message, "splade.step": e.step,
            "splade.epoch": e.epoch, "splade.alert.value": e.value, "splade.alert.threshold": e.threshold,
            "splade.alert.fatal": e.fatal, "splade.alert.count": e.counts.get(e.category, 1)}


def retry_attributes(e: RetryAttempt) -> dict[str, Any]:
    """The ``splade.retry`` span event of a retried transient fault."""
    return {"splade.retry.operation": e.operation, "splade.retry.attempt": e.attempt,
            "splade.retry.max_attempts": e.max_attempts, "splade.retry.delay_s": e.delay_seconds,
            "error.category": e.category, "exception.message": e.message}


def degraded_attributes(e: SinkDegraded) -> dict[str, Any]:
    """The ``splade.sink_degraded`` span event of a sink the bus stopped calling."""
    return {"splade.sink.name": e.sink, "splade.sink.failures": e.failures, "exception.type": e.error_type,
            "exception.message": e.message}
