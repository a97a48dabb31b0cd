"""Per-step values stay on the device: a short real run counts the device-to-host copies the training step
path makes (every ``Tensor.item`` / ``tolist`` / ``__float__`` / ``__int__`` / ``__bool__`` / ``__index__`` /
``cpu`` / ``numpy`` called from the project's code), and the deferred reports carry exactly the values of
per-step reports."""

from __future__ import annotations

import collections
import math
import sys
from pathlib import Path

import pytest
import torch

from splade_obs.bus import RecordingSink, Sink
from splade_obs.events import EpochDone, EpochStarted, ErrorCaught, StepDone
from splade_obs.run import run_training

PROJECT = Path(__file__).resolve().parents[1] / "splade_obs"
#: host-side code that turns CPU tensors into Python values before anything reaches the device (tokenizer
#: output counted by the collator, the epoch's example order): not a device-to-host copy on any device
HOST_SIDE = {PROJECT / "data.py", PROJECT / "collate.py"}
#: the head's CPU-only vocabulary passes: ``model._prefilter`` picks them only for a CPU tensor (checked below), so
#: their reads of sizes and counts never wait on a device
CPU_ONLY = {(PROJECT / "model.py", name) for name in ("_int8_group", "_exact_candidates",
                                                        "_max_per_document_prefiltered")}
SYNC_METHODS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "cpu", "numpy")
TORCH = str(Path(torch.__file__).parent)

STEPS, ACCUM, LOG_EVERY = 6, 2, 3


def _cfg(tiny_cfg, log_every: int, max_steps: int = STEPS, **sections):
    return tiny_cfg(optim={"max_steps": max_steps, "gradient_accumulation_steps": ACCUM, "batch_size": 4,
                           "learning_rate": 3e-4, "mixed_precision": "no", "device": "cpu", "seed": 5},
                    model={"dropout": 0.0}, logging={"log_every_steps": log_every}, **sections)


class SyncCounter(Sink):
    """Counts device-to-host copies made by project code from the first ``EpochStarted`` on; ``at_last_step``
    is the count when the last ``StepDone`` arrived (validation, checkpoints and the final save come later)."""

    name, scope = "sync_counter", "rank"

    def __init__(self) -> None:
        self.active = False
        self.calls: collections.Counter[str] = collections.Counter()
        self.at_last_step: collections.Counter[str] = collections.Counter()

    def on_epoch_started(self, e: EpochStarted) -> None:
        self.active = True

    def on_step_done(self, e: StepDone) -> None:
        self.at_last_step = collections.Counter(self.calls)

    def site(self) -> str | None:
        """``file:line`` of the project code that asked for the copy, or None when it is not ours to count."""
        frame = sys._getframe(2)
        while frame is not None and frame.f_code.co_filename.startswith(TORCH):
            if "/optim/" in frame.f_code.co_filename:
                return None  # the optimizer's step counters: CPU tensors on every device
            frame = frame.f_back
        if frame is None:
            return None
        path = Path(frame.f_code.co_filename)
        if PROJECT not in path.parents or path in HOST_SIDE or (path, frame.f_code.co_name) in CPU_ONLY:
            return None
        return f"{path.relative_to(PROJECT.parent)}:{frame.f_lineno}"

    def install(self, monkeypatch) -> None:
        for name in SYNC_METHODS:
            original = getattr(torch.Tensor, name)

            def counted(tensor, *args, __original=original, __name=name, **kwargs):
                if self.active:
                    where = self.site()
                    if where is not None:
                        self.calls[f"{__name} at {where}"] += 1
                return __original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)


def _values(e: StepDone) -> dict:
    """What a step reports, less its clock readings (times, throughput, timings)."""
    return {"step": e.step, "epoch": e.epoch, "batch_index": e.batch_index, "loss": e.loss, "parts": e.parts,
            "lr": e.learning_rate, "grad_norm": e.grad_norm, "batch_size": e.batch_size, "num_tokens": e.num_tokens,
            "query_nnz": e.query_nnz, "doc_nnz": e.doc_nnz, "retrieval_flops": e.retrieval_flops,
            "lambda_q": e.lambda_q, "lambda_d": e.lambda_d, "grad_scale": e.grad_scale}


