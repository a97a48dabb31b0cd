"""The AMP training loop. It reads top to bottom, emits facts on the event bus and knows no vendor SDK.

One ``Trainer.run()`` call:

1. loads and validates the data (fails fast, before any model is loaded),
2. emits ``RunStarted`` and loads the model,
3. trains: autocast forward, loss with named parts, scaled backward, accumulation, clipping, AdamW,
   linear warm-up then linear decay; every failed batch is classified, reported and skipped safely within
   the error budget; checkpoints every ``save_steps`` and at each epoch end,
4. validates per epoch, runs retrieval evaluation every ``eval_steps`` and at the end,
5. saves the final model in Hugging Face format and emits ``RunFinished``.
"""

from __future__ import annotations

import math
import os
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from . import checkpoint as ckpt_io
from .config import TrainConfig
from .data import Batch, LoadedData, PairCollator, epoch_order, load_training_data
from .errors import (ApplicationError, ConfigError, DataError, DeviceError, ErrorCategory, RunInterrupted,
                     TrainingError, classify, is_out_of_memory)
from .events import (CheckpointSaved, DataLoaded, EpochDone, EpochStarted, ErrorCaught, EvaluationDone,
                     EventBus, Message, ModelLoaded, RetryAttempt, RunFinished, RunStarted, StepDone, now_ns)
from .losses import SpladeLoss, sparsity_stats
from .model import SpladeEncoder
from .recovery import ErrorBudget, retry_listener

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class TrainResult:
    status: str
    global_step: int
    model_path: str | None
    output_dir: str
    final_metrics: dict[str, float] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)
    error: ApplicationError | None = None
    checkpoint: str | None = None


# --------------------------------------------------------------------------------------- device/AMP
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {name!r} requested but CUDA is not available", hint="use --device cpu")
    return dev


def cpu_has_native_bf16() -> bool:
    """bf16 matmuls clearly faster than fp32 on this CPU (measured once; emulated bf16 is slower)."""
    from .cpu import cpu_bf16_is_fast
    return cpu_bf16_is_fast()


