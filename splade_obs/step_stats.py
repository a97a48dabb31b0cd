"""Step statistics: kept on the device while training, fetched once per logging point.

Per micro-batch, :class:`StepAccumulator` adds the loss, its parts, the sparsity of the representations
(non-zero terms per query and per document, the expected retrieval FLOPS) as device tensors: nothing is
copied to the host. At each optimizer step :meth:`StepStats.push` appends the step's row (those sums, the
gradient norm, the GradScaler scale) to an on-device buffer and keeps the host-side facts next to it (step,
times, learning rate, token counts). At a logging point :meth:`StepStats.flush` stacks the buffer, sums it
over the ranks with one ``all_reduce`` under torchrun, copies it to the host with one ``tolist()`` and
returns one :class:`StepDone` per buffered step, each with that step's own number, times and values, exactly
the values a per-step report would have had. The epoch's means (``EpochDone.means``) are computed here from
the same rows; the training-health alerts (:mod:`splade_obs.health`) read the StepDone events.

A flush when the run stops (``reduce=False``) skips the ``all_reduce``: the ranks do not stop at the same
moment, so a collective there could hang. Under torchrun those last steps then carry this rank's own values.

Timings on an accelerator: nothing waits for the device inside a micro-batch, so ``forward`` / ``backward``
seconds are the host's time to queue that work; the step waits at its finiteness check (after clipping), so
``optimizer`` seconds include what the device still had to finish, and ``start_ns`` .. ``end_ns`` spans it all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .errors import TrainingError
from .events import Event, StepDone
from .losses import LossOutput, SpladeLoss, nnz_mean

PARTS = SpladeLoss.PART_NAMES
#: the summed columns of a row (the ranks' values are averaged at a flush); then grad_norm and grad_scale
SUMMED = ("loss", *PARTS, "query_nnz", "doc_nnz", "retrieval_flops")
_GRAD_NORM, _GRAD_SCALE = len(SUMMED), len(SUMMED) + 1


def retrieval_flops(q: torch.Tensor, docs: torch.Tensor) -> torch.Tensor:
    """Expected retrieval cost of a batch, ``sum_j p_q(j) p_d(j)`` (share of queries / documents using term j)."""
    with torch.no_grad():
        return ((q > 0).float().mean(0) * (docs > 0).float().mean(0)).sum()


class StepAccumulator:
    """What the micro-batches of one optimizer step add up to: device tensors plus host counters."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.count = 0                       # micro-batches in the step
        self.size = self.tokens = 0          # examples and non-padding tokens (host ints from the collator)
        self.t_forward = self.t_backward = 0.0
        self.micro_batches: list[tuple[int, int, int]] = []  # (index in epoch, global number, start_ns)
        self.lambda_q = self.lambda_d = 0.0
        self.part_counts: dict[str, int] = {}
        self.sums: torch.Tensor | None = None           # SUMMED columns, on the device
        self.backprop_loss: torch.Tensor | None = None  # sum of the losses backpropagated (injected faults included)
        self.first_bad: torch.Tensor | None = None      # position of the first non-finite micro-batch loss, or -1

    @property
    def start_ns(self) -> int:
        return self.micro_batches[0][2]

    def add(self, out: LossOutput, loss: torch.Tensor, size: int, tokens: int, q: torch.Tensor, docs: torch.Tensor,
            t_forward: float, t_backward: float, where: tuple[int, int, int]) -> None:
        """One micro-batch: ``loss`` is what was backpropagated, ``where`` its (index, number, start_ns)."""
        with torch.no_grad():
            zero = out.total.new_zeros(())
            row = torch.stack([out.total.detach(), *(out.parts.get(k, zero) for k in PARTS),
                               nnz_mean(q), nnz_mean(docs), retrieval_flops(q, docs)]).to(self.dtype)
            lossd = loss.detach().to(self.dtype)
            here = torch.where(torch.isfinite(lossd), -1.0, float(self.count)).to(self.dtype)
            if self.count == 0:
                self.sums, self.backprop_loss, self.first_bad = row, lossd, here
            else:
                self.sums, self.backprop_loss = self.sums + row, self.backprop_loss + lossd
                self.first_bad = torch.where(self.first_bad < 0, here, self.first_bad)
        self.micro_batches.append(where)
        self.count += 1
        self.size += size
        self.tokens += tokens
        self.t_forward += t_forward
        self.t_backward += t_backward
        self.lambda_q, self.lambda_d = out.lambda_q, out.lambda_d
        for k in out.parts:
            self.part_counts[k] = self.part_counts.get(k, 0) + 1


