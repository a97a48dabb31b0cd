"""Exact resume, end to end through the CLI: a run killed at a random step (SIGKILL: no goodbye; SIGTERM: a stop
checkpoint) and continued with ``--resume auto`` ends with what an uninterrupted run with the same seed holds in
every output: the final weights, MLflow's per-step points and epoch means, ``training_metrics.json`` (apart
from times, durations, ``resumed_at`` and the run's paths). A corrupt latest checkpoint is skipped with a
warning that names it; ``--resume PATH`` to it is an error naming the bad file.

Every run is a real ``splade-obs train`` subprocess on the demo data (12 steps of splade-tiny, a checkpoint
every 2 steps, a sqlite MLflow store and the file span exporter under tmp_path).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from splade_obs.errors import EXIT_CODES, ErrorCategory
from splade_obs_cli.main import cli

from .conftest import REPO, TINY_ARGS

DEMO = REPO / "splade_obs" / "demo" / "train.jsonl"  # the collator's seed includes the data path: one path for all
STEPS = 12
ARGS = [*TINY_ARGS, "--max-steps", str(STEPS), "--save-steps", "2", "--dropout", "0", "--mixed-precision", "no",
        "--seed", "7", "--train-file", str(DEMO), "--otel-exporter", "file", "--progress", "none",
        "--log-every-steps", "1"]
#: epoch means and file keys that are times or rates: they differ between any two runs
TIMING = {"duration_seconds", "samples_per_second", "tokens_per_second", "forward_seconds", "backward_seconds",
          "optimizer_seconds"}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1",
       "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


class Run:
    """One output dir + MLflow store; ``train()`` runs ``splade-obs train`` on it (optionally killed)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.out, self.db = root / "out", root / "mlflow.db"
        self.conf = root / "run.toml"  # the metrics file is rewritten every 50 ms: the kill can be aimed by it
        self.conf.write_text("[logging]\nmetrics_file_interval = 0.05\n")
        self.logs: list[Path] = []

    def cmd(self, *extra: str) -> list[str]:
        return [sys.executable, "-m", "splade_obs_cli.main", "train", "--config", str(self.conf),
                "--output-dir", str(self.out), "--tracking-uri", f"sqlite:///{self.db}", *ARGS, *extra]

    def train(self, *extra: str, kill_at: int | None = None, sig: int = signal.SIGKILL) -> int:
        """Run to the end, or send ``sig`` once ``training_metrics.json`` shows step ``kill_at``; the exit code."""
        log = self.root / f"run{len(self.logs)}.log"
        self.logs.append(log)
        with open(log, "wb") as fh:
            proc = subprocess.Popen(self.cmd(*extra), stdout=fh, stderr=subprocess.STDOUT, env=ENV, cwd=self.root)
            try:
                if kill_at is not None:
                    deadline = time.monotonic() + 600
                    while self.last_step() < kill_at:
                        assert proc.poll() is None, f"ended (rc {proc.returncode}) before step {kill_at}:\n{self.tail()}"
                        assert time.monotonic() < deadline, f"step {kill_at} never came:\n{self.tail()}"
                        time.sleep(0.01)
                    proc.send_signal(sig)
                return proc.wait(timeout=600)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()

    def last_step(self) -> int:
        try:
            return int(self.metrics_file().get("last_step") or 0)
        except (OSError, ValueError):
            return 0

    def metrics_file(self) -> dict[str, Any]:
        return json.loads((self.out / "logs" / "training_metrics.json").read_text())

    def tail(self) -> str:
        return self.logs[-1].read_text(errors="replace")[-3000:]

    def weights(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.out / "final" / "model.safetensors"))

    def mlflow(self) -> tuple[Any, Any]:
        from mlflow.tracking import MlflowClient
        client = MlflowClient(f"sqlite:///{self.db}")
        exp = client.get_experiment_by_name("splade-obs")
        runs = client.search_runs([exp.experiment_id])
        assert len(runs) == 1, f"{len(runs)} MLflow runs: the resumed run must continue the killed one"
        return client, runs[0]


def _points(client: Any, run: Any, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))


