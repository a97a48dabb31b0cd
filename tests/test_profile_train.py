"""benchmarks/profile_train.py --quick: the profiler over real training steps of splade-tiny (issue 36, point 2)."""

from __future__ import annotations

import re

from ._eval_utils import run_quick_training_bench


def test_profile_train_records_the_steps_it_says_and_their_operators(tmp_path, tiny_model_path):
    out = tmp_path / "profile.txt"
    run_quick_training_bench("profile_train.py", tmp_path, out)
    header, *table = out.read_text(encoding="utf-8").splitlines()
    assert re.match(r"2 profiled steps of batch \d+ at lengths 16/32, .* ms a step \([\d.]+ samples/s", header), header
    ops = {line.split()[0] for line in table if line.strip().startswith("aten::")}
    assert {"aten::addmm", "aten::amax"} <= ops, ops  # the body's linear layers and the head's token max
    assert "ProfilerStep*" in "\n".join(table)  # the schedule's recorded steps, advanced by the optimizer hook
