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
from .events import CheckpointSaved, Message, now_ns
from .model_card import CardFacts, write_model_card


class Checkpointer:
    """Writes checkpoints and the ``best`` / ``final`` model folders (rank 0) and reports each one."""

    def __init__(self, cfg: TrainConfig, emit: Callable[[Any], None], *, rank: int = 0, dist: Any = None,
                 barrier: Callable[[], Any] | None = None,
                 run_facts: Callable[[], dict[str, Any]] | None = None) -> None:
        self.cfg, self.emit, self.rank, self.dist = cfg, emit, rank, dist
        #: what the trainer knows for a model card: ``final_metrics``, ``system_info``, ``train_means``
        self.run_facts = run_facts
        self.t0 = time.monotonic()
        #: called before a checkpoint is written: every fact reported so far is then durable in the sinks
        self.barrier = barrier
        self.last: str | None = None
        self.parts: dict[str, Any] = {}
        #: checkpoints ``--resume auto`` passed over as unusable: the rotation keeps them out of its count
        self.unusable: frozenset[Path] = frozenset()

    def attach(self, **parts: Any) -> None:
        """The objects a checkpoint holds: encoder, optimizer, scheduler, scaler. Every model folder written
        says the lengths the encoder is trained at (for sentence-transformers, :mod:`.st_layout`)."""
        self.parts = parts
        if "encoder" in parts:
            parts["encoder"].max_lengths = (self.cfg.model.max_query_length, self.cfg.model.max_doc_length)

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
        ranks reach together, a stop they agreed on included (a second signal, which stops one rank at once:
        rank 0's state only then)."""
        if not self.parts:
            return
        together = reason != "interrupt" or getattr(self.dist, "stopped_together", False)
        rank_rngs = self.dist.gather_objects(rng) if self.dist is not None and together else None
        if self.rank != 0:
            return
        same_step = ckpt_io.checkpoints_dir(self.cfg.output_dir) / f"checkpoint-{trainer_state['global_step']}"
        if rank_rngs is None and self.dist is not None and (same_step / "rng_ranks.pt").exists():
            # a stop (another node lost, its agent's SIGTERM) right after a save point: that checkpoint has
            # every rank's RNG state and resumes exactly; this one would have rank 0's only
            self.last = str(same_step)
            return
        if self.barrier is not None:
            self.barrier()
        t0, start = time.monotonic(), now_ns()
        path = ckpt_io.save_checkpoint(self.cfg.output_dir, **self.parts, trainer_state=trainer_state, rng_state=rng,
                                       keep_last=self.cfg.checkpoint.keep_last, rank_rng_states=rank_rngs,
                                       unusable=self.unusable)
        self.unusable -= {path}
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
                self._write_card(tmp, name, step, epoch, metrics)
                ckpt_io.replace_dir(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # no half-written .tmp folder left behind
            raise
        self.emit(CheckpointSaved(step=step, epoch=epoch, path=str(dest), reason=name,
                                  duration_seconds=time.monotonic() - t0, start_ns=start))
        return str(dest)

    def _write_card(self, folder: Path, name: str, step: int, epoch: int, metrics: dict[str, float] | None) -> None:
        """The folder's README.md. Scores: ``best``'s evaluation, else the run's last one (``eval/*``). A card
        that cannot be built is reported and left out (the model still saves); a write error is the save's."""
        try:
            known = self.run_facts() if self.run_facts is not None else {}
            scores = metrics if metrics is not None else {
                k: v for k, v in (known.get("final_metrics") or {}).items() if k.startswith("eval/")}
            facts = CardFacts(kind=name, step=step, epoch=epoch, config=self.cfg, eval_scores=dict(scores),
                              train_means=dict(known.get("train_means") or {}),
                              system_info=dict(known.get("system_info") or {}),
                              duration_seconds=time.monotonic() - self.t0)
            write_model_card(folder, facts)
        except OSError:
            raise
        except Exception as exc:  # noqa: BLE001 - the card is documentation: the model itself must still save
            self.emit(Message(level="WARNING", text=f"no model card for {name}/: {type(exc).__name__}: {exc}"))


class StopSignals:
    """Ctrl-C and SIGTERM only set a flag; the loop acts on it (:meth:`check`) right after an optimizer step,
    where the state is consistent, so the stop checkpoint resumes exactly. A second signal stops at once,
    except while the stop is being reported and its checkpoint written (:meth:`stopping`)."""

    def __init__(self, agree: Callable[[int], int] | None = None) -> None:
        #: under torchrun, :meth:`~splade_obs.distributed.DistContext.agree_stop`: every rank stops together
        self.agree = agree
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
        signum = self.received or 0
        if self.agree is not None:
            signum = self.agree(signum)
        if signum:
            raise RunInterrupted(signum)

    @contextlib.contextmanager
    def stopping(self) -> Iterator[None]:
        self._stopping = True
        try:
            yield
        finally:
            self._stopping = False
