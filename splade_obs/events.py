"""Typed run events: what the training loop reports, and the canonical names of the quantities they carry.

The training loop only calls ``bus.emit(event)`` (:mod:`splade_obs.bus`); sinks decide where facts go.
Every quantity has one canonical name, declared next to the event that carries it (``METRICS``) and
returned by ``Event.metrics()``; each sink maps those names by one rule (the table in
docs/observability.md is generated from these declarations by :mod:`splade_obs.vocabulary`).

All timestamps are wall-clock ``time.time_ns()`` so spans can be rebuilt after the fact.
"""

from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar


def now_ns() -> int:
    return time.time_ns()


# ---------------------------------------------------------------------------------- metric vocabulary
@dataclass(frozen=True)
class MetricDef:
    """One canonical metric name (or a family: ``{part}``, ``{metric}``... in braces) and what it means.

    The names are MLflow-valid (letters, digits, ``_ - . : /``); every sink derives its own key from the
    canonical name by one rule (see ``docs/observability.md``, generated from these definitions).
    """

    name: str
    unit: str
    description: str

    @property
    def pattern(self) -> re.Pattern[str]:
        return re.compile("^" + re.sub(r"\\\{[A-Za-z_]+\\\}", r"[A-Za-z0-9_.:\\-]+", re.escape(self.name)) + "$")


_NAME_BAD_CHARS = re.compile(r"[^\w\-. :/]")


def metric_name(name: str) -> str:
    """An MLflow-valid name: ``ndcg@10`` -> ``ndcg_at_10``; other odd characters -> ``_``."""
    clean = _NAME_BAD_CHARS.sub("_", name.replace("@", "_at_")).strip("/")
    return re.sub(r"/{2,}", "/", clean) or "_"


# --------------------------------------------------------------------------------------------- events
@dataclass(frozen=True)
class Event:
    kind: ClassVar[str] = "event"
    #: Lifecycle events are never dropped by a full sink queue (they wait a bounded time instead).
    lifecycle: ClassVar[bool] = True
    #: The canonical metric names this event carries (see :meth:`metrics`).
    METRICS: ClassVar[tuple[MetricDef, ...]] = ()
    time_ns: int = field(default_factory=now_ns, kw_only=True)
    rank: int = field(default=0, kw_only=True)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["event"] = self.kind
        return d

    def metrics(self) -> dict[str, float]:
        """The quantities this event reports, by canonical name (empty for events that carry none)."""
        return {}


@dataclass(frozen=True)
class RunStarted(Event):
    kind: ClassVar[str] = "run_started"
    run_name: str
    config: dict[str, Any]              # nested effective config, secrets removed (config.yaml, console)
    system_info: dict[str, Any]
    total_steps: int                    # optimizer steps planned for the whole run
    num_epochs: int
    steps_per_epoch: int
    #: the flattened config as MLflow params (``TrainConfig.params()``: dotted keys, string values, redacted)
    params: dict[str, str] = field(default_factory=dict)
    model_name: str = ""
    start_step: int = 0                 # > 0 when resumed
    resumed: bool = False
    output_dir: str = ""
    log_dir: str = ""
    world_size: int = 1
    #: MLflow run id recorded in the checkpoint this run resumes from, if any.
    tracking_run_id: str | None = None
    #: W3C traceparent of the run span to join (distributed ranks > 0), if any.
    traceparent: str | None = None


@dataclass(frozen=True)
class TrackingRunOpened(Event):
    """The MLflow sink opened (or continued) its run; other sinks link to it (span attributes, exporters)."""

    kind: ClassVar[str] = "tracking_run_opened"
    run_id: str
    experiment_id: str
    tracking_uri: str                   # without credentials
    resumed: bool = False


@dataclass(frozen=True)
class TraceOpened(Event):
    """The OpenTelemetry sink knows the run's trace; other sinks link to it (MLflow tag ``otel.trace_id``)."""

    kind: ClassVar[str] = "trace_opened"
    trace_id: str                       # 32 hex digits
    traceparent: str                    # W3C traceparent of the run span


@dataclass(frozen=True)
class DataLoaded(Event):
    kind: ClassVar[str] = "data_loaded"
    split: str                          # "train" | "validation" | "eval"
    source: str                         # path
    num_examples: int
    digest: str                         # content hash of the file(s)
    num_skipped: int = 0
    start_ns: int = 0
    end_ns: int = 0
    fmt: str = ""                       # "jsonl" | "json" | "beir"


