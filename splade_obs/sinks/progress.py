"""ProgressSink: a tqdm bar on a terminal, the seed's progress lines elsewhere (CI logs, files).

Lines mode prints, at most every ``interval`` seconds::

    Training: 250/1000 (25.0%) [32.5 it/s, ETA: 23.1s]

and at the end of a successful run::

    Completed training: 1000/1000 (100.0%) in 31.2s [32.1 it/s]

Progress goes **directly to ``sys.stderr``** (looked up at write time), not through :mod:`logging`:
the lines keep the seed's exact format, and the log files are not filled with progress noise (step
metrics are in the JSON log and the metrics file already). The sink runs inline on the step path, so
``on_step_done`` only compares a clock reading (lines) or calls ``tqdm.update`` (which throttles
its own redraws).
"""

from __future__ import annotations

import sys
import time
from typing import Any

from ..bus import Sink
from ..events import EpochStarted, RunFinished, RunStarted, StepDone
from ..progress_util import MODES, resolve_mode



class ProgressSink(Sink):
    name = "progress"
    scope = "run"
    threaded = False

    def __init__(self, mode: str = "auto", interval: float = 10.0) -> None:
        if mode not in MODES:
            raise ValueError(f"progress mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.mode = mode
        self.interval = float(interval)
        self.total = 0
        self.start_step = 0
        self.step = 0
        self._t0 = time.monotonic()
        self._timer_started = False
        self._last_print = self._t0
        self._bar: Any = None
        self._active = mode  # resolved at run start

    # events -------------------------------------------------------------------------------------------
    def on_run_started(self, e: RunStarted) -> None:
        self.total, self.start_step, self.step = e.total_steps, e.start_step, e.start_step
        self._active = resolve_mode(self.mode)  # a terminal now: the bar, else lines
        self._reset_timer()
        self._timer_started = False

    def on_epoch_started(self, e: EpochStarted) -> None:
        if not self._timer_started:  # time the loop, not model loading
            self._reset_timer()
            self._timer_started = True

    def on_step_done(self, e: StepDone) -> None:
        self.step = e.step
        if e.total_steps:
            self.total = e.total_steps
        if self._active == "lines":
            now = time.monotonic()
            if now - self._last_print >= self.interval:
                self._last_print = now
                self._write(self.progress_line(now))
        elif self._active == "bar":
            self._update_bar()

    def on_run_finished(self, e: RunFinished) -> None:
        self.step = e.step
        if self._active == "bar":
            self._update_bar()
            self._close_bar()
        elif self._active == "lines":
            now = time.monotonic()
            if e.status == "FINISHED":
                self._write(self.completed_line(now))
            else:
                self._write(f"Stopped training ({e.status}): {self._fraction()} after {now - self._t0:.1f}s")
        self._active = "none"

    def close(self, timeout: float = 5.0) -> None:
        self._close_bar()

    # formatting ---------------------------------------------------------------------------------------
    def _rate(self, now: float) -> tuple[float, float]:
        elapsed = max(now - self._t0, 1e-9)
        return elapsed, (self.step - self.start_step) / elapsed

    def _fraction(self) -> str:
        pct = 100.0 * self.step / self.total if self.total else 0.0
        return f"{self.step}/{self.total} ({pct:.1f}%)"

    def progress_line(self, now: float | None = None) -> str:
        elapsed, rate = self._rate(time.monotonic() if now is None else now)
        eta = (self.total - self.step) / rate if rate > 0 and self.total > self.step else 0.0
        return f"Training: {self._fraction()} [{rate:.1f} it/s, ETA: {eta:.1f}s]"

    def completed_line(self, now: float | None = None) -> str:
        elapsed, rate = self._rate(time.monotonic() if now is None else now)
        return f"Completed training: {self._fraction()} in {elapsed:.1f}s [{rate:.1f} it/s]"

    # plumbing -----------------------------------------------------------------------------------------
    def _reset_timer(self) -> None:
        self._t0 = self._last_print = time.monotonic()

    @staticmethod
    def _write(line: str) -> None:
        stream = sys.stderr
        if stream is not None:
            stream.write(line + "\n")
            stream.flush()

    def _update_bar(self) -> None:
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total or None, initial=self.start_step, desc="Training", unit="it",
                             file=sys.stderr, dynamic_ncols=True, leave=True)
        delta = self.step - self._bar.n
        if delta > 0:
            self._bar.update(delta)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
