"""Distillation teachers on SciFact: stemmed BM25, splade-tiny, a dense bi-encoder, and their hybrid fusions.

A student distilled by ``splade-obs train`` learns the margins of the teacher that ``mine-negatives --method hybrid
--teacher-scores`` writes. This script scores those teachers as retrievers, with the very code the miner uses
(``splade_obs.mining.RetrieverScores`` for every document's score, ``fuse_scores`` for the fusion), on the
labelled train queries (where a teacher is chosen: no student is trained on them to choose it) and on test
(read-only: what the teacher knows that a student could learn). One side-by-side table, and a JSON file.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_teacher.py            # dense model: all-minilm-l6-v2

Needs the bench extra (bm25s, PyStemmer, sentence-transformers). On a 2-core CPU it takes ~10 minutes (the dense
model encodes the 5,183 abstracts in ~6). Writes benchmarks/results/scifact_teacher.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path
from typing import Any

# the benchmarks' shared preamble (repository root on sys.path, paths, table printer, results writer)
from _common import DEFAULT_DATA, RESULTS, machine, require_beir, table, write_json


def score_rows(retrievers: dict[str, Any], rows: range, doc_ids: list[str], qids: list[str], qrels: dict,
               bm25_weight: float, dense_weight: float | None, only: str | None = None) -> dict[str, float]:
    """The four metrics of one teacher (a single retriever ``only``, or the fusion) over query ``rows``."""
    import numpy as np

    from splade_obs.evaluation import compute_metrics
    from splade_obs.mining import fuse_scores

    run = {}
    for i in rows:
        if only:
            row = retrievers[only].row(i)
        else:
            parts = {m: r.row(i) for m, r in retrievers.items() if m != "dense" or dense_weight is not None}
            row = fuse_scores(parts, bm25_weight, dense_weight or 0.0)
        top = np.argsort(-row, kind="stable")[:100]
        run[qids[i]] = {doc_ids[j]: float(row[j]) for j in top}
    return compute_metrics(run, qrels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--model", default="splade-tiny", help="the SPLADE model of the hybrid")
    ap.add_argument("--dense-model", default="all-minilm-l6-v2")
    ap.add_argument("--bm25-weight", type=float, default=0.5)
    ap.add_argument("--dense-weights", default="0.1,0.2,0.3,0.4,0.5,0.6")
    ap.add_argument("--splits", default="train,test")
    ap.add_argument("--output", type=Path, default=RESULTS / "scifact_teacher.json")
    args = ap.parse_args()
    require_beir(args.data)
    from splade_obs.beir import beir_doc_text, load_beir
    from splade_obs.mining import RetrieverScores, _training_queries, load_dense_encoder, make_stemmer
    from splade_obs.model import SpladeEncoder

    weights = [float(w) for w in args.dense_weights.split(",")]
    encoder = SpladeEncoder.from_pretrained(args.model, device="cpu")
    dense = load_dense_encoder(args.dense_model)
    stemmer = make_stemmer("english")
    # every split's queries against the one corpus, encoded once
    start = time.perf_counter()
    beirs = {split: load_beir(args.data, split) for split in args.splits.split(",")}
    first = next(iter(beirs.values()))
    doc_ids = list(first.corpus)
    qids: list[str] = []
    spans: dict[str, range] = {}
    qrels: dict[str, dict] = {}
    for split, beir in beirs.items():
        asked = [q for q, _ in _training_queries(beir)]
        spans[split] = range(len(qids), len(qids) + len(asked))
        qids += asked
        qrels[split] = {q: beir.qrels[q] for q in asked}
    texts = {q: b.queries[q] for b in beirs.values() for q in b.queries}
    common = dict(encoder=encoder, doc_texts=[beir_doc_text(first.corpus[d]) for d in doc_ids],
                  query_texts=[texts[q] for q in qids], max_query_length=64, max_doc_length=256,
                  batch_size=32, amp_dtype=None, stemmer=stemmer)
    retrievers = {m: RetrieverScores(m, dense_encoder=dense, **common) for m in ("bm25", "splade", "dense")}
    encode_seconds = round(time.perf_counter() - start, 1)
    print(f"{len(doc_ids)} documents and {len(qids)} queries encoded in {encode_seconds}s", file=sys.stderr)
    splits: dict[str, Any] = {}
    for split, span in spans.items():
        args_ = (retrievers, span, doc_ids, qids, qrels[split], args.bm25_weight)
        rows = {"BM25 (bm25s, Snowball stemming)": score_rows(*args_, None, only="bm25"),
                f"{args.model} zero-shot": score_rows(*args_, None, only="splade"),
                f"{args.dense_model} (dense)": score_rows(*args_, None, only="dense"),
                f"hybrid: BM25 + {args.model}, {args.bm25_weight:g}/{1 - args.bm25_weight:g}": score_rows(*args_, None)}
        for w in weights:
            rows[f"hybrid + {args.dense_model} at dense weight {w:g}"] = score_rows(*args_, w)
        splits[split] = {"queries": len(span), "rows": rows}
    names = list(next(iter(splits.values()))["rows"])
    chosen = None
    if "train" in splits:  # the rule: the fusion best on the labelled train queries
        fused = [n for n in names if n.startswith("hybrid + ")]
        chosen = max(fused, key=lambda n: splits["train"]["rows"][n]["ndcg@10"])
    columns = [("teacher", "<62")]
    for s in splits:
        columns += [(s + " nDCG@10", ">16", ".4f"), (s + " R@100", ">14", ".4f")]
    print(table(columns, ([name + (" *" if name == chosen else ""),
                           *(v for s in splits for v in (splits[s]["rows"][name]["ndcg@10"],
                                                         splits[s]["rows"][name]["recall@100"]))]
                          for name in names)))
    if chosen:
        print(f"* best on the {splits['train']['queries']} labelled train queries")
    out = {"benchmark": "scifact_teacher", "date": dt.datetime.now().isoformat(timespec="seconds"),
           "machine": machine(), "data": str(args.data), "model": args.model, "dense_model": args.dense_model,
           "bm25_weight": args.bm25_weight, "dense_weights": weights,
           "encode_seconds": encode_seconds, "chosen_on_train": chosen, "splits": splits}
    write_json(args.output, out, indent=1)
    print(f"written {args.output}")


if __name__ == "__main__":
    main()