@dataclass(frozen=True)
class ModelLoaded(Event):
    kind: ClassVar[str] = "model_loaded"
    name: str
    path: str
    num_parameters: int
    device: str
    amp_dtype: str                      # "float32" | "float16" | "bfloat16"
    start_ns: int = 0
    end_ns: int = 0
    head_pass: str = ""                 # CPU training's vocabulary pass: "int8", or the plain pass's dtype "bf16" ...
    dropout_masks: str = ""             # CPU dropout masks: "fast" | "torch"; "" elsewhere
    attention: str = ""                 # the backbone's attention implementation: "splade_obs_cpu", "sdpa", "eager"

    def kernels(self) -> dict[str, str]:
        """The kernels the run uses, as ``splade.``-prefixed tag / attribute names: the head pass and dropout
        masks on CPU, the attention implementation on every device (``splade_obs_cpu``: the trainer's own,
        whose padding mask needs no read-back from the device; ``sdpa`` where it was not installed or failed
        its check)."""
        return {f"splade.{k}": v for k, v in (("head_pass", self.head_pass), ("dropout_masks", self.dropout_masks),
                                               ("attention", self.attention)) if v}


@dataclass(frozen=True)
class EpochStarted(Event):
    kind: ClassVar[str] = "epoch_started"
    epoch: int                          # 1-based
    num_epochs: int
    steps_in_epoch: int


@dataclass(frozen=True)
class StepDone(Event):
    """One optimizer step (after gradient accumulation). Values are the global batch's under torchrun.

    The trainer keeps per-step values on the device and emits the StepDone events of several steps at
    once, at each logging point, with each step's own times: sinks see every step, exactly.
    """

    kind: ClassVar[str] = "step_done"
    lifecycle: ClassVar[bool] = False
    METRICS: ClassVar[tuple[MetricDef, ...]] = (
        MetricDef("train/loss", "", "training loss of the step (mean over its micro-batches)"),
        MetricDef("train/{part}", "", "a named part of the loss: base (contrastive), query_reg, doc_reg "
                  "(FLOPS regularizers, weighted), distill, and distill_margin_mse / distill_kl when both "
                  "distillation terms are on"),
        MetricDef("train/lambda_q", "", "query FLOPS-regularizer weight at this step (quadratic warm-up)"),
        MetricDef("train/lambda_d", "", "document FLOPS-regularizer weight at this step (quadratic warm-up)"),
        MetricDef("train/lr", "", "learning rate used by the step"),
        MetricDef("train/grad_norm", "", "gradient norm before clipping"),
        MetricDef("train/grad_scale", "", "fp16 GradScaler scale (fp16 runs only)"),
        MetricDef("train/samples_per_second", "1/s", "training queries per second in the step"),
        MetricDef("train/tokens_per_second", "1/s", "non-padding tokens per second in the step"),
        MetricDef("train/query_nnz", "", "mean non-zero terms per query vector"),
        MetricDef("train/doc_nnz", "", "mean non-zero terms per document vector"),
        MetricDef("train/retrieval_flops", "", "expected retrieval cost of the batch, sum_j p_q(j) p_d(j) "
                  "(share of queries and documents using term j); not the FLOPS regularizer"),
        MetricDef("train/forward_seconds", "s", "forward and loss time of the step"),
        MetricDef("train/backward_seconds", "s", "backward time of the step"),
        MetricDef("train/optimizer_seconds", "s", "unscale, clip and optimizer time of the step"),
        MetricDef("train/epoch", "", "epochs done at the end of the step (step / steps per epoch, fractional): "
                  "an x axis for step charts; not averaged into epoch/*"),
    )
    #: step metrics that are positions, not quantities: no epoch/ mean of them
    NOT_AVERAGED: ClassVar[frozenset[str]] = frozenset({"train/epoch"})
    step: int                           # global optimizer step, 1-based
    epoch: int
    batch_index: int                    # index of the last micro-batch of this step within the epoch
    loss: float
    parts: dict[str, float]             # {"base": .., "query_reg": .., "doc_reg": .., "distill": ..}
    learning_rate: float
    grad_norm: float
    batch_size: int                     # examples in the step (all micro-batches, all ranks)
    num_tokens: int                     # non-padding tokens in the step
    samples_per_second: float
    tokens_per_second: float
    query_nnz: float                    # mean non-zero terms per query vector
    doc_nnz: float
    retrieval_flops: float              # expected retrieval FLOPS of the step's batch
    lambda_q: float = 0.0
    lambda_d: float = 0.0
    start_ns: int = 0
    end_ns: int = 0
    timings: dict[str, float] = field(default_factory=dict)   # seconds: forward, backward, optimizer
    grad_scale: float | None = None
    total_steps: int = 0
    epoch_progress: float | None = None  # step / steps per epoch (None: not known)
    #: process RSS (``rss``) and accelerator memory (``cuda``) in MB at the step's end, read for the health
    #: monitor's memory-growth alert (empty when it is off); not a metric (OTel and MLflow sample memory themselves)
    memory_mb: dict[str, float] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        m = {"train/loss": self.loss}
        m.update({metric_name(f"train/{k}"): v for k, v in self.parts.items()})
        m.update({"train/lambda_q": self.lambda_q, "train/lambda_d": self.lambda_d,
                  "train/lr": self.learning_rate, "train/grad_norm": self.grad_norm,
                  "train/samples_per_second": self.samples_per_second,
                  "train/tokens_per_second": self.tokens_per_second, "train/query_nnz": self.query_nnz,
                  "train/doc_nnz": self.doc_nnz, "train/retrieval_flops": self.retrieval_flops})
        if self.grad_scale is not None:
            m["train/grad_scale"] = self.grad_scale
        m.update({metric_name(f"train/{k}_seconds"): v for k, v in self.timings.items()})
        if self.epoch_progress is not None:
            m["train/epoch"] = self.epoch_progress
        return m


