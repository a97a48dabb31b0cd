"""Corpus scaling for bench_scale.py (issue 34, point 4): encode + index + retrieve as the corpus grows.

The corpus is SciFact's documents cycled: copy 0 is SciFact itself, every further copy perturbs each document
with a seeded shuffle of word pairs and two words swapped for others from the corpus (so no two documents are
duplicates) and gets ids ``<id>~<copy>``; queries and qrels are SciFact test's, so nDCG@10 is comparable across
sizes. Documents are cut to their first 64 words and encoded at ``--max-doc-length`` 16: at SciFact's full
length (256) this machine encodes ~75 documents/s, so 500k documents would take ~2 h per configuration (at 32,
~30 min); the claim measured here, flat time per document, does not depend on the length. Time per document
is (encoding the documents + building the index + retrieving) / documents; the queries' encoding, the same
at every size, is reported apart.

Each configuration is the real command, ``splade-obs evaluate DATA --index-dir DIR`` (the corpus read lazily,
encoded block by block into a memory-mapped CSR on disk), in a fresh process or under ``torchrun
--nproc-per-node 2``; its peak RSS is the sum over the process tree, sampled every 0.2 s. The engine
(Seismic) is then built from the on-disk vectors of the one-process run and searched in a fresh process:
build time, queries/s, index size, its recall@10 against the exact index, its peak RSS.
"""

from __future__ import annotations

import json
import os
import random
import resource
import socket
import sys
import time
from pathlib import Path
from typing import Any

from _common import CLI_MODULE, run_measured

WORDS_KEPT = 64


