"""Retrieval quality on SciFact test: BM25 (bm25s) vs splade-tiny zero-shot vs trained models, one table.

Every row is scored by the same code (``splade_obs.evaluate.compute_metrics`` on a top-100 run), so the
numbers are comparable. Trained models (folders written by ``splade-obs train``, or by another trainer in
HF format) are added with ``--model LABEL=PATH``, repeatable.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_quality.py
    .venv/bin/python benchmarks/bench_quality.py --model "splade-obs trained=runs/x/best" \
        --model "sentence-transformers trained=runs/st/final"

Writes benchmarks/results/bench_quality.json. bm25s is the bench extra (``pip install -e '.[bench]'``);
stemmed BM25 is added when PyStemmer is installed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "scifact"
RESULTS = ROOT / "benchmarks" / "results"
KEYS = ("ndcg@10", "mrr@10", "recall@100", "map@100")


def bm25_rows(beir) -> list[dict]:
    """BM25 without stemming, and with Snowball stemming when PyStemmer is installed."""
    from splade_obs.data import beir_doc_text
    from splade_obs.evaluate import compute_metrics
    from splade_obs.mining import bm25_search

    doc_ids = list(beir.corpus)
    texts = [beir_doc_text(beir.corpus[d]) for d in doc_ids]
    qids = [q for q, rels in beir.qrels.items() if any(r > 0 for r in rels.values()) and q in beir.queries]
    stemmers: list[tuple[str, object]] = [("BM25 (bm25s, no stemming)", None)]
    try:
        import Stemmer  # PyStemmer

        stemmers.append(("BM25 (bm25s, Snowball stemming)", Stemmer.Stemmer("english")))
    except ImportError:
        pass
    rows = []
    for label, stemmer in stemmers:
        start = time.perf_counter()
        ids, scores = bm25_search(doc_ids, texts, [beir.queries[q] for q in qids], 100, stemmer=stemmer)
        run = {q: dict(zip(i, s)) for q, i, s in zip(qids, ids, scores)}
        rows.append({"system": label, **compute_metrics(run, {q: beir.qrels[q] for q in qids}),
                     "seconds": time.perf_counter() - start})
    return rows


def splade_row(label: str, model: str, beir, max_doc_length: int, batch_size: int) -> dict:
    from splade_obs.evaluate import RetrievalEvaluator
    from splade_obs.model import SpladeEncoder

    start = time.perf_counter()
    encoder = SpladeEncoder.from_pretrained(model)
    metrics = RetrievalEvaluator(beir, max_query_length=64, max_doc_length=max_doc_length,
                                 batch_size=batch_size).evaluate(encoder)
    return {"system": label, "model": model, **{k: metrics[k] for k in KEYS},
            "query_nnz": metrics["query_nnz"], "doc_nnz": metrics["doc_nnz"], "flops": metrics["flops"],
            "seconds": time.perf_counter() - start}


def table(rows: list[dict]) -> str:
    width = max(len(r["system"]) for r in rows) + 2
    head = f"{'system':<{width}}" + "".join(f"{k:>12}" for k in KEYS) + f"{'doc nnz':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        nnz = f"{r['doc_nnz']:>10.1f}" if "doc_nnz" in r else f"{'-':>10}"
        lines.append(f"{r['system']:<{width}}" + "".join(f"{r[k]:>12.4f}" for k in KEYS) + nnz)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--split", default="test")
    ap.add_argument("--model", action="append", default=[], metavar="LABEL=PATH",
                    help="a trained model to add as a row (repeatable)")
    ap.add_argument("--max-doc-length", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--skip-zero-shot", action="store_true")
    args = ap.parse_args()
    if not (args.data / "corpus.jsonl").is_file():
        raise SystemExit(f"SciFact not found at {args.data}")
    sys.path.insert(0, str(ROOT))
    from splade_obs.data import load_beir

    beir = load_beir(args.data, args.split)
    rows = bm25_rows(beir)
    if not args.skip_zero_shot:
        rows.append(splade_row("splade-tiny zero-shot", "splade-tiny", beir, args.max_doc_length, args.batch_size))
    for spec in args.model:
        label, _, path = spec.partition("=")
        if not path:
            label, path = Path(spec).name, spec
        rows.append(splade_row(label, path, beir, args.max_doc_length, args.batch_size))
    print(f"SciFact {args.split} ({len(beir.corpus)} docs), max doc length {args.max_doc_length}")
    print(table(rows))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "bench_quality.json"
    out.write_text(json.dumps({"benchmark": "quality", "date": dt.datetime.now().isoformat(timespec="seconds"),
                               "data": str(args.data), "split": args.split,
                               "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version()},
                               "rows": rows}, indent=2) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