@dataclass(frozen=True)
class Finiteness:
    all_finite: bool                # every rank's step is finite
    error: TrainingError | None     # this rank's non-finite value
    at: int                         # position of the micro-batch to blame in the step


def check_finite(acc: StepAccumulator, grad_norm: torch.Tensor | None, distributed: bool = False) -> Finiteness:
    """The finiteness check of a step's summed loss (and gradient norm, when given): the step's one
    device-to-host copy, after one ``all_reduce`` under torchrun so that the ranks skip together."""
    loss = acc.backprop_loss
    vals = loss.reshape(1) if grad_norm is None else torch.stack([loss, grad_norm.to(loss.dtype)])
    ok = torch.isfinite(vals).all().to(vals.dtype).reshape(1)
    if distributed:
        import torch.distributed as tdist
        tdist.all_reduce(ok, op=tdist.ReduceOp.MIN)
    flag, first_bad, loss_v, *grad_v = torch.cat([ok, acc.first_bad.reshape(1), vals]).tolist()
    if first_bad >= 0:
        return Finiteness(False, TrainingError("non-finite loss; batch skipped without an optimizer step",
                                               loss=loss_v, nonfinite=True), int(first_bad))
    if not math.isfinite(loss_v) or (grad_v and not math.isfinite(grad_v[0])):
        return Finiteness(False, TrainingError("non-finite gradient norm; step skipped",
                                               grad_norm=grad_v[0] if grad_v else loss_v, nonfinite=True),
                          acc.count - 1)
    return Finiteness(bool(flag), None, acc.count - 1)


@dataclass
class _StepFacts:
    """The host-side facts of a buffered step."""

    step: int
    epoch: int
    batch_index: int
    count: int
    size: int
    tokens: int
    start_ns: int
    end_ns: int
    timings: dict[str, float]
    lr: float
    lambda_q: float
    lambda_d: float
    part_counts: dict[str, int]
    scaled: bool
    memory_mb: dict[str, float]


@dataclass
class EpochMeans:
    """``epoch/<x>`` = mean over the epoch's reported steps of ``train/<x>``, summed as the steps are reported."""

    steps: int = 0
    sums: dict[str, float] = field(default_factory=dict)

    def add(self, step_metrics: dict[str, float]) -> None:
        self.steps += 1
        for k, v in step_metrics.items():
            if k not in StepDone.NOT_AVERAGED:
                self.sums[k] = self.sums.get(k, 0.0) + v

    def means(self) -> dict[str, float]:
        return {"epoch/" + k.split("/", 1)[1]: v / self.steps for k, v in self.sums.items()} if self.steps else {}

    def state_dict(self) -> dict[str, Any]:
        """The exact running sums (JSON keeps a float's every bit), so a resumed epoch continues them."""
        return {"steps": self.steps, "sums": dict(self.sums)}

    @classmethod
    def from_state(cls, d: dict[str, Any]) -> "EpochMeans":
        return cls(steps=int(d.get("steps", 0)), sums={str(k): float(v) for k, v in (d.get("sums") or {}).items()})


