"""Atomic checkpoints and exact resume.

A checkpoint is a folder ``<output_dir>/checkpoints/checkpoint-<step>`` holding

* ``model/``: the encoder in Hugging Face format (safetensors weights + tokenizer),
* ``optimizer.pt``, ``scheduler.pt``, ``scaler.pt``: state dicts (loaded with ``weights_only=True``),
* ``rng.pt`` (torch CPU/CUDA generator states) and ``rng.json`` (Python and NumPy states),
* ``trainer_state.json``: global step, epoch, position in the epoch, regularizer schedule, error budget,
  MLflow run id and run name, best metric, final metrics so far, and the open epoch's exact running sums
  (``epoch_stats``), so a resumed run reports what an uninterrupted one would.

It is written into a temporary sibling folder and renamed into place, so a crash never leaves a
half-written checkpoint under the final name. Old checkpoints beyond ``keep_last`` are removed after the
new one is in place.

Before a resume a checkpoint is checked (:func:`validate_checkpoint`: every file present, parseable and of
the size its own header gives). ``--resume auto`` takes the newest checkpoint that passes and names each
newer one it passed over; ``--resume PATH`` to a checkpoint that fails is a ``FILE_SYSTEM_ERROR`` naming
the bad file.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import re
import shutil
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from .atomic import apply_umask, fsync_dir, writing
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


def find_resume_checkpoint(output_dir: str | Path, resume: str | None,
                           skipped: list[tuple[Path, str]] | None = None) -> Path | None:
    """``None`` -> no resume; ``"auto"`` -> the newest usable checkpoint, or None when there is none; a path ->
    that checkpoint, which must be usable.

    ``auto`` checks the checkpoints newest first (:func:`validate_checkpoint`) and appends each unusable one
    it passed over to ``skipped`` as ``(path, reason)``, for the caller to warn about; when every checkpoint
    is unusable it raises a :class:`FileSystemError` listing them (starting over would bury them)."""
    if not resume:
        return None
    if resume == "auto":
        bad: list[tuple[Path, str]] = []
        for cand in reversed(_checkpoint_dirs(output_dir)):
            try:
                validate_checkpoint(cand)
            except FileSystemError as err:
                bad.append((cand, err.one_line().removeprefix(f"error[{err.category.value}]: ")))
                continue
            if skipped is not None:
                skipped.extend(bad)
            return cand
        if bad:
            raise FileSystemError("no usable checkpoint to resume from: " + "; ".join(r for _, r in bad),
                                  file_path=str(checkpoints_dir(output_dir)),
                                  hint="resume from a copy you trust with --resume PATH, or start a new "
                                       "--output-dir")
        return None
    p = Path(resume)
    if not (p / STATE_FILE).exists():
        raise FileSystemError("checkpoint not found (no trainer_state.json)", file_path=str(p),
                              hint="pass --resume auto or a folder under <output-dir>/checkpoints/")
    validate_checkpoint(p)
    return p


def _checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Every ``checkpoint-<step>`` folder, oldest first, complete or not."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := CKPT_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


#: files of a checkpoint already checked in this process, by (path, size, mtime): the check runs once per file
_VALID: set[tuple[str, int, int]] = set()


def validate_checkpoint(ckpt: Path) -> None:
    """Raise a :class:`FileSystemError` naming the first unusable file of ``ckpt``, else return.

    Usable: ``trainer_state.json`` and ``rng.json`` parse; ``model/config.json`` parses; the model weights
    (``*.safetensors``, sharded or not, or ``pytorch_model.bin``) are as long as their header says;
    ``optimizer.pt``, ``scheduler.pt``, ``scaler.pt``, ``rng.pt`` (and ``rng_ranks.*``) are whole archives
    whose checksums match. That catches a truncated or overwritten file, not a consistent but wrong one
    (loading reports those)."""
    ckpt = Path(ckpt)
    state = _check_json(ckpt / STATE_FILE)
    if not isinstance(state, dict) or not all(isinstance(state.get(k), int)
                                              for k in ("global_step", "epoch", "batch_in_epoch")):
        raise FileSystemError("checkpoint state is incomplete (global_step, epoch, batch_in_epoch)",
                              file_path=str(ckpt / STATE_FILE))
    _check_json(ckpt / "rng.json")
    model = ckpt / "model"
    _check_json(model / "config.json")
    weights = sorted(model.glob("*.safetensors")) if model.is_dir() else []
    index = model / "model.safetensors.index.json"
    if index.exists():
        shards = set((_check_json(index).get("weight_map") or {}).values())
        missing = sorted(shards - {w.name for w in weights})
        if missing:
            raise FileSystemError(f"checkpoint model shard {missing[0]} is missing", file_path=str(model / missing[0]))
    for w in weights:
        check_safetensors(w)
    if not weights:
        if not (model / "pytorch_model.bin").exists():
            raise FileSystemError("checkpoint has no model weights (model.safetensors)",
                                  file_path=str(model / "model.safetensors"))
        _check_archive(model / "pytorch_model.bin")
    for name in ("optimizer.pt", "scheduler.pt", "scaler.pt", "rng.pt"):
        _check_archive(ckpt / name)
    if (ckpt / "rng_ranks.pt").exists() or (ckpt / "rng_ranks.json").exists():
        _check_archive(ckpt / "rng_ranks.pt")
        _check_json(ckpt / "rng_ranks.json")


def _stat_key(path: Path) -> tuple[str, int, int]:
    try:
        st = path.stat()
    except FileNotFoundError as exc:
        raise FileSystemError("checkpoint file is missing", file_path=str(path), original_exception=exc) from exc
    except OSError as exc:
        raise FileSystemError(f"checkpoint file cannot be read: {exc.strerror or exc}", file_path=str(path),
                              original_exception=exc) from exc
    return (str(path), st.st_size, st.st_mtime_ns)


def _check_json(path: Path) -> Any:
    _stat_key(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise FileSystemError("checkpoint file is corrupt (not valid JSON)", file_path=str(path),
                              original_exception=exc) from exc


def check_safetensors(path: Path, what: str = "checkpoint weights") -> None:
    """The header's length, the header itself and the end of its last tensor agree with the file's size;
    errors call the file ``what``."""
    key = _stat_key(path)
    if key in _VALID:
        return
    size = key[1]
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or 8 + n > size:
                raise ValueError(f"header length {n} does not fit in {size} bytes")
            header = json.loads(f.read(n))
        ends = [int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"]
    except (OSError, ValueError, TypeError, KeyError, IndexError) as exc:
        raise FileSystemError(f"{what} are corrupt ({exc})", file_path=str(path),
                              original_exception=exc) from exc
    if 8 + n + max(ends, default=0) != size:
        raise FileSystemError(f"{what} are truncated or padded: the header gives "
                              f"{8 + n + max(ends, default=0)} bytes, the file has {size}", file_path=str(path))
    _VALID.add(key)


def _check_archive(path: Path) -> None:
    """A file written by ``torch.save``: a zip archive whose every member's CRC matches."""
    key = _stat_key(path)
    if key in _VALID:
        return
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (OSError, zipfile.BadZipFile, ValueError, EOFError) as exc:
        raise FileSystemError("checkpoint file is corrupt (truncated or overwritten)", file_path=str(path),
                              original_exception=exc) from exc
    if bad is not None:
        raise FileSystemError(f"checkpoint file is corrupt (checksum mismatch in {bad})", file_path=str(path))
    _VALID.add(key)


