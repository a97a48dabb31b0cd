"""Training-health alerts: the run watches its own events and says when it is going wrong.

:class:`HealthMonitor` reads the events the trainer emits (``StepDone``, the ``ErrorCaught`` of a skipped
non-finite step) and returns an :class:`~splade_obs.events.AlertRaised` when one of these starts:

============================  ==================================================================================
``loss_spike``                the loss is ``loss_spike_ratio`` x its recent median and ``spike_mads`` robust
                              deviations above it, on a log scale (below)
``grad_explosion``            the gradient norm is ``grad_explosion_factor`` x its recent median and ``spike_mads``
                              robust deviations above it on a log scale, or non-finite
``nonfinite_loss``            ``nonfinite_loss_run`` non-finite steps in a row (each one skipped by the trainer)
``throughput_drop``           samples/s below ``throughput_fraction`` x its recent median ``throughput_patience``
                              steps in a row
``sparsity_collapse``         the query or document vectors have no non-zero term left
``sparsity_dense``            the mean non-zero terms per vector pass ``dense_fraction`` x the vocabulary
``memory_growth``             process RSS (or accelerator memory) grew ``memory_growth_mb`` over the last
                              ``memory_window`` steps, steadily: each quarter of the window above the one before
``grad_overflow``             the fp16 GradScaler skipped a step (reported by the trainer, :meth:`overflow`)
============================  ==================================================================================

Losses and gradient norms of small batches are heavy-tailed (a demo run's per-step loss spans two orders of
magnitude), so spikes are judged on the logarithm: the deviation is 1.4826 x the median absolute deviation of
the recent logs (at least 0.05, i.e. 5 %), and a spike must pass both the multiplicative floor and the
robust bound: a noisy run needs a bigger jump than a steady one.

Each category fires once per *episode*: it fires when its condition starts, and again only after the
condition has been clear for ``cooldown_steps`` steps. Medians are over the last ``window`` steps and wait
for ``min_history`` of them. The monitor is pure bookkeeping on host numbers the events already carry (one
RSS read per step), so it adds no device sync. Thresholds: ``health.*`` in the config (docs/configuration.md).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Any, Callable

from .config import HealthConfig
from .errors import TrainingError
from .events import AlertRaised, ErrorCaught, Event, StepDone
from .sysinfo import loaded_cuda

_MB = 1024 * 1024


class _Episode:
    """Once per episode: ``update(bad)`` is True when a bad spell starts; ``cooldown`` good steps end it."""

    def __init__(self, cooldown: int) -> None:
        self.cooldown, self.active, self.clear = cooldown, False, 0

    def update(self, bad: bool) -> bool:
        if bad:
            self.clear = 0
            started, self.active = not self.active, True
            return started
        if self.active:
            self.clear += 1
            self.active = self.clear < self.cooldown
        return False


def memory_mb() -> dict[str, float]:
    """This process's resident memory, and the accelerator memory torch holds when CUDA is in use (MB)."""
    import psutil

    out = {"rss": psutil.Process().memory_info().rss / _MB}
    cuda = loaded_cuda()
    if cuda is not None and cuda.is_initialized():
        out["cuda"] = cuda.memory_allocated() / _MB
    return out


