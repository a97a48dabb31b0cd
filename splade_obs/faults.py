"""Fault injection (``--inject-fault``): what to break, where, and how it fires.

A spec is ``batch:N:KIND`` (N = 1-based global micro-batch number) or ``step:N:KIND`` (N = optimizer step),
N may be a range ``N-M`` (every unit from N to M), optionally prefixed ``rankR:`` to fire on one torchrun rank
only. The trainer asks its :class:`FaultPlan` at a few places per micro-batch and per optimizer step; each
question is a dictionary lookup.

Step faults that act *during* step N (the training-health alerts' test faults, :mod:`splade_obs.health`):
``spike`` multiplies the reported loss by 10^9 without changing its gradients, ``explode`` multiplies the
gradients by 10^9 before clipping (the grad norm explodes, the clipped update does not), ``slow`` makes each
micro-batch twenty times slower, ``leak`` keeps 32 MB more memory alive from that step on. ``interrupt``,
``sigterm`` and ``exception`` fire right after step N.
"""

from __future__ import annotations

import os
import re
import signal
import time
from dataclasses import dataclass
from typing import Iterable

import torch

from .errors import ConfigError, DataError, TrainingError
from .losses import LossOutput

#: the kinds each unit accepts
KINDS = {"batch": ("oom", "nan", "overflow", "exception", "data"),
         "step": ("interrupt", "sigterm", "exception", "spike", "explode", "slow", "leak")}
#: step faults that act during the step rather than after it
DURING_STEP = ("spike", "explode", "slow", "leak")
_INDEX = re.compile(r"^(\d+)(?:-(\d+))?$")

#: batch faults that corrupt the loss instead of raising: the factor the batch's loss is multiplied by.
#: ``overflow`` stays finite (1e30): under fp16 its gradients overflow, so the GradScaler skips that
#: optimizer step and halves its scale; ``nan`` makes the step non-finite, so the trainer skips it.
LOSS_FAULTS = {"nan": float("nan"), "overflow": 1e30}


@dataclass(frozen=True)
class Fault:
    unit: str   # "batch" | "step"
    index: int  # 1-based global batch number, or optimizer step
    kind: str   # oom | nan | overflow | exception | data | interrupt | sigterm
    rank: int | None = None


def parse_faults(specs: tuple[str, ...] | list[str]) -> list[Fault]:
    """``batch:3:oom``, ``batch:5-7:nan``, ``batch:5:overflow``, ``batch:7:exception``, ``step:4:interrupt``,
    ``step:20:spike``; prefix ``rankR:`` for one rank. Raises :class:`ConfigError` for a spec it cannot read."""
    faults = []
    for spec in specs:
        parts = spec.split(":")
        rank = None
        if parts and parts[0].startswith("rank") and parts[0][4:].isdigit():
            rank = int(parts[0][4:])
            parts = parts[1:]
        span = _INDEX.match(parts[1]) if len(parts) == 3 else None
        if span is None or parts[0] not in KINDS or parts[2] not in KINDS[parts[0]] \
                or int(span[2] or span[1]) < int(span[1]):
            raise ConfigError(f"bad --inject-fault {spec!r}", field="recovery.inject_faults",
                              hint=f"use batch:N:{{{','.join(KINDS['batch'])}}} or step:N:{{{','.join(KINDS['step'])}}}"
                                   ", N a number or a range N-M, optionally prefixed rankR:")
        faults += [Fault(parts[0], i, parts[2], rank) for i in range(int(span[1]), int(span[2] or span[1]) + 1)]
    return faults


class FaultPlan:
    """The faults of one rank, by (unit, index); the first spec wins where two name the same place."""

    def __init__(self, faults: list[Fault], rank: int = 0) -> None:
        self._at: dict[tuple[str, int], Fault] = {}
        self._held: list[bytearray] = []  # what ``leak`` keeps alive
        for f in faults:
            if f.rank in (None, rank):
                self._at.setdefault((f.unit, f.index), f)

    @classmethod
    def from_specs(cls, specs: tuple[str, ...] | list[str], rank: int = 0) -> "FaultPlan":
        return cls(parse_faults(specs), rank)

    def __bool__(self) -> bool:
        return bool(self._at)

    def batch(self, batch_no: int) -> Fault | None:
        return self._at.get(("batch", batch_no)) if self._at else None

    def before_batch(self, batch_no: int) -> None:
        """Fire a raising batch fault (loss faults act in :meth:`loss`)."""
        fault = self.batch(batch_no)
        if fault is None or fault.kind in LOSS_FAULTS:
            return
        msg = f"injected fault at batch {batch_no}"
        if fault.kind == "oom":
            raise torch.OutOfMemoryError(f"CUDA out of memory ({msg})")
        if fault.kind == "data":
            raise DataError(msg, batch=batch_no)
        raise RuntimeError(msg)

    def _during(self, step: int, kind: str) -> bool:
        fault = self._at.get(("step", step)) if self._at else None
        return fault is not None and fault.kind == kind

    def loss(self, out: LossOutput, batch_no: int, step: int) -> torch.Tensor:
        """The micro-batch's loss to backpropagate, as the faults planned for it make it (``out.total`` without
        one). ``spike`` changes the loss the step reports (``out.total``) but not its gradients."""
        if self._during(step, "spike"):
            out.total = out.total + 999_999_999.0 * out.total.detach()
        fault = self.batch(batch_no)
        return out.total * LOSS_FAULTS[fault.kind] if fault is not None and fault.kind in LOSS_FAULTS else out.total

    def slow_down(self, step: int, seconds_of_work: float) -> None:
        """``slow``: the micro-batch takes twenty times as long."""
        if self._during(step, "slow"):
            time.sleep(19.0 * seconds_of_work + 0.01)

    def before_optimizer(self, step: int, params: Iterable[torch.nn.Parameter]) -> None:
        """``explode`` scales the gradients before they are measured and clipped; ``leak`` holds 32 MB more."""
        if self._during(step, "explode"):
            with torch.no_grad():
                for p in params:
                    if p.grad is not None:
                        p.grad.mul_(1e9)
        if self._during(step, "leak"):
            self._held.append(bytearray(b"\x01") * (32 * 1024 * 1024))

    def after_step(self, step: int) -> None:
        """Fire the fault planned right after optimizer step ``step``, if any."""
        fault = self._at.get(("step", step)) if self._at else None
        if fault is None or fault.kind in DURING_STEP:
            return
        if fault.kind == "interrupt":
            raise KeyboardInterrupt
        if fault.kind == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
            return
        raise TrainingError(f"injected fault after step {step}", step=step)
