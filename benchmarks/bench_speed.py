"""Evaluation speed: full SciFact test evaluation, splade-obs vs sentence-transformers' SparseEncoder.

Both sides load the same splade-tiny weights, read the same BEIR folder, encode all 5,183 documents
(max length 256) and the 300 test queries with batch size 32, retrieve and score nDCG@10. Each side runs in
its own subprocess so its peak memory (max RSS) is its own; the parent prints a side-by-side table with
ratios and writes JSON to benchmarks/results/bench_speed.json.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_speed.py            # full run (minutes)
    .venv/bin/python benchmarks/bench_speed.py --quick                        # 500 docs, 50 queries: smoke test

sentence-transformers is the bench extra (``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "scifact"
RESULTS = ROOT / "benchmarks" / "results"


def load_subset(data: Path, quick: bool):
    """The BEIR test split; with ``quick`` a fixed 500-document corpus holding the 50 sampled queries' positives."""
    from splade_obs.data import load_beir

    beir = load_beir(data, "test")
    if quick:
        rng = random.Random(0)
        qids = sorted(rng.sample(sorted(q for q in beir.qrels if q in beir.queries), 50))
        beir.qrels = {q: beir.qrels[q] for q in qids}
        keep = {d for q in qids for d in beir.qrels[q] if d in beir.corpus}
        others = [d for d in beir.corpus if d not in keep]
        keep |= set(rng.sample(others, max(0, 500 - len(keep))))
        beir.corpus = {d: v for d, v in beir.corpus.items() if d in keep}
    return beir


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    """User + system CPU time of this process: less sensitive than wall time to other load on the machine."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_ours(data: Path, quick: bool, batch_size: int) -> dict:
    from splade_obs.evaluate import RetrievalEvaluator
    from splade_obs.model import SpladeEncoder

    beir = load_subset(data, quick)
    start, cpu0, load0 = time.perf_counter(), cpu_seconds(), os.getloadavg()[0]
    encoder = SpladeEncoder.from_pretrained("splade-tiny")
    evaluator = RetrievalEvaluator(beir, max_query_length=64, max_doc_length=256, batch_size=batch_size)
    metrics = evaluator.evaluate(encoder)
    total = time.perf_counter() - start
    return {"eval_s": total, "cpu_s": cpu_seconds() - cpu0, "load_avg_1m": [load0, os.getloadavg()[0]],
            "ndcg@10": metrics["ndcg@10"], "mrr@10": metrics["mrr@10"],
            "encode_docs_s": metrics["encode_docs_s"], "docs_per_s": len(beir.corpus) / metrics["encode_docs_s"],
            "num_docs": len(beir.corpus), "num_queries": int(metrics["num_queries"]), "peak_rss_mb": peak_rss_mb()}


def run_st(data: Path, quick: bool, batch_size: int) -> dict:
    from sentence_transformers.sparse_encoder import SparseEncoder
    from sentence_transformers.sparse_encoder.evaluation import SparseInformationRetrievalEvaluator

    from splade_obs.data import beir_doc_text
    from splade_obs.hub import resolve_model

    beir = load_subset(data, quick)
    start, cpu0, load0 = time.perf_counter(), cpu_seconds(), os.getloadavg()[0]
    queries = {q: beir.queries[q] for q, rels in beir.qrels.items() if any(r > 0 for r in rels.values())}
    relevant = {q: {d for d, r in beir.qrels[q].items() if r > 0} for q in queries}
    corpus = {d: beir_doc_text(doc) for d, doc in beir.corpus.items()}
    model = SparseEncoder(resolve_model("splade-tiny"), device="cpu")
    model.max_seq_length = 256
    evaluator = SparseInformationRetrievalEvaluator(queries, corpus, relevant, batch_size=batch_size,
                                                    show_progress_bar=False, write_csv=False, name="scifact")
    results = evaluator(model)
    total = time.perf_counter() - start
    ndcg = next(v for k, v in results.items() if k.endswith("ndcg@10"))
    mrr = next(v for k, v in results.items() if k.endswith("mrr@10"))
    return {"eval_s": total, "cpu_s": cpu_seconds() - cpu0, "load_avg_1m": [load0, os.getloadavg()[0]],
            "ndcg@10": float(ndcg), "mrr@10": float(mrr), "num_docs": len(corpus),
            "num_queries": len(queries), "peak_rss_mb": peak_rss_mb()}


def child(side: str, data: Path, quick: bool, batch_size: int) -> dict:
    """Run one side in a fresh interpreter and parse the JSON line it prints last."""
    cmd = [sys.executable, __file__, "--side", side, "--data", str(data), "--batch-size", str(batch_size)]
    if quick:
        cmd.append("--quick")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{side} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine() -> dict:
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "threads": int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "python": platform.python_version()}


def table(ours: dict, st: dict) -> str:
    rows = [("evaluation wall time (s)", "eval_s", ".1f"), ("evaluation CPU time (s)", "cpu_s", ".1f"),
            ("nDCG@10", "ndcg@10", ".4f"),
            ("MRR@10", "mrr@10", ".4f"), ("peak RSS (MB)", "peak_rss_mb", ".0f")]
    lines = [f"{'':<26}{'splade-obs':>12}{'sentence-tf':>14}{'ratio':>9}", "-" * 61]
    for label, key, fmt in rows:
        ratio = st[key] / ours[key] if ours[key] else float("nan")
        lines.append(f"{label:<26}{ours[key]:>12{fmt}}{st[key]:>14{fmt}}{ratio:>8.2f}x")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--quick", action="store_true", help="500 docs / 50 queries: checks the script, not the speed")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--side", choices=["ours", "st"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        fn = run_ours if args.side == "ours" else run_st
        print(json.dumps(fn(args.data, args.quick, args.batch_size)))
        return
    if not (args.data / "corpus.jsonl").is_file():
        raise SystemExit(f"SciFact not found at {args.data}")
    ours = child("ours", args.data, args.quick, args.batch_size)
    st = child("st", args.data, args.quick, args.batch_size)
    print(f"SciFact test evaluation ({ours['num_docs']} docs, {ours['num_queries']} queries, batch "
          f"{args.batch_size}, length 256); ratio = sentence-transformers / splade-obs")
    print(table(ours, st))
    print(f"1-minute load average at start/end: splade-obs {ours['load_avg_1m']}, sentence-transformers "
          f"{st['load_avg_1m']} (wall times are only comparable when these are close)")
    result = {"benchmark": "eval_speed", "date": dt.datetime.now().isoformat(timespec="seconds"),
              "quick": args.quick, "machine": machine(), "splade_obs": ours, "sentence_transformers": st,
              "speedup": st["eval_s"] / ours["eval_s"], "cpu_speedup": st["cpu_s"] / ours["cpu_s"],
              "memory_ratio": st["peak_rss_mb"] / ours["peak_rss_mb"]}
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "bench_speed_quick.json" if args.quick else "bench_speed.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {RESULTS / name}")


if __name__ == "__main__":
    main()