def _epoch_keys(run: Any) -> set[str]:
    return {k for k in run.data.metrics if k.startswith("epoch/") and k.split("/", 1)[1] not in TIMING}


def _normalized(run: Run, *outs: Path) -> dict[str, Any]:
    """``training_metrics.json`` without what differs between any two runs: times, durations and rates,
    ``resumed_at``, the run name (checked on its own) and the output folder in paths (also ``outs``)."""
    text = json.dumps(run.metrics_file())
    for out in (run.out, *outs):
        text = text.replace(str(out), "<out>")
    doc = json.loads(text)
    for key in ("start_time", "end_time", "duration_seconds", "resumed_at", "run_name"):
        doc.pop(key, None)
    for epoch in doc["metrics_by_epoch"].values():
        for key in TIMING | {"epoch_duration_seconds"}:
            epoch.pop(key, None)
    for ev in doc.get("eval", []):
        ev.pop("duration_seconds", None)
    return doc


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Run:
    """The uninterrupted run every interrupted one is compared with."""
    run = Run(tmp_path_factory.mktemp("straight"))
    assert run.train() == 0, run.tail()
    return run


def _assert_same_outputs(straight: Run, resumed: Run, *, kill_note: str, resumed_at: int) -> None:
    # the weights, bit for bit
    wa, wb = straight.weights(), resumed.weights()
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), f"final weights differ ({kill_note})"
    # the metrics file: equal apart from times, durations, resumed_at and the run's folder
    a, b = _normalized(straight), _normalized(resumed)
    b["checkpoints"] = [c for c in b["checkpoints"] if c["reason"] != "interrupt"]  # the stop's own checkpoint
    assert a == b, kill_note
    doc = resumed.metrics_file()
    assert doc["status"] == "FINISHED" and [r["step"] for r in doc["resumed_at"]] == [resumed_at]
    # MLflow: one run; the epoch means equal; every step's loss once, equal to the uninterrupted run's
    ca, ra = straight.mlflow()
    cb, rb = resumed.mlflow()
    epoch_keys = _epoch_keys(ra)
    assert "epoch/loss" in epoch_keys and epoch_keys == _epoch_keys(rb)
    for key in sorted(epoch_keys):
        assert _points(ca, ra, key) == _points(cb, rb, key), f"{key} ({kill_note})"
    loss_a, loss_b = dict(_points(ca, ra, "train/loss")), _points(cb, rb, "train/loss")
    steps = [s for s, _ in loss_b]
    assert len(steps) == len(set(steps)) and all(loss_a[s] == v for s, v in loss_b), kill_note
    # points the killed process still held reached the unsent file at the checkpoint (bus barrier) and the
    # resume replayed them: every step once, none lost
    assert steps == list(range(1, STEPS + 1)), f"steps logged {steps} ({kill_note})"


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_kill_at_a_random_step_then_resume_equals_the_uninterrupted_run(straight, tmp_path, sig):
    kill_at = random.Random().randint(3, STEPS - 2)  # after the first checkpoint (step 2)
    note = f"{signal.Signals(sig).name} once step {kill_at} was reported"
    run = Run(tmp_path / "killed")
    rc = run.train(kill_at=kill_at, sig=sig)
    killed = run.metrics_file()
    assert rc == (-signal.SIGKILL if sig == signal.SIGKILL else 130), f"rc {rc} ({note}):\n{run.tail()}"
    assert killed["last_step"] >= kill_at and killed["status"] == ("RUNNING" if sig == signal.SIGKILL else "KILLED")
    name = killed["run_name"]

    assert run.train("--resume", "auto") == 0, run.tail()
    resumed_at = int(re.search(r"resumed at step (\d+)", run.logs[-1].read_text(errors="replace")).group(1))
    assert killed["checkpoints"][-1]["step"] == resumed_at <= killed["last_step"]
    assert run.metrics_file()["run_name"] == name, "the resumed run keeps its name"
    assert run.mlflow()[1].info.run_name == name
    _assert_same_outputs(straight, run, kill_note=note, resumed_at=resumed_at)


