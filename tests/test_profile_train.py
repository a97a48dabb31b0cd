"""benchmarks/profile_train.py --quick: the profiler over real training steps of splade-tiny (issue 36, point 2)."""

from __future__ import annotations

import re

import pytest

from ._eval_utils import run_quick_training_bench


def test_profile_train_records_the_steps_it_says_and_their_operators(tmp_path, tiny_model_path):
    out = tmp_path / "profile.txt"
    run_quick_training_bench("profile_train.py", tmp_path, out)
    header, *table = out.read_text(encoding="utf-8").splitlines()
    assert re.match(r"2 profiled steps of batch \d+ at lengths 16/32, .* ms a step \([\d.]+ samples/s", header), header
    ops = {line.split()[0] for line in table if line.strip().startswith("aten::")}
    assert {"aten::addmm", "aten::amax"} <= ops, ops  # the body's linear layers and the head's token max
    assert "ProfilerStep*" in "\n".join(table)  # the schedule's recorded steps, advanced by the optimizer hook


def test_count_ops_counts_each_phase_of_the_gpu_code_path(tmp_path, tiny_model_path):
    """``--count-ops``: operators per step by phase, every phase dispatching some, the step row their sum, and a
    forward fewer than its backward."""
    out = tmp_path / "ops.txt"
    run_quick_training_bench("profile_train.py", tmp_path, out, "--count-ops")
    header, _, *rows = out.read_text(encoding="utf-8").splitlines()
    assert header.startswith("operators per step on the GPU's code path, 2 steps of batch"), header
    counts = {line[:18].strip(): tuple(float(x) for x in line[18:].split()) for line in rows}
    assert set(counts) == {"backward", "forward", "loss", "optimizer", "rest of the step", "step"}
    assert all(kernels > 0 for kernels, _ in counts.values()), counts
    assert counts["step"][0] == pytest.approx(sum(counts[p][0] for p in counts if p != "step"))
    assert counts["forward"][0] < counts["backward"][0]
