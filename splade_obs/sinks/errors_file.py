"""ErrorsFileSink: every caught error as one JSON line in ``<log_dir>/errors.jsonl``.

Ranks > 0 write ``errors.rank{r}.jsonl``. The file is created on the first error only, so its absence
means a clean run. Lines are flushed one by one (the sink runs on its own thread), and secret
environment values and URL credentials are masked like in the logs (:func:`~splade_obs.redaction.safe_text`).

Each line: ``timestamp``, ``category``, ``message``, ``error_type``, ``exception_type`` (bare class name),
``exception_qualified_type`` (``torch.OutOfMemoryError``), ``exception_message``, ``stacktrace`` (the Python
traceback, redacted; null when the error was never raised), ``context``, ``step``, ``epoch``, ``batch`` (the
run's batch number, 1-based: the N of ``--inject-fault batch:N``), ``batch_index`` (0-based in the epoch, for
code), ``skipped_batch``, ``fatal``, ``rank``, ``counts``. Strict JSON: a non-finite value (the NaN loss in a
skipped batch's context) is written as ``"nan"`` / ``"inf"`` / ``"-inf"`` (:mod:`splade_obs.finite`).
"""

from __future__ import annotations

from pathlib import Path
from typing import IO, Any

from ..bus import Sink
from ..events import ErrorCaught, RunStarted
from ..finite import dumps
from ..logging_setup import iso_utc
from ..redaction import redact_obj, safe_text, secret_values


def errors_file_path(log_dir: Path, rank: int = 0) -> Path:
    return log_dir / (f"errors.rank{rank}.jsonl" if rank > 0 else "errors.jsonl")


class ErrorsFileSink(Sink):
    name = "errors_file"
    scope = "rank"
    threaded = True

    def __init__(self, log_dir: str | Path | None = None, rank: int | None = None) -> None:
        """``rank`` picks the file name; None means the rank the bus stamps on the events."""
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.rank = rank
        self._fh: IO[str] | None = None
        self.path: Path | None = None
        self.count = 0

    def on_run_started(self, e: RunStarted) -> None:
        if self.log_dir is None and (e.log_dir or e.output_dir):
            self.log_dir = Path(e.log_dir or Path(e.output_dir) / "logs")

    def on_error_caught(self, e: ErrorCaught) -> None:
        record: dict[str, Any] = {
            "timestamp": iso_utc(e.time_ns / 1e9), "category": e.category, "message": e.message,
            "error_type": e.error_type, "exception_type": e.exception_type,
            "exception_qualified_type": e.exception_qualified_type, "exception_message": e.exception_message,
            "stacktrace": e.stacktrace, "context": e.context, "step": e.step, "epoch": e.epoch, "batch": e.batch,
            "batch_index": e.batch_index, "skipped_batch": e.skipped_batch, "fatal": e.fatal, "rank": e.rank,
            "counts": e.counts,
        }
        secrets = secret_values()
        record = redact_obj(record, secrets)
        for key in ("message", "exception_message", "stacktrace"):  # URL credentials too, in free text
            if isinstance(record[key], str):
                record[key] = safe_text(record[key], secrets)
        fh = self._open(e.rank if self.rank is None else self.rank)
        fh.write(dumps(record, ensure_ascii=False) + "\n")
        fh.flush()
        self.count += 1

    def _open(self, rank: int) -> IO[str]:
        if self._fh is None:
            log_dir = self.log_dir or Path("logs")
            log_dir.mkdir(parents=True, exist_ok=True)
            self.path = errors_file_path(log_dir, rank)
            self._fh = open(self.path, "a", encoding="utf-8")
        return self._fh

    def close(self, timeout: float = 5.0) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