def read_trainer_state(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))


@retry(max_attempts=3, delay=0.5, backoff_factor=2.0, max_delay=5.0, retry_on=(OSError,),
       operation="checkpoint save")
def save_checkpoint(output_dir: str | Path, *, encoder: Any, optimizer: torch.optim.Optimizer,
                    scheduler: Any, scaler: torch.amp.GradScaler, trainer_state: dict[str, Any],
                    rng_state: dict[str, Any], keep_last: int = 2, name: str | None = None,
                    rank_rng_states: list[dict[str, Any]] | None = None,
                    unusable: frozenset[Path] = frozenset()) -> Path:
    """Write a checkpoint atomically and return its final path (``rank_rng_states``: one per torchrun rank).
    ``unusable``: checkpoints known to be unusable (``--resume auto`` passed over them), which the rotation
    neither counts among the ``keep_last`` nor removes.

    A write the storage refuses (full disk, quota, read-only) is a :class:`FileSystemError` naming the file of
    the checkpoint being written (``.../checkpoint-N/optimizer.pt``) and the space left; it is not retried."""
    root = checkpoints_dir(output_dir)
    with writing(root):
        root.mkdir(parents=True, exist_ok=True)
    final = root / (name or f"checkpoint-{trainer_state['global_step']}")
    tmp = root / f".tmp-{final.name}-{os.getpid()}-{time.monotonic_ns()}"

    def write(part: str, save: Any) -> None:  # ``save(path)`` writes ``part``; a full disk names final/part
        with writing(final / part):
            save(tmp / part)

    def save_json(obj: Any, **kw: Any) -> Any:
        return lambda p: p.write_text(json.dumps(obj, **kw))

    try:
        with writing(final):
            tmp.mkdir(parents=True)
            write("model", encoder.save_pretrained)
            write("optimizer.pt", functools.partial(torch.save, optimizer.state_dict()))
            write("scheduler.pt", functools.partial(torch.save, scheduler.state_dict()))
            write("scaler.pt", functools.partial(torch.save, scaler.state_dict()))
            write("rng.pt", functools.partial(torch.save, {"torch": rng_state["torch"], "cuda": rng_state["cuda"]}))
            write("rng.json", save_json({"python": rng_state["python"], "numpy": rng_state["numpy"]}))
            if rank_rng_states is not None:
                write("rng_ranks.pt", functools.partial(torch.save, [{"torch": r["torch"], "cuda": r["cuda"]}
                                                                     for r in rank_rng_states]))
                write("rng_ranks.json", save_json([{"python": r["python"], "numpy": r["numpy"]}
                                                   for r in rank_rng_states]))
            write(STATE_FILE, save_json(trainer_state, indent=2, sort_keys=True))
            fsync_dir(tmp)
            replace_dir(tmp, final)  # same step saved twice (save_steps and epoch end): the new one wins
            fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if name is None:
        _rotate(output_dir, keep_last, unusable - {final})  # this one was just written whole
    return final


