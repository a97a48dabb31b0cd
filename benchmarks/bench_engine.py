"""Seismic against the exact index on SciFact with splade-tiny: recall against exact, quality, speed, size.

The corpus and the queries are encoded once (``--max-doc-length`` / 64 tokens); each engine is built from the
same CSR matrix (:mod:`splade_obs.engines`) and searched with every query of ``queries.jsonl`` (SciFact: 1,109)
at each ``--k`` (10 and 100). Per engine the table shows

* ``build_s`` and ``index_mb``: build time and the index's memory (exact: the scipy posting lists; Seismic: its
  own count of forward index, posting lists and summaries);
* ``q/s @k``: every query searched in one call at that k, best of ``--repeat`` runs (the exact index is one scipy
  product, single-threaded; Seismic runs ``--threads`` threads, 1 by default so the two are comparable);
* ``R@k vs exact``: the mean share of exact's top k that the engine's top-k search also returns (a query
  where exact finds fewer than k documents counts over what it finds), 1.0 for exact itself;
* nDCG@10 and Recall@100 on the qrels (``--split``, the judged queries) of the largest k's run, through
  ``splade_obs.evaluation`` (not with ``--scale``, whose copies the qrels do not know).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_engine.py              # the full run (docs/benchmarks.md)
    .venv/bin/python benchmarks/bench_engine.py --cache /tmp/scifact.npz --scale 20   # ~100k documents
    .venv/bin/python benchmarks/bench_engine.py --quick                      # 800 documents, 100 queries

Without ``pyseismic-lsr`` (``pip install 'splade-obs[engines]'``) only the exact row is measured. Writes
benchmarks/results/bench_engine.json (``--quick``: bench_engine_quick.json).
"""

from __future__ import annotations

import argparse
import datetime as dt
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import scipy.sparse as sp
# the benchmarks' shared preamble (repository root on sys.path, paths, table printer, results writer)
from _common import DEFAULT_DATA, RESULTS, machine, require_beir, table, write_json

QUICK_DOCS, QUICK_QUERIES = 800, 100


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from splade_obs.engines import SeismicParams

    d = SeismicParams()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="BEIR folder (default: SciFact)")
    ap.add_argument("--model", default="splade-tiny")
    ap.add_argument("--split", default="test", help="qrels for nDCG@10 / Recall@100")
    ap.add_argument("--max-doc-length", type=int, default=256)
    ap.add_argument("--k", type=int, nargs="+", default=[10, 100], help="recall@K against exact")
    ap.add_argument("--query-cut", type=int, default=d.query_cut)
    ap.add_argument("--heap-factor", type=float, default=d.heap_factor)
    ap.add_argument("--n-postings", type=int, default=d.n_postings)
    ap.add_argument("--threads", type=int, default=1, help="Seismic's threads (0: all cores)")
    ap.add_argument("--repeat", type=int, default=3, help="searches per engine; the fastest counts")
    ap.add_argument("--quick", action="store_true", help=f"the first {QUICK_DOCS} documents, {QUICK_QUERIES} queries")
    ap.add_argument("--output", type=Path, default=None, help="results JSON (default under benchmarks/results/)")
    ap.add_argument("--scale", type=int, default=1,
                    help="index the corpus's vectors N times, each copy's weights jittered (x0.5-1.5, seeded) so "
                         "copies are not duplicates: speed and recall vs exact at N times the corpus")
    ap.add_argument("--cache", type=Path, default=None,
                    help="keep the encoded vectors in this .npz and reuse them (to try other Seismic settings)")
    return ap.parse_args(argv)


def encode(args: argparse.Namespace) -> dict[str, Any]:
    """The corpus and queries as CSR matrices, with their ids and the qrels (a subset with ``--quick``)."""
    from splade_obs.beir import beir_doc_text, load_beir
    from splade_obs.model import SpladeEncoder

    beir = load_beir(args.data, args.split)
    doc_ids = list(beir.corpus)
    query_ids = [q for q, text in beir.queries.items() if text.strip()]
    if args.quick:  # judged queries first, so the quality columns mean something
        query_ids = sorted(query_ids, key=lambda q: q not in beir.qrels)[:QUICK_QUERIES]
        wanted = {d for q in query_ids for d in beir.qrels.get(q, {})}
        doc_ids = sorted(doc_ids, key=lambda d: d not in wanted)[:QUICK_DOCS]
    start, cached = time.perf_counter(), args.cache is not None and args.cache.is_file()
    if cached:
        with np.load(args.cache, allow_pickle=False) as z:
            if [str(x) for x in z["doc_ids"]] != doc_ids or [str(x) for x in z["query_ids"]] != query_ids:
                raise SystemExit(f"{args.cache} holds other documents or queries; delete it or pass another --cache")
            docs, queries = (sp.csr_matrix((z[f"{n}_data"], z[f"{n}_indices"], z[f"{n}_indptr"]),
                                           shape=tuple(z[f"{n}_shape"])) for n in ("docs", "queries"))
    else:
        encoder = SpladeEncoder.from_pretrained(args.model)
        docs = encoder.encode([beir_doc_text(beir.corpus[d]) for d in doc_ids], max_length=args.max_doc_length)
        queries = encoder.encode([beir.queries[q] for q in query_ids], max_length=64)
        if args.cache is not None:
            args.cache.parent.mkdir(parents=True, exist_ok=True)
            np.savez(args.cache, doc_ids=np.array(doc_ids), query_ids=np.array(query_ids),
                     **{f"{n}_{a}": getattr(m, a) for n, m in (("docs", docs), ("queries", queries))
                        for a in ("data", "indices", "indptr", "shape")})
    encode_s = None if cached else time.perf_counter() - start
    if args.scale > 1:
        docs, doc_ids = scaled(docs, doc_ids, args.scale)
    return {"doc_ids": doc_ids, "query_ids": query_ids, "docs": docs, "queries": queries, "qrels": beir.qrels,
            "encode_s": encode_s}


