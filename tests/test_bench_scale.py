"""benchmarks/bench_scale.py --quick: 2k step events through the real bus and every real sink, in the suite."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_scale_quick_reaches_every_output_and_loses_no_point(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench_scale", ROOT / "benchmarks" / "bench_scale.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_scale"] = bench
    spec.loader.exec_module(bench)
    out = tmp_path / "scale.json"
    res = bench.main(["--quick", "--output", str(out)])
    assert res["steps"] == 2000 and res["events_per_second"] > 0
    assert res["mlflow_train_loss_points"] == 2000 and not res["unsent_file"], "every point reached the store"
    assert {"traces.jsonl", "metrics.jsonl", "train_splade.jsonl", "training_metrics.json",
            "mlflow.db"} <= set(res["bytes_per_1k_steps"])
    assert res["rss_growth_mb"] < 200, res["rss_mb_at_step"]   # the goal (50 MB) is for 100k steps on a quiet machine
    assert json.loads(out.read_text())["command"] == "python benchmarks/bench_scale.py --quick"