def resolve_amp(mode: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 where the device runs it natively, else fp16 with a GradScaler on CUDA, else fp32."""
    if mode == "no":
        return torch.float32
    if mode == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise DeviceError("bf16 requested but this GPU does not support it", hint="use --mixed-precision fp16")
        return torch.bfloat16
    if mode == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# --------------------------------------------------------------------------------------- faults
@dataclass(frozen=True)
class Fault:
    unit: str   # "batch" | "step"
    index: int  # 1-based global batch number, or optimizer step
    kind: str   # oom | nan | overflow | exception | data | interrupt | sigterm
    rank: int | None = None


def parse_faults(specs: tuple[str, ...]) -> list[Fault]:
    """``batch:3:oom``, ``batch:5:nan``, ``batch:5:overflow``, ``batch:7:exception``, ``step:4:interrupt``; prefix
    ``rankR:`` for one rank. ``overflow`` multiplies the loss by 1e30 (still finite): under fp16 its gradients
    overflow, so the GradScaler skips that optimizer step and halves its scale."""
    faults = []
    for spec in specs:
        parts = spec.split(":")
        rank = None
        if parts and parts[0].startswith("rank"):
            rank = int(parts[0][4:])
            parts = parts[1:]
        kinds = {"batch": ("oom", "nan", "overflow", "exception", "data"), "step": ("interrupt", "sigterm", "exception")}
        if len(parts) != 3 or parts[0] not in kinds or not parts[1].isdigit() or parts[2] not in kinds[parts[0]]:
            raise ConfigError(f"bad --inject-fault {spec!r}", field="recovery.inject_faults",
                              hint="use batch:N:{oom,nan,overflow,exception,data} or step:N:{interrupt,sigterm,exception}, "
                                   "optionally prefixed rankR:")
        faults.append(Fault(parts[0], int(parts[1]), parts[2], rank))
    return faults


#: batch faults that corrupt the loss instead of raising: the factor the batch's loss is multiplied by
LOSS_FAULTS = {"nan": float("nan"), "overflow": 1e30}


def _fire_batch_fault(kind: str, batch_no: int) -> None:
    msg = f"injected fault at batch {batch_no}"
    if kind == "oom":
        raise torch.OutOfMemoryError(f"CUDA out of memory ({msg})")
    if kind == "exception":
        raise RuntimeError(msg)
    if kind == "data":
        raise DataError(msg, batch=batch_no)


# --------------------------------------------------------------------------------------- schedule
def linear_schedule(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))
    return factor


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "LayerNorm" in name or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, fused=False)


# --------------------------------------------------------------------------------------- trainer
class Trainer:
    def __init__(self, cfg: TrainConfig, bus: EventBus, *, system_info: dict[str, Any] | None = None,
                 evaluator: Any = None, run_name: str = "", rank: int = 0, world_size: int = 1,
                 dist_ctx: Any = None) -> None:
        self.cfg = cfg
        self.bus = bus
        self.system_info = system_info or {}
        self.evaluator = evaluator
        self.run_name = run_name
        self.rank = rank
        self.world_size = world_size
        self.dist = dist_ctx
        self.faults = [f for f in parse_faults(cfg.recovery.inject_faults) if f.rank in (None, rank)]
        self.budget = ErrorBudget(cfg.recovery.max_skipped_batches, cfg.recovery.max_skipped_fraction,
                                  cfg.recovery.max_consecutive_failures)
        self.global_step = 0
        self.started = False
        self.best_metric: float | None = None
        self.last_checkpoint: str | None = None
        self._boundary: dict[str, Any] = {}
        self._collapse_warned: set[str] = set()
        self.final_metrics: dict[str, float] = {}
        self._stop_signal: int | None = None
        self._saving_on_stop = False

    # ---------------------------------------------------------------------------------- events
    def emit(self, event: Any) -> None:
        self.bus.emit(event)

    def _error_event(self, err: ApplicationError, **kw: Any) -> None:
        self.emit(ErrorCaught.from_error(err, counts=dict(self.budget.by_category), **kw))

    # ---------------------------------------------------------------------------------- entry
    def run(self) -> TrainResult:
        t0_ns, t0 = now_ns(), time.monotonic()
        cfg = self.cfg
        status, error = "FAILED", None
        model_path = None
        prev_handlers = self._install_signal_handlers()
        try:
            with retry_listener(self._on_retry):
                train_data, val_data, resume = self._prepare_data()
                self._setup_plan(train_data)
                self._emit_run_started(t0_ns, resume)
                self._emit_data_loaded(train_data, "train")
                if val_data is not None:
                    self._emit_data_loaded(val_data, "validation")
                self._load_model(resume)
                self._train_loop(train_data, val_data)
                model_path = self._save_final()
                status = "FINISHED"
        except RunInterrupted as intr:
            status = "KILLED"
            error = TrainingError(f"interrupted by {intr}", step=self.global_step)
            self._save_on_stop("interrupt")
        except KeyboardInterrupt:
            status = "KILLED"
            error = TrainingError("interrupted by SIGINT", step=self.global_step)
            self._save_on_stop("interrupt")
        except Exception as exc:  # noqa: BLE001 - the run boundary: classify, report, re-raise typed
            error = classify(exc, ErrorCategory.TRAINING_ERROR, step=self.global_step)
            if self.world_size > 1 and "rank" not in error.context:
                error.context["rank"] = self.rank
                error.message = f"rank {self.rank}: {error.message}"
            if not self.started:
                # Failed before the run could start (e.g. bad data): still give sinks a complete run record.
                self._emit_run_started(t0_ns, None)
            self._error_event(error, step=self.global_step, fatal=True)
        finally:
            for signum, handler in prev_handlers.items():
                signal.signal(signum, handler)
        if not self.started:
            self._emit_run_started(t0_ns, None)
        counters = {f"errors/{k}": v for k, v in self.budget.by_category.items()}
        counters["skipped_batches"] = self.budget.skipped
        self.emit(RunFinished(status=status, step=self.global_step, duration_seconds=time.monotonic() - t0,
                              final_metrics=dict(self.final_metrics), output_dir=str(cfg.output_dir),
                              error=error.to_dict() if error is not None and status == "FAILED" else None,
                              model_path=model_path, counters=counters))
        return TrainResult(status=status, global_step=self.global_step, model_path=model_path,
                           output_dir=str(cfg.output_dir), final_metrics=dict(self.final_metrics),
                           counters=counters, error=error, checkpoint=self.last_checkpoint)

    # ---------------------------------------------------------------------------------- setup
    def _prepare_data(self) -> tuple[LoadedData, LoadedData | None, Path | None]:
        cfg = self.cfg
        resume = ckpt_io.find_resume_checkpoint(cfg.output_dir, cfg.checkpoint.resume)
        log_dir = cfg.log_dir
        bad_path = log_dir / "bad_records.jsonl" if self.rank == 0 else None  # one copy, this run's only
        if bad_path is not None and bad_path.exists():
            bad_path.unlink()
        t = now_ns()
        train = load_training_data(cfg.data.train_file, split=cfg.data.train_split,
                                   on_bad_record=cfg.data.on_bad_record, bad_records_path=bad_path,
                                   max_reported=cfg.data.max_reported_problems)
        self._train_load_ns = (t, now_ns())
        if len(train.examples) < 2:
            raise DataError(f"need at least 2 training examples, found {len(train.examples)}",
                            file_path=train.source)
        if cfg.loss.contrastive_weight == 0:
            unscored = sum(1 for ex in train.examples if ex.scores is None)
            if unscored:
                raise DataError(f"loss.contrastive_weight is 0 (pure distillation) but {unscored} of "
                                f"{len(train.examples)} training examples have no teacher \"scores\"",
                                file_path=train.source, field="scores",
                                hint="mine them with `splade-obs mine-negatives --teacher-scores`, or set "
                                     "loss.contrastive_weight > 0")
        val = None
        if cfg.data.val_file:
            t = now_ns()
            try:
                val = load_training_data(cfg.data.val_file, on_bad_record="skip", bad_records_path=bad_path)
                if not val.examples:
                    raise DataError("validation set has no usable examples", file_path=cfg.data.val_file)
                self._val_load_ns = (t, now_ns())
            except ApplicationError as err:  # graceful degradation: train without validation
                self._error_event(err, fatal=False)
                self.emit(Message(level="WARNING", text=f"validation disabled: {err.one_line()}",
                                  fields={"category": err.category.value}))
                val = None
        return train, val, resume

    def _setup_plan(self, data: LoadedData) -> None:
        o = self.cfg.optim
        per_rank = len(data.examples) // self.world_size
        self.batches_per_epoch = max(1, per_rank // o.batch_size) if per_rank >= o.batch_size else 1
        self.steps_per_epoch = max(1, math.ceil(self.batches_per_epoch / o.gradient_accumulation_steps))
        if o.max_steps:
            self.total_steps = o.max_steps
            self.num_epochs = math.ceil(o.max_steps / self.steps_per_epoch)
        else:
            self.total_steps = o.epochs * self.steps_per_epoch
            self.num_epochs = o.epochs
        warm = o.warmup_steps if o.warmup_steps is not None else int(o.warmup_ratio * self.total_steps)
        self.warmup_steps = min(warm, self.total_steps)
        rw = self.cfg.loss.reg_warmup_steps
        self.reg_warmup_steps = rw if rw is not None else max(1, self.total_steps // 3)

    def _emit_run_started(self, t0_ns: int, resume: Path | None) -> None:
        from .config import redact
        state = ckpt_io.read_trainer_state(resume) if resume else {}
        self.started = True
        traceparent = None
        if self.dist is not None and self.rank != 0:
            traceparent = self.dist.broadcast_object(None)  # rank 0's run span: every rank joins one trace
        self.emit(RunStarted(
            time_ns=t0_ns, run_name=self.run_name, config=redact(self.cfg.to_dict()), system_info=self.system_info,
            total_steps=getattr(self, "total_steps", 0), num_epochs=getattr(self, "num_epochs", 0),
            steps_per_epoch=getattr(self, "steps_per_epoch", 0), start_step=state.get("global_step", 0),
            resumed=resume is not None, output_dir=str(self.cfg.output_dir), log_dir=str(self.cfg.log_dir),
            world_size=self.world_size, tracking_run_id=state.get("mlflow_run_id"), traceparent=traceparent))
        if self.dist is not None and self.rank == 0:
            self.dist.broadcast_object(self.bus.shared.get("otel.traceparent"))

    def _emit_data_loaded(self, data: LoadedData, split: str) -> None:
        start, end = self._train_load_ns if split == "train" else self._val_load_ns
        self.emit(DataLoaded(split=split, source=data.source, num_examples=len(data.examples), digest=data.digest,
                             num_skipped=data.num_skipped, start_ns=start, end_ns=end, fmt=data.fmt))

    def _load_model(self, resume: Path | None) -> None:
        cfg = self.cfg
        self.device = resolve_device(cfg.optim.device if self.dist is None else self.dist.device_name)
        self.amp_dtype = resolve_amp(cfg.optim.mixed_precision, self.device)
        torch.manual_seed(cfg.optim.seed)
        t = now_ns()
        source = str(resume / "model") if resume else cfg.model.name
        self.encoder = SpladeEncoder.from_pretrained(source, device=self.device,
                                                     chunk_size=cfg.model.head_chunk_size)
        if cfg.model.dropout is not None:
            for module in self.encoder.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = cfg.model.dropout
        self.encoder.train()
        self.emit(ModelLoaded(name=cfg.model.name, path=source,
                              num_parameters=sum(p.numel() for p in self.encoder.parameters()),
                              device=str(self.device), amp_dtype=dtype_name(self.amp_dtype), start_ns=t, end_ns=now_ns()))
        pair = PairForward(self.encoder)
        self.model = self.dist.wrap(pair) if self.dist is not None else pair
        o = cfg.optim
        self.optimizer = build_optimizer(self.encoder, o.learning_rate, o.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           linear_schedule(self.warmup_steps, self.total_steps))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.loss_fn = SpladeLoss(cfg.loss.lambda_q, cfg.loss.lambda_d, self.reg_warmup_steps,
                                  cfg.loss.temperature, cfg.loss.distillation, cfg.loss.distillation_weight,
                                  cfg.loss.contrastive_weight, cfg.loss.contrastive_negatives,
                                  cfg.loss.distillation_temperature)
        self.collator = PairCollator(self.encoder.tokenizer, cfg.model.max_query_length, cfg.model.max_doc_length,
                                     num_negatives=cfg.data.num_negatives, seed=cfg.optim.seed)
        self.start_epoch, self.start_batch = 1, 0
        torch.manual_seed(cfg.optim.seed + self.rank)
        if resume:
            state = ckpt_io.load_checkpoint(resume, optimizer=self.optimizer, scheduler=self.scheduler,
                                            scaler=self.scaler, map_location=self.device)
            if state.get("world_size", 1) != self.world_size:
                raise ConfigError(f"checkpoint was written with world size {state.get('world_size', 1)}, "
                                  f"this run has {self.world_size}", file_path=str(resume),
                                  hint="resume with the same number of processes")
            self.global_step = state["global_step"]
            self.start_epoch, self.start_batch = state["epoch"], state["batch_in_epoch"]
            # the FLOPS ramp continues as it was planned, even if --max-steps changed
            self.reg_warmup_steps = state.get("reg_warmup_steps", self.reg_warmup_steps)
            self.loss_fn.reg_warmup_steps = self.reg_warmup_steps
            self.budget.load_state_dict(state["budget"])
            self.best_metric = state.get("best_metric")
            ranks = state.get("_rank_rngs")
            ckpt_io.restore_rng(ranks[self.rank] if ranks and len(ranks) == self.world_size else state["_rng"])
        self._boundary = {"epoch": self.start_epoch, "batch_in_epoch": self.start_batch,
                          "rng": ckpt_io.capture_rng()}

    # ---------------------------------------------------------------------------------- loop
    def _train_loop(self, train: LoadedData, val: LoadedData | None) -> None:
        o = self.cfg.optim
        accum = o.gradient_accumulation_steps
        examples = train.examples
        for epoch in range(self.start_epoch, self.num_epochs + 1):
            if self.global_step >= self.total_steps:
                break
            batches = self._epoch_batches(len(examples), epoch)
            first = self.start_batch if epoch == self.start_epoch else 0
            epoch_t0, epoch_ns = time.monotonic(), now_ns()
            self.emit(EpochStarted(epoch=epoch, num_epochs=self.num_epochs, steps_in_epoch=self.steps_per_epoch))
            stats = _EpochStats()
            acc = _Accumulator()
            for bi in range(first, len(batches)):
                batch_no = (epoch - 1) * len(batches) + bi + 1
                closes_step = acc.count + 1 == accum or bi == len(batches) - 1
                ok = self._micro_batch(examples, batches[bi], epoch, bi, batch_no, acc, closes_step)
                if not ok:
                    self._check_budget(epoch, bi)
                    acc = _Accumulator()
                    self._check_stop()
                    continue
                if closes_step:
                    stepped = self._optimizer_step(acc, epoch, bi, stats)
                    acc = _Accumulator()
                    self._boundary = {"epoch": epoch, "batch_in_epoch": bi + 1, "rng": ckpt_io.capture_rng()}
                    self._check_stop()
                    if stepped:
                        self._after_step(epoch, bi)
                        self._check_stop()
                    if self.global_step >= self.total_steps:
                        break
            self._end_epoch(epoch, epoch_t0, epoch_ns, stats, val, len(batches))
        if self.evaluator is not None and self.rank == 0:
            self._evaluate(self.num_epochs, final=True)

    def _epoch_batches(self, n: int, epoch: int) -> list[list[int]]:
        order = epoch_order(n, self.cfg.optim.seed, epoch)
        if self.world_size > 1:  # equal shares, so every rank runs the same number of batches
            order = order[: n - n % self.world_size][self.rank::self.world_size]
        bs = self.cfg.optim.batch_size
        batches = [order[i:i + bs] for i in range(0, len(order), bs)]
        if len(batches) > 1 and len(batches[-1]) < bs:
            batches.pop()  # equal batches keep in-batch negatives and DDP ranks in step
        return batches

    def _micro_batch(self, examples: list, idx: list[int], epoch: int, bi: int, batch_no: int,
                     acc: "_Accumulator", closes_step: bool) -> bool:
        """Forward, loss and backward of one micro-batch; False when the batch was skipped.

        Under torchrun every rank must skip the same batches, or the collectives pair up wrong (DDP's
        forward itself runs collectives). So the ranks agree on the negatives per query and on failures
        of everything before the forward (faults, collation) and again on a non-finite loss; a failure
        inside the forward, the gathers or the backward cannot be skipped consistently and ends the run.
        """
        start_ns = now_ns()
        fault = self._fault("batch", batch_no)
        chosen = [examples[i] for i in idx]
        k = self.collator.negatives_for(chosen)
        err: Exception | None = None
        batch = None
        try:
            if self.dist is not None:
                k = self.dist.min_int(k)
            if fault is not None and fault.kind not in LOSS_FAULTS:
                _fire_batch_fault(fault.kind, batch_no)
            batch = self.collator(chosen, epoch=epoch, batch_index=bi, num_negatives=k).to(self.device)
        except (KeyboardInterrupt, RunInterrupted):
            raise
        except Exception as exc:  # noqa: BLE001 - the batch-level policy
            if self.dist is None:
                return self._skip_batch(exc, epoch, bi, batch_no, start_ns)
            err = exc
        if not self._ranks_agree(err, epoch, bi, batch_no, start_ns):
            return False
        sync = self.dist is None or closes_step
        with (nullcontext() if sync else self.dist.no_sync(self.model)):  # DDP decides at forward time
            try:
                t_fwd = time.perf_counter()
                with self._autocast():
                    q, d_pos, d_neg = self._forward(batch)
                    out = self._loss(q, d_pos, d_neg, batch)
                loss = out.total
                if fault is not None and fault.kind in LOSS_FAULTS:
                    loss = loss * LOSS_FAULTS[fault.kind]
                if not torch.isfinite(loss):
                    raise TrainingError("non-finite loss; batch skipped without an optimizer step",
                                        loss=float(loss.detach()))
            except (KeyboardInterrupt, RunInterrupted):
                raise
            except Exception as exc:  # noqa: BLE001
                if self.dist is None:
                    return self._skip_batch(exc, epoch, bi, batch_no, start_ns)
                if not isinstance(exc, TrainingError):
                    raise  # a failure inside the forward or a gather: the ranks can no longer agree
                err = exc
            if not self._ranks_agree(err, epoch, bi, batch_no, start_ns):
                return False
            try:
                t_bwd = time.perf_counter()
                self.scaler.scale(loss / self.cfg.optim.gradient_accumulation_steps).backward()
                t_end = time.perf_counter()
            except (KeyboardInterrupt, RunInterrupted):
                raise
            except Exception as exc:  # noqa: BLE001
                if self.dist is not None:
                    raise  # gradients of the ranks are out of step now
                return self._skip_batch(exc, epoch, bi, batch_no, start_ns)
        acc.add(out, batch, q, d_pos, d_neg, t_bwd - t_fwd, t_end - t_bwd, start_ns)
        self.budget.record_ok()
        return True

    def _loss(self, q: torch.Tensor, d_pos: torch.Tensor, d_neg: torch.Tensor | None, batch: Batch) -> Any:
        q, d_pos = q.float(), d_pos.float()
        d_neg = None if d_neg is None else d_neg.float()
        if self.dist is None:
            return self.loss_fn(q, d_pos, d_neg, step=self.global_step, teacher_scores=batch.teacher_scores)
        # In-batch negatives and FLOPS over the global batch: gather (with gradient) from every rank.
        from torch.distributed.nn.functional import all_gather
        all_q = torch.cat(all_gather(q))
        all_pos = torch.cat(all_gather(d_pos))
        docs = d_pos if d_neg is None else torch.cat([d_pos, d_neg.reshape(-1, d_pos.shape[-1])])
        all_docs = torch.cat(all_gather(docs)) if d_neg is not None else all_pos
        return self.loss_fn(q, all_pos, d_neg, step=self.global_step, teacher_scores=batch.teacher_scores,
                            positive_offset=self.rank * q.shape[0], reg_queries=all_q, reg_docs=all_docs)

    def _ranks_agree(self, err: Exception | None, epoch: int, bi: int, batch_no: int, start_ns: int) -> bool:
        """True when this micro-batch succeeded on every rank; otherwise every rank records the skip."""
        if self.dist is None:
            return err is None
        failed = self.dist.gather_failures(classify(err).category if err is not None else None)
        if not failed:
            return True
        if err is not None:
            self._skip_batch(err, epoch, bi, batch_no, start_ns)
        else:  # a peer failed: skip in step with it, counted under the peer's category
            peer, category = failed[0]
            self.optimizer.zero_grad(set_to_none=True)
            self.budget.record_failure(category)
            self._error_event(TrainingError(f"batch skipped because rank {peer} failed it ({category})",
                                            peer_rank=peer, peer_category=category, batch=batch_no),
                              step=self.global_step, epoch=epoch, batch_index=bi, skipped_batch=True,
                              start_ns=start_ns)
        return False

    def _forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        negs = batch.neg_docs if (batch.neg_docs is not None and batch.num_negatives > 0) else None
        q, d_pos, flat = self.model(batch.queries["input_ids"], batch.queries["attention_mask"],
                                    batch.pos_docs["input_ids"], batch.pos_docs["attention_mask"],
                                    None if negs is None else negs["input_ids"],
                                    None if negs is None else negs["attention_mask"])
        d_neg = None if flat is None else flat.view(batch.size, batch.num_negatives, -1)
        return q, d_pos, d_neg

    def _autocast(self) -> Any:
        if self.amp_dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _skip_batch(self, exc: Exception, epoch: int, bi: int, batch_no: int, start_ns: int) -> bool:
        err = classify(exc, ErrorCategory.TRAINING_ERROR, step=self.global_step, epoch=epoch,
                       batch_index=bi, batch=batch_no)
        self.optimizer.zero_grad(set_to_none=True)   # drop partial gradients; GradScaler state untouched
        if is_out_of_memory(exc) and self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.budget.record_failure(err.category)
        self._error_event(err, step=self.global_step, epoch=epoch, batch_index=bi, skipped_batch=True,
                          start_ns=start_ns)
        return False

    def _check_budget(self, epoch: int, bi: int) -> None:
        reason = self.budget.exceeded()
        if reason is None:
            return
        err = self.budget.to_error(reason)
        self._save_checkpoint("error_budget", self._boundary["epoch"], self._boundary["batch_in_epoch"])
        raise err

    def _optimizer_step(self, acc: "_Accumulator", epoch: int, bi: int, stats: "_EpochStats") -> bool:
        o = self.cfg.optim
        t0 = time.perf_counter()
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.encoder.parameters(), o.max_grad_norm)
        if not torch.isfinite(grad_norm) and not self.scaler.is_enabled():
            self.optimizer.zero_grad(set_to_none=True)
            self._skip_batch(TrainingError("non-finite gradient norm; step skipped", grad_norm=float(grad_norm)),
                             epoch, bi, 0, acc.start_ns)
            self._check_budget(epoch, bi)
            return False
        self.scaler.step(self.optimizer)
        self.scaler.update()
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        t_opt = time.perf_counter() - t0
        self.global_step += 1
        end_ns = now_ns()
        duration = max(1e-9, (end_ns - acc.start_ns) / 1e9)
        parts = {k: v / acc.count for k, v in acc.parts.items()}
        loss = acc.loss / acc.count
        if self.dist is not None:  # log the global batch's values, not this rank's share
            keys = sorted(parts)
            vals = self.dist.mean([loss, acc.query_nnz, acc.doc_nnz, acc.flops] + [parts[k] for k in keys])
            loss, acc.query_nnz, acc.doc_nnz, acc.flops = vals[:4]
            parts = dict(zip(keys, vals[4:]))
        stats.add(loss, parts, acc.query_nnz / acc.count, acc.doc_nnz / acc.count, lr)
        self.emit(StepDone(
            step=self.global_step, epoch=epoch, batch_index=bi, loss=loss, parts=parts, learning_rate=lr,
            grad_norm=float(grad_norm), batch_size=acc.size * self.world_size, num_tokens=acc.tokens,
            samples_per_second=acc.size * self.world_size / duration, tokens_per_second=acc.tokens / duration,
            query_nnz=acc.query_nnz / acc.count, doc_nnz=acc.doc_nnz / acc.count, flops=acc.flops / acc.count,
            start_ns=acc.start_ns, end_ns=end_ns,
            timings={"forward": acc.t_forward, "backward": acc.t_backward, "optimizer": t_opt},
            lambda_q=parts.get("lambda_q", 0.0), lambda_d=parts.get("lambda_d", 0.0),
            grad_scale=float(self.scaler.get_scale()) if self.scaler.is_enabled() else None,
            total_steps=self.total_steps))
        self._collapse_guard(acc.query_nnz / acc.count, acc.doc_nnz / acc.count)
        return True

    def _after_step(self, epoch: int, bi: int) -> None:
        fault = self._fault("step", self.global_step)
        if fault is not None:
            if fault.kind == "interrupt":
                raise KeyboardInterrupt
            if fault.kind == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
            if fault.kind == "exception":
                raise TrainingError(f"injected fault after step {self.global_step}", step=self.global_step)
        se = self.cfg.checkpoint.save_steps
        if se and self.global_step % se == 0:
            self._save_checkpoint("save_steps", epoch, bi + 1)
        ev = self.cfg.eval.eval_steps
        if self.evaluator is not None and ev and self.global_step % ev == 0 and self.global_step < self.total_steps:
            self._evaluate(epoch)

    def _collapse_guard(self, q_nnz: float, d_nnz: float) -> None:
        vocab = self.encoder.vocab_size
        for which, nnz in (("query", q_nnz), ("doc", d_nnz)):
            if nnz == 0 and f"{which}-zero" not in self._collapse_warned:
                self._collapse_warned.add(f"{which}-zero")
                self.emit(Message(level="WARNING", text=f"collapse guard: {which} representations are all zero "
                                  f"at step {self.global_step}; lower the FLOPS weights or the learning rate",
                                  fields={"step": self.global_step, "guard": f"{which}_all_zero"}))
            if nnz > 0.5 * vocab and f"{which}-dense" not in self._collapse_warned:
                self._collapse_warned.add(f"{which}-dense")
                self.emit(Message(level="WARNING", text=f"collapse guard: {which} representations are no longer "
                                  f"sparse ({nnz:.0f} of {vocab} terms) at step {self.global_step}",
                                  fields={"step": self.global_step, "guard": f"{which}_dense"}))

    def _end_epoch(self, epoch: int, t0: float, t0_ns: int, stats: "_EpochStats", val: LoadedData | None,
                   num_batches: int) -> None:
        val_loss = self._validate(val, epoch) if val is not None else None
        lr = self.scheduler.get_last_lr()[0]
        extra = stats.means()
        extra["skipped_batches"] = float(self.budget.skipped)
        self.emit(EpochDone(epoch=epoch, num_epochs=self.num_epochs, step=self.global_step,
                            train_loss=stats.mean_loss(), learning_rate=lr,
                            duration_seconds=time.monotonic() - t0, val_loss=val_loss, extra=extra, start_ns=t0_ns))
        self.final_metrics["train_loss"] = stats.mean_loss()
        if val_loss is not None:
            self.final_metrics["val_loss"] = val_loss
        finished_epoch = self._boundary["batch_in_epoch"] >= num_batches
        pos = (epoch + 1, 0) if finished_epoch else (epoch, self._boundary["batch_in_epoch"])
        self._save_checkpoint("epoch_end", *pos)

    @torch.no_grad()
    def _validate(self, val: LoadedData, epoch: int) -> float | None:
        self.model.eval()
        losses = []
        try:
            bs = self.cfg.optim.batch_size
            ex = val.examples
            for i in range(0, len(ex) - 1, bs):
                chunk = ex[i:i + bs]
                if len(chunk) < 2:
                    break
                batch = self.collator(chunk, epoch=0, batch_index=i // bs).to(self.device)
                with self._autocast():
                    q, d_pos, d_neg = self._forward(batch)
                    out = self.loss_fn(q.float(), d_pos.float(), None if d_neg is None else d_neg.float(),
                                       step=self.global_step, teacher_scores=batch.teacher_scores)
                losses.append(float(out.total))
        except Exception as exc:  # noqa: BLE001 - validation is optional: report and go on
            err = classify(exc, ErrorCategory.EVALUATION_ERROR, epoch=epoch, phase="validation")
            self._error_event(err, step=self.global_step, epoch=epoch)
            return None
        finally:
            self.model.train()
        return sum(losses) / len(losses) if losses else None

    def _evaluate(self, epoch: int, final: bool = False) -> None:
        start_ns, t0 = now_ns(), time.monotonic()
        try:
            metrics = self.evaluator.evaluate(self.encoder, amp_dtype=None if self.amp_dtype == torch.float32
                                              else self.amp_dtype)
        except Exception as exc:  # noqa: BLE001 - evaluation is optional: report and go on
            err = classify(exc, ErrorCategory.EVALUATION_ERROR, step=self.global_step, phase="retrieval")
            self._error_event(err, step=self.global_step, epoch=epoch)
            return
        finally:
            self.encoder.train()
        key = self.cfg.eval.save_best_metric
        is_best = False
        if key and key in metrics and (self.best_metric is None or metrics[key] > self.best_metric):
            self.best_metric, is_best = metrics[key], True
        self.emit(EvaluationDone(step=self.global_step, epoch=epoch, split=self.cfg.eval.eval_split,
                                 metrics=metrics, duration_seconds=time.monotonic() - t0, start_ns=start_ns,
                                 is_best=is_best))
        for k, v in metrics.items():
            self.final_metrics[f"eval_{k}"] = v
        if is_best:
            self._save_best(metrics)

    # ---------------------------------------------------------------------------------- checkpoints
    def _trainer_state(self, epoch: int, batch_in_epoch: int) -> dict[str, Any]:
        return {"global_step": self.global_step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                "total_steps": self.total_steps, "reg_warmup_steps": self.reg_warmup_steps,
                "lambda_q": self.cfg.loss.lambda_q, "lambda_d": self.cfg.loss.lambda_d,
                "budget": self.budget.state_dict(), "best_metric": self.best_metric,
                "mlflow_run_id": self.bus.shared.get("mlflow.run_id"), "world_size": self.world_size,
                "seed": self.cfg.optim.seed, "model": self.cfg.model.name, "saved_at_ns": now_ns()}

    def _save_checkpoint(self, reason: str, epoch: int, batch_in_epoch: int) -> None:
        """Rank 0 writes; under torchrun every rank's RNG state goes in too, gathered at the save points all
        ranks reach together (a stop signal reaches ranks at different times: rank 0's state only then)."""
        if not hasattr(self, "optimizer"):
            return
        rank_rngs = None
        if self.dist is not None and reason != "interrupt":
            rank_rngs = self.dist.gather_objects(self._boundary["rng"])
        if self.rank != 0:
            return
        t0, start = time.monotonic(), now_ns()
        path = ckpt_io.save_checkpoint(self.cfg.output_dir, encoder=self.encoder, optimizer=self.optimizer,
                                       scheduler=self.scheduler, scaler=self.scaler,
                                       trainer_state=self._trainer_state(epoch, batch_in_epoch),
                                       rng_state=self._boundary["rng"], keep_last=self.cfg.checkpoint.keep_last,
                                       rank_rng_states=rank_rngs)
        self.last_checkpoint = str(path)
        self.emit(CheckpointSaved(step=self.global_step, epoch=epoch, path=str(path), reason=reason,
                                  duration_seconds=time.monotonic() - t0, start_ns=start))

    def _save_on_stop(self, reason: str) -> None:
        if not self._boundary or not hasattr(self, "optimizer"):
            return
        self._saving_on_stop = True
        try:
            self._save_checkpoint(reason, self._boundary["epoch"], self._boundary["batch_in_epoch"])
        except Exception as exc:  # noqa: BLE001 - report, the stop goes on
            self._error_event(classify(exc, ErrorCategory.FILE_SYSTEM_ERROR, phase="checkpoint on stop"))
        finally:
            self._saving_on_stop = False

    def _save_best(self, metrics: dict[str, float]) -> None:
        if self.rank != 0:
            return
        import json
        t0, start = time.monotonic(), now_ns()
        best = self.cfg.output_dir / "best"
        tmp = self.cfg.output_dir / f".tmp-best-{os.getpid()}"
        self.encoder.save_pretrained(tmp)
        (tmp / "metrics.json").write_text(json.dumps({"step": self.global_step, **metrics}, indent=2))
        ckpt_io.replace_dir(tmp, best)
        self.emit(CheckpointSaved(step=self.global_step, epoch=0, path=str(best), reason="best",
                                  duration_seconds=time.monotonic() - t0, start_ns=start))

    def _save_final(self) -> str | None:
        if self.rank != 0:
            return None
        t0, start = time.monotonic(), now_ns()
        final = self.cfg.output_dir / "final"
        tmp = self.cfg.output_dir / f".tmp-final-{os.getpid()}"
        self.encoder.save_pretrained(tmp)
        ckpt_io.replace_dir(tmp, final)
        self.emit(CheckpointSaved(step=self.global_step, epoch=self.num_epochs, path=str(final), reason="final",
                                  duration_seconds=time.monotonic() - t0, start_ns=start))
        return str(final)

    # ---------------------------------------------------------------------------------- misc
    def _fault(self, unit: str, index: int) -> Fault | None:
        for f in self.faults:
            if f.unit == unit and f.index == index:
                return f
        return None

    def _on_retry(self, info: dict[str, Any]) -> None:
        self.emit(RetryAttempt(**info))

    def _install_signal_handlers(self) -> dict[int, Any]:
        """Ctrl-C and SIGTERM only set a flag; the loop acts on it right after an optimizer step, where the
        state is consistent, so the stop checkpoint resumes exactly. A second signal stops at once, except
        while the stop checkpoint is being written."""
        import threading
        if threading.current_thread() is not threading.main_thread():
            return {}

        def on_signal(signum: int, frame: Any) -> None:
            if self._saving_on_stop:
                return
            if self._stop_signal is not None:
                raise RunInterrupted(signum)
            self._stop_signal = signum

        return {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _check_stop(self) -> None:
        if self._stop_signal is not None:
            raise RunInterrupted(self._stop_signal)


class PairForward(torch.nn.Module):
    """Queries, positives and negatives in one forward call (one call per step is what DDP expects)."""

    def __init__(self, encoder: SpladeEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, q_ids: torch.Tensor, q_mask: torch.Tensor, p_ids: torch.Tensor, p_mask: torch.Tensor,
                n_ids: torch.Tensor | None = None, n_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        q = self.encoder(q_ids, q_mask)
        d_pos = self.encoder(p_ids, p_mask)
        d_neg = self.encoder(n_ids, n_mask) if n_ids is not None else None
        return q, d_pos, d_neg


class _Accumulator:
    """Sums what the micro-batches of one optimizer step report."""

    def __init__(self) -> None:
        self.count = 0
        self.loss = 0.0
        self.parts: dict[str, float] = {}
        self.size = self.tokens = 0
        self.query_nnz = self.doc_nnz = self.flops = 0.0
        self.t_forward = self.t_backward = 0.0
        self.start_ns = 0

    def add(self, out: Any, batch: Batch, q: torch.Tensor, d_pos: torch.Tensor, d_neg: torch.Tensor | None,
            t_fwd: float, t_bwd: float, start_ns: int) -> None:
        if self.count == 0:
            self.start_ns = start_ns
        self.count += 1
        self.loss += float(out.total.detach())
        for k, v in out.parts.items():
            self.parts[k] = self.parts.get(k, 0.0) + float(v)
        self.size += batch.size
        self.tokens += batch.num_tokens
        docs = d_pos if d_neg is None else torch.cat([d_pos, d_neg.reshape(-1, d_pos.shape[-1])])
        qs, ds = sparsity_stats(q.detach()), sparsity_stats(docs.detach())
        self.query_nnz += qs["nnz_mean"]
        self.doc_nnz += ds["nnz_mean"]
        self.flops += float((((q.detach() > 0).float().mean(0)) * ((docs.detach() > 0).float().mean(0))).sum())
        self.t_forward += t_fwd
        self.t_backward += t_bwd


class _EpochStats:
    def __init__(self) -> None:
        self.n = 0
        self.loss = 0.0
        self.sums: dict[str, float] = {}

    def add(self, loss: float, parts: dict[str, float], q_nnz: float, d_nnz: float, lr: float) -> None:
        self.n += 1
        self.loss += loss
        for k, v in {**parts, "query_nnz": q_nnz, "doc_nnz": d_nnz}.items():
            self.sums[k] = self.sums.get(k, 0.0) + v

    def mean_loss(self) -> float:
        return self.loss / self.n if self.n else float("nan")

    def means(self) -> dict[str, float]:
        return {k: v / self.n for k, v in self.sums.items()} if self.n else {}
