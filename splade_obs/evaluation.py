"""Retrieval evaluation: an exact sparse inverted index, IR metrics and sparsity statistics.

Why it looks like this:

* SPLADE vectors are non-negative and sparse, so the score of every document for a block of queries is one
  sparse matrix product ``Q @ D.T`` (scipy walks only the posting lists the queries touch - an inverted
  index in matrix form). Top-k per query is an ``argpartition`` over that block, done in query chunks so
  the dense score block stays bounded in memory. The result is exact, not approximate.
* Metrics follow trec_eval (pytrec_eval, its C code in Python, is what the tests compare against): nDCG uses the
  relevance label itself as the gain (``rel / log2(rank + 1)``, graded when qrels are graded) and the
  ideal ranking from the qrels; a document is relevant when its label is > 0; every metric is a per-query
  value averaged over the queries of the qrels that have at least one relevant document (a query missing
  from the run scores 0). Ties inside a run are broken by document id, ascending, so results never depend
  on dict order.
* ``RetrievalEvaluator`` encodes the corpus and queries with ``torch.no_grad`` in length-sorted batches
  (the encoder does the sorting), restores the encoder's train/eval mode afterwards, and returns one flat
  dict: quality metrics, sparsity and timings. The trainer uses it for in-training evaluation.
* ``idf_reweight`` is an optional index-time transform: each document weight ``w_dj`` becomes
  ``w_dj * idf_j ** power``, with BM25's idf (``ln(1 + (N - df_j + 0.5) / (df_j + 0.5))``) and ``df_j`` the
  number of the index's documents whose vector has term ``j``. It needs only the encoded corpus (no labels,
  no queries), keeps the model and the posting lists' shape, and since ``q . diag(idf^a) . d`` is one
  product, weighting the documents is the same as weighting the queries. Off (power 0) by default.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np
import scipy.sparse as sp

from .errors import DataError, EvaluationError

if TYPE_CHECKING:  # pragma: no cover
    from .beir import BeirData
    from .progress_util import ProgressSpec
    from .shard import Shard

log = logging.getLogger("splade_obs.evaluate")

Run = dict[str, dict[str, float]]
Qrels = Mapping[str, Mapping[str, int]]

#: The dense score block of one query chunk holds at most this many floats (8 MB in float32; the sparse product
#: it is made from and the top-k selection take a few times that). 2M: SciFact's 300 test queries against 5k
#: documents already make a 1.5M block, so the search's working memory stays the same from 5k to millions of
#: documents (100k documents: peak +55 MB at 2M, +184 MB at 8M, the same 0.7 s; 64M took +1,103 MB at 500k).
MAX_BLOCK_ELEMENTS = 2 * 1024 * 1024
METRIC_KEYS = ("ndcg@10", "mrr@10", "recall@100", "map@100")


# ----------------------------------------------------------------------------------------- index
class InvertedIndex:
    """Exact top-k retrieval by sparse dot product over a fixed set of document vectors.

    Ranking rule (also what the brute-force test checks): score descending, ties by document position
    ascending; only documents with a positive score are returned (a document sharing no term with the
    query is not retrieved, as in any inverted index), so a query can get fewer than ``k`` results.
    """

    def __init__(self, doc_vectors: sp.spmatrix | np.ndarray, doc_ids: Sequence[str] | None = None) -> None:
        docs = sp.csr_matrix(doc_vectors)
        if docs.dtype not in (np.float32, np.float64):
            docs = docs.astype(np.float32)
        docs.sum_duplicates()
        docs.eliminate_zeros()
        self.num_docs, self.vocab_size = docs.shape
        self.doc_ids = list(doc_ids) if doc_ids is not None else [str(i) for i in range(self.num_docs)]
        if len(self.doc_ids) != self.num_docs:
            raise EvaluationError(f"{len(self.doc_ids)} doc ids for {self.num_docs} document vectors")
        # Term-major (V x N) CSR: row j is the posting list of term j. Q @ postings reads only the rows
        # (terms) that appear in the queries.
        self.postings = docs.T.tocsr()
        self.postings.sort_indices()
        self.doc_nnz = int(docs.nnz)

    @property
    def size_bytes(self) -> int:
        """Bytes of the posting lists: weights, document positions and row pointers."""
        p = self.postings
        return int(p.data.nbytes + p.indices.nbytes + p.indptr.nbytes)

    def scores(self, query_vectors: sp.spmatrix | np.ndarray) -> np.ndarray:
        """Dense (Q x N) score matrix; for tests and small query sets."""
        q = self._queries(query_vectors)
        return np.asarray((q @ self.postings).toarray())

    def _queries(self, query_vectors: sp.spmatrix | np.ndarray) -> sp.csr_matrix:
        q = sp.csr_matrix(query_vectors)
        if q.shape[1] != self.vocab_size:
            raise EvaluationError(f"query vectors have {q.shape[1]} dimensions, the index has {self.vocab_size}")
        return q.astype(self.postings.dtype, copy=False)

    def search_positions(self, query_vectors: sp.spmatrix | np.ndarray,
                         k: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Top-k document positions and scores per query (arrays of length <= k, best first)."""
        if k <= 0:
            raise EvaluationError(f"k must be positive, got {k}")
        q = self._queries(query_vectors)
        chunk = max(1, MAX_BLOCK_ELEMENTS // max(1, self.num_docs))
        positions: list[np.ndarray] = []
        values: list[np.ndarray] = []
        for start in range(0, q.shape[0], chunk):
            block = np.asarray((q[start:start + chunk] @ self.postings).toarray())
            p, v = _top_k_rows(block, k)
            positions.extend(p)
            values.extend(v)
        return positions, values

    def search(self, query_vectors: sp.spmatrix | np.ndarray, k: int) -> tuple[list[list[str]], list[np.ndarray]]:
        """Top-k document ids and scores per query row, best first."""
        positions, values = self.search_positions(query_vectors, k)
        return [[self.doc_ids[i] for i in row] for row in positions], values


def _top_k_rows(block: np.ndarray, k: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per row: positions of the k best positive scores (desc, ties by position asc) and the scores."""
    n = block.shape[1]
    kk = min(k, n)
    if kk < n:
        cand = np.argpartition(-block, kk - 1, axis=1)[:, :kk]
    else:
        cand = np.broadcast_to(np.arange(n), block.shape)
    cand_scores = np.take_along_axis(block, cand, axis=1)
    threshold = cand_scores.min(axis=1)
    out_pos, out_val = [], []
    for r in range(block.shape[0]):
        row = block[r]
        thr = threshold[r]
        if thr > 0 and kk < n and np.count_nonzero(row >= thr) > kk:
            # Ties at the cut-off: argpartition picked arbitrary members of the tie; take the lowest positions.
            idx = np.flatnonzero(row >= thr)
        else:
            idx = cand[r]
            idx = idx[row[idx] > 0]
        order = np.lexsort((idx, -row[idx]))[:kk]
        idx = idx[order]
        out_pos.append(idx)
        out_val.append(row[idx])
    return out_pos, out_val


def run_from_search(query_ids: Sequence[str], doc_ids: list[list[str]], scores: list[np.ndarray]) -> Run:
    """``{qid: {docid: score}}`` from the output of :meth:`InvertedIndex.search`."""
    return {qid: {d: float(s) for d, s in zip(ds, ss)} for qid, ds, ss in zip(query_ids, doc_ids, scores)}


# ----------------------------------------------------------------------------------------- metrics
def _ranked(docs: Mapping[str, float], k: int | None = None) -> list[str]:
    """Document ids by score descending, ties by id ascending, cut at k."""
    ranked = sorted(docs.items(), key=lambda item: (-item[1], item[0]))
    return [d for d, _ in (ranked if k is None else ranked[:k])]


def _judged_queries(qrels: Qrels) -> list[str]:
    """Queries with at least one relevant (label > 0) document: the ones every metric averages over."""
    return [qid for qid, rels in qrels.items() if any(r > 0 for r in rels.values())]


def _mean(values: Iterable[float]) -> float:
    vals = list(values)
    return float(sum(vals) / len(vals)) if vals else 0.0


def _per_query(run: Mapping[str, Mapping[str, float]], qrels: Qrels, k: int, fn: Any) -> dict[str, float]:
    out = {}
    for qid in _judged_queries(qrels):
        rels = {d: int(r) for d, r in qrels[qid].items()}
        out[qid] = fn(_ranked(run.get(qid, {}), k), rels)
    return out


def _ndcg(ranked: list[str], rels: dict[str, int], k: int) -> float:
    dcg = sum(max(rels.get(d, 0), 0) / math.log2(i + 2) for i, d in enumerate(ranked))
    ideal = sorted((r for r in rels.values() if r > 0), reverse=True)[:k]
    idcg = sum(r / math.log2(i + 2) for i, r in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def _rr(ranked: list[str], rels: dict[str, int]) -> float:
    for i, d in enumerate(ranked):
        if rels.get(d, 0) > 0:
            return 1.0 / (i + 1)
    return 0.0


def _recall(ranked: list[str], rels: dict[str, int]) -> float:
    relevant = sum(1 for r in rels.values() if r > 0)
    return sum(1 for d in ranked if rels.get(d, 0) > 0) / relevant


def _ap(ranked: list[str], rels: dict[str, int]) -> float:
    relevant = sum(1 for r in rels.values() if r > 0)
    hits, total = 0, 0.0
    for i, d in enumerate(ranked):
        if rels.get(d, 0) > 0:
            hits += 1
            total += hits / (i + 1)
    return total / relevant


def ndcg_per_query(run: Run, qrels: Qrels, k: int = 10) -> dict[str, float]:
    """nDCG@k of every judged query (0 for a judged query the run lacks): what :func:`ndcg_at_k` averages."""
    return _per_query(run, qrels, k, lambda r, q: _ndcg(r, q, k))


def ndcg_at_k(run: Run, qrels: Qrels, k: int = 10) -> float:
    """Mean nDCG@k with gain = relevance label (trec_eval ``ndcg_cut``), ideal DCG from the qrels."""
    return _mean(ndcg_per_query(run, qrels, k).values())


def mrr_at_k(run: Run, qrels: Qrels, k: int = 10) -> float:
    """Mean reciprocal rank of the first relevant document within the top k (0 when none)."""
    return _mean(_per_query(run, qrels, k, _rr).values())


def recall_at_k(run: Run, qrels: Qrels, k: int = 100) -> float:
    """Mean fraction of a query's relevant documents found in its top k."""
    return _mean(_per_query(run, qrels, k, _recall).values())


def map_at_k(run: Run, qrels: Qrels, k: int = 100) -> float:
    """Mean average precision over the top k, divided by all relevant documents (trec_eval ``map_cut``)."""
    return _mean(_per_query(run, qrels, k, _ap).values())


def compute_metrics(run: Run, qrels: Qrels) -> dict[str, float]:
    """The four headline metrics under exactly the keys ``ndcg@10, mrr@10, recall@100, map@100``."""
    if not _judged_queries(qrels):
        raise DataError("qrels have no query with a relevant document (label > 0) — expected at least one")
    return {
        "ndcg@10": ndcg_at_k(run, qrels, 10),
        "mrr@10": mrr_at_k(run, qrels, 10),
        "recall@100": recall_at_k(run, qrels, 100),
        "map@100": map_at_k(run, qrels, 100),
    }


def _check_idf_power(power: float) -> float:
    if not (power >= 0 and math.isfinite(power)):
        raise EvaluationError(f"idf power must be a finite number >= 0, got {power}")
    return float(power)


def idf_weights(doc_vectors: sp.spmatrix | np.ndarray, power: float) -> np.ndarray:
    """Per-term factor ``idf_j ** power`` from the document frequencies of the document vectors themselves.

    ``idf_j = ln(1 + (N - df_j + 0.5) / (df_j + 0.5))`` (BM25's, always > 0); ``df_j`` counts the documents
    with a non-zero weight for term ``j``. ``power`` 0 gives all ones.
    """
    _check_idf_power(power)
    docs = sp.csr_matrix(doc_vectors, copy=True)
    docs.sum_duplicates()
    return _idf_power(np.bincount(docs.indices[docs.data != 0], minlength=docs.shape[1]), docs.shape[0], power)


def _idf_power(df: np.ndarray, n: int, power: float) -> np.ndarray:
    df = df.astype(np.float64)
    return np.power(np.log1p((n - df + 0.5) / (df + 0.5)), power)


def idf_reweight(doc_vectors: sp.spmatrix | np.ndarray, power: float) -> sp.csr_matrix:
    """The document vectors with each term's weights multiplied by :func:`idf_weights` (an index-time
    transform; power 0 returns the vectors unchanged, as CSR)."""
    docs = sp.csr_matrix(doc_vectors)
    if power == 0:
        return docs
    dtype = docs.dtype if docs.dtype in (np.float32, np.float64) else np.float32
    out = docs.astype(dtype, copy=True)
    out.sum_duplicates()
    out.data *= idf_weights(out, power).astype(dtype)[out.indices]
    return out


# ----------------------------------------------------------------------------------------- sparsity
def sparsity_metrics(q_csr: sp.spmatrix, d_csr: sp.spmatrix, doc_df: np.ndarray | None = None) -> dict[str, float]:
    """Average non-zeros per query and per document, the expected retrieval FLOPS and the index size.

    ``retrieval_flops`` (not the FLOPS regularizer of training) is the expected number of multiply-adds of one query-document score (SPLADE paper, eq. 4
    in spirit): ``sum_j p_q(j) * p_d(j)``, where ``p_q(j)`` is the fraction of queries and ``p_d(j)`` the
    fraction of documents whose weight for term ``j`` is non-zero. ``index_size_mb`` is the size of the
    posting lists (float32 weight + int32 doc position per entry, plus one int32 pointer per term), in
    10^6 bytes.

    ``doc_df`` (the documents' non-zeros per term, e.g. the posting lists' lengths of an index without explicit
    zeros, :mod:`splade_obs.csr_store`) stands in for reading every document's weights.
    """
    q = sp.csr_matrix(q_csr)
    nq, nd = q.shape[0], d_csr.shape[0]
    q_active = np.bincount(q.indices[q.data != 0], minlength=q.shape[1]) / max(nq, 1)
    if doc_df is None:
        d = sp.csr_matrix(d_csr)
        doc_df = np.bincount(d.indices[d.data != 0], minlength=d.shape[1])
    d_active = np.asarray(doc_df, dtype=np.float64) / max(nd, 1)
    d_nnz = int(np.sum(doc_df))
    return {
        "query_nnz": float(np.count_nonzero(q.data) / max(nq, 1)),
        "doc_nnz": float(d_nnz / max(nd, 1)),
        "retrieval_flops": float(np.dot(q_active, d_active)),
        "index_size_mb": float((d_nnz * 8 + (d_csr.shape[1] + 1) * 4) / 1e6),
        "num_docs": float(nd),
    }


# ----------------------------------------------------------------------------------------- trec
def write_trec_run(run: Run, path: str | Path, tag: str = "splade-obs") -> Path:
    """Write ``qid Q0 docid rank score tag`` lines (rank from 1, best first), the format trec_eval reads."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for qid in sorted(run):
            docs = run[qid]
            for rank, docid in enumerate(_ranked(docs), 1):
                f.write(f"{qid} Q0 {docid} {rank} {docs[docid]:.6f} {tag}\n")
    return out


# ----------------------------------------------------------------------------------------- evaluator
class RetrievalEvaluator:
    """Encode a BEIR split with a SPLADE encoder, retrieve exactly and score: one call, one flat dict.

    The corpus is encoded in full every time (the model changes between in-training evaluations); the
    queries are those of the split's qrels that have a relevant document and a text in queries.jsonl,
    optionally a fixed random subset of ``max_queries`` of them (same ``seed`` -> same subset).
    ``idf_power`` > 0 weights the index by :func:`idf_reweight` (sparsity is that of the model's vectors).
    """

    def __init__(self, beir: "BeirData", *, max_query_length: int = 64, max_doc_length: int = 256,
                 batch_size: int = 32, max_queries: int | None = None, seed: int = 0,
                 top_k_retrieve: int = 100, idf_power: float = 0.0, progress: "ProgressSpec | str | None" = None,
                 progress_interval: float = 10.0, index_dir: str | Path | None = None,
                 engine: str = "exact") -> None:
        from .beir import CorpusFile, beir_doc_text
        from .engines import require_engine
        from .progress_util import as_spec

        self.progress = as_spec(progress, progress_interval)  # the display of evaluate()'s encoding (off by default)
        #: ``{phase: (start_ns, end_ns)}`` of the last :meth:`evaluate` (wall clock, ``time.time_ns``)
        self.phases: dict[str, tuple[int, int]] = {}

        self.idf_power = _check_idf_power(idf_power)  # fail before any encoding
        require_engine(engine)  # an unknown engine or a missing package, before any encoding too
        self.engine = engine  # splade_obs.engines: "exact" (InvertedIndex) or "seismic" (approximate)
        if top_k_retrieve < 100:
            log.warning("top_k_retrieve=%d < 100: recall@100 and map@100 only see the top %d",
                        top_k_retrieve, top_k_retrieve)
        self.max_query_length = int(max_query_length)
        self.max_doc_length = int(max_doc_length)
        self.batch_size = int(batch_size)
        self.top_k = int(top_k_retrieve)
        #: a lazy corpus's ids stay packed (:class:`~splade_obs.beir.IdTable`: ~20 bytes a document, not ~95)
        self.doc_ids: Sequence[str] = beir.corpus.ids if isinstance(beir.corpus, CorpusFile) else list(beir.corpus)
        #: read from the file block by block when the corpus is lazy (``load_beir(lazy_corpus=True)``)
        self.doc_texts: Sequence[str] = (beir.corpus.texts() if isinstance(beir.corpus, CorpusFile)
                                         else [beir_doc_text(beir.corpus[d]) for d in self.doc_ids])
        if not self.doc_ids:
            raise DataError("corpus.jsonl has no documents", file_path=beir.folder or None)
        qids = [q for q in _judged_queries(beir.qrels) if beir.queries.get(q, "").strip()]
        if not qids:
            raise DataError("no query of the qrels has both a relevant document and a text in queries.jsonl",
                            file_path=beir.folder or None)
        if max_queries is not None and 0 < max_queries < len(qids):
            qids = sorted(random.Random(seed).sample(qids, max_queries))
        self.query_ids = qids
        self.query_texts = [beir.queries[q] for q in qids]
        self.qrels = {q: dict(beir.qrels[q]) for q in qids}
        self._run: Run = {}
        self._seconds: dict[str, float] = {}
        self.source = beir.folder        # what the run records as its evaluation dataset
        self.digest = beir.digest
        #: Under torchrun (``evaluate(shard=...)``): documents encoded by each rank, in rank order.
        self.docs_per_rank: list[int] | None = None
        #: Encode the corpus block by block into a CSR on disk here and retrieve from it memory-mapped
        #: (:mod:`splade_obs.csr_store`); idf weighting then weights the queries (the same product).
        self.index_dir = Path(index_dir) if index_dir is not None else None
        self._postings: sp.csr_matrix | None = None

    def evaluate(self, encoder: Any, *, amp_dtype: Any = None, shard: "Shard | None" = None) -> dict[str, float]:
        """Metrics + sparsity + timings (``encode_docs_s``, ``encode_queries_s``, ``search_s``).

        The same phases, as wall-clock ``(start_ns, end_ns)``, are in :attr:`phases` afterwards:
        ``encode_docs``, ``encode_queries`` and ``retrieve`` (index, search and metrics). Encoding shows
        progress as :attr:`progress` says (:mod:`splade_obs.progress_util`).

        ``shard`` (under torchrun, :mod:`splade_obs.shard`): every rank encodes its contiguous share of the
        documents and queries, rank 0 retrieves and scores, and every rank returns rank 0's metrics;
        :attr:`docs_per_rank` says how many documents each rank encoded.
        """
        was_training = bool(getattr(encoder, "training", False))
        encoder.eval()
        phases: dict[str, tuple[int, int]] = {}
        self._postings = None  # from this call's corpus, on disk (``index_dir``)
        try:
            docs = self._encode(encoder, "encode_docs", "Encoding documents", self.doc_texts, self.max_doc_length,
                                amp_dtype, phases, shard)
            queries = self._encode(encoder, "encode_queries", "Encoding queries", self.query_texts,
                                   self.max_query_length, amp_dtype, phases, shard)
        finally:
            encoder.train(was_training)
        if shard is None:
            return self._retrieve(docs, queries, phases)
        self.docs_per_rank, self.phases = shard.counts(len(self.doc_texts)), phases
        return shard.from_main(lambda: self._retrieve(docs, queries, phases))  # rank 0 retrieves, all get metrics

    def _retrieve(self, docs: sp.csr_matrix, queries: sp.csr_matrix,
                  phases: dict[str, tuple[int, int]]) -> dict[str, float]:
        t0, start_ns = time.perf_counter(), time.time_ns()
        from .engines import build_engine

        doc_df = None  # from disk: the postings' lengths, not a read of every document's weights
        if self.index_dir is None:
            index, weighted = build_engine(self.engine, idf_reweight(docs, self.idf_power), self.doc_ids), queries
        else:
            from .csr_store import disk_index

            assert self._postings is not None  # written with the documents (encode_to_disk)
            docs, index, weighted = disk_index(docs, self._postings, self.doc_ids, queries, self.idf_power)
            doc_df = np.diff(np.asarray(index.postings.indptr))
            if self.engine != "exact":  # idf already moved to the queries: index the model's own vectors
                index = build_engine(self.engine, docs, self.doc_ids)
        found, scores = index.search(weighted, self.top_k)
        self._run = run_from_search(self.query_ids, found, scores)
        metrics = compute_metrics(self._run, self.qrels)
        search_s = time.perf_counter() - t0
        phases["retrieve"] = (start_ns, time.time_ns())
        self.phases = phases
        metrics.update(sparsity_metrics(queries, docs, doc_df))
        metrics.update({"num_queries": float(len(self.query_ids)), "encode_docs_s": self._seconds["encode_docs"],
                        "encode_queries_s": self._seconds["encode_queries"], "search_s": search_s})
        return metrics

    def _encode(self, encoder: Any, phase: str, desc: str, texts: Sequence[str], max_length: int, amp_dtype: Any,
                phases: dict[str, tuple[int, int]], shard: "Shard | None" = None) -> Any:
        from .progress_util import encode_in_blocks
        from .shard import encode_sharded

        t0, start_ns = time.perf_counter(), time.time_ns()
        bar = self.progress.start(desc, len(texts), unit="texts") if shard is None or shard.is_main else None
        with bar if bar is not None else contextlib.nullcontext():  # a bar closes (or says stopped) either way
            if shard is not None and self.index_dir is not None and phase == "encode_docs":
                from .shard import encode_sharded_to_disk

                out, self._postings = encode_sharded_to_disk(encoder, texts, shard, self.index_dir,
                                                             max_length=max_length, batch_size=self.batch_size,
                                                             amp_dtype=amp_dtype, progress=bar)
            elif shard is not None:
                out = encode_sharded(encoder, texts, shard, max_length=max_length, batch_size=self.batch_size,
                                     amp_dtype=amp_dtype, progress=bar)
            elif self.index_dir is not None and phase == "encode_docs":
                from .csr_store import encode_to_disk

                out, self._postings = encode_to_disk(encoder, texts, self.index_dir, max_length=max_length,
                                                     batch_size=self.batch_size, amp_dtype=amp_dtype, progress=bar)
            else:  # block by block: a lazy corpus's text is never in memory all at once
                out = encode_in_blocks(encoder, texts, max_length=max_length, batch_size=self.batch_size,
                                       amp_dtype=amp_dtype, progress=bar)
        phases[phase] = (start_ns, time.time_ns())
        self._seconds[phase] = time.perf_counter() - t0
        return out

    def run(self) -> Run:
        """The run of the last :meth:`evaluate` call: ``{qid: {docid: score}}``."""
        return self._run


def format_metrics_table(metrics: Mapping[str, float]) -> str:
    """A two-column console table: quality metrics with 4 decimals, counts as integers, the rest with 2."""
    width = max(len(k) for k in metrics) if metrics else 10
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ----------"]
    for key, value in metrics.items():
        fmt = ".4f" if key in METRIC_KEYS else ".0f" if key.startswith("num_") else ".2f"
        lines.append(f"{key:<{width}}  {value:{fmt}}")
    return "\n".join(lines)
