"""Fault injection (``--inject-fault``): what to break, where, and how it fires.

A spec is ``batch:N:KIND`` (N = 1-based global micro-batch number) or ``step:N:KIND`` (N = optimizer step),
optionally prefixed ``rankR:`` to fire on one torchrun rank only. The trainer asks its :class:`FaultPlan`
at one place per micro-batch and one place per optimizer step; each question is a dictionary lookup.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

import torch

from .errors import ConfigError, DataError, TrainingError

#: the kinds each unit accepts
KINDS = {"batch": ("oom", "nan", "overflow", "exception", "data"), "step": ("interrupt", "sigterm", "exception")}

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
    """``batch:3:oom``, ``batch:5:nan``, ``batch:5:overflow``, ``batch:7:exception``, ``step:4:interrupt``;
    prefix ``rankR:`` for one rank. Raises :class:`ConfigError` for a spec it cannot read."""
    faults = []
    for spec in specs:
        parts = spec.split(":")
        rank = None
        if parts and parts[0].startswith("rank") and parts[0][4:].isdigit():
            rank = int(parts[0][4:])
            parts = parts[1:]
        if len(parts) != 3 or parts[0] not in KINDS or not parts[1].isdigit() or parts[2] not in KINDS[parts[0]]:
            raise ConfigError(f"bad --inject-fault {spec!r}", field="recovery.inject_faults",
                              hint="use batch:N:{oom,nan,overflow,exception,data} or "
                                   "step:N:{interrupt,sigterm,exception}, optionally prefixed rankR:")
        faults.append(Fault(parts[0], int(parts[1]), parts[2], rank))
    return faults


class FaultPlan:
    """The faults of one rank, by (unit, index); the first spec wins where two name the same place."""

    def __init__(self, faults: list[Fault], rank: int = 0) -> None:
        self._at: dict[tuple[str, int], Fault] = {}
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

    def before_batch(self, batch_no: int) -> float | None:
        """Fire a raising batch fault; return the loss factor of a loss fault (None when there is none)."""
        fault = self.batch(batch_no)
        if fault is None:
            return None
        if fault.kind in LOSS_FAULTS:
            return LOSS_FAULTS[fault.kind]
        msg = f"injected fault at batch {batch_no}"
        if fault.kind == "oom":
            raise torch.OutOfMemoryError(f"CUDA out of memory ({msg})")
        if fault.kind == "data":
            raise DataError(msg, batch=batch_no)
        raise RuntimeError(msg)

    def after_step(self, step: int) -> None:
        """Fire the fault planned right after optimizer step ``step``, if any."""
        fault = self._at.get(("step", step)) if self._at else None
        if fault is None:
            return
        if fault.kind == "interrupt":
            raise KeyboardInterrupt
        if fault.kind == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
            return
        raise TrainingError(f"injected fault after step {step}", step=step)
