"""Where a run can stop and resume exactly: the checkpoints the trainer writes, and the stop signals it
acts on only at a consistent point."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from . import finite
from . import checkpoint as ckpt_io
from .atomic import writing
from .config import TrainConfig
from .errors import ConfigError, RunInterrupted
from .events import CheckpointSaved, now_ns


class Checkpointer:
    """Writes checkpoints and the ``best`` / ``final`` model folders (rank 0) and reports each one."""

    def __init__(self, cfg: TrainConfig, emit: Callable[[Any], None], *, rank: int = 0, dist: Any = None,
                 barrier: Callable[[], Any] | None = None) -> None:
        self.cfg, self.emit, self.rank, self.dist = cfg, emit, rank, dist
        #: called before a checkpoint is written: every fact reported so far is then durable in the sinks
        self.barrier = barrier
        self.last: str | None = None
        self.parts: dict[str, Any] = {}

    def attach(self, **parts: Any) -> None:
        """The objects a checkpoint holds: encoder, optimizer, scheduler, scaler."""
        self.parts = parts

    def restore(self, resume: Path, *, world_size: int = 1, map_location: Any = None) -> dict[str, Any]:
        """Load the optimizer, scheduler and scaler state and this rank's RNG state; the trainer state."""
        p = self.parts
        state = ckpt_io.load_checkpoint(resume, optimizer=p["optimizer"], scheduler=p["scheduler"], scaler=p["scaler"],
                                        map_location=map_location)
        if state.get("world_size", 1) != world_size:
            raise ConfigError(f"checkpoint was written with world size {state.get('world_size', 1)}, this run has "
                              f"{world_size}", file_path=str(resume), hint="resume with the same number of processes")
        ranks = state.get("_rank_rngs")
        ckpt_io.restore_rng(ranks[self.rank] if ranks and len(ranks) == world_size else state["_rng"])
        return state

    def save(self, reason: str, *, step: int, epoch: int, rng: dict[str, Any], trainer_state: dict[str, Any]) -> None:
        """Rank 0 writes; under torchrun every rank's RNG state goes in too, gathered at the save points all
        ranks reach together (a stop signal reaches ranks at different times: rank 0's state only then)."""
        if not self.parts:
            return
        rank_rngs = self.dist.gather_objects(rng) if self.dist is not None and reason != "interrupt" else None
        if self.rank != 0:
            return
        if self.barrier is not None:
            self.barrier()
        t0, start = time.monotonic(), now_ns()
        path = ckpt_io.save_checkpoint(self.cfg.output_dir, **self.parts, trainer_state=trainer_state, rng_state=rng,
                                       keep_last=self.cfg.checkpoint.keep_last, rank_rng_states=rank_rngs)
        self.last = str(path)
        self.emit(CheckpointSaved(step=step, epoch=epoch, path=str(path), reason=reason,
                                  duration_seconds=time.monotonic() - t0, start_ns=start))

    def save_model_dir(self, name: str, *, step: int, epoch: int, metrics: dict[str, float] | None = None) -> str | None:
        """``<output_dir>/best`` (with its metrics.json) or ``<output_dir>/final``, replaced atomically."""
        if self.rank != 0:
            return None
        t0, start = time.monotonic(), now_ns()
        dest, tmp = self.cfg.output_dir / name, self.cfg.output_dir / f".tmp-{name}-{os.getpid()}"
        try:
            with writing(dest):  # a full disk names the folder and the space left, typed FILE_SYSTEM_ERROR
                self.parts["encoder"].save_pretrained(tmp)
                if metrics is not None:
                    (tmp / "metrics.json").write_text(finite.dumps({"step": step, **metrics}, indent=2))
                ckpt_io.replace_dir(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # no half-written .tmp folder left behind
            raise
        self.emit(CheckpointSaved(step=step, epoch=epoch, path=str(dest), reason=name,
                                  duration_seconds=time.monotonic() - t0, start_ns=start))
        return str(dest)


class StopSignals:
    """Ctrl-C and SIGTERM only set a flag; the loop acts on it (:meth:`check`) right after an optimizer step,
    where the state is consistent, so the stop checkpoint resumes exactly. A second signal stops at once,
    except while the stop is being reported and its checkpoint written (:meth:`stopping`)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._stopping = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._stopping:
            return
        if self.received is not None:
            raise RunInterrupted(signum)
        self.received = signum

    def check(self) -> None:
        if self.received is not None:
            raise RunInterrupted(self.received)

    @contextlib.contextmanager
    def stopping(self) -> Iterator[None]:
        self._stopping = True
        try:
            yield
        finally:
            self._stopping = False
