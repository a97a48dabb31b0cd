"""Atomic checkpoints and exact resume.

A checkpoint is a folder ``<output_dir>/checkpoints/checkpoint-<step>`` holding

* ``model/``: the encoder in Hugging Face format (safetensors weights + tokenizer),
* ``optimizer.pt``, ``scheduler.pt``, ``scaler.pt``: state dicts (loaded with ``weights_only=True``),
* ``rng.pt`` (torch CPU/CUDA generator states) and ``rng.json`` (Python and NumPy states),
* ``trainer_state.json``: global step, epoch, position in the epoch, regularizer schedule, error budget,
  MLflow run id, best metric.

It is written into a temporary sibling folder and renamed into place, so a crash never leaves a
half-written checkpoint under the final name. Old checkpoints beyond ``keep_last`` are removed after the
new one is in place.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from .atomic import fsync_dir
from .errors import FileSystemError, TrainingError
from .recovery import retry

CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"


def capture_rng() -> dict[str, Any]:
    """Snapshot every generator that influences training (dropout uses torch's global generator)."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = CKPT_RE.match(p.name)
        if m and (p / STATE_FILE).exists():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def find_resume_checkpoint(output_dir: str | Path, resume: str | None) -> Path | None:
    """``None`` -> no resume; ``"auto"`` -> latest checkpoint or None; a path -> that checkpoint (must exist)."""
    if not resume:
        return None
    if resume == "auto":
        ckpts = list_checkpoints(output_dir)
        return ckpts[-1] if ckpts else None
    p = Path(resume)
    if not (p / STATE_FILE).exists():
        raise FileSystemError("checkpoint not found (no trainer_state.json)", file_path=str(p),
                              hint="pass --resume auto or a folder under <output-dir>/checkpoints/")
    return p


def read_trainer_state(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))


@retry(max_attempts=3, delay=0.5, backoff_factor=2.0, max_delay=5.0, retry_on=(OSError,),
       operation="checkpoint save")
def save_checkpoint(output_dir: str | Path, *, encoder: Any, optimizer: torch.optim.Optimizer,
                    scheduler: Any, scaler: torch.amp.GradScaler, trainer_state: dict[str, Any],
                    rng_state: dict[str, Any], keep_last: int = 2, name: str | None = None,
                    rank_rng_states: list[dict[str, Any]] | None = None) -> Path:
    """Write a checkpoint atomically and return its final path (``rank_rng_states``: one per torchrun rank)."""
    root = checkpoints_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / (name or f"checkpoint-{trainer_state['global_step']}")
    tmp = root / f".tmp-{final.name}-{os.getpid()}-{time.monotonic_ns()}"
    try:
        tmp.mkdir(parents=True)
        encoder.save_pretrained(tmp / "model")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(scaler.state_dict(), tmp / "scaler.pt")
        torch.save({"torch": rng_state["torch"], "cuda": rng_state["cuda"]}, tmp / "rng.pt")
        (tmp / "rng.json").write_text(json.dumps({"python": rng_state["python"], "numpy": rng_state["numpy"]}))
        if rank_rng_states is not None:
            torch.save([{"torch": r["torch"], "cuda": r["cuda"]} for r in rank_rng_states], tmp / "rng_ranks.pt")
            (tmp / "rng_ranks.json").write_text(json.dumps([{"python": r["python"], "numpy": r["numpy"]}
                                                            for r in rank_rng_states]))
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2, sort_keys=True))
        fsync_dir(tmp)
        replace_dir(tmp, final)  # same step saved twice (save_steps and epoch end): the new one wins
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if name is None:
        _rotate(output_dir, keep_last)
    return final


def replace_dir(src: Path, dst: Path) -> None:
    """Move a finished folder into place; an existing one is renamed aside first and removed last, so a
    crash at any point leaves a complete folder under ``dst`` or its aside copy."""
    if dst.exists():
        trash = dst.parent / f".old-{dst.name}-{time.monotonic_ns()}"
        os.replace(dst, trash)
        os.replace(src, dst)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(src, dst)


def check_output_dir(target: str | Path) -> Path:
    """Fail early, as a :class:`FileSystemError`, where ``target`` cannot take a model folder: its parent cannot
    be created or written, or it is a non-empty folder that holds no model (no ``config.json``), which
    replacing it would delete."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise FileSystemError("the output exists and is not a folder", file_path=str(target),
                              hint="name a new folder for the model")
    if target.is_dir() and any(target.iterdir()) and not (target / "config.json").is_file():
        raise FileSystemError("the output folder holds files but no model (no config.json): replacing it would "
                              "delete them", file_path=str(target), hint="name a new folder or a model folder")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FileSystemError(f"cannot create the output's parent folder: {exc.strerror or exc}",
                              file_path=str(target.parent), original_exception=exc) from exc
    if not os.access(target.parent, os.W_OK | os.X_OK):
        raise FileSystemError("the output's parent folder is not writable", file_path=str(target.parent),
                              hint="choose an output folder you can write to")
    return target


@contextlib.contextmanager
def staged_dir(target: str | Path) -> Iterator[Path]:
    """A fresh hidden folder beside ``target`` to fill inside the ``with`` block; when the block ends it is
    fsynced and replaces ``target`` (:func:`replace_dir`); when the block raises it is removed and ``target``
    stays as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=str(target.parent)))
    try:
        yield staging
        fsync_dir(staging)
        replace_dir(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_dir(target.parent)


def load_checkpoint(ckpt: Path, *, optimizer: torch.optim.Optimizer, scheduler: Any,
                    scaler: torch.amp.GradScaler, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load optimizer/scheduler/scaler/RNG states (the model weights are loaded by the caller from
    ``ckpt / "model"``) and return the trainer state."""
    try:
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=map_location, weights_only=True))
        scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
        scaler.load_state_dict(torch.load(ckpt / "scaler.pt", weights_only=True))
        rng = torch.load(ckpt / "rng.pt", weights_only=True)
        rng.update(json.loads((ckpt / "rng.json").read_text()))
        rank_rngs = None
        if (ckpt / "rng_ranks.pt").exists():
            rank_rngs = [{**t, **p} for t, p in zip(torch.load(ckpt / "rng_ranks.pt", weights_only=True),
                                                     json.loads((ckpt / "rng_ranks.json").read_text()))]
    except FileNotFoundError as exc:
        raise FileSystemError("checkpoint is incomplete", file_path=str(ckpt), original_exception=exc) from exc
    except (RuntimeError, ValueError, KeyError) as exc:
        raise TrainingError("checkpoint does not match this run (model or optimizer differ)",
                            file_path=str(ckpt), original_exception=exc,
                            hint="resume with the same model and settings, or start a new --output-dir") from exc
    state = read_trainer_state(ckpt)
    state["_rng"] = rng
    state["_rank_rngs"] = rank_rngs
    return state


def _rotate(output_dir: str | Path, keep_last: int) -> None:
    ckpts = list_checkpoints(output_dir)
    for old in ckpts[: max(0, len(ckpts) - max(1, keep_last))]:
        shutil.rmtree(old, ignore_errors=True)