@dataclass(frozen=True)
class ErrorCaught(Event):
    kind: ClassVar[str] = "error_caught"
    METRICS: ClassVar[tuple[MetricDef, ...]] = (
        MetricDef("errors/{CATEGORY}", "", "errors caught so far in this category (DATA_ERROR, ...)"),
        MetricDef("errors/total", "", "errors caught so far, all categories (also logged as 0 by a clean run's "
                  "RunFinished)"),
        MetricDef("train/skipped_batches", "", "batches skipped so far by the batch-error policy"),
    )
    category: str                       # ErrorCategory name
    message: str
    error_type: str                     # class name of the ApplicationError
    exception_type: str | None          # class of the original exception, if any (bare name: ``OutOfMemoryError``)
    exception_message: str | None
    context: dict[str, Any]
    #: the step and batch numbers follow one rule (:class:`splade_obs.batch_policy.Where`): both 1-based; a
    #: failed batch carries the step it was part of and its run-wide number (the N of ``--inject-fault batch:N``)
    step: int | None = None
    epoch: int | None = None
    batch_index: int | None = None      # 0-based position in the epoch (code: resume, collation); never printed
    batch: int | None = None            # the run's batch number, 1-based: what logs, spans and errors.jsonl show
    skipped_batch: bool = False         # the batch was dropped by the batch policy
    fatal: bool = False                 # the run stops because of it
    start_ns: int = 0                   # when the failing unit of work began (for the batch span)
    counts: dict[str, int] = field(default_factory=dict)   # running counters by category
    skipped_batches: int = 0            # running count of skipped batches (this one included)
    #: fully qualified class of the original exception (else of the error): OTel ``exception.type``
    exception_qualified_type: str | None = None
    #: the Python traceback (``errors.stack_trace``, not yet redacted: sinks redact it), None when never raised
    stacktrace: str | None = None

    @classmethod
    def from_error(cls, err: Any, **kw: Any) -> "ErrorCaught":
        from .errors import qualified_type, stack_trace

        d = err.to_dict()
        orig = d.get("original_exception") or {}
        original = getattr(err, "original_exception", None)
        if "batch" not in kw and isinstance(d["context"].get("batch"), int):
            kw["batch"] = d["context"]["batch"]
        kw.setdefault("exception_qualified_type", qualified_type(original if original is not None else err))
        if "stacktrace" not in kw and isinstance(err, BaseException):
            kw["stacktrace"] = stack_trace(err)
        return cls(
            category=d["category"], message=d["message"], error_type=d["type"],
            exception_type=orig.get("type") or d["type"], exception_message=orig.get("message") or d["message"],
            context=d["context"], **kw,
        )

    def metrics(self) -> dict[str, float]:
        m = {metric_name(f"errors/{self.category}"): float(self.counts.get(self.category, 1)),
             "errors/total": float(max(sum(self.counts.values()), 1))}
        if self.skipped_batch:
            m["train/skipped_batches"] = float(self.skipped_batches)
        return m


