"""LogSink: turns run events into human log lines on the ``splade_obs.trainer`` logger.

The lines reach the console and the log files through :mod:`splade_obs.logging_setup`; each carries
structured fields (``step``, ``epoch``, ``category``, ``context``, ``event``...) via ``extra=`` so the
JSON log stays machine-readable. The first lines read like the seed's example (``Starting training for 3
epochs``, ``Epoch 1/3``, ``Training loss: 0.0692``, ``Validation loss: 0.0815``), each next to a fuller
line. Step lines are throttled (every ``every_n_steps`` steps, plus the first and the last) so the log does
not grow by one line per step. Steps and batches are numbered from 1 by the
rule of :class:`splade_obs.batch_policy.Where` (``skipped batch [..] (step 3, batch 3)`` for
``--inject-fault batch:3``); a non-finite value prints as ``nan`` / ``inf`` and reaches the JSON log as the
string ``"nan"`` / ``"inf"`` (:mod:`splade_obs.finite`).
"""

from __future__ import annotations

import logging
from typing import Any

from ..bus import Sink
from ..events import (AlertRaised, CheckpointSaved, DataLoaded, EpochDone, EpochStarted, ErrorCaught, EvaluationDone,
                      Message, ModelLoaded, RetryAttempt, RunFinished, RunStarted, SinkDegraded, StepDone)

TRAIN_LOGGER = "splade_obs.train"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"
    return str(value)


def _location(context: dict[str, Any]) -> str:
    """``file:line`` (or ``file``) from an error context, empty when unknown."""
    path = context.get("file_path") or context.get("path")
    if not path:
        return ""
    line = context.get("line_number")
    return f"{path}:{line}" if line is not None else str(path)