def scaled(docs: sp.csr_matrix, doc_ids: list[str], n: int) -> tuple[sp.csr_matrix, list[str]]:
    """``n`` copies of the documents (copy 0 as it is), every weight of copies 1.. times a factor in [0.5, 1.5]."""
    rng = np.random.default_rng(0)
    copies = [docs] + [sp.csr_matrix((docs.data * rng.uniform(0.5, 1.5, docs.nnz).astype(np.float32),
                                      docs.indices, docs.indptr), shape=docs.shape) for _ in range(n - 1)]
    return sp.vstack(copies, format="csr"), doc_ids + [f"{d}#{c}" for c in range(1, n) for d in doc_ids]


def measure(name: str, data: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Build the engine; per k, search every query ``--repeat`` times (the fastest counts); score the largest k."""
    from splade_obs.engines import SeismicParams, build_engine
    from splade_obs.evaluation import compute_metrics, run_from_search

    params = SeismicParams(query_cut=args.query_cut, heap_factor=args.heap_factor, n_postings=args.n_postings,
                           num_threads=args.threads)
    engine = build_engine(name, data["docs"], data["doc_ids"], seismic=params)
    row: dict[str, Any] = {"engine": name, "build_s": engine.build_seconds, "index_bytes": engine.size_bytes,
                           "positions": {}}
    for k in sorted(args.k):  # a search at each k: Seismic prunes against the k-th score, so k changes its work
        times = []
        for _ in range(max(1, args.repeat)):
            start = time.perf_counter()
            positions, scores = engine.search_positions(data["queries"], k)
            times.append(time.perf_counter() - start)
        row["positions"][k] = positions
        row[f"queries_per_s@{k}"] = len(data["query_ids"]) / max(min(times), 1e-9)
    ids = [[data["doc_ids"][i] for i in r] for r in positions]
    qrels = {q: data["qrels"][q] for q in data["query_ids"] if q in data["qrels"] and args.scale == 1}
    metrics = compute_metrics(run_from_search(data["query_ids"], ids, scores), qrels) if qrels else {}
    row.update({"ndcg@10": metrics.get("ndcg@10"), "recall@100": metrics.get("recall@100"),
                "judged_queries": len(qrels)})
    return row


def recall_vs(exact: list[Any], other: list[Any]) -> float:
    """Mean over queries of |exact top k ∩ other top k| / |exact top k| (queries exact finds nothing for skipped)."""
    shares = []
    for e, o in zip(exact, other):
        truth = set(e.tolist())
        if truth:
            shares.append(len(truth & set(o.tolist())) / len(truth))
    return sum(shares) / len(shares) if shares else 1.0


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from splade_obs.engines import ENGINES, import_seismic
    from splade_obs.errors import DependencyError

    args = parse_args(argv)
    require_beir(args.data)
    engines = list(ENGINES)
    try:
        import_seismic()
    except DependencyError:
        print("pyseismic-lsr is not installed: measuring the exact index only "
              "(pip install 'splade-obs[engines]')")
        engines = ["exact"]
    data = encode(args)
    rows = [measure(name, data, args) for name in engines]
    exact = rows[0].pop("positions")
    for row in rows:
        found = row.pop("positions", exact)
        for k in args.k:
            row[f"recall@{k}_vs_exact"] = recall_vs(exact[k], found[k])
    source = f"vectors from {args.cache}" if data["encode_s"] is None else f"encoded in {data['encode_s']:.1f}s"
    print(f"{len(data['doc_ids'])} documents, {len(data['query_ids'])} queries ({source}); seismic: query_cut "
          f"{args.query_cut}, heap_factor {args.heap_factor}, n_postings {args.n_postings}, "
          f"{args.threads or 'all'} thread(s)")
    ks = sorted(args.k)
    cols = [("engine", "<9"), ("build_s", ">9", ".2f"), ("index_mb", ">10", ".2f")]
    cols += [(f"q/s @{k}", f">{len(str(k)) + 8}", ".0f") for k in ks]
    cols += [(f"R@{k} vs exact", f">{len(str(k)) + 13}", ".4f") for k in ks]
    cols += [("nDCG@10", ">9"), ("R@100", ">8")]
    fmt = (lambda v: "-" if v is None else f"{v:.4f}")
    print(table(cols, [[r["engine"], r["build_s"], r["index_bytes"] / 1e6, *(r[f"queries_per_s@{k}"] for k in ks),
                        *(r[f"recall@{k}_vs_exact"] for k in ks), fmt(r["ndcg@10"]), fmt(r["recall@100"])]
                       for r in rows], sep=" ", rule=True))
    result = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
              "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "num_docs": len(data["doc_ids"]), "num_queries": len(data["query_ids"]), "encode_s": data["encode_s"],
              "engines": rows}
    write_json(args.output or RESULTS / ("bench_engine_quick.json" if args.quick else "bench_engine.json"), result)
    return result


if __name__ == "__main__":
    main()
