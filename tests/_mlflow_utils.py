"""Helpers for the MLflow tests: a config pointing at a store under tmp_path, a realistic synthetic run,
and a real ``mlflow server`` on 127.0.0.1 (started and stopped by the test that needs it)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

from splade_obs.config import TrainConfig
from splade_obs.bus import EventBus, RunIds
from splade_obs.events import (CheckpointSaved, DataLoaded, EpochDone, EpochStarted, ErrorCaught, EvaluationDone,
                               ModelLoaded, RunFinished, RunStarted, StepDone)
from splade_obs.sinks.mlflow import MlflowOptions, MlflowSink

LONG_VALUE_LEN = 7000  # over MLflow's 6000-character param limit


def sqlite_uri(path: Path) -> str:
    return f"sqlite:///{path}"


def make_cfg(tmp_path: Path, uri: str | None = None, **tracking: Any) -> TrainConfig:
    """A config whose store, outputs and logs all live under ``tmp_path``; one overlong value (a long path)."""
    long_path = str(tmp_path / ("d" * (LONG_VALUE_LEN - len(str(tmp_path)) - 12)) / "train.jsonl")
    return TrainConfig.from_mapping({
        "data": {"train_file": long_path},
        "checkpoint": {"output_dir": str(tmp_path / "out")},
        "tracking": {"tracking_uri": uri or sqlite_uri(tmp_path / "m.db"), "experiment_name": "t",
                     "flush_interval": 0.0, **tracking},
    })


def options_for(cfg: TrainConfig) -> MlflowOptions:
    """The options ``run.build_sinks`` would give the sink for ``cfg``."""
    t = cfg.tracking
    return MlflowOptions(tracking_uri=t.tracking_uri, experiment_name=t.experiment_name, run_name=t.run_name,
                         require=t.require, register_model=t.register_model, log_model=t.log_model,
                         flush_interval=t.flush_interval)


def create_sink(cfg: TrainConfig, **kw: Any) -> MlflowSink | None:
    return MlflowSink.create(options_for(cfg), **kw)


def open_bus(sink: MlflowSink, *extra: Any) -> tuple[EventBus, RunIds]:
    """A bus with ``RunIds``, the sink and ``extra`` sinks, opened (the sink announces its run)."""
    ids = RunIds()
    bus = EventBus([ids, sink, *extra])
    bus.open()
    return bus, ids


def config_params(cfg: TrainConfig) -> dict[str, str]:
    """What ``RunStarted.params`` holds: ``TrainConfig.params()`` (the flattened config as param strings)."""
    return dict(cfg.params())


def write_log_files(log_dir: Path) -> None:
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / "train_splade.log").write_text("2025-01-01 INFO splade_obs.train started\n")
    (log_dir / "errors.jsonl").write_text(json.dumps({"category": "DATA_ERROR", "step": 3}) + "\n")
    (log_dir / "bad_records.jsonl").write_text("")  # empty: must not be uploaded


def step_event(step: int, *, epoch: int = 1, loss: float | None = None) -> StepDone:
    loss = 2.0 / step if loss is None else loss
    return StepDone(step=step, epoch=epoch, batch_index=step - 1, loss=loss,
                    parts={"base": loss * 0.9, "query_reg": 0.01 * step, "doc_reg": 0.02 * step},
                    learning_rate=1e-5 * step, grad_norm=1.0 + step, batch_size=4, num_tokens=100,
                    samples_per_second=8.0, tokens_per_second=200.0, query_nnz=30.0 - step, doc_nnz=80.0 - step,
                    retrieval_flops=1000.0 / step, lambda_q=1e-4 * step, lambda_d=2e-4 * step, total_steps=6)


def run_events(cfg: TrainConfig, *, steps: range = range(1, 7), status: str = "FINISHED", start_step: int = 0,
               model_path: str | None = None, fail_at: int | None = None) -> list[Any]:
    """A realistic run: start, two datasets, model, steps with one skipped batch, epoch, eval, checkpoint, end."""
    log_dir = str(cfg.log_dir)
    ev: list[Any] = [
        RunStarted(run_name="synthetic-run-0001", config=cfg.to_dict(), params=config_params(cfg),
                   model_name=cfg.model.name,
                   system_info={"hostname": "test-host", "mixed_precision": "float32", "git_commit": "a" * 40},
                   total_steps=steps.stop - 1, num_epochs=1, steps_per_epoch=steps.stop - 1, start_step=start_step,
                   resumed=start_step > 0, output_dir=str(cfg.output_dir), log_dir=log_dir),
        DataLoaded(split="train", source="/data/train.jsonl", num_examples=24, digest="sha256:" + "1" * 40,
                   fmt="jsonl"),
        DataLoaded(split="validation", source="/data/val.jsonl", num_examples=8, digest="sha256:" + "2" * 40,
                   fmt="jsonl"),
        ModelLoaded(name="splade-tiny", path="/models/splade-tiny", num_parameters=4_400_000, device="cpu",
                    amp_dtype="float32"),
        EpochStarted(epoch=1, num_epochs=1, steps_in_epoch=steps.stop - 1),
    ]
    counts: dict[str, int] = {}
    skipped = 0
    for s in steps:
        if s == 3:
            counts["DATA_ERROR"] = counts.get("DATA_ERROR", 0) + 1
            skipped += 1
            ev.append(ErrorCaught(category="DATA_ERROR", message="field \"query\" is missing", error_type="DataError",
                                  exception_type="KeyError", exception_message="query", context={}, step=s,
                                  epoch=1, skipped_batch=True, counts=dict(counts), skipped_batches=skipped))
            continue
        if fail_at is not None and s == fail_at:
            counts["TRAINING_ERROR"] = counts.get("TRAINING_ERROR", 0) + 1
            ev.append(ErrorCaught(category="TRAINING_ERROR", message="loss is NaN", error_type="TrainingError",
                                  exception_type=None, exception_message=None, context={}, step=s, epoch=1,
                                  fatal=True, counts=dict(counts)))
            break
        ev.append(step_event(s))
    last = ev[-1].step if hasattr(ev[-1], "step") and ev[-1].step else steps.stop - 1
    if fail_at is None:
        # a KILLED run stops inside its epoch: the trainer reports the partial epoch (complete=False)
        ev += [EpochDone(epoch=1, num_epochs=1, step=last, duration_seconds=3.0, val_loss=0.6, skipped_batches=skipped,
                         means={"epoch/loss": 0.5, "epoch/lr": 1e-5, "epoch/query_nnz": 25.0},
                         steps_completed=len(steps) - skipped, complete=status != "KILLED"),
               EvaluationDone(step=last, epoch=1, split="test", scores={"ndcg@10": 0.31, "mrr@10": 0.25},
                              duration_seconds=1.5),
               CheckpointSaved(step=last, epoch=1, path=str(cfg.output_dir / f"checkpoint-{last}"),
                               reason="epoch_end", duration_seconds=0.2)]
    counters = {f"errors/{k}": v for k, v in counts.items()}
    counters["train/skipped_batches"] = skipped
    ev.append(RunFinished(status=status, step=last, duration_seconds=10.0,
                          final_metrics={"epoch/loss": 0.5, "eval/ndcg_at_10": 0.31} if status == "FINISHED" else {},
                          error={"category": "TRAINING_ERROR", "message": "loss is NaN"} if status == "FAILED" else None,
                          output_dir=str(cfg.output_dir), model_path=model_path, counters=counters))
    return ev


def metric_steps(client: Any, run_id: str, key: str) -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, key)]


def artifact_paths(client: Any, run_id: str, path: str | None = None) -> set[str]:
    """Every file path under the run's artifacts (recursive)."""
    out: set[str] = set()
    for f in client.list_artifacts(run_id, path):
        if f.is_dir:
            out |= artifact_paths(client, run_id, f.path)
        else:
            out.add(f.path)
    return out


# ------------------------------------------------------------------------------------------ server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(tmp_path: Path, wait_s: float = 60.0) -> Iterator[tuple[str, subprocess.Popen, Path]]:
    """``mlflow server`` on a free 127.0.0.1 port with a sqlite backend under ``tmp_path``; killed on exit.

    Yields (url, process, backend db path). The caller may kill it early (the outage test does).
    """
    port = free_port()
    db = tmp_path / "server.db"
    art = tmp_path / "server-artifacts"
    art.mkdir(exist_ok=True)
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    # no GenAI job workers (8 processes of ~240 MB each that no test needs)
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    logf = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen(
        [str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{db}", "--default-artifact-root", art.as_uri()],
        stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, wait_s, tmp_path / "server.log")
        yield url, proc, db
    finally:
        stop_server(proc)
        logf.close()


def _wait_healthy(url: str, proc: subprocess.Popen, wait_s: float, log_path: Path) -> None:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited early:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"mlflow server not healthy after {wait_s}s:\n{log_path.read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    """Kill the server's whole process group (it forks uvicorn workers)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)