def replace_dir(src: Path, dst: Path) -> None:
    """Move a finished folder into place; an existing one is renamed aside first and removed last, so a
    crash at any point leaves a complete folder under ``dst`` or its aside copy. What ``src`` holds first gets
    the permissions of new files under the process umask (:func:`~splade_obs.atomic.apply_umask`: safetensors
    writes its weights 0600, ``mkdtemp`` makes 0700), like every other file the run writes."""
    apply_umask(src)
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
    ``ckpt / "model"``) and return the trainer state.

    A file that cannot be read is a :class:`FileSystemError` naming it; states that read but do not fit this
    run's model or optimizer are a :class:`TrainingError`."""
    optim_state, sched_state, scaler_state = (_read(ckpt / "optimizer.pt", map_location), _read(ckpt / "scheduler.pt"),
                                              _read(ckpt / "scaler.pt"))
    rng = _read(ckpt / "rng.pt")
    rng.update(_check_json(ckpt / "rng.json"))
    rank_rngs = None
    if (ckpt / "rng_ranks.pt").exists():
        rank_rngs = [{**t, **p} for t, p in zip(_read(ckpt / "rng_ranks.pt"), _check_json(ckpt / "rng_ranks.json"))]
    for what, obj, loaded in (("optimizer.pt", optimizer, optim_state), ("scheduler.pt", scheduler, sched_state),
                              ("scaler.pt", scaler, scaler_state)):
        try:
            obj.load_state_dict(loaded)
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            raise TrainingError("checkpoint does not match this run (model or optimizer differ)",
                                file_path=str(ckpt / what), original_exception=exc,
                                hint="resume with the same model and settings, or start a new --output-dir") from exc
    state = _check_json(ckpt / STATE_FILE)
    state["_rng"] = rng
    state["_rank_rngs"] = rank_rngs
    return state


def _read(path: Path, map_location: str | torch.device | None = None) -> Any:
    """``torch.load`` of one checkpoint file (tensors only); an unreadable file is a :class:`FileSystemError`."""
    _stat_key(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError/pickle errors/EOFError for a bad file
        raise FileSystemError("checkpoint file is corrupt or unreadable", file_path=str(path),
                              original_exception=exc) from exc


def _rotate(output_dir: str | Path, keep_last: int, unusable: frozenset[Path] = frozenset()) -> None:
    """Remove all but the newest ``keep_last`` checkpoints. An unusable one (a corrupt newer checkpoint that a
    resume passed over) is not one of them: it stays, for a look, and the good ones it would displace stay too
    (counting it, the rotation kept it and removed the checkpoint the run had resumed from)."""
    bad = {Path(p).resolve() for p in unusable}
    ckpts = [p for p in list_checkpoints(output_dir) if p.resolve() not in bad]
    for old in ckpts[: max(0, len(ckpts) - max(1, keep_last))]:
        shutil.rmtree(old, ignore_errors=True)
