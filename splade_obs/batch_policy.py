"""The batch-level error policy: a failed batch is classified, counted against the error budget, reported and
skipped, and the run stops (with a checkpoint) once the budget is spent. Under torchrun every rank skips
the same batches, or the collectives pair up wrong."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .config import RecoveryConfig
from .errors import ApplicationError, ErrorCategory, TrainingError, classify
from .events import ErrorCaught
from .recovery import ErrorBudget


@dataclass(frozen=True)
class Where:
    """Which batch, and when its work began (for the batch span).

    **The numbering rule** (one for flags, logs, spans, ``errors.jsonl`` and MLflow): steps, epochs and batches
    are counted from 1.

    * ``step``: the optimizer step this batch is part of (steps done before it + 1). A batch that fails made
      no step: it carries the step it was going into, and the next good batch then makes that step.
    * ``batch``: the run's micro-batch number, counted from 1 across epochs (a resumed run goes on counting):
      the N of ``--inject-fault batch:N``. Logs say ``batch N``, spans ``splade.batch``, errors.jsonl ``batch``.
    * ``batch_index``: the 0-based position in the epoch, for code only (collation seed, resume position);
      spans show it 1-based as ``splade.batch_in_epoch``.
    """

    step: int
    epoch: int
    batch_index: int
    batch: int
    start_ns: int


class BatchPolicy:
    def __init__(self, recovery: RecoveryConfig, *, emit: Callable[[Any], None], dist: Any = None, rank: int = 0,
                 on_skip: Callable[[Exception], None] = lambda exc: None) -> None:
        self.budget = ErrorBudget(recovery.max_skipped_batches, recovery.max_skipped_fraction,
                                  recovery.max_consecutive_failures)
        self.emit, self.dist, self.rank, self.on_skip = emit, dist, rank, on_skip

    def report(self, err: ApplicationError, **kw: Any) -> None:
        """An :class:`ErrorCaught` with the running counts."""
        self.emit(ErrorCaught.from_error(err, counts=dict(self.budget.by_category),
                                         skipped_batches=self.budget.skipped, **kw))

    def ok(self, batches: int = 1) -> None:
        for _ in range(batches):
            self.budget.record_ok()

    def agree(self, err: Exception | None, where: Where, ok_before: int = 0, ok_after: int = 0) -> bool:
        """True when this batch (or step) succeeded on every rank; otherwise every rank records the skip, a rank
        whose peer failed under the peer's category."""
        if self.dist is None:
            failed = [] if err is None else [(self.rank, "")]
        else:
            failed = self.dist.gather_failures(classify(err).category if err is not None else None)
        if not failed:
            return True
        category = None
        if err is None:
            peer, category = failed[0]
            err = TrainingError(f"batch skipped because rank {peer} failed it ({category})", peer_rank=peer,
                                peer_category=category)
        self.skip(err, where, ok_before, ok_after, category)
        return False

    def skip(self, exc: Exception, where: Where, ok_before: int = 0, ok_after: int = 0,
             category: str | None = None) -> bool:
        """Drop the batch (``on_skip``) and count it, between the good batches of its step before and after it."""
        err = classify(exc, ErrorCategory.TRAINING_ERROR, step=where.step, epoch=where.epoch,
                       batch_index=where.batch_index, batch=where.batch)
        self.on_skip(exc)
        self.ok(ok_before)
        self.budget.record_failure(category or err.category)
        self.ok(ok_after)
        self.report(err, step=where.step, epoch=where.epoch, batch_index=where.batch_index, batch=where.batch,
                    skipped_batch=True, start_ns=where.start_ns)
        return False

    def spent(self) -> TrainingError | None:
        """The error that stops the run once the budget is spent, else None."""
        reason = self.budget.exceeded()
        return None if reason is None else self.budget.to_error(reason)
