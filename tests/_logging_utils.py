"""Helpers for the logging-layer tests: a synthetic but complete event sequence and schema checks."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from splade_obs.errors import DataError
from splade_obs.events import (CheckpointSaved, EpochDone, EpochStarted, ErrorCaught, Event, EvaluationDone,
                               RunFinished, RunStarted, StepDone)

TIMESTAMP_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
CONSOLE_RE = re.compile(r"^\[(DEBUG|INFO|WARNING|ERROR|CRITICAL)\] \d{4}-\d\d-\d\d \d\d:\d\d:\d\d - ")
PROGRESS_RE = re.compile(r"^Training: \d+/\d+ \(\d+\.\d%\) \[\d+\.\d it/s, ETA: \d+\.\ds\]$")
COMPLETED_RE = re.compile(r"^Completed training: \d+/\d+ \(100\.0%\) in \d+\.\ds \[\d+\.\d it/s\]$")
ANSI = "\x1b["

#: key -> accepted types of every JSON log line
JSON_LOG_KEYS: dict[str, tuple[type, ...]] = {
    "timestamp": (str,), "level": (str,), "name": (str,), "message": (str,), "module": (str,),
    "function": (str,), "line": (int,), "rank": (int,),
}
NUM = (int, float)


def run_started(log_dir: Path, total: int, epochs: int, resumed: bool = False, start_step: int = 0) -> RunStarted:
    return RunStarted(run_name="synthetic", config={"model": {"name": "splade-tiny"}, "optim": {"batch_size": 4}},
                      system_info={"python_version": "3.x", "gpu_names": []}, total_steps=total,
                      num_epochs=epochs, steps_per_epoch=total // epochs, log_dir=str(log_dir),
                      output_dir=str(log_dir.parent), resumed=resumed, start_step=start_step)


def step(n: int, epoch: int, total: int) -> StepDone:
    return StepDone(step=n, epoch=epoch, batch_index=n - 1, loss=2.0 / n, parts={"base": 1.5 / n, "query_reg": 0.1,
                    "doc_reg": 0.2}, learning_rate=1e-4 / n, grad_norm=0.5, batch_size=4, num_tokens=100,
                    samples_per_second=20.0, tokens_per_second=500.0, query_nnz=12.0, doc_nnz=40.0,
                    retrieval_flops=3.0, total_steps=total)


def epoch_means(steps: list[StepDone]) -> dict[str, float]:
    """What the trainer reports as an epoch's aggregates: epoch/<x> = mean of train/<x> over the steps."""
    rows = [s.metrics() for s in steps]
    return {"epoch/" + k.split("/", 1)[1]: sum(r[k] for r in rows) / len(rows) for k in rows[0]}


def partial_epoch(steps: list[StepDone], epoch: int, epochs: int) -> EpochDone:
    """The partial EpochDone a stopped run emits for the steps it got through."""
    return EpochDone(epoch=epoch, num_epochs=epochs, step=steps[-1].step, duration_seconds=0.5,
                     means=epoch_means(steps), steps_completed=len(steps), complete=False)


def epoch_events(epoch: int, epochs: int, steps_per_epoch: int, *, skip_batch: bool = False,
                 val_loss: float | None = 0.7, finish: bool = True) -> list[Event]:
    total = epochs * steps_per_epoch
    first = (epoch - 1) * steps_per_epoch + 1
    evs: list[Event] = [EpochStarted(epoch=epoch, num_epochs=epochs, steps_in_epoch=steps_per_epoch)]
    steps = []
    for n in range(first, first + steps_per_epoch):
        steps.append(step(n, epoch, total))
        evs.append(steps[-1])
        if skip_batch and n == first:
            err = DataError('field "query" is missing', file_path="train.jsonl", line_number=17, field="query")
            evs.append(ErrorCaught.from_error(err, step=n, epoch=epoch, batch_index=0, skipped_batch=True))
    if finish:
        last = first + steps_per_epoch - 1
        evs.append(EpochDone(epoch=epoch, num_epochs=epochs, step=last, duration_seconds=1.5, val_loss=val_loss,
                             means=epoch_means(steps), skipped_batches=1 if skip_batch else 0,
                             steps_completed=len(steps)))
        evs.append(EvaluationDone(step=last, epoch=epoch, split="test", scores={"ndcg@10": 0.3, "mrr@10": 0.25},
                                  duration_seconds=0.5, is_best=epoch == 1))
        evs.append(CheckpointSaved(step=last, epoch=epoch, path=f"ckpt-{last}", reason="epoch_end",
                                   duration_seconds=0.1))
    return evs


def full_run(log_dir: Path, epochs: int = 2, steps_per_epoch: int = 3) -> list[Event]:
    evs: list[Event] = [run_started(log_dir, epochs * steps_per_epoch, epochs)]
    for ep in range(1, epochs + 1):
        evs += epoch_events(ep, epochs, steps_per_epoch, skip_batch=ep == 1)
    evs.append(RunFinished(status="FINISHED", step=epochs * steps_per_epoch, duration_seconds=3.0,
                           final_metrics={"epoch/loss": 0.5, "eval/ndcg_at_10": 0.3},
                           counters={"train/skipped_batches": 1, "errors/DATA_ERROR": 1}))
    return evs


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def check_json_log_line(doc: dict[str, Any]) -> None:
    for key, types in JSON_LOG_KEYS.items():
        assert key in doc, f"{key} missing from {doc}"
        assert isinstance(doc[key], types), f"{key}={doc[key]!r} in {doc}"
    assert TIMESTAMP_RE.match(doc["timestamp"]), doc["timestamp"]
    assert doc["level"] in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
    for key in ("step", "epoch"):
        if key in doc and doc[key] is not None:
            assert isinstance(doc[key], int), doc
    if "category" in doc:
        assert isinstance(doc["category"], str) and isinstance(doc.get("context"), dict), doc


def check_metrics_file(doc: dict[str, Any], *, finished: bool) -> None:
    """Every key of the seed's shape, with its type."""
    assert TIMESTAMP_RE.match(doc["start_time"])
    if finished:
        assert TIMESTAMP_RE.match(doc["end_time"])
    else:
        assert doc["end_time"] is None
    assert isinstance(doc["duration_seconds"], NUM) and doc["duration_seconds"] >= 0
    assert doc["status"] in ("RUNNING", "FINISHED", "FAILED", "KILLED")
    assert isinstance(doc["metrics_by_epoch"], dict)
    for key, ep in doc["metrics_by_epoch"].items():
        assert key.isdigit()
        assert isinstance(ep["train_loss"], NUM) and isinstance(ep["learning_rate"], NUM)
        assert isinstance(ep["step"], int) and isinstance(ep["skipped_batches"], int)
        assert isinstance(ep["complete"], bool)
        if ep["complete"]:
            assert isinstance(ep["epoch_duration_seconds"], NUM)
        for part in ("base", "query_reg", "doc_reg", "query_nnz", "doc_nnz"):
            assert isinstance(ep[part], NUM), (part, ep)
        if "val_loss" in ep:
            assert isinstance(ep["val_loss"], NUM)
    assert isinstance(doc["eval"], list) and isinstance(doc["final_metrics"], dict)
    for ev in doc["eval"]:
        assert isinstance(ev["step"], int) and isinstance(ev["metrics"], dict) and isinstance(ev["split"], str)
    assert isinstance(doc["errors_by_category"], dict) and isinstance(doc["last_step"], int)


def all_file_text(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in root.rglob("*") if p.is_file()}
