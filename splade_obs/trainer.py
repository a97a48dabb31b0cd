"""The AMP training loop. It reads top to bottom, emits facts on the event bus and knows no vendor SDK.

One ``Trainer.run()`` call:

1. loads and validates the data (fails fast, before any model is loaded),
2. emits ``RunStarted`` and loads the model on the run's device (:class:`~.device.Runtime`, resolved once),
3. trains: autocast forward, loss with named parts, scaled backward, accumulation, clipping, AdamW,
   linear warm-up then linear decay; every failed batch is classified, reported and skipped safely within
   the error budget (:mod:`.batch_policy`); checkpoints every ``save_steps`` and at each epoch end,
4. validates per epoch, runs retrieval evaluation every ``eval_steps`` and at the end,
5. saves the final model in Hugging Face format and emits ``RunFinished``.

Per-step values stay on the device (:mod:`.step_stats`): the one device-to-host copy of an optimizer step is
the finiteness check the batch policy needs; the rest is fetched once per logging point (every
``logging.log_every_steps`` steps, before a checkpoint or an evaluation, at each epoch end and when the run
stops), where every step still gets its own ``StepDone``.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt_io
from .batch_policy import BatchPolicy, Where
from .checkpointing import Checkpointer, StopSignals
from .config import TrainConfig
from . import cpu
from .collate import PairCollator, Prefetch
from .data import LoadedData
from .device import Runtime, resolve_runtime
from .errors import ErrorCategory, RunInterrupted, TrainingError, classify, is_out_of_memory
from .bus import EventBus, RunIds
from .events import (AlertRaised, DataLoaded, EpochDone, EpochStarted, EvaluationDone, Message, ModelLoaded,
                     RetryAttempt, RunFinished, RunStarted, now_ns)
from .faults import FaultPlan
from .losses import SpladeLoss
from .model import SpladeEncoder
from .objective import PairForward, all_docs, batch_loss, encode_batch, validation_loss
from .optim import build_optimizer, build_scheduler
from .plan import EpochClock, RunData, TrainResult, epoch_batches, every, load_run_data, make_plan
from .recovery import retry_listener
from .redaction import safe_text
from .shard import Shard
from .health import HealthMonitor, ScaleWatch, fatal_alert, memory_mb
from .step_stats import StepAccumulator, StepStats, check_finite


class Trainer:
    def __init__(self, cfg: TrainConfig, bus: EventBus, *, system_info: dict[str, Any] | None = None,
                 evaluator: Any = None, run_name: str = "", rank: int = 0, world_size: int = 1,
                 dist_ctx: Any = None, ids: RunIds | None = None, runtime: Runtime | None = None,
                 parent_traceparent: str | None = None) -> None:
        self.cfg, self.bus, self.evaluator, self.run_name = cfg, bus, evaluator, run_name
        self.parent_traceparent = parent_traceparent  # the span this run's span is a child of (``fit``'s stage)
        self.ids = ids if ids is not None else RunIds()
        self.system_info = system_info or {}
        self.rank, self.world_size, self.dist = rank, world_size, dist_ctx
        self.runtime = runtime  # resolved in _load_model when the caller did not
        self.faults = FaultPlan.from_specs(cfg.recovery.inject_faults, rank)
        self.policy = BatchPolicy(cfg.recovery, emit=self.emit, dist=dist_ctx, rank=rank, on_skip=self._drop_gradients)
        self.budget = self.policy.budget
        self.checkpoints = Checkpointer(cfg, self.emit, rank=rank, dist=dist_ctx, barrier=bus.barrier,
                                        run_facts=lambda: {  # what the model cards say
            "final_metrics": self.final_metrics, "system_info": self.system_info,
            "train_means": self.stats.epoch.means() if hasattr(self, "stats") else {}})
        self.stops = StopSignals(agree=dist_ctx.agree_stop if dist_ctx is not None else None)
        self.log_every = cfg.logging.log_every_steps
        self.global_step = 0
        self.started = False
        self.best_metric: float | None = None
        self.final_metrics: dict[str, float] = {}
        self._boundary: dict[str, Any] = {}  # the last consistent point: where a stop checkpoint resumes
        self._epoch: EpochClock | None = None
        self._resume_epoch: dict[str, Any] | None = None  # the checkpoint's statistics of the epoch it stopped in
        #: what the last optimizer step still has to do after it ("save", "eval"): a stop can come first, and a
        #: checkpoint records it, so the resumed run does it before it goes on
        self._after_pending: set[str] = set()
        #: training-health alerts (rank 0 watches the global values); the alert that stops the run, if any
        self.health: HealthMonitor | None = None
        self._alert_stop: AlertRaised | None = None

    def emit(self, event: Any) -> None:
        self.bus.emit(event)
        if self.health is not None:
            self._raise_alerts(self.health.observe(event))

    def _raise_alerts(self, alerts: list[AlertRaised]) -> None:
        for alert in alerts:
            self.bus.emit(alert)
            if alert.fatal and self._alert_stop is None:
                self._alert_stop = alert  # acted on at the next consistent point (_stop_if_budget_spent)

    # ---------------------------------------------------------------------------------- entry
    def run(self) -> TrainResult:
        t0_ns, t0 = now_ns(), time.monotonic()
        status, error, model_path = "FAILED", None, None
        with self.stops:
            try:
                with retry_listener(lambda info: self.emit(RetryAttempt(**info))):
                    data = self._prepare(t0_ns)
                    self._load_model(data.resume)
                    self._train_loop(data.train, data.val)
                    model_path = self.checkpoints.save_model_dir("final", step=self.global_step, epoch=self.num_epochs)
                    status = "FINISHED"
            except (RunInterrupted, KeyboardInterrupt) as intr:
                status = "KILLED"
                error = TrainingError(f"interrupted by {intr if isinstance(intr, RunInterrupted) else 'SIGINT'}",
                                      step=self.global_step)
                self._close_epoch_on_stop()
                self._save_on_stop()
            except Exception as exc:  # noqa: BLE001 - the run boundary: classify, report, re-raise typed
                error = classify(exc, ErrorCategory.TRAINING_ERROR, step=self.global_step)
                if self.world_size > 1 and "rank" not in error.context:
                    error.context["rank"] = self.rank
                    error.message = f"rank {self.rank}: {error.message}"
                if not self.started:  # failed before the run could start: still give sinks a complete run record
                    self._emit_run_started(t0_ns, None)
                self._close_epoch_on_stop()
                self.policy.report(error, step=self.global_step, fatal=True)
            finally:
                if getattr(self, "prefetch", None) is not None:
                    self.prefetch.close()
                if hasattr(self, "_head_pass_before"):
                    cpu.set_head_pass(self._head_pass_before)
        if not self.started:
            self._emit_run_started(t0_ns, None)
        counters = {f"errors/{k}": v for k, v in self.budget.by_category.items()}
        counters["train/skipped_batches"] = self.budget.skipped
        counters.update({f"alerts/{k}": v for k, v in (self.health.counts if self.health else {}).items()})
        if getattr(self, "overflow", None) is not None and self.overflow.skipped:
            counters["train/overflow_steps"] = self.overflow.skipped
        self.emit(RunFinished(status=status, step=self.global_step, duration_seconds=time.monotonic() - t0,
                              final_metrics=dict(self.final_metrics), output_dir=str(self.cfg.output_dir),
                              error=error.to_dict() if error is not None and status == "FAILED" else None,
                              model_path=model_path, counters=counters))
        return TrainResult(status=status, global_step=self.global_step, model_path=model_path,
                           output_dir=str(self.cfg.output_dir), final_metrics=dict(self.final_metrics),
                           counters=counters, error=error, checkpoint=self.checkpoints.last)

    # ---------------------------------------------------------------------------------- setup
    def _prepare(self, t0_ns: int) -> RunData:
        """Read the data (before any model), plan the steps, announce the run and its data."""
        data = load_run_data(self.cfg, self.rank)
        plan = make_plan(self.cfg, len(data.train.examples), self.world_size)
        self.steps_per_epoch, self.total_steps, self.num_epochs = plan.steps_per_epoch, plan.total_steps, plan.num_epochs
        self.warmup_steps, self.reg_warmup_steps = plan.warmup_steps, plan.reg_warmup_steps
        if data.val_error is not None:  # graceful degradation: train without validation
            self.policy.report(data.val_error, fatal=False)
            self.emit(Message(level="WARNING", text=f"validation disabled: {data.val_error.one_line()}",
                              fields={"category": data.val_error.category.value}))
        self._emit_run_started(t0_ns, data.resume)
        self.checkpoints.unusable = frozenset(Path(p) for p, _ in data.skipped_checkpoints)
        for skipped, reason in data.skipped_checkpoints:
            self.emit(Message(level="WARNING", text=f"checkpoint {skipped} is unusable ({reason}); resuming from "
                              f"{data.resume}", fields={"checkpoint": str(skipped), "resume": str(data.resume)}))
        for split, loaded, (start, end) in (("train", data.train, data.train_span), ("validation", data.val, data.val_span)):
            if loaded is not None:
                self.emit(DataLoaded(split=split, source=loaded.source, num_examples=len(loaded.examples),
                                     digest=loaded.digest, num_skipped=loaded.num_skipped, start_ns=start, end_ns=end,
                                     fmt=loaded.fmt))
        ev = self.evaluator
        if ev is not None and self.rank == 0 and getattr(ev, "digest", None):
            self.emit(DataLoaded(split="eval", source=str(ev.source), num_examples=len(ev.query_ids),
                                 digest=ev.digest, fmt="beir"))
        return data

    def _emit_run_started(self, t0_ns: int, resume: Path | None) -> None:
        from .redaction import redact
        state = ckpt_io.read_trainer_state(resume) if resume else {}
        self.started = True
        traceparent = self.parent_traceparent
        if self.dist is not None and self.rank != 0:
            traceparent = self.dist.broadcast_object(None)  # rank 0's run span: every rank joins one trace
        cfg = self.cfg
        self.emit(RunStarted(
            time_ns=t0_ns, run_name=self.run_name, config=redact(cfg.to_dict()), system_info=self.system_info,
            params=cfg.params(), model_name=cfg.model.name, total_steps=getattr(self, "total_steps", 0),
            num_epochs=getattr(self, "num_epochs", 0), steps_per_epoch=getattr(self, "steps_per_epoch", 0),
            start_step=state.get("global_step", 0), resumed=resume is not None, output_dir=str(cfg.output_dir),
            log_dir=str(cfg.log_dir), world_size=self.world_size, tracking_run_id=state.get("mlflow_run_id"),
            traceparent=traceparent))
        if self.dist is not None and self.rank == 0:
            self.dist.broadcast_object(self.ids.traceparent)

    def _load_model(self, resume: Path | None) -> None:
        cfg, o, lc = self.cfg, self.cfg.optim, self.cfg.loss
        if self.runtime is None:
            self.runtime = resolve_runtime(o.device if self.dist is None else self.dist.device_name, o.mixed_precision)
        self.device = self.runtime.device
        torch.manual_seed(o.seed)
        t, source = now_ns(), str(resume / "model") if resume else cfg.model.name
        self.encoder = SpladeEncoder.from_pretrained(source, device=self.device, chunk_size=cfg.model.head_chunk_size)
        for module in self.encoder.modules() if cfg.model.dropout is not None else ():
            if isinstance(module, torch.nn.Dropout):
                module.p = cfg.model.dropout
        self.encoder.train()
        self._head_pass_before = cpu.forced_head_pass()  # put back when the run ends (the pass is process-wide)
        head_pass, masks = cpu.training_kernels(self.encoder, self.device, cfg.model.head_pass, cfg.model.cpu_dropout,
                                                self.runtime.amp_dtype)
        self.emit(ModelLoaded(name=cfg.model.name, path=source, device=str(self.device),
                              num_parameters=sum(p.numel() for p in self.encoder.parameters()),
                              amp_dtype=self.runtime.amp_name, start_ns=t, end_ns=now_ns(), head_pass=head_pass,
                              dropout_masks=masks, attention=str(getattr(getattr(self.encoder.mlm, "config", None),
                                                                         "_attn_implementation", None) or "")))
        pair = PairForward(self.encoder)
        self.model = self.dist.wrap(pair) if self.dist is not None else pair
        self.optimizer = build_optimizer(self.encoder, o.learning_rate, o.weight_decay)
        self.scheduler = build_scheduler(self.optimizer, self.warmup_steps, self.total_steps)
        self.scaler = self.runtime.grad_scaler()
        self.overflow = ScaleWatch(self.scaler)
        self.checkpoints.attach(encoder=self.encoder, optimizer=self.optimizer, scheduler=self.scheduler,
                                scaler=self.scaler)
        self.loss_fn = SpladeLoss(lc.lambda_q, lc.lambda_d, self.reg_warmup_steps, lc.temperature, lc.distillation,
                                  lc.distillation_weight, lc.contrastive_weight, lc.contrastive_negatives,
                                  lc.distillation_temperature)
        self.collator = PairCollator(self.encoder.tokenizer, cfg.model.max_query_length, cfg.model.max_doc_length,
                                     num_negatives=cfg.data.num_negatives, seed=o.seed)
        self.prefetch = Prefetch(self.collator, enabled=cfg.data.prefetch)
        if cfg.health.alerts and self.rank == 0:
            self.health = HealthMonitor(cfg.health, self.encoder.vocab_size)
        self.stats = StepStats(self.device, total_steps=self.total_steps, world_size=self.world_size,
                               steps_per_epoch=self.steps_per_epoch, memory_probe=memory_mb if self.health else None)
        self.start_epoch, self.start_batch = 1, 0
        torch.manual_seed(o.seed + self.rank)
        if resume:
            state = self.checkpoints.restore(resume, world_size=self.world_size, map_location=self.device)
            self.global_step = state["global_step"]
            self.start_epoch, self.start_batch = state["epoch"], state["batch_in_epoch"]
            # the FLOPS ramp continues as it was planned, even if --max-steps changed
            self.reg_warmup_steps = self.loss_fn.reg_warmup_steps = state.get("reg_warmup_steps", self.reg_warmup_steps)
            self.budget.load_state_dict(state["budget"])
            self.best_metric = state.get("best_metric")
            # every number of the run so far: the open epoch's exact sums, the final metrics, the guard's warnings
            self.final_metrics = {k: float(v) for k, v in (state.get("final_metrics") or {}).items()}
            if self.health is not None:
                self.health.load_state_dict(state.get("health"))
            self.overflow.skipped = int(state.get("overflow_steps") or 0)
            self._resume_epoch = state.get("epoch_stats")
            self._after_pending = set(state.get("after_step_pending") or ())
            if self._resume_epoch is None and self.start_batch > 0:
                self.emit(Message(level="WARNING", text=f"checkpoint {resume.name} holds no epoch statistics (written "
                                  f"by an older version): epoch {self.start_epoch}'s means cover only the steps "
                                  f"after step {self.global_step}"))
        self._boundary = {"epoch": self.start_epoch, "batch_in_epoch": self.start_batch, "rng": ckpt_io.capture_rng()}

    # ---------------------------------------------------------------------------------- loop
    def _train_loop(self, train: LoadedData, val: LoadedData | None) -> None:
        o, examples = self.cfg.optim, train.examples
        # a resumed epoch that has not ended yet ends in this run, even with no step left to take
        saved = self._resume_epoch
        open_epoch = bool(saved) and saved.get("epoch") == self.start_epoch and not saved.get("complete")
        for epoch in range(self.start_epoch, self.num_epochs + 1):
            if self.global_step >= self.total_steps and not (open_epoch and epoch == self.start_epoch):
                break
            batches, negatives = epoch_batches(examples, epoch, batch_size=o.batch_size, seed=o.seed, rank=self.rank,
                                               world_size=self.world_size, negatives_for=self.collator.negatives_for,
                                               bucket_batches=self.cfg.data.length_buckets)
            self._begin_epoch(epoch, len(batches))
            if self._after_pending:  # the checkpoint came before its step's own checkpoint or evaluation
                self._after_step(epoch, self.start_batch - 1, replay=True)
            acc = self.stats.accumulator()
            first = self.start_batch if epoch == self.start_epoch else 0
            for bi in range(first if self.global_step < self.total_steps else len(batches), len(batches)):
                where = Where(self.global_step + 1, epoch, bi, (epoch - 1) * len(batches) + bi + 1, now_ns())
                closes_step = acc.count + 1 == o.gradient_accumulation_steps or bi == len(batches) - 1
                upcoming = (bi + 1, [examples[i] for i in batches[bi + 1]], negatives[bi + 1]) \
                    if bi + 1 < len(batches) else None
                if not self._micro_batch([examples[i] for i in batches[bi]], negatives[bi], where, acc, closes_step,
                                         upcoming):
                    self._stop_if_budget_spent()
                    acc = self.stats.accumulator()
                    self.stops.check()
                    continue
                if not closes_step:
                    continue
                stepped = self._optimizer_step(acc, epoch, bi)
                acc = self.stats.accumulator()
                self._boundary = {"epoch": epoch, "batch_in_epoch": bi + 1, "rng": ckpt_io.capture_rng()}
                self._after_pending = {"save", "eval"} if stepped else set()
                if stepped and self._report_due():
                    self._report()
                    self._stop_if_budget_spent()
                self.stops.check()
                if stepped:
                    self._after_step(epoch, bi)
                    self.stops.check()
                if self.global_step >= self.total_steps:
                    break
            self._end_epoch(val)
        if self.evaluator is not None:  # under torchrun every rank has one: they encode a shard each
            self._evaluate(self.num_epochs)

    def _micro_batch(self, chosen: list, k: int, where: Where, acc: StepAccumulator, closes_step: bool,
                     upcoming: tuple[int, list, int] | None = None) -> bool:
        """Forward, loss and backward of one micro-batch; False when the batch was skipped.

        Under torchrun every rank must skip the same batches, or the collectives pair up wrong (DDP's forward
        itself runs collectives). So the ranks agree on failures of everything before the forward (faults,
        collation), and on a non-finite step at the optimizer step; a failure inside the forward, the gathers
        or the backward cannot be skipped consistently and ends the run.
        """
        err, batch = None, None
        try:
            self.faults.before_batch(where.batch)  # raises an injected fault
            batch = self.prefetch.take((where.epoch, where.batch_index), chosen, epoch=where.epoch,
                                       batch_index=where.batch_index, num_negatives=k).to(self.device)
        except (KeyboardInterrupt, RunInterrupted):
            raise
        except Exception as exc:  # noqa: BLE001 - the batch-level policy
            err = exc
        if upcoming is not None:  # tokenized while this batch computes
            self.prefetch.submit((where.epoch, upcoming[0]), upcoming[1], epoch=where.epoch, batch_index=upcoming[0],
                                 num_negatives=upcoming[2])
        try:
            return self._compute(batch, err, where, acc, closes_step)
        finally:
            self.prefetch.settle()  # nothing else tokenizes while the worker does

    def _compute(self, batch: Any, err: Exception | None, where: Where, acc: StepAccumulator,
                 closes_step: bool) -> bool:
        """The ranks' agreement on the collation's outcome, then forward, loss and backward (see above)."""
        if not self.policy.agree(err, where, ok_before=acc.count):
            return False
        try:
            with nullcontext() if self.dist is None or closes_step else self.dist.no_sync(self.model):
                t_fwd = time.perf_counter()  # DDP decides at forward time whether this backward syncs gradients
                with self.runtime.autocast():
                    q, d_pos, d_neg = reps = encode_batch(self.model, batch)
                    out = batch_loss(self.loss_fn, reps, batch, step=self.global_step, rank=self.rank,
                                     distributed=self.dist is not None)
                loss = self.faults.loss(out, where.batch, self.global_step + 1) if self.faults else out.total
                t_bwd = time.perf_counter()
                self.scaler.scale(loss / self.cfg.optim.gradient_accumulation_steps).backward()
                t_end = time.perf_counter()
                if self.faults:
                    self.faults.slow_down(self.global_step + 1, t_end - t_fwd)
        except (KeyboardInterrupt, RunInterrupted):
            raise
        except Exception as exc:  # noqa: BLE001
            if self.dist is not None:
                raise  # inside the forward, a gather or the backward: the ranks can no longer agree
            return self.policy.skip(exc, where, ok_before=acc.count)
        acc.add(out, loss, batch.size, batch.num_tokens, q.detach(), all_docs(d_pos, d_neg).detach(), t_bwd - t_fwd,
                t_end - t_bwd, (where.batch_index, where.batch, where.start_ns))
        return True

    def _optimizer_step(self, acc: StepAccumulator, epoch: int, bi: int) -> bool:
        """Unscale, clip, step; False when the step was skipped.

        The step's one device-to-host copy is the finiteness check of its summed loss (and, without a
        GradScaler, of its gradient norm); under fp16 the GradScaler checks the gradients itself (an
        overflow skips the step and halves the scale). With gradient accumulation a non-finite micro-batch
        makes the whole step non-finite: the step is skipped and counted as one skipped batch, that micro-batch
        (its other micro-batches count as seen, not skipped).
        """
        t0 = time.perf_counter()
        if self.faults:
            self.faults.before_optimizer(self.global_step + 1, self.encoder.parameters())
        clip = lambda: torch.nn.utils.clip_grad_norm_(self.encoder.parameters(), self.cfg.optim.max_grad_norm)
        grad_norm = None if self.scaler.is_enabled() else clip()
        check = check_finite(acc, grad_norm, distributed=self.dist is not None)
        if not check.all_finite:  # every rank skips the step
            bad_bi, batch_no, start_ns = acc.micro_batches[check.at]
            self.policy.agree(check.error, Where(self.global_step + 1, epoch, bad_bi, batch_no, start_ns),
                              ok_before=check.at, ok_after=acc.count - check.at - 1)
            self._stop_if_budget_spent()
            return False
        if grad_norm is None:
            self.scaler.unscale_(self.optimizer)
            grad_norm = clip()
        self.overflow.arm()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self._skipped_by_scaler(epoch, acc.count):
            return False
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.policy.ok(acc.count)
        self.global_step += 1
        scale = self.scaler._get_scale_async() if self.scaler.is_enabled() else None  # a tensor: no copy
        self.stats.push(acc, step=self.global_step, epoch=epoch, batch_index=bi, lr=lr, grad_norm=grad_norm,
                        grad_scale=scale, t_optimizer=time.perf_counter() - t0, end_ns=now_ns())
        return True

    def _skipped_by_scaler(self, epoch: int, batches: int) -> bool:
        """fp16: the GradScaler skipped the step (gradient overflow). As in Hugging Face's Trainer, the scheduler
        and the step counter stay where they are; the health monitor warns once per episode."""
        fell = self.overflow.fell()
        if fell is None:
            return False
        self.optimizer.zero_grad(set_to_none=True)
        self.policy.ok(batches)
        if self.health is not None:
            self._raise_alerts(self.health.overflow(self.global_step + 1, epoch, *fell, self.overflow.skipped))
        return True

    def _after_step(self, epoch: int, bi: int, replay: bool = False) -> None:
        """The step's checkpoint and evaluation when due; ``replay``: what a stop left undone, on resume."""
        if not replay:
            self.faults.after_step(self.global_step)
        if "save" in self._after_pending:
            self._after_pending.discard("save")  # the checkpoint records only what is still to do after it
            if every(self.global_step, self.cfg.checkpoint.save_steps):
                self._save_checkpoint("save_steps", epoch, bi + 1)
        if "eval" in self._after_pending:
            if self.evaluator is not None and every(self.global_step, self.cfg.eval.eval_steps) \
                    and self.global_step < self.total_steps:
                self._evaluate(epoch)
            self._after_pending.discard("eval")

    # ---------------------------------------------------------------------------------- reporting
    def _report_due(self) -> bool:
        """A logging point: the same answer on every rank (the flush runs a collective under torchrun)."""
        s, c = self.global_step, self.cfg
        return (s % self.log_every == 0 or s >= self.total_steps or every(s, c.checkpoint.save_steps)
                or (c.eval.eval_data is not None and every(s, c.eval.eval_steps)))

    def _report(self, reduce: bool = True) -> None:
        for event in self.stats.flush(reduce=reduce):
            self.emit(event)

    def _begin_epoch(self, epoch: int, num_batches: int) -> None:
        saved, self._resume_epoch = self._resume_epoch, None
        if saved is not None and saved.get("epoch") == epoch:  # resumed part-way: the epoch goes on where it was
            self._epoch = EpochClock(epoch, num_batches, time.monotonic() - float(saved.get("elapsed_seconds", 0.0)),
                                 now_ns(), int(saved.get("skipped_at_start", self.budget.skipped)))
            self.stats.start_epoch(saved)
        else:
            self._epoch = EpochClock(epoch, num_batches, time.monotonic(), now_ns(), self.budget.skipped)
            self.stats.start_epoch()
        self.emit(EpochStarted(epoch=epoch, num_epochs=self.num_epochs, steps_in_epoch=self.steps_per_epoch))

    def _end_epoch(self, val: LoadedData | None) -> None:
        ep = self._epoch
        self._report()
        self._stop_if_budget_spent()
        val_loss = self._validate(val, ep.number) if val is not None else None
        done = self._emit_epoch_done(ep, val_loss, complete=True)
        self.final_metrics.update({k: v for k, v in done.metrics().items() if k in ("epoch/loss", "val/loss")})
        batch_in_epoch = self._boundary["batch_in_epoch"]
        pos = (ep.number + 1, 0) if batch_in_epoch >= ep.num_batches else (ep.number, batch_in_epoch)
        self._save_checkpoint("epoch_end", *pos, closes_epoch=ep.number)  # resumes at pos; reports this epoch

    def _close_epoch_on_stop(self) -> None:
        """A stopped run reports its pending steps (this rank's values: no collective) and the partial epoch."""
        ep = self._epoch
        if ep is None or ep.closed:
            return
        with self.stops.stopping():  # a second Ctrl-C does not cut the stop's own report short
            pending = self.stats.pending
            try:
                self._report(reduce=False)
            except Exception as exc:  # noqa: BLE001 - a broken device cannot hand its values over: say so
                self.emit(Message(level="WARNING", text=f"{pending} steps could not be reported: {exc}"))
            if self.stats.epoch.steps:
                self._emit_epoch_done(ep, None, complete=False)
            ep.closed = True

    def _emit_epoch_done(self, ep: EpochClock, val_loss: float | None, complete: bool) -> EpochDone:
        ep.closed, ep.complete = True, complete
        done = EpochDone(epoch=ep.number, num_epochs=self.num_epochs, step=self.global_step,
                         duration_seconds=time.monotonic() - ep.t0, means=self.stats.epoch.means(), val_loss=val_loss,
                         skipped_batches=self.budget.skipped - ep.skipped_at_start,
                         steps_completed=self.stats.epoch.steps, complete=complete, start_ns=ep.start_ns)
        self.emit(done)
        return done

    def _validate(self, val: LoadedData, epoch: int) -> float | None:
        try:
            return validation_loss(self.model, self.loss_fn, self.collator, val.examples,
                                   batch_size=self.cfg.optim.batch_size, device=self.device,
                                   autocast=self.runtime.autocast, step=self.global_step)
        except Exception as exc:  # noqa: BLE001 - validation is optional: report and go on
            err = classify(exc, ErrorCategory.EVALUATION_ERROR, epoch=epoch, phase="validation")
            self.policy.report(err, step=self.global_step, epoch=epoch)
            return None
        finally:
            self.model.train()

    def _evaluate(self, epoch: int) -> None:
        start_ns, t0 = now_ns(), time.monotonic()
        try:
            shard = None if self.dist is None else Shard(self.rank, self.world_size, self.dist.local_rank)
            metrics = self.evaluator.evaluate(self.encoder, amp_dtype=self.runtime.eval_amp_dtype, shard=shard)
        except Exception as exc:  # noqa: BLE001 - evaluation is optional: report and go on
            err = classify(exc, ErrorCategory.EVALUATION_ERROR, step=self.global_step, phase="retrieval")
            self.policy.report(err, step=self.global_step, epoch=epoch)
            return
        finally:
            self.encoder.train()
        key = self.cfg.eval.save_best_metric
        is_best = bool(key and key in metrics and (self.best_metric is None or metrics[key] > self.best_metric))
        if is_best:
            self.best_metric = metrics[key]
        done = EvaluationDone(step=self.global_step, epoch=epoch, split=self.cfg.eval.eval_split, scores=metrics,
                              duration_seconds=time.monotonic() - t0, start_ns=start_ns, is_best=is_best,
                              phases=dict(getattr(self.evaluator, "phases", {}) or {}))
        self.emit(done)
        self.final_metrics.update({k: v for k, v in done.metrics().items() if k != "eval/duration_seconds"})
        if is_best:
            self.checkpoints.save_model_dir("best", step=self.global_step, epoch=epoch, metrics=metrics)

    # ---------------------------------------------------------------------------------- failures, checkpoints
    def _drop_gradients(self, exc: Exception) -> None:
        """A skipped batch's partial gradients go (the GradScaler state is untouched); a CUDA OOM frees the cache."""
        self.optimizer.zero_grad(set_to_none=True)
        if is_out_of_memory(exc) and self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _stop_if_budget_spent(self) -> None:
        """Stop with a checkpoint when the error budget is spent or an alert named by --fail-on-alert fired."""
        err, reason = self.policy.spent(), "error_budget"
        if err is None:
            err, reason = fatal_alert(self._alert_stop, self.dist if self.cfg.health.fail_on_alert else None), "alert"
        if err is not None:
            self._close_epoch_on_stop()
            self._save_checkpoint(reason, self._boundary["epoch"], self._boundary["batch_in_epoch"])
            raise err

    def _save_checkpoint(self, reason: str, epoch: int, batch_in_epoch: int, closes_epoch: int | None = None) -> None:
        if not hasattr(self, "optimizer"):
            return
        state = {"global_step": self.global_step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                 "total_steps": self.total_steps, "reg_warmup_steps": self.reg_warmup_steps,
                 "lambda_q": self.cfg.loss.lambda_q, "lambda_d": self.cfg.loss.lambda_d,
                 "budget": self.budget.state_dict(), "best_metric": self.best_metric,
                 "mlflow_run_id": self.ids.mlflow_run_id, "world_size": self.world_size,
                 "seed": self.cfg.optim.seed, "model": safe_text(self.cfg.model.name), "saved_at_ns": now_ns(),
                 "run_name": safe_text(self.run_name), "reason": reason, "final_metrics": dict(self.final_metrics),
                 "health": self.health.state_dict() if self.health else None,
                 "overflow_steps": self.overflow.skipped, "epoch_stats": self._epoch_state(),
                 "after_step_pending": sorted(self._after_pending)}
        self.checkpoints.save(reason, step=self.global_step, epoch=closes_epoch or epoch, rng=self._boundary["rng"],
                              trainer_state=state)

    def _epoch_state(self) -> dict[str, Any] | None:
        """The open epoch's statistics as reported so far (every checkpoint is written right after a logging
        point, so no step is pending): restored on resume, so its ``EpochDone`` equals an uninterrupted run's."""
        ep = self._epoch
        if ep is None:
            return None
        return {"epoch": ep.number, **self.stats.epoch.state_dict(), "skipped_at_start": ep.skipped_at_start,
                "elapsed_seconds": time.monotonic() - ep.t0, "complete": ep.complete}

    def _save_on_stop(self) -> None:
        if not self._boundary:
            return
        with self.stops.stopping():
            try:
                self._save_checkpoint("interrupt", self._boundary["epoch"], self._boundary["batch_in_epoch"])
            except Exception as exc:  # noqa: BLE001 - report, the stop goes on
                self.policy.report(classify(exc, ErrorCategory.FILE_SYSTEM_ERROR, phase="checkpoint on stop"))