class HealthMonitor:
    """Watches a run's events; :meth:`observe` returns the alerts they raise (usually none)."""

    def __init__(self, cfg: HealthConfig, vocab_size: int,
                 memory_probe: Callable[[], dict[str, float]] = memory_mb) -> None:
        self.cfg, self.vocab, self.probe = cfg, vocab_size, memory_probe
        self.counts: dict[str, int] = {}
        self._episodes: dict[str, _Episode] = {}
        self._loss: deque[float] = deque(maxlen=cfg.window)
        self._grad: deque[float] = deque(maxlen=cfg.window)
        self._speed: deque[float] = deque(maxlen=cfg.window)
        self._slow = 0
        self._nonfinite_step, self._nonfinite = 0, 0
        self._memory: dict[str, deque[float]] = {}
        self._steps_seen = 0
        self.fail_on = frozenset(cfg.fail_on_alert)

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps, so a resumed run raises the alerts the uninterrupted one would: the counts,
        the recent values and each episode. Memory readings are not kept (a new process has another RSS)."""
        return {"counts": dict(self.counts), "loss": list(self._loss), "grad": list(self._grad),
                "speed": list(self._speed), "slow": self._slow, "nonfinite": [self._nonfinite_step, self._nonfinite],
                "episodes": {k: [ep.active, ep.clear] for k, ep in self._episodes.items()}}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        state = state or {}
        self.counts = {str(k): int(v) for k, v in (state.get("counts") or {}).items()}
        for name in ("loss", "grad", "speed"):
            getattr(self, f"_{name}").extend(float(v) for v in state.get(name) or ())
        self._slow = int(state.get("slow") or 0)
        self._nonfinite_step, self._nonfinite = (int(v) for v in state.get("nonfinite") or (0, 0))
        for category, (active, clear) in (state.get("episodes") or {}).items():
            episode = self._episodes.setdefault(category, _Episode(self.cfg.cooldown_steps))
            episode.active, episode.clear = bool(active), int(clear)

    # ------------------------------------------------------------------------------------------ observe
    def observe(self, event: Event) -> list[AlertRaised]:
        if isinstance(event, StepDone):
            return self._step(event)
        if isinstance(event, ErrorCaught) and event.context.get("nonfinite") and event.step is not None:
            return self._nonfinite_step_skipped(event)
        return []

    def overflow(self, step: int, epoch: int, scale_before: float, scale_after: float,
                 skipped: int) -> list[AlertRaised]:
        """The GradScaler skipped the step going into ``step`` (fp16 overflow); ``skipped``: so far in the run."""
        return self._check("grad_overflow", True, step, epoch, scale_before, scale_after,
                           f"Gradient overflow detected, scaling down: grad scale {scale_before:g} -> "
                           f"{scale_after:g}, step {step} skipped ({skipped} skipped so far)")

    def _step(self, e: StepDone) -> list[AlertRaised]:
        c, out = self.cfg, []
        self._steps_seen += 1
        if e.step >= self._nonfinite_step:
            self._nonfinite = 0
            out += self._check("nonfinite_loss", False, e.step, e.epoch)
        out += self._check("grad_overflow", False, e.step, e.epoch)
        if len(self._loss) >= c.min_history and e.loss > 0 and math.isfinite(e.loss):
            med, bound = self._bound(self._loss, c.loss_spike_ratio)
            out += self._check("loss_spike", e.loss > bound, e.step, e.epoch, e.loss, bound,
                               f"loss spike at step {e.step}: {e.loss:.4g} > {bound:.4g} (recent median {med:.4g})")
        if e.loss > 0 and math.isfinite(e.loss):
            self._loss.append(math.log(e.loss))
        finite = math.isfinite(e.grad_norm)
        if not finite or (len(self._grad) >= c.min_history and e.grad_norm > 0):
            med, bound = self._bound(self._grad, c.grad_explosion_factor) if self._grad else (math.nan, math.nan)
            out += self._check("grad_explosion", not finite or e.grad_norm > bound, e.step, e.epoch, e.grad_norm,
                               bound, f"gradient norm explodes at step {e.step}: {e.grad_norm:.4g} > {bound:.4g} "
                               f"(recent median {med:.4g})")
        if finite and e.grad_norm > 0:
            self._grad.append(math.log(e.grad_norm))
        smed = _median(self._speed) if len(self._speed) >= c.min_history else None
        if smed is not None:
            bound = c.throughput_fraction * smed
            self._slow = self._slow + 1 if e.samples_per_second < bound else 0
            out += self._check("throughput_drop", self._slow >= c.throughput_patience, e.step, e.epoch,
                               e.samples_per_second, bound,
                               f"throughput dropped at step {e.step}: {e.samples_per_second:.3g} samples/s < "
                               f"{bound:.3g} ({c.throughput_fraction:g} x its recent median) for {self._slow} steps")
        self._speed.append(e.samples_per_second)
        out += self._sparsity(e)
        out += self._memory_growth(e)
        return out

    def _bound(self, logs: deque[float], ratio: float) -> tuple[float, float]:
        """(recent median, the bound a spike passes): ``ratio`` x the median, and ``spike_mads`` robust
        deviations above it on the log scale."""
        med = _median(logs)
        sigma = max(1.4826 * _median([abs(x - med) for x in logs]), 0.05)
        return math.exp(med), math.exp(med + max(math.log(ratio), self.cfg.spike_mads * sigma))

    def _sparsity(self, e: StepDone) -> list[AlertRaised]:
        nnz = {"query": e.query_nnz, "doc": e.doc_nnz}
        zero = [w for w, n in nnz.items() if n == 0]
        dense_at = self.cfg.dense_fraction * self.vocab
        dense = [w for w, n in nnz.items() if n > dense_at]
        out = self._check("sparsity_collapse", bool(zero), e.step, e.epoch, min(nnz.values()), 0.0,
                          f"sparsity collapse at step {e.step}: {' and '.join(zero)} vectors have no non-zero term "
                          f"left; lower the FLOPS weights or the learning rate")
        return out + self._check("sparsity_dense", bool(dense), e.step, e.epoch, max(nnz.values()), dense_at,
                                 f"vectors no longer sparse at step {e.step}: {' and '.join(dense)} use "
                                 f"{max(nnz.values()):.0f} of {self.vocab} terms; raise the FLOPS weights")

    def _memory_growth(self, e: StepDone) -> list[AlertRaised]:
        c = self.cfg
        if self._steps_seen <= c.min_history:  # the first steps allocate what the run keeps: not a leak
            return []
        grown: list[tuple[str, float]] = []
        for name, mb in (e.memory_mb or self.probe()).items():
            series = self._memory.setdefault(name, deque(maxlen=c.memory_window))
            series.append(mb)
            if len(series) == c.memory_window and _steady_growth(series) >= c.memory_growth_mb:
                grown.append((name, series[-1] - series[0]))
        what = ", ".join(f"{'process RSS' if n == 'rss' else n + ' memory'} +{mb:.0f} MB" for n, mb in grown)
        return self._check("memory_growth", bool(grown), e.step, e.epoch, max((mb for _, mb in grown), default=0.0),
                           c.memory_growth_mb, f"memory grows steadily: {what} over the last {c.memory_window} "
                           f"steps (step {e.step})")

    def _nonfinite_step_skipped(self, e: ErrorCaught) -> list[AlertRaised]:
        step = int(e.step or 0)
        self._nonfinite = self._nonfinite + 1 if step == self._nonfinite_step else 1
        self._nonfinite_step = step
        n = self.cfg.nonfinite_loss_run
        return self._check("nonfinite_loss", self._nonfinite >= n, step, e.epoch, float(self._nonfinite), float(n),
                           f"non-finite loss {self._nonfinite} times in a row at step {step} (each batch skipped); "
                           f"lower the learning rate or check the data")

    # ------------------------------------------------------------------------------------------ episodes
    def _check(self, category: str, bad: bool, step: int, epoch: int | None, value: float | None = None,
               threshold: float | None = None, message: str = "") -> list[AlertRaised]:
        episode = self._episodes.setdefault(category, _Episode(self.cfg.cooldown_steps))
        if not episode.update(bad):
            return []
        self.counts[category] = self.counts.get(category, 0) + 1
        return [AlertRaised(category=category, message=message, step=step, epoch=epoch, value=value,
                            threshold=threshold, counts=dict(self.counts),
                            fatal=bool({"any", category} & self.fail_on))]


def _median(values: Any) -> float:
    return float(statistics.median(values))


def _steady_growth(series: deque[float]) -> float:
    """The growth over ``series`` when each of its four quarters averages above the one before, else 0."""
    n = len(series) // 4
    values = list(series)
    means = [statistics.fmean(values[i * n:(i + 1) * n]) for i in range(4)]
    return values[-1] - values[0] if all(b > a for a, b in zip(means, means[1:])) else 0.0


class ScaleWatch:
    """fp16: whether the GradScaler skipped the step it just took (its scale fell). One host copy per step, and
    only with a GradScaler (a skipped step must not move the scheduler, so this cannot wait for a logging point)."""

    def __init__(self, scaler: Any) -> None:
        self.scaler, self.enabled = scaler, bool(scaler.is_enabled())
        self.scale: float | None = None
        self.skipped = 0  # steps skipped so far in the run (restored on resume)

    def arm(self) -> None:
        if self.enabled and self.scale is None:
            self.scale = float(self.scaler.get_scale())

    def fell(self) -> tuple[float, float] | None:
        """(scale before, scale after) when the step was skipped, else None."""
        if not self.enabled or self.scale is None:
            return None
        before, self.scale = self.scale, float(self.scaler.get_scale())
        if self.scale >= before:
            return None
        self.skipped += 1
        return before, self.scale


def fatal_alert(alert: AlertRaised | None, dist: Any = None) -> TrainingError | None:
    """The error that stops the run for an alert named by ``--fail-on-alert`` (None: go on).

    Rank 0 watches the run; under torchrun (``dist``) every rank learns its decision here, at a point all ranks
    reach together (a logging point, an epoch end, a skipped batch), so they stop together."""
    if dist is not None:
        alert = dist.broadcast_object(alert)
    if alert is None:
        return None
    return TrainingError(f"stopped by --fail-on-alert {alert.category}: {alert.message}", step=alert.step,
                         alert=alert.category, hint="the last checkpoint resumes the run (--resume auto); raise the "
                         "health.* threshold or drop --fail-on-alert to let it go on")