def test_corrupt_latest_checkpoint_is_skipped_with_a_warning(straight, tmp_path):
    """A truncated model file in the newest checkpoint: ``--resume auto`` warns, naming it, resumes from the one
    before and still ends where the uninterrupted run ended; ``--resume`` to it names the file."""
    run = Run(tmp_path / "corrupt")
    shutil.copytree(straight.out, run.out)
    ckpts = sorted((run.out / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert [p.name for p in ckpts] == [f"checkpoint-{STEPS - 2}", f"checkpoint-{STEPS}"]
    weights = ckpts[-1] / "model" / "model.safetensors"
    with open(weights, "r+b") as fh:
        fh.truncate(weights.stat().st_size - 1000)

    res = CliRunner().invoke(cli, ["train", "--output-dir", str(run.out), *ARGS, "--no-mlflow",
                                   "--resume", str(ckpts[-1])])
    assert res.exit_code == EXIT_CODES[ErrorCategory.FILE_SYSTEM_ERROR], res.output
    assert res.stderr.startswith("error[FILE_SYSTEM_ERROR]:") and str(weights) in res.stderr, res.stderr
    assert "truncated" in res.stderr and "Traceback" not in res.stderr

    shutil.rmtree(run.out / "final")  # made again by the resumed run
    assert run.train("--resume", "auto", "--no-mlflow") == 0, run.tail()
    log = run.tail()
    warnings = [line for line in log.splitlines() if "is unusable" in line]
    assert len(warnings) == 1 and str(ckpts[-1]) in warnings[0] and "model.safetensors" in warnings[0], log
    assert f"resumed at step {STEPS - 2}" in log
    wa, wb = straight.weights(), run.weights()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert _normalized(run, straight.out) == _normalized(straight)  # epochs and checkpoints after step STEPS-2 made again


@pytest.mark.parametrize("damage", ["truncated weights", "overwritten optimizer", "broken state", "missing scaler",
                                    "garbage weights header"])
def test_checkpoint_validation_names_the_bad_file(straight, tmp_path, damage):
    from splade_obs.checkpoint import find_resume_checkpoint, validate_checkpoint
    from splade_obs.errors import FileSystemError

    out = tmp_path / "out"
    for name in ("checkpoint-8", "checkpoint-10"):  # two copies of a good checkpoint, the newer one damaged
        shutil.copytree(straight.out / "checkpoints" / f"checkpoint-{STEPS - 2}", out / "checkpoints" / name)
    ckpt = out / "checkpoints" / "checkpoint-10"
    bad = {"truncated weights": ckpt / "model" / "model.safetensors", "overwritten optimizer": ckpt / "optimizer.pt",
           "broken state": ckpt / "trainer_state.json", "missing scaler": ckpt / "scaler.pt",
           "garbage weights header": ckpt / "model" / "model.safetensors"}[damage]
    if damage == "truncated weights":
        os.truncate(bad, bad.stat().st_size // 2)
    elif damage == "overwritten optimizer":  # same size, some bytes in the middle replaced
        with open(bad, "r+b") as fh:
            fh.seek(bad.stat().st_size // 2)
            fh.write(os.urandom(64))
    elif damage == "broken state":
        bad.write_text('{"global_step": 10, "epoch"')
    elif damage == "missing scaler":
        bad.unlink()
    else:
        with open(bad, "r+b") as fh:
            fh.write(b"\xff" * 8)
    with pytest.raises(FileSystemError) as info:
        validate_checkpoint(ckpt)
    assert info.value.context["file_path"] == str(bad)
    skipped: list = []
    assert find_resume_checkpoint(out, "auto", skipped=skipped) == out / "checkpoints" / "checkpoint-8"
    assert [p for p, _ in skipped] == [ckpt] and str(bad) in skipped[0][1]
    with pytest.raises(FileSystemError, match="checkpoint"):
        find_resume_checkpoint(out, str(ckpt))
    shutil.rmtree(out / "checkpoints" / "checkpoint-8")  # nothing usable left: an error, not a fresh start
    with pytest.raises(FileSystemError, match="no usable checkpoint") as info:
        find_resume_checkpoint(out, "auto")
    assert "checkpoint-10" in info.value.message