def test_at_most_one_sync_per_step_plus_one_per_logging_point_and_values_unchanged(tiny_cfg, tmp_path, monkeypatch):
    # reference: every step reported as it ends
    ref = RecordingSink()
    assert run_training(_cfg(tiny_cfg, 1, checkpoint={"output_dir": str(tmp_path / "ref")}),
                        extra_sinks=[ref]).status == "FINISHED"

    counter, rec = SyncCounter(), RecordingSink()
    counter.install(monkeypatch)
    res = run_training(_cfg(tiny_cfg, LOG_EVERY, checkpoint={"output_dir": str(tmp_path / "deferred")}),
                       extra_sinks=[counter, rec])
    monkeypatch.undo()
    assert res.status == "FINISHED"

    steps = rec.of(StepDone)
    assert [s.step for s in steps] == list(range(1, STEPS + 1))
    logging_points = STEPS // LOG_EVERY  # steps 3 and 6 (6 is also the last step)
    syncs = sum(counter.at_last_step.values())
    detail = "\n".join(f"{n:4d}  {k}" for k, n in counter.at_last_step.most_common())
    assert syncs <= STEPS * (1 + 1 / LOG_EVERY), f"{syncs} syncs for {STEPS} steps:\n{detail}"
    assert syncs == STEPS + logging_points, detail  # one finiteness check per step, one copy per logging point
    assert counter.active and sum(counter.calls.values()) >= syncs

    # the deferral changes when values are fetched, not what they are
    assert [_values(s) for s in steps] == [_values(s) for s in ref.of(StepDone)]
    for s in steps:
        assert all(math.isfinite(v) for v in (s.loss, s.grad_norm, s.query_nnz, s.doc_nnz, s.retrieval_flops))
        assert s.start_ns < s.end_ns == s.time_ns and s.timings["forward"] > 0 and s.samples_per_second > 0
    assert [s.end_ns for s in steps] == sorted(s.end_ns for s in steps)
    # the epoch's means are the means of the steps it reported
    (epoch,) = rec.of(EpochDone)
    assert epoch.complete and epoch.steps_completed == STEPS
    for key in ("loss", "base", "query_reg", "doc_reg", "grad_norm", "query_nnz", "doc_nnz", "retrieval_flops", "lr"):
        mean = sum(s.metrics()[f"train/{key}"] for s in steps) / STEPS
        assert epoch.means[f"epoch/{key}"] == pytest.approx(mean, rel=1e-12), key


def test_a_non_finite_micro_batch_skips_its_whole_accumulated_step(tiny_cfg):
    """batch 3 is the first micro-batch of step 2 (2 micro-batches per step): the step is skipped, the skip is
    reported against batch 3, and the run still makes its optimizer steps on the following batches."""
    rec = RecordingSink()
    res = run_training(_cfg(tiny_cfg, LOG_EVERY, max_steps=3, recovery={"inject_faults": ("batch:3:nan",)}),
                       extra_sinks=[rec])
    assert res.status == "FINISHED" and res.result.global_step == 3
    (err,) = rec.of(ErrorCaught)
    assert err.category == "TRAINING_ERROR" and err.skipped_batch and not err.fatal
    assert (err.context["batch"], err.batch_index, err.step) == (3, 2, 2)  # batch 3 was going into step 2
    assert "non-finite loss" in err.message and math.isnan(err.context["loss"])
    steps = rec.of(StepDone)
    assert [(s.step, s.batch_index) for s in steps] == [(1, 1), (2, 5), (3, 7)]  # batches 3-4 made no step
    assert all(math.isfinite(s.loss) for s in steps)
    assert res.result.counters["train/skipped_batches"] == 1
    (epoch,) = rec.of(EpochDone)
    assert epoch.skipped_batches == 1 and epoch.steps_completed == 3


def test_the_cpu_only_passes_are_picked_for_cpu_tensors_only():
    """What lets SyncCounter leave CPU_ONLY out: off a CPU the head takes the plain fp32 pass, whatever this
    machine's measurement says."""
    from splade_obs import model

    weight = torch.zeros(8, 4)
    assert model._prefilter(torch.zeros(1, 2, 4, device="meta"), weight) == "fp32"
    assert model._prefilter(torch.zeros(1, 2, 4), weight.to(torch.bfloat16)) == "fp32"
    assert {name for _, name in CPU_ONLY} <= set(vars(model))
