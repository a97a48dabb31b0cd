"""Speed: SciFact evaluation and training throughput, splade-obs vs sentence-transformers' SparseEncoder.

Evaluation (``--part eval``): both sides load the same splade-tiny weights, read the same BEIR folder, encode all 5,183 documents
(max length 256) and the 300 test queries with batch size 32, retrieve and score nDCG@10. Each side runs in
its own subprocess so its peak memory (max RSS) is its own; the parent prints a side-by-side table with
ratios and writes JSON to benchmarks/results/bench_speed.json.

Training (``--part train``): each trainer runs ``--train-steps`` optimizer steps (default 30) on the same
SciFact train triples (query, positive, one splade-tiny-mined hard negative) with the settings of
benchmarks/configs/scifact_finetune.toml (batch 16, query length 64, document length 256, the same
precision), each in its own subprocess; samples/s is measured between the end of step ``--skip-steps``
and the last step, so model loading, data preparation and saving are left out; peak RSS is the process's.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_speed.py            # full run (minutes)
    .venv/bin/python benchmarks/bench_speed.py --quick                        # small: smoke test
    .venv/bin/python benchmarks/bench_speed.py --part train                   # training only

sentence-transformers is the bench extra (``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

# the benchmarks' shared preamble (repository root on sys.path, paths, table printer, results writer)
from _common import CONFIGS, DEFAULT_DATA, RESULTS, machine, require_beir, table, write_json


def load_subset(data: Path, quick: bool):
    """The BEIR test split; with ``quick`` a fixed 500-document corpus holding the 50 sampled queries' positives."""
    from splade_obs.beir import load_beir

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


def run_ours(data: Path, quick: bool, batch_size: int, head_pass: str = "auto") -> dict:
    from splade_obs.cpu import head_pass as chosen_pass, set_head_pass
    from splade_obs.evaluation import RetrievalEvaluator
    from splade_obs.model import SpladeEncoder

    set_head_pass(head_pass)  # what --head-pass does
    beir = load_subset(data, quick)
    start, cpu0, load0 = time.perf_counter(), cpu_seconds(), os.getloadavg()[0]
    encoder = SpladeEncoder.from_pretrained("splade-tiny")
    evaluator = RetrievalEvaluator(beir, max_query_length=64, max_doc_length=256, batch_size=batch_size)
    metrics = evaluator.evaluate(encoder)
    total = time.perf_counter() - start
    return {"eval_s": total, "cpu_s": cpu_seconds() - cpu0, "load_avg_1m": [load0, os.getloadavg()[0]],
            "ndcg@10": metrics["ndcg@10"], "mrr@10": metrics["mrr@10"],
            "encode_docs_s": metrics["encode_docs_s"], "docs_per_s": len(beir.corpus) / metrics["encode_docs_s"],
            "num_docs": len(beir.corpus), "num_queries": int(metrics["num_queries"]), "peak_rss_mb": peak_rss_mb(),
            "head_pass": chosen_pass(), "head_pass_asked": head_pass}


def run_st(data: Path, quick: bool, batch_size: int) -> dict:
    from sentence_transformers.sparse_encoder import SparseEncoder
    from sentence_transformers.sparse_encoder.evaluation import SparseInformationRetrievalEvaluator

    from splade_obs.beir import beir_doc_text
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


ENCODE_DOCS = 512


def _first_documents(data: Path, n: int = ENCODE_DOCS) -> list[str]:
    from splade_obs.beir import CorpusFile

    return list(CorpusFile(data / "corpus.jsonl").texts()[:n])


def encode_ours(data: Path, batch_size: int, head_pass: str) -> dict:
    """``--part encode``: our encoder on the corpus's first 512 documents at length 256 (after a warm-up batch)."""
    from splade_obs.cpu import head_pass as chosen_pass, set_head_pass
    from splade_obs.model import SpladeEncoder

    set_head_pass(head_pass)
    texts = _first_documents(data)
    encoder = SpladeEncoder.from_pretrained("splade-tiny")
    encoder.encode(texts[:batch_size], max_length=256, batch_size=batch_size)
    start, cpu0 = time.perf_counter(), cpu_seconds()
    vectors = encoder.encode(texts, max_length=256, batch_size=batch_size)
    wall = time.perf_counter() - start
    return {"docs": len(texts), "wall_s": wall, "cpu_s": cpu_seconds() - cpu0, "docs_per_s": len(texts) / wall,
            "nnz": int(vectors.nnz), "head_pass": chosen_pass(), "head_pass_asked": head_pass}


