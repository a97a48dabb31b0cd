"""benchmarks/bench_scale.py --quick in the suite: 2k step events through the real bus and every real sink; corpora
of 500 and 2,000 SciFact documents through the real `splade-obs evaluate --index-dir` and the engine."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench_scale", ROOT / "benchmarks" / "bench_scale.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_scale"] = bench
    spec.loader.exec_module(bench)
    return bench


@pytest.mark.slow
def test_bench_scale_quick_reaches_every_output_and_loses_no_point(tmp_path, monkeypatch):
    out = tmp_path / "scale.json"
    res = _bench(monkeypatch).main(["--quick", "--part", "runlength", "--output", str(out)])
    assert res["steps"] == 2000 and res["events_per_second"] > 0
    assert res["mlflow_train_loss_points"] == 2000 and not res["unsent_file"], "every point reached the store"
    assert {"traces.jsonl", "metrics.jsonl", "train_splade.jsonl", "training_metrics.json",
            "mlflow.db"} <= set(res["bytes_per_1k_steps"])
    assert res["rss_growth_mb"] < 200, res["rss_mb_at_step"]   # the goal (50 MB) is for 100k steps on a quiet machine
    assert json.loads(out.read_text())["command"] == "python benchmarks/bench_scale.py --part runlength --quick"


@pytest.mark.slow
def test_bench_scale_quick_corpus_part_measures_every_size_and_the_engine(tmp_path, monkeypatch, scifact_dir,
                                                                         tiny_model_path):
    out = tmp_path / "scale.json"
    res = _bench(monkeypatch).main(["--quick", "--part", "corpus", "--data", str(scifact_dir), "--output", str(out)])
    corpus = res["corpus"]
    rows = corpus["configs"]
    assert [(r["docs"], r["processes"]) for r in rows] == [(500, 1), (2000, 1)]
    assert all(r["ms_per_doc"] > 0 and r["cpu_s"] > 0 and r["peak_rss_mb"] > 100 for r in rows)
    assert rows[1]["index_mb"] > rows[0]["index_mb"] > 0
    assert rows[1]["ndcg@10"] > rows[0]["ndcg@10"] > 0  # more of SciFact's judged documents are in the corpus
    assert corpus["time_per_doc_spread"]["1"] >= 1.0
    if importlib.util.find_spec("seismic") is None:
        assert corpus["engine"] == []
    else:
        assert [e["docs"] for e in corpus["engine"]] == [500, 2000]
        assert all(e["recall@10_vs_exact"] >= 0.9 and e["queries_per_s"] > 0 for e in corpus["engine"])
    assert json.loads(out.read_text())["corpus"]["sizes"] == [500, 2000]
