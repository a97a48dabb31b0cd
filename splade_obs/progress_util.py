"""Progress of long work outside the training loop: evaluation, encoding, negative mining.

The same display rules as the training progress (:class:`splade_obs.sinks.progress.ProgressSink`):

* ``auto``: a tqdm bar when stderr is a terminal, lines otherwise; ``bar`` / ``lines`` force one;
  ``none`` prints nothing (and costs nothing: :meth:`ProgressSpec.start` returns ``None``);
* lines come at most every ``interval`` seconds, in the training lines' format, then one closing line::

      Encoding documents: 256/1000 (25.6%) [85.3 docs/s, ETA: 8.7s]
      Completed encoding documents: 1000/1000 (100.0%) in 11.7s [85.5 docs/s]

Everything goes to ``sys.stderr`` (looked up at write time, so click's CliRunner sees it); stdout stays
free for results. A bar opened while the training bar is on screen (in-training evaluation) takes the
line below it and is cleared when done (``leave=False``), so the training bar is never garbled.

:func:`encode_with_progress` feeds a progress from inside a SPLADE encoding: it encodes the texts in
chunks of whole batches, in the encoder's own length order, so every batch, and so every vector, is
exactly what one ``encoder.encode`` call would have produced.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any, Sequence

MODES = ("auto", "bar", "lines", "none")
#: Batches per encoding chunk: one progress update each.
CHUNK_BATCHES = 4


def stderr_is_tty() -> bool:
    """Whether ``sys.stderr`` (as it is now) is a terminal."""
    stream = sys.stderr
    return bool(stream is not None and getattr(stream, "isatty", lambda: False)())


def resolve_mode(mode: str) -> str:
    """``auto`` -> ``bar`` on a terminal, ``lines`` otherwise; other modes are returned as they are."""
    if mode not in MODES:
        raise ValueError(f"progress mode must be one of {', '.join(MODES)}, got {mode!r}")
    return ("bar" if stderr_is_tty() else "lines") if mode == "auto" else mode


def write_line(line: str) -> None:
    """One line on the current ``sys.stderr``, flushed; through tqdm when a bar is on screen."""
    stream = sys.stderr
    if stream is None:
        return
    tqdm_mod = sys.modules.get("tqdm")
    if tqdm_mod is not None and getattr(tqdm_mod.tqdm, "_instances", None):
        tqdm_mod.tqdm.write(line, file=stream)  # keeps the training bar intact
        return
    stream.write(line + "\n")
    stream.flush()


class Progress:
    """The progress of one task of ``total`` units: a tqdm bar or interval lines (see the module docstring).

    Use as a context manager, or call :meth:`close`; ``elapsed`` is the task's wall time so far.
    """

    def __init__(self, desc: str, total: int, *, unit: str = "it", mode: str = "lines", interval: float = 10.0,
                 leave: bool | None = None) -> None:
        self.desc, self.total, self.unit = desc, int(total), unit
        self.mode = resolve_mode(mode)
        self.interval = float(interval)
        self.n = 0
        self._t0 = self._last = time.monotonic()
        self._closed = False
        self._bar: Any = None
        if self.mode == "bar":
            from tqdm import tqdm

            nested = bool(getattr(tqdm, "_instances", None))  # the training bar is up: take the line below
            self._bar = tqdm(total=self.total or None, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
                             leave=(not nested) if leave is None else leave)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._t0

    def update(self, n: int = 1) -> None:
        self.n += int(n)
        if self._bar is not None:
            self._bar.update(n)
        elif self.mode == "lines":
            now = time.monotonic()
            if now - self._last >= self.interval:
                self._last = now
                write_line(self.progress_line(now))

    def close(self, ok: bool = True) -> float:
        """End the task (a closing line in lines mode); returns its wall time in seconds."""
        elapsed = self.elapsed
        if self._closed:
            return elapsed
        self._closed = True
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.mode == "lines":
            write_line(self.completed_line() if ok else
                       f"Stopped {self._lower_desc()}: {self._fraction()} after {elapsed:.1f}s")
        return elapsed

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(ok=exc_type is None)

    # formatting (the training lines' format) ----------------------------------------------------------
    def _lower_desc(self) -> str:
        return self.desc[:1].lower() + self.desc[1:]

    def _fraction(self) -> str:
        pct = 100.0 * self.n / self.total if self.total else 0.0
        return f"{self.n}/{self.total} ({pct:.1f}%)"

    def _rate(self, now: float) -> tuple[float, float]:
        elapsed = max(now - self._t0, 1e-9)
        return elapsed, self.n / elapsed

    def progress_line(self, now: float | None = None) -> str:
        _, rate = self._rate(time.monotonic() if now is None else now)
        eta = (self.total - self.n) / rate if rate > 0 and self.total > self.n else 0.0
        return f"{self.desc}: {self._fraction()} [{rate:.1f} {self.unit}/s, ETA: {eta:.1f}s]"

    def completed_line(self, now: float | None = None) -> str:
        elapsed, rate = self._rate(time.monotonic() if now is None else now)
        return f"Completed {self._lower_desc()}: {self._fraction()} in {elapsed:.1f}s [{rate:.1f} {self.unit}/s]"


@dataclass(frozen=True)
class ProgressSpec:
    """How to show progress (``mode`` as ``--progress``; ``interval`` seconds between lines)."""

    mode: str = "none"
    interval: float = 10.0

    def __post_init__(self) -> None:
        resolve_mode(self.mode)  # an unknown mode fails here, not halfway through a corpus
        if not self.interval >= 0:
            raise ValueError(f"progress interval must be >= 0 seconds, got {self.interval}")

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    def start(self, desc: str, total: int, unit: str = "it") -> Progress | None:
        """A running :class:`Progress`, or ``None`` when progress is off."""
        if not self.enabled:
            return None
        return Progress(desc, total, unit=unit, mode=self.mode, interval=self.interval)


def as_spec(progress: "ProgressSpec | str | None", interval: float = 10.0) -> ProgressSpec:
    """A :class:`ProgressSpec` from a spec, a mode name, or ``None`` (off)."""
    if isinstance(progress, ProgressSpec):
        return progress
    return ProgressSpec(progress or "none", interval)


def encode_with_progress(encoder: Any, texts: Sequence[str], *, max_length: int, batch_size: int = 32,
                         progress: Progress | None = None, **kwargs: Any) -> Any:
    """``encoder.encode(texts, ...)`` (a CSR matrix, rows in input order), advancing ``progress`` as it goes.

    Without a progress (or an encoder without a tokenizer) it is the plain call. Otherwise the texts are put
    in the order the encoder itself uses (token length, longest first, stable) and encoded in chunks of
    :data:`CHUNK_BATCHES` whole batches with ``sort_by_length=False``: the batches, and so the vectors, are
    those of a single call. The price is one extra tokenization of the texts.
    """
    texts = list(texts)
    tokenizer = getattr(encoder, "tokenizer", None)
    if progress is None or tokenizer is None or not texts:
        out = encoder.encode(texts, max_length=max_length, batch_size=batch_size, **kwargs)
        if progress is not None:
            progress.update(len(texts))
        return out
    import numpy as np
    import scipy.sparse as sp

    from .model import token_ids

    lengths = [len(ids) for ids in token_ids(tokenizer, texts, max_length)]
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])
    step = batch_size * CHUNK_BATCHES
    parts = []
    for start in range(0, len(order), step):
        chunk = order[start:start + step]
        parts.append(encoder.encode([texts[i] for i in chunk], max_length=max_length, batch_size=batch_size,
                                    sort_by_length=False, **kwargs))
        progress.update(len(chunk))
    stacked = sp.vstack(parts, format="csr")
    inverse = np.empty(len(order), dtype=np.int64)
    inverse[np.asarray(order, dtype=np.int64)] = np.arange(len(order))
    return stacked[inverse]


def encode_in_blocks(encoder: Any, texts: Sequence[str], *, start: int = 0, stop: int | None = None,
                     block_size: int | None = None, progress: Progress | None = None, **kwargs: Any) -> Any:
    """:func:`encode_with_progress` over ``texts[start:stop]`` one block of ``block_size`` texts at a time
    (default :data:`splade_obs.encoding.BLOCK_SIZE`): only one block's text is in memory at once, which is
    what keeps a lazily read corpus (:class:`splade_obs.beir.CorpusTexts`) off the heap. Rows in input order."""
    import scipy.sparse as sp

    from .encoding import BLOCK_SIZE

    stop = len(texts) if stop is None else stop
    block_size = block_size or BLOCK_SIZE

    parts = []
    for lo in range(start, stop, block_size):
        parts.append(encode_with_progress(encoder, list(texts[lo:min(lo + block_size, stop)]), progress=progress,
                                          **kwargs))
    if not parts:
        return encode_with_progress(encoder, [], progress=progress, **kwargs)
    return parts[0] if len(parts) == 1 else sp.vstack(parts, format="csr")