def encode_st(data: Path, batch_size: int) -> dict:
    """``--part encode``: sentence-transformers' SparseEncoder (fp32) on the same documents, the same way."""
    from sentence_transformers.sparse_encoder import SparseEncoder

    from splade_obs.hub import resolve_model

    texts = _first_documents(data)
    model = SparseEncoder(resolve_model("splade-tiny"), device="cpu")
    model.max_seq_length = 256
    model.encode_document(texts[:batch_size], batch_size=batch_size)
    start, cpu0 = time.perf_counter(), cpu_seconds()
    vectors = model.encode_document(texts, batch_size=batch_size, convert_to_sparse_tensor=True)
    wall = time.perf_counter() - start
    return {"docs": len(texts), "wall_s": wall, "cpu_s": cpu_seconds() - cpu0, "docs_per_s": len(texts) / wall,
            "nnz": int(vectors.coalesce().values().numel())}


#: ``--train-kernels former``: the CPU training path before issue 36 (the plain vocabulary pass in the autocast
#: dtype, recomputed argmax in the backward; torch's dropout masks). The AdamW step is fused in both.
FORMER_KERNELS = {"model.head_pass": "bf16", "model.cpu_dropout": "torch"}


def train_side(trainer: str, data: Path, triples: Path, config: Path, steps: int, skip: int,
               precision: str | None, kernels: str = "default") -> dict:
    """``steps`` optimizer steps of one trainer on the mined SciFact triples; samples/s after ``skip`` steps."""
    import tempfile

    import bench_quality as bq

    bq.ensure_triples(triples, data, 256, bq.is_distill(config))
    overrides = {"optim.mixed_precision": precision} if precision else {}
    if kernels == "former":
        overrides.update(FORMER_KERNELS)
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix=f"bench-train-{trainer}-") as tmp:
        cfg = bq.train_config(config, triples, Path(tmp), max_steps=steps, overrides=overrides)
        cpu0 = cpu_seconds()
        if trainer == "ours":
            info = bq.train_ours(cfg, skip=skip)
            info["kernels"] = kernels
        else:
            info = bq.train_st(cfg, steps, Path(tmp), skip=skip, save=False)
    info.update(cpu_s=cpu_seconds() - cpu0, peak_rss_mb=peak_rss_mb(), load_avg_1m=[load0, os.getloadavg()[0]],
                precision=cfg.optim.mixed_precision, skip_steps=skip,
                max_query_length=cfg.model.max_query_length, max_doc_length=cfg.model.max_doc_length)
    info.pop("model_path", None)
    return info


def child(side: str, args: argparse.Namespace, head_pass: str = "auto", kernels: str = "default") -> dict:
    """Run one side in a fresh interpreter and parse the JSON line it prints last."""
    cmd = [sys.executable, __file__, "--side", side, "--data", str(args.data), "--batch-size", str(args.batch_size),
           "--triples", str(args.triples), "--config", str(args.config), "--train-steps", str(args.train_steps),
           "--skip-steps", str(args.skip_steps), "--head-pass", head_pass, "--train-kernels", kernels]
    if args.quick:
        cmd.append("--quick")
    if args.precision:
        cmd += ["--precision", args.precision]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{side} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# (label, side key, value key, format, True when larger is better)
ROWS = [("evaluation wall time (s)", "eval", "eval_s", ".1f", False),
        ("evaluation CPU time (s)", "eval", "cpu_s", ".1f", False),
        ("evaluation nDCG@10", "eval", "ndcg@10", ".4f", None),
        ("evaluation peak RSS (MB)", "eval", "peak_rss_mb", ".0f", False),
        ("training samples/s", "train", "samples_per_s", ".2f", True),
        ("training CPU time (s)", "train", "cpu_s", ".1f", False),
        ("training peak RSS (MB)", "train", "peak_rss_mb", ".0f", False)]