def write_corpus(scifact: Path, n: int, out: Path) -> Path:
    """A BEIR folder of ``n`` documents (SciFact cycled, each copy perturbed) with SciFact test's queries."""
    base = [json.loads(line) for line in open(scifact / "corpus.jsonl", encoding="utf-8") if line.strip()]
    vocab = sorted({w for d in base[:500] for w in (d.get("text") or "").split()[:WORDS_KEPT]})
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "corpus.jsonl", "w", encoding="utf-8") as f:
        for i in range(n):
            copy, doc = divmod(i, len(base))
            src = base[doc]
            words = f"{src.get('title') or ''} {src.get('text') or ''}".split()[:WORDS_KEPT]
            if copy:
                rng = random.Random(copy * 1_000_003 + doc)
                for _ in range(6):
                    j = rng.randrange(max(1, min(len(words), 40) - 1))
                    words[j:j + 2] = words[j:j + 2][::-1]
                for _ in range(2):
                    if words:
                        words[rng.randrange(min(len(words), 40))] = rng.choice(vocab)
            doc_id = str(src["_id"]) if not copy else f"{src['_id']}~{copy}"
            f.write(json.dumps({"_id": doc_id, "title": "", "text": " ".join(words)}) + "\n")
    (out / "qrels").mkdir(exist_ok=True)
    (out / "queries.jsonl").write_bytes((scifact / "queries.jsonl").read_bytes())
    (out / "qrels" / "test.tsv").write_bytes((scifact / "qrels" / "test.tsv").read_bytes())
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def evaluate_config(data: Path, procs: int, work: Path, *, max_doc_length: int, batch_size: int) -> dict[str, Any]:
    """``splade-obs evaluate --index-dir`` on ``data`` with ``procs`` processes: times, peak RSS, index size."""
    index, out = work / f"index-{procs}", work / f"eval-{procs}.json"
    args = ["evaluate", "--data", str(data), "--model", "splade-tiny", "--max-doc-length", str(max_doc_length),
            "--max-query-length", "32", "--batch-size", str(batch_size), "--index-dir", str(index),
            "--output", str(out), "--progress", "none"]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(MLFLOW_DISABLE_TELEMETRY="true", PYTHONUNBUFFERED="1")
    if procs == 1:
        cmd = [sys.executable, "-m", CLI_MODULE, *args]
    else:  # one thread per process: the two processes share the machine's cores as one process's threads do
        env.update(OMP_NUM_THREADS=str(max(1, (os.cpu_count() or procs) // procs)), GLOO_SOCKET_IFNAME="lo")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs), "--master-addr",
               "127.0.0.1", "--master-port", str(_free_port()), "-m", CLI_MODULE, *args]
    wall, cpu, peak = run_measured(cmd, env, work / f"eval-{procs}.log")
    res = json.loads(out.read_text())
    m = res["metrics"]
    n = int(m["num_docs"])
    work_s = m["encode_docs_s"] + m["search_s"]  # the queries' encoding is the same at every size: apart
    return {"docs": n, "processes": procs, "wall_s": wall, "cpu_s": cpu, "cpu_ms_per_doc": 1000 * cpu / n,
            "encode_docs_s": m["encode_docs_s"],
            "encode_queries_s": m["encode_queries_s"], "index_and_retrieve_s": m["search_s"],
            "encode_index_retrieve_s": work_s, "ms_per_doc": 1000 * work_s / n, "peak_rss_mb": peak,
            "index_mb": sum(p.stat().st_size for p in index.rglob("*") if p.is_file()) / 2**20,
            "ndcg@10": m["ndcg@10"], "recall@100": m["recall@100"]}


def engine_config(data: Path, index: Path, work: Path, engine: str = "seismic") -> dict[str, Any]:
    """The engine built from the on-disk vectors and searched, in a fresh process (:func:`engine_worker`)."""
    out = work / f"engine-{engine}.json"
    cmd = [sys.executable, str(Path(__file__).resolve().parent / "bench_scale.py"), "--engine-worker", engine,
           str(data), str(index), str(out)]
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true")
    wall, _, peak = run_measured(cmd, env, work / f"engine-{engine}.log")
    return {**json.loads(out.read_text()), "wall_s": wall, "peak_rss_mb": peak}


def engine_worker(engine: str, data: Path, index: Path, out: Path) -> None:
    """Open the on-disk vectors, build ``engine``, search SciFact test's queries, compare with exact."""
    import numpy as np

    from splade_obs.beir import load_beir
    from splade_obs.csr_store import index_over, open_csr
    from splade_obs.engines import build_engine
    from splade_obs.evaluation import RetrievalEvaluator
    from splade_obs.model import SpladeEncoder

    evaluator = RetrievalEvaluator(load_beir(data, "test", lazy_corpus=True))  # the queries evaluate searches
    ids, queries = evaluator.doc_ids, evaluator.query_texts
    encoder = SpladeEncoder.from_pretrained("splade-tiny", device="cpu")
    q = encoder.encode(queries, max_length=32, batch_size=64)
    exact = index_over(open_csr(index / "postings"), ids)
    t0 = time.perf_counter()
    exact_found, _ = exact.search(q, 10)
    exact_s = time.perf_counter() - t0
    docs = open_csr(index / "docs")
    built = build_engine(engine, docs, ids)
    t0 = time.perf_counter()
    found, _ = built.search(q, 10)
    search_s = time.perf_counter() - t0
    recall = float(np.mean([len(set(a) & set(b)) / max(1, len(b)) for a, b in zip(found, exact_found)]))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(out).write_text(json.dumps({
        "engine": engine, "docs": len(ids), "queries": len(queries), "build_s": built.build_seconds,
        "search_s": search_s, "queries_per_s": len(queries) / max(search_s, 1e-9), "index_mb": built.size_bytes / 2**20,
        "recall@10_vs_exact": recall, "exact_search_s": exact_s,
        "exact_queries_per_s": len(queries) / max(exact_s, 1e-9), "worker_max_rss_mb": rss}))


def corpus_scaling(scifact: Path, sizes: list[int], procs: list[int], engine: str | None, work: Path, *,
                   max_doc_length: int = 16, batch_size: int = 128) -> dict[str, Any]:
    rows, engines = [], []
    for n in sizes:
        data = write_corpus(scifact, n, work / f"corpus-{n}")
        for p in procs:
            cfg_work = work / f"run-{n}-{p}"
            cfg_work.mkdir(parents=True, exist_ok=True)
            rows.append(evaluate_config(data, p, cfg_work, max_doc_length=max_doc_length, batch_size=batch_size))
            print(f"  {n:>8,} docs, {p} process{'es' if p > 1 else ''}: {rows[-1]['ms_per_doc']:.3f} ms/doc "
                  f"({rows[-1]['cpu_ms_per_doc']:.3f} CPU ms/doc), peak RSS {rows[-1]['peak_rss_mb']:.0f} MB", flush=True)
        if engine:  # from the first configuration's index: the vectors are the same for every process count
            first_work = work / f"run-{n}-{procs[0]}"
            engines.append(engine_config(data, first_work / f"index-{procs[0]}", first_work, engine))
        (data / "corpus.jsonl").unlink()  # the next size's corpus takes its place on disk
    flat, flat_cpu = {}, {}
    for p in procs:
        per = [r["ms_per_doc"] for r in rows if r["processes"] == p]
        flat[str(p)] = max(per) / min(per)
        mine = [r for r in rows if r["processes"] == p]  # CPU time counts start-up too: per document *added*
        per_cpu = [1000 * (b["cpu_s"] - a["cpu_s"]) / (b["docs"] - a["docs"]) for a, b in zip(mine, mine[1:])]
        flat_cpu[str(p)] = max(per_cpu) / min(per_cpu) if per_cpu and min(per_cpu) > 0 else None
    first, last = rows[0], [r for r in rows if r["processes"] == procs[0]][-1]
    return {"sizes": sizes, "processes": procs, "max_doc_length": max_doc_length, "batch_size": batch_size,
            "configs": rows, "engine": engines, "time_per_doc_spread": flat, "cpu_per_doc_spread": flat_cpu,
            "time_per_doc_goal": 1.3,
            "rss_growth_mb": last["peak_rss_mb"] - first["peak_rss_mb"],
            "index_growth_mb": last["index_mb"] - first["index_mb"]}
