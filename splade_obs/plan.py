"""What a training run will do before it does it: its data (read and validated first), its step plan and
the batches of each epoch."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import checkpoint as ckpt_io
from .config import TrainConfig
from .data import LoadedData, epoch_order, load_training_data
from .records import Example
from .errors import ApplicationError, DataError
from .events import now_ns


@dataclass
class RunData:
    train: LoadedData
    train_span: tuple[int, int]                 # when it was read (ns)
    val: LoadedData | None = None
    val_span: tuple[int, int] = (0, 0)
    val_error: ApplicationError | None = None   # the validation set could not be used: train without it
    resume: Path | None = None                  # checkpoint to resume from
    #: newer checkpoints ``--resume auto`` passed over as unusable (corrupt or partial), with the reason
    skipped_checkpoints: list[tuple[Path, str]] = field(default_factory=list)


def load_run_data(cfg: TrainConfig, rank: int = 0) -> RunData:
    """Read and check the training (and validation) data; find the checkpoint to resume from."""
    skipped: list[tuple[Path, str]] = []
    resume = ckpt_io.find_resume_checkpoint(cfg.output_dir, cfg.checkpoint.resume, skipped=skipped)
    bad_path = cfg.log_dir / "bad_records.jsonl" if rank == 0 else None  # one copy, this run's only
    if bad_path is not None and bad_path.exists():
        bad_path.unlink()
    t = now_ns()
    train = load_training_data(cfg.data.train_file, split=cfg.data.train_split, on_bad_record=cfg.data.on_bad_record,
                               bad_records_path=bad_path, max_reported=cfg.data.max_reported_problems,
                               beir_negatives=cfg.data.beir_negatives, beir_negatives_depth=cfg.data.beir_negatives_depth)
    out = RunData(train=train, train_span=(t, now_ns()), resume=resume, skipped_checkpoints=skipped)
    if len(train.examples) < 2:
        raise DataError(f"need at least 2 training examples, found {len(train.examples)}", file_path=train.source)
    unscored = sum(1 for ex in train.examples if ex.scores is None) if cfg.loss.contrastive_weight == 0 else 0
    if unscored:
        raise DataError(f"loss.contrastive_weight is 0 (pure distillation) but {unscored} of "
                        f"{len(train.examples)} training examples have no teacher \"scores\"",
                        file_path=train.source, field="scores",
                        hint="mine them with `splade-obs mine-negatives --teacher-scores`, or set "
                             "loss.contrastive_weight > 0")
    if cfg.data.val_file:
        t = now_ns()
        try:
            val = load_training_data(cfg.data.val_file, on_bad_record="skip", bad_records_path=bad_path,
                                     beir_negatives=cfg.data.beir_negatives,
                                     beir_negatives_depth=cfg.data.beir_negatives_depth)
            if not val.examples:
                raise DataError("validation set has no usable examples", file_path=cfg.data.val_file)
            out.val, out.val_span = val, (t, now_ns())
        except ApplicationError as err:  # graceful degradation: the caller reports it and trains without
            out.val_error = err
    return out


@dataclass(frozen=True)
class Plan:
    steps_per_epoch: int
    total_steps: int
    num_epochs: int
    warmup_steps: int        # learning-rate warm-up
    reg_warmup_steps: int    # FLOPS-regularizer ramp


def make_plan(cfg: TrainConfig, num_examples: int, world_size: int = 1) -> Plan:
    o = cfg.optim
    batches_per_epoch = max(1, num_examples // world_size // o.batch_size)
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / o.gradient_accumulation_steps))
    total = o.max_steps or o.epochs * steps_per_epoch
    warm = o.warmup_steps if o.warmup_steps is not None else int(o.warmup_ratio * total)
    rw = cfg.loss.reg_warmup_steps
    return Plan(steps_per_epoch=steps_per_epoch, total_steps=total,
                num_epochs=math.ceil(o.max_steps / steps_per_epoch) if o.max_steps else o.epochs,
                warmup_steps=min(warm, total), reg_warmup_steps=rw if rw is not None else max(1, total // 3))


def epoch_batches(examples: list[Example], epoch: int, *, batch_size: int, seed: int, rank: int = 0,
                  world_size: int = 1, negatives_for: Callable[[list[Example]], int] = lambda exs: 0,
                  bucket_batches: int = 0) -> tuple[list[list[int]], list[int]]:
    """This rank's batches of the epoch (example indices), and for each the hard negatives per query K.

    Every rank gets an equal share cut into equal batches (in-batch negatives and DDP ranks stay in step).
    Under torchrun the ranks must use the same K at a batch index, or the gathers do not match: the smallest
    K of the ranks' batches there. Every rank computes it from the data it holds, without a collective.
    ``bucket_batches`` > 1 groups each window of that many batches by length (:func:`length_buckets`).
    """
    n = len(examples)
    order = epoch_order(n, seed, epoch)
    order = order[: n - n % world_size]
    if bucket_batches > 1:  # on the global batches: rank r's batch b is its share of global batch b, as without
        order = length_buckets(order, examples, batch_size * world_size, bucket_batches, f"{seed}:{epoch}")
    shares = []
    for r in range(world_size):
        share = order[r::world_size]
        batches = [share[i:i + batch_size] for i in range(0, len(share), batch_size)]
        if len(batches) > 1 and len(batches[-1]) < batch_size:
            batches.pop()
        shares.append(batches)
    ks = [min(negatives_for([examples[i] for i in share[b]]) for share in shares) for b in range(len(shares[rank]))]
    return shares[rank], ks


def example_length(example: Example) -> int:
    """What a batch pads to, as characters: the longest of the example's positives (the documents it draws
    from each epoch; its hard negatives are usually cut at the maximum length anyway) plus its query."""
    return len(example.query) + max((len(p) for p in example.positives), default=0)


def length_buckets(share: list[int], examples: list[Example], batch_size: int, window: int,
                   salt: str) -> list[int]:
    """``share`` (the epoch's shuffled order) with each window of ``window`` batches sorted by
    :func:`example_length`, cut into batches, and those batches shuffled within the window: a batch holds
    examples of similar length (less padding), the epoch still mixes lengths from batch to batch, and the
    order depends only on the seed and the epoch (a resumed run replays it). Ties keep the shuffled order; a
    last window shorter than ``window`` batches is bucketed the same way."""
    import random

    rng = random.Random(salt)  # string seeds hash deterministically (not with PYTHONHASHSEED)
    out: list[int] = []
    size = batch_size * window
    for lo in range(0, len(share), size):
        chunk = sorted(share[lo:lo + size], key=lambda i: -example_length(examples[i]))
        batches = [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
        full = [b for b in batches if len(b) == batch_size]
        rng.shuffle(full)
        out.extend(i for b in full + [b for b in batches if len(b) < batch_size] for i in b)
    return out


@dataclass
class TrainResult:
    """What ``Trainer.run`` returns (``run_training`` wraps it in a ``RunResult``)."""

    status: str
    global_step: int
    model_path: str | None
    output_dir: str
    final_metrics: dict[str, float] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)
    error: ApplicationError | None = None
    checkpoint: str | None = None


@dataclass
class EpochClock:
    """The epoch in progress: its number and size, when it began, the skipped batches before it."""

    number: int
    num_batches: int
    t0: float
    start_ns: int
    skipped_at_start: int
    closed: bool = False     # its EpochDone (complete or partial) was emitted
    complete: bool = False   # its complete EpochDone was emitted


def every(step: int, n: int | None) -> bool:
    """``step`` is a multiple of ``n`` (never, when ``n`` is unset)."""
    return bool(n) and step % n == 0
