"""The prepared GPU check (benchmarks/gpu_amp_check.py) must still run end to end, so that a lent GPU session
spends its minutes on CUDA rather than on a broken script: exercised here in its CPU dry-run mode, which
drives the same trainer paths (every AMP mode, injected NaN/OOM batches, interrupt + resume, both heads)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_amp_check_dry_run_reports_every_mode_faults_resume_and_heads(tmp_path, tiny_model_path) -> None:
    out = tmp_path / "gpu_amp.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_amp_check.py"), "--cpu-dry-run",
                           "--steps", "4", "--batch-size", "4", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"]["device"] == "cpu" and report["device"]["gpu"] is None
    runs = {r["mode"]: r for r in report["runs"]}
    assert list(runs) == ["no", "fp16", "bf16", "auto"]
    assert [runs[m]["amp_dtype"] for m in ("no", "fp16", "bf16")] == ["float32", "float16", "bfloat16"]
    for r in runs.values():
        assert r["status"] == "FINISHED" and r["steps"] == 4 and r["all_finite"], r
        assert math.isfinite(r["loss_first5"]) and math.isfinite(r["loss_last5"])
    assert runs["fp16"]["grad_scale_last"] is not None and runs["no"]["grad_scale_last"] is None
    # the injected NaN batch and the injected OOM are each skipped, typed, and the run still finishes
    faulty = report["faulty_fp16"]
    assert faulty["status"] == "FINISHED"
    assert faulty["counters"]["train/skipped_batches"] == 2
    assert faulty["counters"]["errors/TRAINING_ERROR"] == 1 and faulty["counters"]["errors/DEVICE_ERROR"] == 1
    # an fp16 run interrupted at step 5 and resumed ends where the straight run ends, with the scale restored:
    # bit for bit on a CPU (on CUDA, nondeterministic kernels leave ~1e-3, see results/gpu_amp_h200.json)
    resume = report["resume_fp16"]
    assert resume["resumed_status"] == "FINISHED"
    assert resume["resumed_scale"] == resume["straight_scale"] is not None
    assert resume["max_abs_weight_diff"] == 0.0
    # the fused max-pooled head agrees with the reference full-logits head under fp16 and bf16 autocast
    assert [h["dtype"] for h in report["heads"]] == ["float16", "bfloat16"]
    for h in report["heads"]:
        assert h["grad_cosine"] > 0.999 and h["forward_max_rel_diff"] < 0.02, h
    assert "fused vs reference head" in proc.stdout and "resume fp16" in proc.stdout
