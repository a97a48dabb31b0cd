"""MetricsFileSink: ``<log_dir>/training_metrics.json`` in the seed's shape, always a valid JSON file.

Shape::

    {"start_time": "2025-04-11T10:15:30.123Z", "end_time": null | "...", "duration_seconds": 12.3,
     "status": "RUNNING" | "FINISHED" | "FAILED" | "KILLED",
     "run_name": "...", "total_steps": 1000, "num_epochs": 3, "last_step": 250,
     "metrics_by_epoch": {"1": {"train_loss": .., "val_loss": .. (when validated), "learning_rate": ..,
                                "epoch_duration_seconds": .., "step": .., "base": .., "query_reg": ..,
                                "doc_reg": .., "query_nnz": .., "doc_nnz": .., "grad_norm": ..,
                                "samples_per_second": .., "skipped_batches": 0, "complete": true}},
     "eval": [{"step": .., "epoch": .., "split": .., "metrics": {..}, "duration_seconds": .., "is_best": ..}],
     "checkpoints": [{"step": .., "epoch": .., "path": .., "reason": ..}],
     "errors_by_category": {"DATA_ERROR": 2}, "final_metrics": {..}, "counters": {..}, "error": null}

The file is rewritten atomically (temp file + fsync + rename) at run start, after each epoch, after each
evaluation, on a fatal error and at run end, so a crash at any moment leaves the previous valid version.
A run killed mid-epoch records that epoch with ``"complete": false``. On resume the existing file is
loaded and continued. The sink also writes ``RunStarted.system_info`` to ``system_info.json`` next to it
at run start (``write_system_info=False`` turns that off).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_json
from ..events import (CheckpointSaved, EpochDone, EpochStarted, ErrorCaught, EvaluationDone, RunFinished, RunStarted,
                      Sink, StepDone)
from ..logging_setup import iso_utc, redact_obj
from ..sysinfo import save_system_info

METRICS_FILE = "training_metrics.json"


class _EpochAccumulator:
    """Running sums of per-step values for the epoch in progress (means go into the file)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0
        self.skipped = 0
        self.last_lr: float | None = None
        self.last_step = 0

    def add(self, e: StepDone) -> None:
        self.count += 1
        self.last_lr, self.last_step = e.learning_rate, e.step
        values = {"loss": e.loss, **e.parts, "query_nnz": e.query_nnz, "doc_nnz": e.doc_nnz,
                  "grad_norm": e.grad_norm, "samples_per_second": e.samples_per_second,
                  "tokens_per_second": e.tokens_per_second}
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)

    def means(self) -> dict[str, float]:
        if not self.count:
            return {}
        return {k: v / self.count for k, v in self.sums.items()}


