"""benchmarks/profile_train.py --quick: the profiler over real training steps of splade-tiny (issue 36, point 2)."""

from __future__ import annotations

import re

import pytest
import torch

from ._eval_utils import bench_module, run_quick_training_bench


def test_profile_train_records_the_steps_it_says_and_their_operators(tmp_path, tiny_model_path):
    out = tmp_path / "profile.txt"
    run_quick_training_bench("profile_train.py", tmp_path, out)
    header, *table = out.read_text(encoding="utf-8").splitlines()
    assert re.match(r"2 profiled steps of batch \d+ at lengths 16/32, .* ms a step \([\d.]+ samples/s", header), header
    ops = {line.split()[0] for line in table if line.strip().startswith("aten::")}
    assert {"aten::addmm", "aten::amax"} <= ops, ops  # the body's linear layers and the head's token max
    assert "ProfilerStep*" in "\n".join(table)  # the schedule's recorded steps, advanced by the optimizer hook


def _op_counts(tmp_path, name: str, *extra: str) -> tuple[str, dict[str, tuple[float, ...]], list[str]]:
    """``--count-ops``' header, its table's rows (kernels, views, syncs by phase) and its syncs' lines."""
    out = tmp_path / name
    run_quick_training_bench("profile_train.py", tmp_path, out, "--count-ops", *extra)
    header, _, *rest = out.read_text(encoding="utf-8").splitlines()
    table, syncs = rest[:rest.index("")], rest[rest.index("") + 2:]
    return header, {line[:18].strip(): tuple(float(x) for x in line[18:].split()) for line in table}, syncs


def test_count_ops_counts_each_phase_and_fewer_passes_dispatch_fewer(tmp_path, tiny_model_path):
    """``--count-ops``: operators per step by phase, every phase dispatching some and the step row their sum;
    queries, positives and negatives in one encoder pass (a GPU's rule) dispatch fewer forward and backward
    kernels than with the queries apart (``--passes 2``), and those fewer than three passes; the rest of the step
    is the same. Host synchronisations: none in the forward (the attention mask is built without reading the
    padding back), one ``nonzero`` per encoder pass in the backward (the head keeps its maxima's rows), one read
    of the step's finiteness in the optimizer's phase."""
    header, one, syncs = _op_counts(tmp_path, "one.txt")
    assert header.startswith("operators per step on the GPU's code path, 2 steps of batch"), header
    assert header.endswith("one encoder pass")
    assert set(one) == {"backward", "forward", "loss", "optimizer", "rest of the step", "step"}
    assert all(kernels > 0 for kernels, *_ in one.values()), one
    for column in range(3):
        assert one["step"][column] == pytest.approx(sum(one[p][column] for p in one if p != "step"))
    assert (one["forward"][2], one["backward"][2], one["loss"][2], one["optimizer"][2]) == (0, 1, 0, 1), one
    assert syncs == ["  backward: nonzero 1.0", "  optimizer: tolist 1.0"], syncs
    fewer = one
    for passes in (2, 3):
        header, more, syncs = _op_counts(tmp_path, f"{passes}.txt", "--passes", str(passes))
        assert header.endswith(f"{passes} encoder passes")
        assert fewer["forward"][0] < more["forward"][0] and fewer["backward"][0] < more["backward"][0]
        assert one["optimizer"] == more["optimizer"] and one["loss"] == more["loss"]
        assert more["backward"][2] == passes and f"  backward: nonzero {passes}.0" in syncs  # one a pass
        fewer = more


def test_step_passes_forces_the_trainers_encoder_passes_and_puts_the_rule_back() -> None:
    from splade_obs import objective

    shapes, rule = [(4, 8), (4, 16), (4, 16)], objective.pass_groups
    with bench_module("profile_train").step_passes(3):
        assert objective.pass_groups(shapes, torch.device("cpu")) == [[0], [1], [2]]
    with bench_module("profile_train").step_passes(1):
        assert objective.pass_groups(shapes, torch.device("cpu")) == [[0, 1, 2]]
    assert objective.pass_groups is rule and rule(shapes, torch.device("cpu")) == [[0], [1, 2]]
