"""The prepared GPU check (benchmarks/gpu_check.py, issue 36) must run end to end before a GPU is lent: its
``--cpu-dry-run`` drives the same code (both trainers and both encoders at fp16 and bf16, gpu_amp_check's AMP
runs, the target verdict, the JSON) on a CPU with tiny sizes. Real parts: splade-tiny, sentence-transformers'
trainer and encoder, SciFact when present (else the bundled demo data)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from ._eval_utils import bench_module

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
SIDES = ("splade_obs", "sentence_transformers")


def _run(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu-dry-run", "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


def test_the_overflow_check_reads_the_scale_across_the_forced_batch() -> None:
    """[epoch, batch index, scale] per step taken: batch 2 (index 1) skipped halves the scale from the step before
    it to the step after it; a natural overflow elsewhere neither makes nor breaks the check."""
    halved = bench_module("gpu_check").scale_halved_across
    assert halved([[1, 0, 65536.0], [1, 2, 32768.0], [1, 3, 32768.0]], 2)
    assert halved([[1, 2, 16384.0]], 2)                                    # batch 1 overflowed by itself too
    assert halved([[1, 0, 65536.0], [1, 2, 32768.0], [1, 5, 16384.0]], 2)  # a natural overflow later
    assert not halved([[1, 0, 65536.0], [1, 2, 65536.0]], 2)               # no skip at batch 2
    assert not halved([[1, 0, 32768.0], [1, 1, 32768.0], [1, 2, 32768.0]], 2)
    assert not halved([[1, 0, 65536.0], [1, 1, 32768.0], [1, 2, 32768.0]], 2)  # batch 2 took a step
    assert not halved([[1, 0, 65536.0]], 2)                                # no step after it


def test_a_side_reports_its_median_run() -> None:
    median_run = bench_module("gpu_check").median_run
    runs = [{"samples_per_s": 10.0, "n": 1}, {"error": "boom"}, {"samples_per_s": 30.0, "n": 3},
            {"samples_per_s": 20.0, "n": 2}]
    assert median_run(runs) == {"samples_per_s": 20.0, "n": 2, "runs_samples_per_s": [10.0, None, 30.0, 20.0]}
    two = median_run(runs[:2] + [{"samples_per_s": 14.0, "n": 4}])  # an even count: the median, the lower run
    assert two == {"samples_per_s": 12.0, "n": 1, "runs_samples_per_s": [10.0, None, 14.0]}
    assert median_run([{"error": "a"}, {"error": "b"}]) == {"error": "b"}
    nan = median_run([{"samples_per_s": float("nan"), "n": 1}, {"samples_per_s": 5.0, "n": 2}])  # too few steps
    assert nan["samples_per_s"] == 5.0 and nan["n"] == 2


def test_dry_run_reports_training_encoding_amp_checks_and_the_target(tmp_path, tiny_model_path) -> None:
    proc, report = _run(tmp_path, "--repeats", "2")
    assert report["sizes"]["repeats"] == 2
    assert report["cpu_dry_run"] is True and report["device"]["device"] == "cpu" and report["device"]["gpu"] is None
    assert report["budget"]["exceeded"] is False and report["budget"]["used_s"] > 0
    assert report["data"]["source"] in ("scifact", "demo")
    for part, key in (("training", "samples_per_s"), ("encoding", "docs_per_s")):
        assert set(report[part]) == {"fp16", "bf16"}, part
        for precision, pair in report[part].items():
            for side in SIDES:
                run = pair[side]
                assert "error" not in run, (part, precision, side, run)
                assert math.isfinite(run[key]) and run[key] > 0, (part, precision, side, run)
            assert pair["ratio"] == pair["splade_obs"][key] / pair["sentence_transformers"][key]
    for pair in report["training"].values():  # each side ran twice, alternating; its samples/s is the median
        for side in SIDES:
            runs = pair[side]["runs_samples_per_s"]
            assert len(runs) == 2 and pair[side]["samples_per_s"] == sum(runs) / 2, pair[side]
        assert pair["splade_obs"]["status"] == "FINISHED"
        assert pair["splade_obs"]["attention"] == "splade_obs_cpu"  # which attention each run of ours used
        assert pair["splade_obs"]["steps"] == pair["sentence_transformers"]["steps"] == report["sizes"]["train_steps"]
    # the former step (queries in a pass of their own) beside ours in bf16, and what one pass a step gains
    bf16, former = report["training"]["bf16"], report["training"]["bf16"]["splade_obs_queries_apart"]
    assert former["status"] == "FINISHED" and former["steps"] == report["sizes"]["train_steps"], former
    assert len(former["runs_samples_per_s"]) == 2
    assert bf16["one_pass_speedup"] == bf16["splade_obs"]["samples_per_s"] / former["samples_per_s"]
    assert "the former step (queries in a pass of their own)" in proc.stdout
    assert "our attention: splade_obs_cpu" in proc.stdout
    for pair in report["encoding"].values():
        assert pair["splade_obs"]["docs"] == pair["sentence_transformers"]["docs"] == report["sizes"]["encode_docs"]
        # both encoders turn the same documents into the same vectors, up to the precision's rounding
        assert pair["agreement_min_cosine"] > 0.99, pair
    amp = report["amp"]
    assert set(amp["checks"]) == {"fp16_clean_run_finite", "bf16_clean_run_finite", "fp16_uses_grad_scaler_bf16_none",
                                  "grad_scale_drops_on_overflow", "fp16_resume_restores_scaler",
                                  "fused_head_matches_reference_float16", "fused_head_matches_reference_bfloat16"}
    assert all(amp["checks"].values()) and amp["all_ok"] is True, amp["checks"]
    assert amp["resume_fp16"]["resumed_scale"] == amp["resume_fp16"]["straight_scale"] is not None
    over = amp["runs"]["fp16_overflow_at_batch_2"]
    # batch 2 took no step, and the step after it ran at half the scale before it, or less (emulated fp16 on a
    # CPU may also overflow by itself, at any batch)
    assert over["counters"]["train/overflow_steps"] >= 1
    assert bench_module("gpu_check").scale_halved_across(over["grad_scale_trace"], 2), over["grad_scale_trace"]
    target = report["target"]
    assert target["threshold"] == 2.0 and set(target["ratios"]) == {"fp16", "bf16"}
    assert target["verdict"] == ("met" if target["met"] else "missed")
    assert target["met"] == all(r >= 2.0 for r in target["ratios"].values())
    assert "training samples/s, fp16" in proc.stdout and "encoding docs/s, bf16" in proc.stdout
    assert target["text"] in proc.stdout and "CPU dry run" in target["text"]


def test_budget_end_writes_partial_results_and_exits_zero(tmp_path, tiny_model_path) -> None:
    proc, report = _run(tmp_path, "--budget-minutes", "0.02")
    assert report["budget"]["exceeded"] is True
    assert any("budget" in s for s in report["budget"]["scaled"])
    assert report["target"]["verdict"] == "incomplete" and report["target"]["met"] is False
    assert "incomplete" in proc.stdout


def test_missing_scifact_falls_back_to_the_bundled_demo_data(tmp_path) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    train, info = gpu_check.training_file(tmp_path / "no-scifact", tmp_path / "train.jsonl")
    assert info["source"] == "demo" and "no-scifact" in info["note"] and train.is_file()
    docs, enc = gpu_check.encoding_docs(tmp_path / "no-scifact", 600)
    assert len(docs) == 600 and enc["source"] == "demo" and enc["unique_docs"] < 600
    assert docs[enc["unique_docs"]] == docs[0]  # the demo corpus repeated up to the requested count

