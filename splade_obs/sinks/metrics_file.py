"""MetricsFileSink: ``<log_dir>/training_metrics.json`` in the seed's shape, always a valid JSON file.

Shape::

    {"start_time": "2025-04-11T10:15:30.123Z", "end_time": null | "...", "duration_seconds": 12.3,
     "status": "RUNNING" | "FINISHED" | "FAILED" | "KILLED",
     "run_name": "...", "total_steps": 1000, "num_epochs": 3, "last_step": 250,
     "metrics_by_epoch": {"1": {"train_loss": .., "val_loss": .. (when validated), "learning_rate": ..,
                                "epoch_duration_seconds": .., "step": .., "base": .., "query_reg": ..,
                                "doc_reg": .., "query_nnz": .., "doc_nnz": .., "grad_norm": ..,
                                "samples_per_second": .., "skipped_batches": 0, "complete": true}},

Every number is an event's canonical metric under the key :func:`file_key` gives: the seed's keys
(``train_loss``, ``val_loss``, ``learning_rate``, ``epoch_duration_seconds``) by one table, every other name
without its section. The sink aggregates nothing itself: epoch means come in ``EpochDone``.
     "eval": [{"step": .., "epoch": .., "split": .., "metrics": {..}, "duration_seconds": .., "is_best": ..}],
     "checkpoints": [{"step": .., "epoch": .., "path": .., "reason": ..,
                      "errors_by_category": {..} (only once errors were caught)}],
     "errors_by_category": {"DATA_ERROR": 2}, "final_metrics": {..}, "counters": {..}, "error": null}

The file is rewritten atomically (temp file + fsync + rename) at run start, at each checkpoint, at least every
``interval`` seconds while steps come in (``last_step`` is the last step reported), after each epoch, after
each evaluation, on a fatal error and at run end, so a crash at any moment leaves the previous valid version.
A run stopped mid-epoch records that epoch with ``"complete": false`` (the trainer's partial ``EpochDone``).

Strict JSON: a non-finite number (a NaN loss, an infinite gradient norm) is written as the string ``"nan"`` /
``"inf"`` / ``"-inf"`` (:func:`splade_obs.finite.json_safe`), here and in ``system_info.json``.

On resume (``RunStarted.resumed``) the existing file is loaded and cut back to the checkpoint the run resumes
from (``start_step``): what came after it (a partial epoch, epochs, evaluations and checkpoints past that
step, errors counted since that checkpoint) is dropped, because the resumed run produces it again; the
trainer restores the epoch's exact sums from the checkpoint, so after ``kill -9`` and ``--resume auto`` the
finished file equals an uninterrupted run's apart from times, durations and ``resumed_at``. The sink also
writes ``RunStarted.system_info`` to ``system_info.json`` next to it at run start (``write_system_info=False``
turns that off).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_json
from ..bus import Sink
from ..finite import json_safe
from ..events import CheckpointSaved, EpochDone, ErrorCaught, EvaluationDone, RunFinished, RunStarted, StepDone
from ..logging_setup import iso_utc
from ..redaction import redact_obj
from ..sysinfo import save_system_info

METRICS_FILE = "training_metrics.json"


#: The seed's keys, by canonical name; every other canonical name loses its section (``epoch/query_nnz`` ->
#: ``query_nnz``, ``eval/ndcg_at_10`` -> ``ndcg_at_10``, ``errors/DATA_ERROR`` -> ``DATA_ERROR``).
SEED_KEYS = {"epoch/loss": "train_loss", "val/loss": "val_loss", "epoch/lr": "learning_rate",
             "epoch/duration_seconds": "epoch_duration_seconds"}


def file_key(name: str) -> str:
    """The key of canonical metric ``name`` in ``training_metrics.json`` (one table, one rule)."""
    return SEED_KEYS.get(name) or name.split("/", 1)[-1]


def _file_metrics(metrics: dict[str, float]) -> dict[str, float]:
    return {file_key(k): v for k, v in metrics.items()}


def _put(entries: list[dict[str, Any]], entry: dict[str, Any], key: tuple[str, ...]) -> None:
    """Append ``entry``, or replace the one with the same ``key`` values: a resumed run that redoes the
    checkpoint or evaluation a stop left behind records it once."""
    for i, old in enumerate(entries):
        if isinstance(old, dict) and all(old.get(k) == entry[k] for k in key):
            entries[i] = entry
            return
    entries.append(entry)


class MetricsFileSink(Sink):
    name = "metrics_file"
    scope = "run"
    threaded = True

    def __init__(self, log_dir: str | Path | None = None, write_system_info: bool = True,
                 interval: float | None = None) -> None:
        """``interval``: most seconds between rewrites while steps come in; None: the run's
        ``logging.metrics_file_interval`` (from ``RunStarted.config``), else 30."""
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.write_system_info = write_system_info
        self.interval = interval
        self._last_write = 0.0
        self.doc: dict[str, Any] = {}
        self._start_mono = 0.0
        self._prior_duration = 0.0
        self._lock = threading.Lock()
        self._finished = False

    @property
    def path(self) -> Path | None:
        return self.log_dir / METRICS_FILE if self.log_dir is not None else None

    # lifecycle ----------------------------------------------------------------------------------------
    def on_run_started(self, e: RunStarted) -> None:
        if self.log_dir is None:
            self.log_dir = Path(e.log_dir or Path(e.output_dir or ".") / "logs")
        if self.interval is None:
            logging_section = (e.config or {}).get("logging")
            configured = logging_section.get("metrics_file_interval") if isinstance(logging_section, dict) else None
            self.interval = float(configured) if isinstance(configured, (int, float)) else 30.0
        self._start_mono = time.monotonic()
        self._finished = False
        previous = self._load_previous(e.start_step) if e.resumed else None
        if previous is not None:
            self.doc = previous
            self._prior_duration = float(previous.get("duration_seconds") or 0.0)
            self.doc.setdefault("resumed_at", []).append({"time": iso_utc(e.time_ns / 1e9), "step": e.start_step})
            self.doc["error"] = None
        else:
            self._prior_duration = 0.0
            self.doc = {"start_time": iso_utc(e.time_ns / 1e9), "end_time": None, "duration_seconds": 0.0,
                        "metrics_by_epoch": {}, "eval": [], "checkpoints": [], "errors_by_category": {},
                        "final_metrics": {}, "counters": {}, "error": None}
        self.doc.update({"status": "RUNNING", "end_time": None, "run_name": e.run_name,
                         "total_steps": e.total_steps, "num_epochs": e.num_epochs,
                         "steps_per_epoch": e.steps_per_epoch, "last_step": e.start_step})
        if self.write_system_info and e.system_info:
            save_system_info(json_safe(redact_obj(dict(e.system_info))), self.log_dir)
        self._write()

    def on_step_done(self, e: StepDone) -> None:
        self.doc["last_step"] = e.step
        if time.monotonic() - self._last_write >= (self.interval or 0.0):
            self._write()

    def on_error_caught(self, e: ErrorCaught) -> None:
        errs = self.doc.setdefault("errors_by_category", {})
        errs[e.category] = errs.get(e.category, 0) + 1
        if e.fatal:
            self.doc["status"] = "FAILED"
            self.doc["error"] = {"category": e.category, "message": e.message, "error_type": e.error_type,
                                 "step": e.step, "epoch": e.epoch}
            self._write()

    def on_epoch_done(self, e: EpochDone) -> None:
        """The epoch's aggregates as the trainer computed them, under the file's keys; a stopped run's
        partial epoch goes in with ``"complete": false`` (and is replaced when a resumed run finishes it)."""
        record: dict[str, Any] = _file_metrics(e.metrics())
        record["skipped_batches"] = int(record.get("skipped_batches") or 0)
        record.update({"step": e.step, "complete": e.complete})
        if not e.complete:
            record["steps_completed"] = e.steps_completed
        self.doc["metrics_by_epoch"][str(e.epoch)] = record
        self.doc["last_step"] = max(int(self.doc.get("last_step") or 0), e.step)
        self._write()

    def on_evaluation_done(self, e: EvaluationDone) -> None:
        metrics = _file_metrics({k: v for k, v in e.metrics().items() if k != "eval/duration_seconds"})
        _put(self.doc.setdefault("eval", []), {"step": e.step, "epoch": e.epoch, "split": e.split,
                                               "metrics": metrics, "duration_seconds": e.duration_seconds,
                                               "is_best": e.is_best}, ("step", "split"))
        self._write()

    def on_checkpoint_saved(self, e: CheckpointSaved) -> None:
        """Recorded and written at once: the file holds every checkpoint a resume can start from, and the
        error counts at it (what a resume from there goes back to)."""
        entry: dict[str, Any] = {"step": e.step, "epoch": e.epoch, "path": e.path, "reason": e.reason}
        if self.doc.get("errors_by_category"):
            entry["errors_by_category"] = dict(self.doc["errors_by_category"])
        _put(self.doc.setdefault("checkpoints", []), entry, ("step", "reason"))
        self.doc["last_step"] = max(int(self.doc.get("last_step") or 0), e.step)
        self._write()

    def on_run_finished(self, e: RunFinished) -> None:
        self.doc.update({"status": e.status, "end_time": iso_utc(e.time_ns / 1e9),
                         "final_metrics": _file_metrics(e.final_metrics), "counters": _file_metrics(e.counters),
                         "last_step": e.step, "model_path": e.model_path})
        if e.error:
            self.doc["error"] = e.error
        self._finished = True
        self._write()

    def persist(self) -> None:
        """Before a checkpoint: the file as of the last step reported."""
        if self.doc:
            self._write()

    def close(self, timeout: float = 5.0) -> None:
        """A run that never sent RunFinished (hard crash) still leaves its last state on disk."""
        if self.doc and not self._finished:
            self._write()

    # helpers ------------------------------------------------------------------------------------------
    def _load_previous(self, start_step: int) -> dict[str, Any] | None:
        """The previous file, cut back to the checkpoint at ``start_step``: what the resumed run redoes goes."""
        assert self.path is not None
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(doc, dict) or not isinstance(doc.get("metrics_by_epoch"), dict):
            return None

        def before(entry: Any) -> bool:
            return isinstance(entry, dict) and int(entry.get("step") or 0) <= start_step

        # a partial epoch, and epochs that ended after the checkpoint, come back when the resumed run ends them
        doc["metrics_by_epoch"] = {k: v for k, v in doc["metrics_by_epoch"].items()
                                   if before(v) and v.get("complete", True)}
        doc["eval"] = [v for v in doc.get("eval") or [] if before(v)]
        doc["checkpoints"] = [v for v in doc.get("checkpoints") or [] if before(v)]
        if doc["checkpoints"]:  # errors caught after the checkpoint happen again in the resumed run
            doc["errors_by_category"] = dict(doc["checkpoints"][-1].get("errors_by_category") or {})
        return doc

    def _write(self) -> None:
        if self.path is None or not self.doc:
            return
        self._last_write = time.monotonic()
        self.doc["duration_seconds"] = round(self._prior_duration + self._last_write - self._start_mono, 3)
        with self._lock:
            atomic_write_json(self.path, json_safe(redact_obj(self.doc)))
