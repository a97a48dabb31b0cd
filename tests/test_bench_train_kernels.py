"""benchmarks/bench_train_kernels.py --quick: current vs former CPU training kernels on real steps (issue 36)."""

from __future__ import annotations

import json

from ._eval_utils import run_quick_training_bench


def test_bench_train_kernels_compares_the_two_kernels_per_seed(tmp_path, tiny_model_path):
    out = tmp_path / "kernels.json"
    proc = run_quick_training_bench("bench_train_kernels.py", tmp_path, out)
    res = json.loads(out.read_text(encoding="utf-8"))
    former = {(r["head_pass"], r["dropout_masks"]) for r in res["runs"]["former"]}
    assert len(former) == 1 and next(iter(former))[0] != "int8" and next(iter(former))[1] == "torch", former
    assert {r["dropout_masks"] for r in res["runs"]["current"]} == {"fast"}
    assert [r["seed"] for r in res["runs"]["current"]] == [1, 2] and all(len(r["losses"]) == 6 for rs in
                                                                        res["runs"].values() for r in rs)
    assert [w["steps"] for w in res["windows"]] == [[1, 3], [4, 6]]
    # the seeds change the curve; the windows' numbers are the runs' own
    cur = res["runs"]["current"]
    assert cur[0]["losses"] != cur[1]["losses"]
    assert abs(res["windows"][0]["current"][0] - sum(sum(r["losses"][:3]) / 3 for r in cur) / 2) < 1e-12
    assert "seed noise" in proc.stdout and "samples/s (mean over seeds)" in proc.stdout