class StepStats:
    """The run's buffer of optimizer steps not yet reported, and the current epoch's means."""

    def __init__(self, device: torch.device, *, total_steps: int, world_size: int = 1,
                 steps_per_epoch: int = 0, memory_probe: Callable[[], dict[str, float]] | None = None) -> None:
        #: read at each step's end when set (the health monitor's memory-growth alert): host-side, no device sync
        self.memory_probe = memory_probe
        self.steps_per_epoch = steps_per_epoch
        self.dtype = torch.float32 if device.type == "mps" else torch.float64  # exact sums of float32 values
        self.device = device
        self.total_steps = total_steps
        self.world_size = world_size
        self.epoch = EpochMeans()
        self._rows: list[torch.Tensor] = []
        self._facts: list[_StepFacts] = []

    def accumulator(self) -> StepAccumulator:
        return StepAccumulator(self.dtype)

    @property
    def pending(self) -> int:
        return len(self._rows)

    def start_epoch(self, state: dict[str, Any] | None = None) -> None:
        """A new epoch's means, or (``state``: :meth:`EpochMeans.state_dict`) an epoch resumed part-way."""
        self.epoch = EpochMeans.from_state(state) if state else EpochMeans()

    def push(self, acc: StepAccumulator, *, step: int, epoch: int, batch_index: int, lr: float,
             grad_norm: torch.Tensor, grad_scale: torch.Tensor | None, t_optimizer: float, end_ns: int) -> None:
        """Buffer one optimizer step (device work only: no copy to the host)."""
        assert acc.sums is not None, "a step without micro-batches"
        with torch.no_grad():
            scale = grad_norm.new_zeros(()) if grad_scale is None else grad_scale.reshape(())
            self._rows.append(torch.cat([acc.sums, torch.stack([grad_norm.detach().to(self.dtype),
                                                                scale.to(self.dtype)])]))
        self._facts.append(_StepFacts(step, epoch, batch_index, acc.count, acc.size, acc.tokens, acc.start_ns,
                                      end_ns, {"forward": acc.t_forward, "backward": acc.t_backward,
                                               "optimizer": t_optimizer}, lr, acc.lambda_q, acc.lambda_d,
                                      dict(acc.part_counts), grad_scale is not None,
                                      self.memory_probe() if self.memory_probe is not None else {}))

    def flush(self, reduce: bool = True) -> list[Event]:
        """The buffered steps as StepDone events, in order.

        One ``tolist()`` for the whole buffer; under torchrun (``reduce``) one ``all_reduce`` before it.
        """
        if not self._rows:
            return []
        rows, facts = torch.stack(self._rows), self._facts
        self._rows, self._facts = [], []
        counts = [[f.part_counts.get(k, 0) for k in PARTS] for f in facts]
        n = len(SUMMED)
        if reduce and self.world_size > 1:
            import torch.distributed as tdist
            shared = torch.cat([rows[:, :n], torch.tensor(counts, dtype=self.dtype, device=rows.device)], dim=1)
            tdist.all_reduce(shared)  # the global batch's values, not this rank's share
            rows = torch.cat([shared[:, :n] / self.world_size, rows[:, n:], shared[:, n:]], dim=1)
            host = rows.tolist()
            counts = [row[n + 2:] for row in host]
        else:
            host = rows.tolist()
        events: list[Event] = []
        for f, row, present in zip(facts, host, counts):
            ev = self._step_done(f, row, present)
            self.epoch.add(ev.metrics())
            events.append(ev)
        return events

    def _step_done(self, f: _StepFacts, row: list[float], present: list[Any]) -> StepDone:
        sums = dict(zip(SUMMED, row))
        mean = {k: v / f.count for k, v in sums.items()}
        duration = max(1e-9, (f.end_ns - f.start_ns) / 1e9)
        size = f.size * self.world_size
        return StepDone(
            step=f.step, epoch=f.epoch, batch_index=f.batch_index, loss=mean["loss"],
            parts={k: mean[k] for k, c in zip(PARTS, present) if c > 0}, learning_rate=f.lr,
            grad_norm=row[_GRAD_NORM], batch_size=size, num_tokens=f.tokens, samples_per_second=size / duration,
            tokens_per_second=f.tokens / duration, query_nnz=mean["query_nnz"], doc_nnz=mean["doc_nnz"],
            retrieval_flops=mean["retrieval_flops"], lambda_q=f.lambda_q, lambda_d=f.lambda_d,
            start_ns=f.start_ns, end_ns=f.end_ns, time_ns=f.end_ns, timings=f.timings,
            grad_scale=row[_GRAD_SCALE] if f.scaled else None, total_steps=self.total_steps,
            epoch_progress=f.step / self.steps_per_epoch if self.steps_per_epoch else None, memory_mb=f.memory_mb)