@dataclass(frozen=True)
class EpochDone(Event):
    """The end of an epoch, or (``complete=False``) the part of one that a stopped run got through.

    ``means`` holds the epoch's aggregates, computed once by the trainer: ``epoch/<x>`` is the mean over the
    epoch's steps of the step metric ``train/<x>``.
    """

    kind: ClassVar[str] = "epoch_done"
    METRICS: ClassVar[tuple[MetricDef, ...]] = (
        MetricDef("epoch/{x}", "", "mean over the epoch's optimizer steps of the step metric train/{x} "
                  "(epoch/loss is the epoch's training loss)"),
        MetricDef("epoch/duration_seconds", "s", "wall time of the epoch (validation included)"),
        MetricDef("epoch/skipped_batches", "", "batches skipped in this epoch"),
        MetricDef("val/loss", "", "validation loss at the end of the epoch (--val-file, or the demo's val.jsonl)"),
    )
    epoch: int
    num_epochs: int
    step: int
    duration_seconds: float
    means: dict[str, float] = field(default_factory=dict)   # {"epoch/loss": .., "epoch/lr": .., ...}
    val_loss: float | None = None
    skipped_batches: int = 0
    steps_completed: int = 0
    complete: bool = True
    start_ns: int = 0

    def metrics(self) -> dict[str, float]:
        m = dict(self.means)
        m["epoch/duration_seconds"] = self.duration_seconds
        m["epoch/skipped_batches"] = float(self.skipped_batches)
        if self.val_loss is not None:
            m["val/loss"] = self.val_loss
        return m


@dataclass(frozen=True)
class EvaluationDone(Event):
    kind: ClassVar[str] = "evaluation_done"
    METRICS: ClassVar[tuple[MetricDef, ...]] = (
        MetricDef("eval/{metric}", "", "retrieval metric on the evaluation split: ndcg_at_10, mrr_at_10, "
                  "recall_at_100, map_at_100, query_nnz, doc_nnz (the evaluator's names made MLflow-valid)"),
        MetricDef("eval/duration_seconds", "s", "wall time of the evaluation"),
    )
    step: int
    epoch: int
    split: str
    scores: dict[str, float]            # the evaluator's own names: {"ndcg@10": .., "mrr@10": .., ...}
    duration_seconds: float
    start_ns: int = 0
    is_best: bool = False
    #: wall-clock ``(start_ns, end_ns)`` of the evaluation's phases, in order: ``encode_docs``,
    #: ``encode_queries``, ``retrieve`` (index, search, metrics); ``RetrievalEvaluator.phases``. They lie
    #: within the evaluation (start_ns .. start_ns + duration); the OTel sink draws them as child spans.
    phases: dict[str, tuple[int, int]] = field(default_factory=dict)

    def phase_seconds(self) -> dict[str, float]:
        """Seconds of each phase, by phase name."""
        return {name: (end - start) / 1e9 for name, (start, end) in self.phases.items()}

    def metrics(self) -> dict[str, float]:
        m = {metric_name(f"eval/{k}"): v for k, v in self.scores.items()}
        m["eval/duration_seconds"] = self.duration_seconds
        return m


@dataclass(frozen=True)
class CheckpointSaved(Event):
    kind: ClassVar[str] = "checkpoint_saved"
    METRICS: ClassVar[tuple[MetricDef, ...]] = (
        MetricDef("checkpoint/duration_seconds", "s", "time to write the checkpoint or model"),
    )
    step: int
    epoch: int
    path: str
    reason: str                         # save_steps | epoch_end | interrupt | error_budget | alert | best | final
    duration_seconds: float
    start_ns: int = 0

    def metrics(self) -> dict[str, float]:
        return {"checkpoint/duration_seconds": self.duration_seconds}


@dataclass(frozen=True)
class RetryAttempt(Event):
    kind: ClassVar[str] = "retry_attempt"
    operation: str
    attempt: int
    max_attempts: int
    delay_seconds: float
    category: str
    message: str


@dataclass(frozen=True)
class SinkDegraded(Event):
    kind: ClassVar[str] = "sink_degraded"
    sink: str
    failures: int
    error_type: str
    message: str


@dataclass(frozen=True)
class Message(Event):
    """A free-form note for humans (warnings about degraded options, collapse guard, ...)."""

    kind: ClassVar[str] = "message"
    level: str                          # "INFO" | "WARNING" | ...
    text: str
    fields: dict[str, Any] = field(default_factory=dict)


#: training-health alert categories (:mod:`splade_obs.health`), in the order the docs list them
ALERT_CATEGORIES = ("loss_spike", "grad_explosion", "nonfinite_loss", "throughput_drop", "sparsity_collapse",
                    "sparsity_dense", "memory_growth", "grad_overflow")


