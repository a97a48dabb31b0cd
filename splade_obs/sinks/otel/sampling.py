"""Which batches get a span: decided per batch, before any span exists, in O(1) time and memory."""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass, field


@dataclass
class BatchSampler:
    """Decides per batch, before any span exists, whether the batch gets a span.

    Keeps the first batch the run traces and every ``every``-th step after it (steps N, 2N, ...; ``every=1``:
    all, ``every=0``: none), every failed batch and every batch slower than ``slow_factor`` x the typical batch
    duration. The typical duration is the median of the first ``warmup`` batches, then an exponential moving
    average whose input is clipped at the slow threshold (one pathological batch does not hide the next).
    O(1) time and memory per batch.
    """

    every: int = 50
    slow_factor: float = 3.0
    warmup: int = 5
    alpha: float = 0.1
    kept: int = 0
    kept_sampled: int = 0
    kept_slow: int = 0
    kept_failed: int = 0
    sampled_out: int = 0
    _first_seen: bool = False
    _typical: float | None = None
    _seed: list[float] = field(default_factory=list)

    @classmethod
    def from_spec(cls, spec: str, slow_factor: float = 3.0) -> "BatchSampler":
        """``all`` | ``none`` | ``every:N``."""
        if spec == "all":
            return cls(every=1, slow_factor=slow_factor)
        if spec == "none":
            return cls(every=0, slow_factor=slow_factor)
        m = re.fullmatch(r"every:([1-9]\d*)", spec)
        if not m:
            raise ValueError(f"trace_batches must be all, none or every:N, got {spec!r}")
        return cls(every=int(m.group(1)), slow_factor=slow_factor)

    def decide(self, step: int, duration_s: float) -> str | None:
        """Reason to keep this batch (``"first"``, ``"sampled"`` or ``"slow"``), or None to drop it.

        The first batch is kept (``"first"``) whatever N, so a run shorter than N steps (the quickstart's 25
        steps under the default ``every:50``) still shows one batch with its timings; a resumed run's first
        batch is its first step after the checkpoint.
        """
        slow = self._observe(duration_s)
        first, self._first_seen = not self._first_seen, True
        if self.every > 1 and first:
            self.kept += 1
            self.kept_sampled += 1
            return "first"
        if self.every and step % self.every == 0:
            self.kept += 1
            self.kept_sampled += 1
            return "sampled"
        if slow:
            self.kept += 1
            self.kept_slow += 1
            return "slow"
        self.sampled_out += 1
        return None

    def record_failed(self) -> None:
        self.kept += 1
        self.kept_failed += 1

    @property
    def typical_duration_s(self) -> float | None:
        return self._typical

    def _observe(self, d: float) -> bool:
        if d <= 0:
            return False
        if self._typical is None:
            self._seed.append(d)
            if len(self._seed) >= self.warmup:
                self._typical = statistics.median(self._seed)
                self._seed.clear()
            return False
        threshold = self.slow_factor * self._typical
        self._typical += self.alpha * (min(d, threshold) - self._typical)
        return d > threshold
