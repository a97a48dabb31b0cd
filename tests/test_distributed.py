"""A real 2-process gloo run on CPU through torchrun, compared with a single-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from splade_obs.sinks.otel.attributes import span_kind

pytestmark = pytest.mark.slow

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "splade_obs_cli.main"]
COMMON = ["train", "--max-steps", "3", "--max-query-length", "16", "--max-doc-length", "32", "--dropout", "0",
          "--learning-rate", "2e-4", "--seed", "11", "--mixed-precision", "no", "--progress", "lines", "--json-logs", "--trace-batches", "all"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", MLFLOW_DISABLE_TELEMETRY="true", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    return env


def _losses(db: Path, run_name: str) -> list[float]:
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              f"tags.mlflow.runName = '{run_name}'")
    assert len(runs) == 1, [r.info.run_name for r in runs]
    hist = sorted(client.get_metric_history(runs[0].info.run_id, "train/loss"), key=lambda m: m.step)
    return [m.value for m in hist]


def test_two_process_gloo_run_matches_single_process(tmp_path):
    db = tmp_path / "m.db"
    uri = f"sqlite:///{db}"
    out2 = tmp_path / "ddp"
    proc = subprocess.run([*TORCHRUN, *COMMON, "--batch-size", "2", "--output-dir", str(out2), "--tracking-uri", uri,
                           "--run-name", "ddp"], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = subprocess.run([sys.executable, "-m", "splade_obs_cli.main", *COMMON, "--batch-size", "4", "--output-dir",
                             str(tmp_path / "single"), "--tracking-uri", uri, "--run-name", "single"],
                            cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=400)
    assert single.returncode == 0, single.stderr[-3000:]

    # one MLflow run for the two processes, with the global batch size
    from mlflow.tracking import MlflowClient
    client = MlflowClient(uri)
    ddp_runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                  "tags.mlflow.runName = 'ddp'")
    assert len(ddp_runs) == 1 and ddp_runs[0].info.status == "FINISHED"
    assert ddp_runs[0].data.tags.get("splade.world_size") == "2"

    # same objective: per-step loss of 2 ranks x batch 2 == 1 process x batch 4 (fp32, no dropout)
    l2, l1 = _losses(db, "ddp"), _losses(db, "single")
    assert len(l2) == len(l1) == 3
    for a, b in zip(l2, l1):
        assert a == pytest.approx(b, rel=2e-3, abs=1e-5), (l2, l1)

    logs = out2 / "logs"
    # rank 0 owns the metrics file and the checkpoints; every rank has its own JSON log
    metrics = json.loads((logs / "training_metrics.json").read_text())
    assert metrics["status"] == "FINISHED"
    assert not list(logs.glob("training_metrics.rank*"))
    ranks = {json.loads(line)["rank"] for f in ("train_splade.jsonl", "train_splade.rank1.jsonl")
             for line in (logs / f).read_text().splitlines() if line.strip()}
    assert ranks == {0, 1}
    assert (out2 / "checkpoints" / "checkpoint-3" / "trainer_state.json").exists()
    assert json.loads((out2 / "checkpoints" / "checkpoint-3" / "trainer_state.json").read_text())["world_size"] == 2

    # spans from both ranks in one trace
    per_rank = {r: [json.loads(line) for line in (logs / f).read_text().splitlines() if line.strip()]
                for r, f in ((0, "traces.jsonl"), (1, "traces.rank1.jsonl"))}
    assert len({_trace_id(s) for spans in per_rank.values() for s in spans}) == 1
    assert all(sum(span_kind(_name(s)) == "batch" for s in spans) == 3 for spans in per_rank.values())
    roots = {r: next(s for s in spans if _name(s) == "train") for r, spans in per_rank.items()}
    assert _attr(roots[0], "splade.rank") == 0 and _attr(roots[1], "splade.rank") == 1
    assert roots[1]["parent_id"] == roots[0]["context"]["span_id"]  # rank 1 joined rank 0's run span


def test_fault_on_rank1_stops_both_ranks_naming_the_rank(tmp_path):
    out = tmp_path / "ddp"
    proc = subprocess.run([*TORCHRUN, *COMMON, "--batch-size", "2", "--output-dir", str(out), "--no-mlflow",
                           "--otel-exporter", "none", "--max-steps", "6", "--inject-fault", "rank1:step:2:exception"],
                          cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "error[TRAINING_ERROR]: rank 1: injected fault after step 2" in text
    # rank 0 did not train on alone: no step beyond the failure reached its log
    steps = [json.loads(line).get("step") for line in (out / "logs" / "train_splade.jsonl").read_text().splitlines()
             if line.strip()]
    assert max(s for s in steps if s is not None) <= 3


def _trace_id(span: dict) -> str:
    ctx = span.get("context") or {}
    return ctx.get("trace_id") or span.get("trace_id")


def _name(span: dict) -> str:
    return span.get("name")


def _attr(span: dict, key: str):
    return (span.get("attributes") or {}).get(key)


def test_batch_fault_on_one_rank_is_skipped_in_step_and_mixed_negatives_agree(tmp_path):
    """A batch that fails on rank 1 only is skipped by both ranks (no hang), and batches where only some
    ranks have hard negatives agree on K, so the gathers match."""
    demo = Path(__file__).resolve().parents[1] / "splade_obs" / "demo" / "train.jsonl"
    rows = [json.loads(line) for line in demo.read_text().splitlines()[:64]]
    for i, row in enumerate(rows):
        if i % 3 == 0:
            row.pop("negatives", None)
    data = tmp_path / "mixed.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "ddp"
    proc = subprocess.run([*TORCHRUN, *COMMON, "--batch-size", "2", "--output-dir", str(out), "--no-mlflow",
                           "--otel-exporter", "none", "--max-steps", "4", "--train-file", str(data),
                           "--inject-fault", "rank1:batch:2:exception"],
                          cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "logs" / "training_metrics.json").read_text())
    assert metrics["status"] == "FINISHED"
    assert metrics["metrics_by_epoch"]["1"]["skipped_batches"] == 1
    rank1_errors = [json.loads(line) for line in (out / "logs" / "errors.rank1.jsonl").read_text().splitlines()]
    assert [(e["category"], e["skipped_batch"]) for e in rank1_errors] == [("TRAINING_ERROR", True)]
    rank0_errors = [json.loads(line) for line in (out / "logs" / "errors.jsonl").read_text().splitlines()]
    assert rank0_errors[0]["context"]["peer_rank"] == 1


def test_resume_under_torchrun_is_exact_with_dropout(tmp_path):
    """Each rank's RNG (dropout) is saved at the checkpoints all ranks reach together, so a 2-process run
    that fails after step 3 and resumes from checkpoint-2 ends with the uninterrupted run's weights."""
    import torch
    from safetensors.torch import load_file

    base = [arg for arg in COMMON if arg not in ("--dropout", "0")]
    args = [*TORCHRUN, *base, "--batch-size", "2", "--no-mlflow", "--otel-exporter", "none", "--max-steps", "4",
            "--save-steps", "2"]
    run = lambda *extra: subprocess.run([*args, *extra], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                                        timeout=300)
    straight = run("--output-dir", str(tmp_path / "a"))
    assert straight.returncode == 0, straight.stderr[-2000:]
    broken = run("--output-dir", str(tmp_path / "b"), "--inject-fault", "step:3:exception")
    assert broken.returncode != 0
    assert (tmp_path / "b" / "checkpoints" / "checkpoint-2" / "rng_ranks.pt").exists()
    resumed = run("--output-dir", str(tmp_path / "b"), "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    wa = load_file(str(tmp_path / "a" / "final" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "final" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_fail_on_alert_stops_every_rank_together(tmp_path):
    """Rank 0 watches the run's health; under torchrun every rank learns its --fail-on-alert decision at the same
    logging point (a broadcast), so both stop there with one checkpoint instead of rank 1 waiting forever."""
    out = tmp_path / "ddp"
    (tmp_path / "health.toml").write_text("[health]\nmin_history = 4\n", encoding="utf-8")
    proc = subprocess.run([*TORCHRUN, *COMMON, "--batch-size", "2", "--output-dir", str(out), "--no-mlflow",
                           "--otel-exporter", "none", "--max-steps", "12", "--log-every-steps", "4",
                           "--config", str(tmp_path / "health.toml"), "--inject-fault", "step:6:spike",
                           "--fail-on-alert", "loss_spike"],
                          cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "stopped by --fail-on-alert loss_spike" in text, text[-3000:]
    state = json.loads((out / "checkpoints" / "checkpoint-8" / "trainer_state.json").read_text())
    assert state["reason"] == "alert" and state["global_step"] == 8
    assert not (out / "final").exists()


def test_in_training_evaluation_uses_every_rank_and_equals_one_process(tmp_path):
    """--eval-data under torchrun: each rank encodes its shard of the corpus, rank 0 retrieves; the run's
    eval/* metrics equal one process's evaluation of the same final weights, and rank 1's trace has its share."""
    from splade_obs.beir import load_beir
    from splade_obs.evaluation import RetrievalEvaluator
    from splade_obs.model import SpladeEncoder
    from tests._eval_utils import write_beir

    data = write_beir(tmp_path / "beir", split="dev")
    out = tmp_path / "ddp"
    proc = subprocess.run([*TORCHRUN, *COMMON, "--batch-size", "2", "--output-dir", str(out), "--no-mlflow",
                           "--eval-data", str(data), "--eval-split", "dev"],
                          cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((out / "logs" / "training_metrics.json").read_text())
    (final,) = [e for e in doc["eval"] if e["step"] == 3]
    again = RetrievalEvaluator(load_beir(data, "dev"), max_query_length=16, max_doc_length=32).evaluate(
        SpladeEncoder.from_pretrained(str(out / "final")))
    for key, file_key in (("ndcg@10", "ndcg_at_10"), ("mrr@10", "mrr_at_10"), ("recall@100", "recall_at_100"),
                          ("doc_nnz", "doc_nnz")):
        assert final["metrics"][file_key] == pytest.approx(again[key], rel=1e-5, abs=1e-6), key
    rank1 = [json.loads(line) for line in (out / "logs" / "traces.rank1.jsonl").read_text().splitlines() if line]
    assert any(_name(s) == "evaluation" for s in rank1), "rank 1 took part in the evaluation"