@dataclass(frozen=True)
class AlertRaised(Event):
    """A training-health alert (:mod:`splade_obs.health`): the run's own events show it going wrong.

    Raised once per episode: an alert of a category fires when its condition starts and again only after
    the condition has been clear for a while (``health.cooldown_steps``).
    """

    kind: ClassVar[str] = "alert_raised"
    METRICS: ClassVar[tuple[MetricDef, ...]] = (
        MetricDef("alerts/{category}", "", "training-health alerts raised so far in this category (loss_spike, "
                  "grad_explosion, nonfinite_loss, throughput_drop, sparsity_collapse, sparsity_dense, "
                  "memory_growth, grad_overflow)"),
        MetricDef("alerts/total", "", "training-health alerts raised so far, all categories"),
    )
    category: str                       # one of ALERT_CATEGORIES
    message: str                        # one line for humans, with the numbers
    step: int                           # the optimizer step it was seen at
    epoch: int | None = None
    value: float | None = None          # the observed quantity (loss, grad norm, samples/s, nnz, MB, count)
    threshold: float | None = None      # the bound it crossed
    counts: dict[str, int] = field(default_factory=dict)   # alerts raised so far by category (this one included)
    fatal: bool = False                 # --fail-on-alert names this category: the run stops with a checkpoint

    def metrics(self) -> dict[str, float]:
        return {f"alerts/{self.category}": float(self.counts.get(self.category, 1)),
                "alerts/total": float(max(sum(self.counts.values()), 1))}


@dataclass(frozen=True)
class RunFinished(Event):
    kind: ClassVar[str] = "run_finished"
    METRICS: ClassVar[tuple[MetricDef, ...]] = (
        MetricDef("run/duration_seconds", "s", "wall time of the run (this process, since its start)"),
        MetricDef("train/overflow_steps", "", "optimizer steps the fp16 GradScaler skipped (gradient overflow): "
                  "no update, not counted as steps (fp16 runs that overflowed only)"),
    )
    status: str                         # "FINISHED" | "FAILED" | "KILLED"
    step: int
    duration_seconds: float
    #: the last value of each epoch/*, val/* and eval/* metric, by canonical name
    final_metrics: dict[str, float] = field(default_factory=dict)
    error: dict[str, Any] | None = None # ApplicationError.to_dict() when FAILED
    output_dir: str = ""
    model_path: str | None = None
    #: final counts by canonical name: errors/<CATEGORY>, train/skipped_batches, alerts/<category>
    counters: dict[str, int] = field(default_factory=dict)

    @property
    def errors_total(self) -> int:
        """Errors caught in the run, all categories (0 for a clean run)."""
        return sum(v for k, v in self.counters.items() if k.startswith("errors/") and k != "errors/total")

    def health(self, skipped_batches: int = 0, sinks_degraded: int = 0) -> str:
        """``splade.health`` (the MLflow tag, the root span's attribute): failed, stopped, degraded (batches
        skipped, errors caught or a sink lost: the sinks' own counts may add to the trainer's) or ok."""
        if self.status in ("FAILED", "KILLED"):
            return "failed" if self.status == "FAILED" else "stopped"
        skipped = max(skipped_batches, int(self.counters.get("train/skipped_batches", 0)))
        return "degraded" if skipped or self.errors_total or sinks_degraded else "ok"

    @property
    def alerts(self) -> dict[str, int]:
        """Training-health alerts raised in the run, by category (empty for a healthy run)."""
        return {k.split("/", 1)[1]: v for k, v in self.counters.items()
                if k.startswith("alerts/") and k != "alerts/total"}

    def metrics(self) -> dict[str, float]:
        m = {k: float(v) for k, v in self.counters.items()}
        m["errors/total"] = float(self.errors_total)
        m["run/duration_seconds"] = self.duration_seconds
        return m


EVENT_TYPES: dict[str, type[Event]] = {
    c.kind: c for c in (RunStarted, TrackingRunOpened, TraceOpened, DataLoaded, ModelLoaded, EpochStarted,
                        StepDone, ErrorCaught, EpochDone, EvaluationDone, CheckpointSaved, RetryAttempt,
                        SinkDegraded, Message, AlertRaised, RunFinished)
}

#: Every canonical metric (or family), in the order of the events that carry them.
METRIC_VOCABULARY: tuple[tuple[type[Event], MetricDef], ...] = tuple(
    (cls, m) for cls in EVENT_TYPES.values() for m in cls.METRICS)


def metric_def(name: str) -> MetricDef | None:
    """The definition a canonical name belongs to (exact names win over families), or None."""
    for _, m in METRIC_VOCABULARY:
        if m.name == name:
            return m
    for _, m in METRIC_VOCABULARY:
        if "{" in m.name and m.pattern.match(name):
            return m
    return None