class LogSink(Sink):
    name = "console"
    scope = "rank"
    threaded = False  # logging handlers are cheap at this rate (one line per N steps)

    def __init__(self, every_n_steps: int = 50, logger: logging.Logger | None = None) -> None:
        self.every_n_steps = max(1, int(every_n_steps))
        self.log = logger or logging.getLogger(TRAIN_LOGGER)
        self.total_steps = 0
        self.num_epochs = 0

    def _emit(self, level: int, msg: str, event: Any, **fields: Any) -> None:
        # stacklevel=2: the record's function/line name the on_<kind> hook, not this helper
        self.log.log(level, msg, extra={"event": event.kind, **fields}, stacklevel=2)

    # lifecycle ----------------------------------------------------------------------------------------
    def on_run_started(self, e: RunStarted) -> None:
        self.total_steps, self.num_epochs = e.total_steps, e.num_epochs
        cfg, si = e.config or {}, e.system_info or {}
        model, optim = cfg.get("model", {}), cfg.get("optim", {})
        amp = si.get("mixed_precision") or optim.get("mixed_precision")  # the effective mode when known
        resumed = f", resumed at step {e.start_step}" if e.resumed else ""
        self._emit(logging.INFO, f"Starting training for {e.num_epochs} epoch{'' if e.num_epochs == 1 else 's'}",
                   e, step=e.start_step, run_name=e.run_name)
        self._emit(logging.INFO,
                   f"Run {e.run_name} started: model={model.get('name')} epochs={e.num_epochs} "
                   f"steps={e.total_steps} ({e.steps_per_epoch}/epoch) batch_size={optim.get('batch_size')} "
                   f"lr={_fmt(optim.get('learning_rate'))} mixed_precision={amp} "
                   f"world_size={e.world_size}{resumed}; output={e.output_dir}",
                   e, step=e.start_step, run_name=e.run_name)
        if si:
            gpus = ", ".join(si.get("gpu_names") or []) or "none"
            self._emit(logging.INFO,
                       f"System: Python {si.get('python_version')}, torch {si.get('torch_version')}, "
                       f"{si.get('cpu_count_logical')} CPUs, {si.get('memory_total_gb')} GB RAM, GPUs: {gpus}",
                       e, system_info=si)

    def on_data_loaded(self, e: DataLoaded) -> None:
        skipped = f" ({e.num_skipped} bad records skipped)" if e.num_skipped else ""
        self._emit(logging.INFO, f"Loaded {e.num_examples} {e.split} examples from {e.source}{skipped}", e,
                   split=e.split, num_examples=e.num_examples, num_skipped=e.num_skipped)

    def on_model_loaded(self, e: ModelLoaded) -> None:
        kernels = "".join(f", {k[7:].replace('_', ' ')} {v}" for k, v in e.kernels().items())
        self._emit(logging.INFO, f"Model {e.name} loaded: {e.num_parameters:,} parameters on {e.device} "
                                 f"({e.amp_dtype}{kernels})", e, device=e.device, amp_dtype=e.amp_dtype,
                   head_pass=e.head_pass, dropout_masks=e.dropout_masks, attention=e.attention)

    def on_epoch_started(self, e: EpochStarted) -> None:
        self.num_epochs = e.num_epochs
        self._emit(logging.INFO, f"Epoch {e.epoch}/{e.num_epochs}", e, epoch=e.epoch)

    def on_step_done(self, e: StepDone) -> None:
        total = e.total_steps or self.total_steps
        if not (e.step == 1 or e.step % self.every_n_steps == 0 or (total and e.step == total)):
            return
        parts = " ".join(f"{k}={_fmt(v)}" for k, v in e.parts.items())
        self._emit(logging.INFO,
                   f"Step {e.step}/{total or '?'} | loss={_fmt(e.loss)} {parts} | lr={e.learning_rate:.3e} | "
                   f"grad_norm={_fmt(e.grad_norm)} | {e.samples_per_second:.1f} samples/s "
                   f"{e.tokens_per_second:.0f} tok/s | nnz q={e.query_nnz:.1f} d={e.doc_nnz:.1f}",
                   e, step=e.step, epoch=e.epoch, metrics=e.metrics())

    def on_epoch_done(self, e: EpochDone) -> None:
        loss = e.means.get("epoch/loss")
        # the seed's two lines first (4 decimals), then the full one
        for label, value in (("Training loss", loss), ("Validation loss", e.val_loss)):
            if value is not None:
                self._emit(logging.INFO, f"{label}: {value:.4f}", e, step=e.step, epoch=e.epoch)
        val = f" val/loss={_fmt(e.val_loss)}" if e.val_loss is not None else ""
        state = "done" if e.complete else f"stopped after {e.steps_completed} steps"
        self._emit(logging.INFO,
                   f"Epoch {e.epoch}/{e.num_epochs} {state}: epoch/loss={_fmt(loss)}{val} "
                   f"duration={e.duration_seconds:.1f}s",
                   e, step=e.step, epoch=e.epoch, metrics=e.metrics())

    def on_evaluation_done(self, e: EvaluationDone) -> None:
        metrics = " ".join(f"{k}={_fmt(v)}" for k, v in e.scores.items())
        best = " (best so far)" if e.is_best else ""
        self._emit(logging.INFO, f"Evaluation on {e.split} at step {e.step}: {metrics}{best} "
                                 f"[{e.duration_seconds:.1f}s]",
                   e, step=e.step, epoch=e.epoch, split=e.split, metrics=e.metrics())

    def on_checkpoint_saved(self, e: CheckpointSaved) -> None:
        self._emit(logging.INFO, f"Checkpoint saved at step {e.step} ({e.reason}): {e.path} "
                                 f"[{e.duration_seconds:.1f}s]", e, step=e.step, epoch=e.epoch, path=e.path)

    # problems -----------------------------------------------------------------------------------------
    def on_error_caught(self, e: ErrorCaught) -> None:
        where = _location(e.context)
        at = []
        if where:
            at.append(where)
        if e.step is not None:
            at.append(f"step {e.step}")
        # 1-based, the N of --inject-fault batch:N (the rule: splade_obs.batch_policy.Where)
        batch = e.batch if e.batch is not None else e.context.get("batch")
        if batch is not None:
            at.append(f"batch {batch}")
        elif e.batch_index is not None:
            at.append(f"batch {e.batch_index + 1} of epoch {e.epoch}")
        loc = f" ({', '.join(at)})" if at else ""
        if e.fatal:
            level, what = logging.ERROR, "fatal error"
        elif e.skipped_batch:
            level, what = logging.WARNING, "skipped batch"
        else:
            level, what = logging.WARNING, "error"
        self._emit(level, f"{what} [{e.category}]{loc}: {e.message.splitlines()[0] if e.message else ''}", e, step=e.step, epoch=e.epoch,
                   category=e.category, context=e.context, error_type=e.error_type,
                   exception_type=e.exception_type, batch=batch, batch_index=e.batch_index, fatal=e.fatal,
                   skipped_batch=e.skipped_batch)

    def on_retry_attempt(self, e: RetryAttempt) -> None:
        self._emit(logging.WARNING, f"Retrying {e.operation} (attempt {e.attempt}/{e.max_attempts}) in "
                                    f"{e.delay_seconds:.1f}s after [{e.category}]: {e.message}",
                   e, category=e.category, operation=e.operation, attempt=e.attempt)

    def on_sink_degraded(self, e: SinkDegraded) -> None:
        self._emit(logging.WARNING, f"Sink {e.sink} disabled after {e.failures} consecutive failures "
                                    f"({e.error_type}: {e.message}); training continues",
                   e, sink=e.sink, failures=e.failures)

    def on_alert_raised(self, e: AlertRaised) -> None:
        stop = " (--fail-on-alert: the run stops)" if e.fatal else ""
        self._emit(logging.WARNING, f"alert [{e.category}] {e.message}{stop}", e, alert=e.category, step=e.step,
                   epoch=e.epoch, value=e.value, threshold=e.threshold, fatal=e.fatal)

    def on_message(self, e: Message) -> None:
        level = logging.getLevelName(e.level.upper())
        self._emit(level if isinstance(level, int) else logging.INFO, e.text, e, fields=e.fields)

    def on_run_finished(self, e: RunFinished) -> None:
        level = {"FINISHED": logging.INFO, "KILLED": logging.WARNING}.get(e.status, logging.ERROR)
        metrics = " ".join(f"{k}={_fmt(v)}" for k, v in e.final_metrics.items())
        msg = f"Run finished with status {e.status} at step {e.step} after {e.duration_seconds:.1f}s"
        if metrics:
            msg += f": {metrics}"
        if e.error:
            first = (e.error.get("message") or "").splitlines()
            msg += f" — [{e.error.get('category')}] {first[0] if first else ''}"
        if e.model_path:
            msg += f"; model saved to {e.model_path}"
        self._emit(level, msg, e, step=e.step, status=e.status, final_metrics=e.final_metrics,
                   counters=e.counters)
