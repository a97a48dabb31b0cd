"""Hard-negative mining: training triples whose negatives are what a retriever wrongly ranks high.

For each query of a BEIR split with at least one relevant document, retrieve the top ``depth``
documents (with the current SPLADE model through the exact inverted index, or with BM25 from the
``bm25s`` package), drop every known positive (qrels label > 0), and keep the best ``num_negatives``.
Documents the qrels judge non-relevant (label 0) are kept: they are real negatives. A query for which
nothing is left is skipped and counted; one with fewer than asked keeps what it has (the collator
repeats a query's negatives to fill a batch).

Output records are the training format of :mod:`splade_obs.data` (``query``, ``positives``,
``negatives``), plus ``query_id``, ``positive_ids`` and ``negative_ids`` so a mined file can be traced back.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .errors import DataError, DependencyError
from .evaluate import InvertedIndex

if TYPE_CHECKING:  # pragma: no cover
    from .data import BeirData

log = logging.getLogger("splade_obs.mining")

METHODS = ("splade", "bm25")


@dataclass
class MiningResult:
    records: list[dict[str, Any]]
    num_queries: int
    num_skipped: int = 0          # queries with no negative left after removing positives
    num_short: int = 0            # queries with fewer negatives than asked
    seconds: float = 0.0
    method: str = "splade"
    notes: list[str] = field(default_factory=list)


def _training_queries(beir: "BeirData") -> list[tuple[str, list[str]]]:
    """(query id, relevant doc ids present in the corpus) for queries with a text and a relevant doc."""
    out = []
    for qid, rels in beir.qrels.items():
        positives = [d for d, rel in rels.items() if rel > 0 and d in beir.corpus]
        if positives and beir.queries.get(qid, "").strip():
            out.append((qid, positives))
    return out


def retrieve_splade(encoder: Any, doc_ids: list[str], doc_texts: list[str], queries: list[str], depth: int, *,
                    max_query_length: int, max_doc_length: int, batch_size: int,
                    amp_dtype: Any = None) -> list[list[str]]:
    """Top-``depth`` document ids per query by exact SPLADE dot product."""
    docs = encoder.encode(doc_texts, max_length=max_doc_length, batch_size=batch_size, amp_dtype=amp_dtype)
    qs = encoder.encode(queries, max_length=max_query_length, batch_size=batch_size, amp_dtype=amp_dtype)
    found, _ = InvertedIndex(docs, doc_ids).search(qs, depth)
    return found


def bm25_search(doc_ids: list[str], doc_texts: list[str], queries: list[str], k: int,
                stemmer: Any = None) -> tuple[list[list[str]], list[list[float]]]:
    """Top-``k`` (ids, scores) per query by BM25 (``bm25s``: Lucene scoring, k1=1.5, b=0.75, English stopwords).

    Documents with a zero score (no query term) are not returned. ``stemmer`` is e.g. a PyStemmer stemmer.
    """
    try:
        import bm25s
    except ImportError as exc:
        raise DependencyError("BM25 needs the 'bm25s' package", original_exception=exc,
                              hint="pip install -e '.[bench]' (or pip install bm25s), or use --method splade") from exc
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(doc_texts, stopwords="en", stemmer=stemmer, show_progress=False),
                    show_progress=False)
    # String tokens (not ids) so the queries are mapped onto the corpus vocabulary.
    query_tokens = bm25s.tokenize(queries, stopwords="en", stemmer=stemmer, return_ids=False, show_progress=False)
    results, scores = retriever.retrieve(query_tokens, k=min(k, len(doc_ids)), show_progress=False)
    ids_out, scores_out = [], []
    for row, srow in zip(results, scores):
        kept = [(doc_ids[int(i)], float(s)) for i, s in zip(row, srow) if s > 0]
        ids_out.append([d for d, _ in kept])
        scores_out.append([s for _, s in kept])
    return ids_out, scores_out


def retrieve_bm25(doc_ids: list[str], doc_texts: list[str], queries: list[str], depth: int) -> list[list[str]]:
    """Top-``depth`` document ids per query by BM25."""
    return bm25_search(doc_ids, doc_texts, queries, depth)[0]


def mine_negatives(beir: "BeirData", *, method: str = "splade", encoder: Any = None, num_negatives: int = 4,
                   depth: int = 50, max_query_length: int = 64, max_doc_length: int = 256, batch_size: int = 32,
                   amp_dtype: Any = None) -> MiningResult:
    """Build training records with hard negatives for every query of ``beir``'s qrels that has a positive."""
    from .data import beir_doc_text

    if method not in METHODS:
        raise DataError(f"mining method {method!r} is not known — expected one of {', '.join(METHODS)}")
    if num_negatives < 1 or depth < 1:
        raise DataError(f"num_negatives and depth must be >= 1, got {num_negatives} and {depth}")
    if method == "splade" and encoder is None:
        raise DataError("SPLADE mining needs an encoder")
    pairs = _training_queries(beir)
    if not pairs:
        raise DataError("no query of the qrels has a text and a relevant document in the corpus",
                        file_path=beir.folder or None)
    start = time.perf_counter()
    doc_ids = list(beir.corpus)
    doc_texts = [beir_doc_text(beir.corpus[d]) for d in doc_ids]
    query_texts = [beir.queries[q] for q, _ in pairs]
    if method == "splade":
        ranked = retrieve_splade(encoder, doc_ids, doc_texts, query_texts, depth, max_query_length=max_query_length,
                                 max_doc_length=max_doc_length, batch_size=batch_size, amp_dtype=amp_dtype)
    else:
        ranked = retrieve_bm25(doc_ids, doc_texts, query_texts, depth)
    text_of = dict(zip(doc_ids, doc_texts))
    result = MiningResult([], len(pairs), method=method)
    for (qid, positives), text, hits in zip(pairs, query_texts, ranked):
        record = _record(qid, text, positives, hits, text_of, num_negatives)
        if record is None:
            result.num_skipped += 1
            continue
        result.num_short += len(record["negatives"]) < num_negatives
        result.records.append(record)
    result.seconds = time.perf_counter() - start
    return result


def _record(qid: str, query: str, positives: Sequence[str], hits: Sequence[str], text_of: dict[str, str],
            num_negatives: int) -> dict[str, Any] | None:
    known = set(positives)
    pos = [d for d in positives if text_of[d].strip()]
    neg = [d for d in hits if d not in known and text_of[d].strip()][:num_negatives]
    if not pos or not neg:
        return None
    return {"query": query, "positives": [text_of[d] for d in pos], "negatives": [text_of[d] for d in neg],
            "query_id": qid, "positive_ids": pos, "negative_ids": neg}


def write_jsonl(records: list[dict[str, Any]], path: str | Path) -> Path:
    """Write records as JSONL; the file appears under its name only once complete."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    try:
        with open(partial, "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        os.replace(partial, out)
    finally:
        if partial.exists():
            partial.unlink()
    return out
