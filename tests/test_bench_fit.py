"""benchmarks/bench_fit.py on the small BEIR folder of test_fit: the real fit and train commands in fresh processes,
every system scored on test with its paired comparisons, the targets judged and the costs measured."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from .test_fit import SMALL, _beir

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_fit_runs_both_commands_scores_every_system_and_judges_the_targets(tmp_path, monkeypatch,
                                                                               tiny_model_path):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench_fit", ROOT / "benchmarks" / "bench_fit.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_fit", bench)
    spec.loader.exec_module(bench)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    (tmp_path / "small.toml").write_text(SMALL)
    out = tmp_path / "bench_fit.json"
    res = bench.main(["--data", str(_beir(tmp_path / "beir")), "--work", str(tmp_path / "work"), "--output", str(out),
                      "--fit-args", f"--config {tmp_path / 'small.toml'} --dense-model none",
                      "--train-args", "--max-steps 6 --batch-size 8 --max-doc-length 48"])
    assert set(res["test"]) == {"zero-shot", "plain train", "fit", "bm25-stemmed", "bm25"}
    assert all(0 <= row["ndcg@10"] <= 1 for row in res["test"].values())
    assert {c["queries"] for c in res["paired"].values()} == {31}  # the test split's queries, paired
    assert set(res["costs"]) == {"fit", "plain"} and all(c["wall_s"] > 0 and c["peak_rss_mb"] > 100
                                                          for c in res["costs"].values())
    assert set(res["targets"]) == {"fit >= zero-shot + 0.03", "fit > stemmed BM25", "plain train > zero-shot",
                                   "fit under 45 min"}
    assert res["targets"]["fit under 45 min"] is True
    saved = json.loads(out.read_text())
    assert saved["command"].startswith("python benchmarks/bench_fit.py --fit-args") and saved["fit_chosen"] == "seed-42"