def side_by_side(results: dict) -> str:
    """Side by side; 'advantage' > 1 means splade-obs is better (faster, more samples/s, less memory)."""
    lines = []
    for label, part, key, fmt, higher in ROWS:
        if part not in results:
            continue
        ours, st = results[part]["splade_obs"][key], results[part]["sentence_transformers"][key]
        if higher is None:
            adv = "-"
        else:
            ratio = (ours / st if higher else st / ours) if ours and st else float("nan")
            adv = f"{ratio:.2f}x"
        lines.append([label, format(ours, fmt), format(st, fmt), adv])
    return table([("", "<27"), ("splade-obs", ">12"), ("sentence-tf", ">14"), ("advantage", ">11")], lines, rule=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--quick", action="store_true", help="500 docs / 50 queries, 8 training steps: checks the script")
    ap.add_argument("--batch-size", type=int, default=32, help="evaluation batch size")
    ap.add_argument("--part", action="append", choices=["eval", "encode", "train"],
                    help="default: eval and train; encode: the corpus's first 512 documents alone, both sides")
    ap.add_argument("--config", type=Path, default=CONFIGS / "scifact_finetune.toml",
                    help="training config (batch size, lengths, precision) for both trainers")
    ap.add_argument("--triples", type=Path, default=Path("/tmp/splade-obs-bench/scifact_train_triples.jsonl"))
    ap.add_argument("--train-steps", type=int, default=30)
    ap.add_argument("--skip-steps", type=int, default=5, help="first steps left out of samples/s (start-up)")
    ap.add_argument("--precision", choices=["auto", "no", "bf16"], help="override the config's mixed_precision")
    ap.add_argument("--head-pass", default="auto", choices=["auto", "fp32", "bf16", "int8"],
                    help="our side's CPU vocabulary pass (splade-obs evaluate --head-pass)")
    ap.add_argument("--compare-head-passes", default="fp32,bf16",
                    help="also run our evaluation with these passes, in the same run ('' for none): the passes "
                         "auto chose from before int8 (docs/benchmarks.md)")
    ap.add_argument("--train-kernels", choices=["default", "former"], default="default", help=argparse.SUPPRESS)
    ap.add_argument("--no-former-kernels", action="store_true",
                    help="skip the extra training run of our side with the former CPU kernels (plain head pass, "
                         "torch dropout masks)")
    ap.add_argument("--side", choices=["ours", "st", "train-ours", "train-st", "encode-ours", "encode-st"],
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.train_steps, args.skip_steps = min(args.train_steps, 8), min(args.skip_steps, 2)
    if args.side:
        if args.side.startswith("encode-"):
            out = (encode_ours(args.data, args.batch_size, args.head_pass) if args.side == "encode-ours"
                   else encode_st(args.data, args.batch_size))
        elif args.side.startswith("train-"):
            out = train_side(args.side[6:], args.data, args.triples, args.config, args.train_steps,
                             args.skip_steps, args.precision, args.train_kernels)
        else:
            out = (run_ours(args.data, args.quick, args.batch_size, args.head_pass) if args.side == "ours"
                   else run_st(args.data, args.quick, args.batch_size))
        print(json.dumps(out))
        return
    require_beir(args.data)
    parts = args.part or ["eval", "train"]
    name = "bench_speed_quick.json" if args.quick else "bench_speed.json"
    out_path = RESULTS / name
    previous = json.loads(out_path.read_text()) if out_path.is_file() else {}
    results: dict = {k: v for k, v in previous.get("parts", {}).items() if k not in parts}
    now = dt.datetime.now().isoformat(timespec="seconds")
    if "eval" in parts:
        ours, st = child("ours", args, args.head_pass), child("st", args)
        passes = {p: child("ours", args, p) for p in filter(None, args.compare_head_passes.split(","))}
        results["eval"] = {"date": now, "machine": machine(), "splade_obs": ours, "sentence_transformers": st,
                           "head_passes": {ours["head_pass"]: ours, **passes},
                           "num_docs": ours["num_docs"], "num_queries": ours["num_queries"],
                           "batch_size": args.batch_size, "max_doc_length": 256,
                           "speedup": st["eval_s"] / ours["eval_s"], "cpu_speedup": st["cpu_s"] / ours["cpu_s"],
                           "memory_ratio": st["peak_rss_mb"] / ours["peak_rss_mb"]}
    if "encode" in parts:
        st = child("encode-st", args)
        runs = {p: child("encode-ours", args, p) for p in ["auto", *filter(None, args.compare_head_passes.split(","))]}
        results["encode"] = {"date": now, "machine": machine(), "sentence_transformers": st, "splade_obs": runs,
                             "docs": st["docs"], "max_length": 256, "batch_size": args.batch_size}
        print(f"encoding: the corpus's first {st['docs']} documents, length 256, batch {args.batch_size}, after a "
              f"warm-up batch; sentence-transformers: {st['docs_per_s']:.1f} docs/s")
        print(table([("ours, --head-pass", "<20"), ("docs/s", ">8"), ("vs ST", ">8"), ("non-zeros", ">10")],
                    [[f"{p} ({r['head_pass']})", f"{r['docs_per_s']:.1f}", f"{r['docs_per_s'] / st['docs_per_s']:.2f}x",
                      str(r["nnz"])] for p, r in runs.items()] + [["sentence-transformers", f"{st['docs_per_s']:.1f}",
                                                                   "1.00x", str(st["nnz"])]], rule=True))
    if "train" in parts:
        ours, st = child("train-ours", args), child("train-st", args)
        former = None if args.no_former_kernels else child("train-ours", args, kernels="former")
        results["train"] = {"date": now, "machine": machine(), "splade_obs": ours, "sentence_transformers": st,
                            "splade_obs_former_kernels": former,
                            "steps": args.train_steps, "skip_steps": args.skip_steps,
                            "batch_size": ours["batch_size"], "config": str(args.config),
                            "speedup": ours["samples_per_s"] / st["samples_per_s"],
                            "cpu_speedup": st["cpu_s"] / ours["cpu_s"],
                            "memory_ratio": st["peak_rss_mb"] / ours["peak_rss_mb"]}
    if "eval" in results:
        e = results["eval"]
        print(f"evaluation: SciFact test, {e['num_docs']} docs, {e['num_queries']} queries, batch {e['batch_size']}, "
              f"length 256 (measured {e['date']})")
    if "train" in results:
        t = results["train"]
        print(f"training: {t['steps']} steps of batch {t['batch_size']} (query + positive + 1 hard negative), "
              f"lengths {t['splade_obs']['max_query_length']}/{t['splade_obs']['max_doc_length']}, "
              f"{t['splade_obs']['precision']} precision, samples/s after the first {t['skip_steps']} steps "
              f"(measured {t['date']})")
    print(side_by_side(results))
    former = results.get("train", {}).get("splade_obs_former_kernels")
    if former:
        t = results["train"]
        ours, st = t["splade_obs"], t["sentence_transformers"]
        print(f"training kernels: ours {ours['samples_per_s']:.2f} samples/s (head pass {ours.get('head_pass')}, "
              f"dropout masks {ours.get('dropout_masks')}), former {former['samples_per_s']:.2f} (head pass "
              f"{former.get('head_pass')}, masks {former.get('dropout_masks')}): "
              f"{ours['samples_per_s'] / former['samples_per_s']:.2f}x; vs sentence-transformers "
              f"{ours['samples_per_s'] / st['samples_per_s']:.2f}x (target >= 40 samples/s and >= 8x)")
    if results.get("eval", {}).get("head_passes"):
        e = results["eval"]
        st_s = e["sentence_transformers"]["eval_s"]
        rows = [[f"--head-pass {r['head_pass_asked']} ({name})", f"{r['eval_s']:.1f}", f"{r['docs_per_s']:.1f}",
                 f"{r['ndcg@10']:.4f}", f"{r['eval_s'] / e['splade_obs']['eval_s']:.2f}x", f"{st_s / r['eval_s']:.2f}x"]
                for name, r in e["head_passes"].items()]
        print(table([("our evaluation, vocabulary pass", "<34"), ("wall s", ">8"), ("docs/s", ">8"),
                     ("nDCG@10", ">8"), ("wall / ours", ">12"), ("vs ST's wall", ">13")], rows, rule=True))
    for part, r in results.items():
        if part == "encode":
            continue
        print(f"{part}: 1-minute load average at start/end: splade-obs {r['splade_obs']['load_avg_1m']}, "
              f"sentence-transformers {r['sentence_transformers']['load_avg_1m']}")
    write_json(out_path, {"benchmark": "speed", "date": now, "machine": machine(), "quick": args.quick,
                          "parts": results})
    print(f"written {out_path}")


if __name__ == "__main__":
    main()
