"""Atomic file writes: a reader (or a crash) never sees a half-written file.

The content goes to a temporary file in the *same* directory (so ``os.replace`` is a rename on one
file system), is flushed and fsynced, then renamed over the target. On POSIX and Windows
``os.replace`` is atomic, so the target is always either the old or the new content.
:func:`atomic_writer` streams (large outputs written line by line: ``encode``, ``mine-negatives``);
:func:`atomic_write_text` and :func:`atomic_write_json` write a whole string through it.

Files written this way, and folders moved into place by ``checkpoint.replace_dir``, get the permissions a
plain ``open()`` / ``mkdir`` would give under the process umask (0644 / 0755 under umask 022), although the
temporary files behind them are made private (``tempfile.mkstemp``, ``mkdtemp``, safetensors' own writer).
A write the storage refuses (full disk, quota, read-only) names the path being written: an ``OSError`` from
:func:`atomic_writer` carries it as its filename, and :func:`writing` turns whatever torch or safetensors
raise into a ``FileSystemError`` naming the path and the free space.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

from .errors import STORAGE_ERRNOS, ApplicationError, is_storage_failure, storage_error


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike[str], mode: str = "w", encoding: str = "utf-8") -> Iterator[IO[Any]]:
    """A file object whose content replaces ``path`` only when the ``with`` block ends normally.

    It writes ``.NAME.XXXX.tmp`` beside ``path`` (the parent directory is created); at the end of the block
    the file is flushed, fsynced and renamed over ``path``. Any exception in the block (or a failed flush)
    removes the temporary file and leaves ``path`` as it was, old content or absent. The new file keeps the
    permissions of the file it replaces, or gets those of a normal new file under the umask (0644 under 022).
    ``mode`` is ``"w"`` (text, in ``encoding``) or ``"wb"``. A full disk (or quota, read-only file system)
    while writing raises the ``OSError`` with ``path`` as its ``filename``, which ``classify`` turns into a
    ``FileSystemError`` naming ``path`` and the free space.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_writer mode must be 'w' or 'wb', got {mode!r}")
    target = Path(path)
    with _naming(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=str(target.parent))
    try:
        with _naming(target):  # a full disk in the block (our file's writes) or at the flush names the target
            with os.fdopen(fd, mode, encoding=None if mode == "wb" else encoding) as fh:
                os.chmod(tmp, _mode_for(target))  # mkstemp makes 0600; readable like a normal new file
                yield fh
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(target.parent)


@contextlib.contextmanager
def _naming(target: Path) -> Iterator[None]:
    """A refused write (ENOSPC, quota, read-only) that names no file gets ``target`` as its filename; the
    exception keeps its type (callers catch ``OSError``)."""
    try:
        yield
    except OSError as exc:
        if exc.errno in STORAGE_ERRNOS and exc.filename is None:
            exc.filename = str(target)
        raise


@contextlib.contextmanager
def writing(path: str | os.PathLike[str]) -> Iterator[None]:
    """Inside the block, a write the storage refuses (full disk, quota, read-only file system, I/O error),
    however torch, safetensors or Python report it, becomes a ``FileSystemError`` naming ``path`` and the
    space left on its file system; typed errors and anything else pass through unchanged."""
    try:
        yield
    except ApplicationError:
        raise
    except Exception as exc:
        if is_storage_failure(exc):
            raise storage_error(exc, path) from exc
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically; creates the parent directory. Returns the path."""
    with atomic_writer(path, "w", encoding=encoding) as fh:
        fh.write(text)
    return Path(path)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, indent: int | None = 2) -> Path:
    """Serialize ``obj`` first (so a serialization error leaves the old file alone), then write atomically.

    Values JSON does not know (paths, numpy scalars, enums) are written with ``str``; NaN and
    infinities become ``"nan"`` / ``"inf"`` / ``"-inf"`` (:mod:`splade_obs.finite`) so strict JSON parsers (jq,
    JavaScript) can read the file.
    """
    text = json.dumps(_finite(obj), indent=indent, default=_json_default, allow_nan=False)
    return atomic_write_text(path, text + "\n")


def _finite(obj: Any) -> Any:
    from .finite import json_safe  # the one rule for non-finite numbers

    return json_safe(obj)


def _json_default(o: Any) -> Any:
    item = getattr(o, "item", None)  # numpy / torch scalars
    if callable(item):
        try:
            return _finite(item())
        except Exception:  # noqa: BLE001 - fall back to str below
            pass
    return str(o)


def _mode_for(target: Path) -> int:
    try:
        return target.stat().st_mode & 0o777
    except OSError:
        return file_mode()


def current_umask() -> int:
    """The process umask, read without changing it where Linux shows it (``/proc/self/status``); elsewhere
    set and restored at once."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode(executable: bool = False) -> int:
    """What ``open()`` (``executable``: ``mkdir``) gives a new file under the umask: 0644 (0755) under 022."""
    return (0o777 if executable else 0o666) & ~current_umask()


def apply_umask(root: str | os.PathLike[str]) -> None:
    """Give ``root`` and everything under it the permissions of freshly created files and folders under the
    process umask (0644 files, 0755 folders under umask 022); a file with its owner's execute bit keeps it
    executable. For folders this process has just written, whose writers made private temporaries
    (``mkdtemp`` makes 0700; safetensors writes 0600)."""
    mask = current_umask()
    files, dirs = 0o666 & ~mask, 0o777 & ~mask
    root = Path(root)
    paths = [root] + sorted(root.rglob("*")) if root.is_dir() else [root]
    for p in paths:
        try:
            st = p.lstat()
        except OSError:
            continue
        if p.is_symlink():
            continue
        if p.is_dir():
            want = dirs
        else:
            want = dirs if st.st_mode & 0o100 else files
        if st.st_mode & 0o7777 != want:
            os.chmod(p, want)


def fsync_dir(directory: Path) -> None:
    """Persist the rename itself (POSIX); silently skipped where directories cannot be opened."""
    try:
        fd = os.open(str(directory), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