class MetricsFileSink(Sink):
    name = "metrics_file"
    scope = "run"
    threaded = True

    def __init__(self, log_dir: str | Path | None = None, write_system_info: bool = True) -> None:
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.write_system_info = write_system_info
        self.doc: dict[str, Any] = {}
        self._acc = _EpochAccumulator()
        self._epoch: int | None = None
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
        self._start_mono = time.monotonic()
        self._finished = False
        previous = self._load_previous() if e.resumed else None
        if previous is not None:
            self.doc = previous
            self._prior_duration = float(previous.get("duration_seconds") or 0.0)
            self.doc.setdefault("resumed_at", []).append({"time": iso_utc(e.time_ns / 1e9), "step": e.start_step})
        else:
            self._prior_duration = 0.0
            self.doc = {"start_time": iso_utc(e.time_ns / 1e9), "end_time": None, "duration_seconds": 0.0,
                        "metrics_by_epoch": {}, "eval": [], "checkpoints": [], "errors_by_category": {},
                        "final_metrics": {}, "counters": {}, "error": None}
        self.doc.update({"status": "RUNNING", "end_time": None, "run_name": e.run_name,
                         "total_steps": e.total_steps, "num_epochs": e.num_epochs,
                         "steps_per_epoch": e.steps_per_epoch, "last_step": e.start_step})
        if self.write_system_info and e.system_info:
            save_system_info(redact_obj(dict(e.system_info)), self.log_dir)
        self._write()

    def on_epoch_started(self, e: EpochStarted) -> None:
        self._epoch = e.epoch
        self._acc = _EpochAccumulator()

    def on_step_done(self, e: StepDone) -> None:
        if self._epoch != e.epoch:  # no EpochStarted seen (dropped or resumed mid-epoch)
            self._epoch, self._acc = e.epoch, _EpochAccumulator()
        self._acc.add(e)
        self.doc["last_step"] = e.step

    def on_error_caught(self, e: ErrorCaught) -> None:
        errs = self.doc.setdefault("errors_by_category", {})
        errs[e.category] = errs.get(e.category, 0) + 1
        if e.skipped_batch:
            self._acc.skipped += 1
        if e.fatal:
            self.doc["status"] = "FAILED"
            self.doc["error"] = {"category": e.category, "message": e.message, "error_type": e.error_type,
                                 "step": e.step, "epoch": e.epoch}
            self._record_partial_epoch()
            self._write()

    def on_epoch_done(self, e: EpochDone) -> None:
        record: dict[str, Any] = {"train_loss": e.train_loss}
        if e.val_loss is not None:
            record["val_loss"] = e.val_loss
        record.update({"learning_rate": e.learning_rate, "epoch_duration_seconds": e.duration_seconds,
                       "step": e.step})
        means = self._acc.means() if self._epoch == e.epoch else {}
        means.pop("loss", None)  # train_loss from the trainer is authoritative
        record.update(means)
        record["skipped_batches"] = self._acc.skipped if self._epoch == e.epoch else 0
        record.update(e.extra)  # the trainer's own numbers win over our step means
        record["skipped_batches"] = int(record.get("skipped_batches") or 0)
        record["complete"] = True
        self.doc["metrics_by_epoch"][str(e.epoch)] = record
        self.doc["last_step"] = max(int(self.doc.get("last_step") or 0), e.step)
        self._acc = _EpochAccumulator()
        self._epoch = None
        self._write()

    def on_evaluation_done(self, e: EvaluationDone) -> None:
        self.doc.setdefault("eval", []).append({"step": e.step, "epoch": e.epoch, "split": e.split,
                                                "metrics": dict(e.metrics), "duration_seconds": e.duration_seconds,
                                                "is_best": e.is_best})
        self._write()

    def on_checkpoint_saved(self, e: CheckpointSaved) -> None:
        self.doc.setdefault("checkpoints", []).append({"step": e.step, "epoch": e.epoch, "path": e.path,
                                                       "reason": e.reason})

    def on_run_finished(self, e: RunFinished) -> None:
        self._record_partial_epoch()
        self.doc.update({"status": e.status, "end_time": iso_utc(e.time_ns / 1e9),
                         "final_metrics": dict(e.final_metrics), "counters": dict(e.counters),
                         "last_step": e.step, "model_path": e.model_path})
        if e.error:
            self.doc["error"] = e.error
        self._finished = True
        self._write()

    def close(self, timeout: float = 5.0) -> None:
        """A run that never sent RunFinished (hard crash) still leaves its last state on disk."""
        if self.doc and not self._finished:
            self._record_partial_epoch()
            self._write()

    # helpers ------------------------------------------------------------------------------------------
    def _record_partial_epoch(self) -> None:
        """Steps of an epoch that did not finish go in as ``"complete": false`` (killed or crashed runs)."""
        if self._epoch is None or not self._acc.count:
            return
        means = self._acc.means()
        record: dict[str, Any] = {"train_loss": means.pop("loss")}
        record.update({"learning_rate": self._acc.last_lr, "step": self._acc.last_step, **means,
                       "skipped_batches": self._acc.skipped, "steps_completed": self._acc.count,
                       "complete": False})
        self.doc["metrics_by_epoch"][str(self._epoch)] = record

    def _load_previous(self) -> dict[str, Any] | None:
        assert self.path is not None
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(doc, dict) or not isinstance(doc.get("metrics_by_epoch"), dict):
            return None
        # epochs the resumed run will redo are dropped; they come back when that epoch finishes
        doc["metrics_by_epoch"] = {k: v for k, v in doc["metrics_by_epoch"].items()
                                   if isinstance(v, dict) and v.get("complete", True)}
        return doc

    def _write(self) -> None:
        if self.path is None or not self.doc:
            return
        self.doc["duration_seconds"] = round(self._prior_duration + time.monotonic() - self._start_mono, 3)
        with self._lock:
            atomic_write_json(self.path, redact_obj(self.doc))
