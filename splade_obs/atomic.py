"""Atomic file writes: a reader (or a crash) never sees a half-written file.

The content goes to a temporary file in the *same* directory (so ``os.replace`` is a rename on one
file system), is flushed and fsynced, then renamed over the target. On POSIX and Windows
``os.replace`` is atomic, so the target is always either the old or the new content.
:func:`atomic_writer` streams (large outputs written line by line: ``encode``, ``mine-negatives``);
:func:`atomic_write_text` and :func:`atomic_write_json` write a whole string through it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike[str], mode: str = "w", encoding: str = "utf-8") -> Iterator[IO[Any]]:
    """A file object whose content replaces ``path`` only when the ``with`` block ends normally.

    It writes ``.NAME.XXXX.tmp`` beside ``path`` (the parent directory is created); at the end of the block
    the file is flushed, fsynced and renamed over ``path``. Any exception in the block (or a failed flush)
    removes the temporary file and leaves ``path`` as it was, old content or absent. The new file keeps the
    permissions of the file it replaces, or gets 0644 like a normal new file. ``mode`` is ``"w"`` (text, in
    ``encoding``) or ``"wb"``.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_writer mode must be 'w' or 'wb', got {mode!r}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=str(target.parent))
    try:
        with os.fdopen(fd, mode, encoding=None if mode == "wb" else encoding) as fh:
            os.chmod(tmp, _mode_for(target))  # mkstemp makes 0600; keep the file readable like a normal one
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


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically; creates the parent directory. Returns the path."""
    with atomic_writer(path, "w", encoding=encoding) as fh:
        fh.write(text)
    return Path(path)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, indent: int | None = 2) -> Path:
    """Serialize ``obj`` first (so a serialization error leaves the old file alone), then write atomically.

    Values JSON does not know (paths, numpy scalars, enums) are written with ``str``; NaN and
    infinities become ``null`` so strict JSON parsers (jq, JavaScript) can read the file.
    """
    text = json.dumps(_finite(obj), indent=indent, default=_json_default, allow_nan=False)
    return atomic_write_text(path, text + "\n")


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


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
        return 0o644


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
