"""Hard-negative mining: training triples whose negatives are what a retriever wrongly ranks high.

For each query of a BEIR split with at least one relevant document, retrieve the top ``depth``
documents (with the current SPLADE model through the exact inverted index, or with BM25 from the
``bm25s`` package), drop every known positive (qrels label > 0), and keep the best ``num_negatives``.
Documents the qrels judge non-relevant (label 0) are kept: they are real negatives. A query for which
nothing is left is skipped and counted; one with fewer than asked keeps what it has (the collator
repeats a query's negatives to fill a batch).

Output records are the training format of :mod:`splade_obs.data` (``query``, ``positives``,
``negatives``), plus ``query_id``, ``positive_ids`` and ``negative_ids`` so a mined file can be traced back.

Distillation data (``teacher_scores=True``): one record per (query, positive) with ``scores`` = the
retriever's score of the positive, then of each negative, the input MarginMSE expects. ``method="hybrid"``
is the teacher worth distilling from when no cross-encoder is at hand: BM25 and SPLADE scores, each divided
by its per-query maximum over the corpus, summed with weights ``bm25_weight`` / ``1 - bm25_weight`` and
scaled by the mean top SPLADE score of the labelled queries (``MiningResult.teacher_scale``, also used
for the title queries so that one file has one unit), so the teacher's margins are in the student's units (on SciFact the fusion at weight 0.5 scores nDCG@10 0.709 on
test where stemmed BM25 scores 0.686 and splade-tiny 0.644: benchmarks/results/scifact_recipe.json).
A ``dense_encoder`` (a sentence-transformers bi-encoder, e.g. all-MiniLM-L6-v2) joins that teacher: its
cosine, divided by its per-query maximum, is mixed in with weight ``dense_weight``, the sparse fusion keeping
``1 - dense_weight``, and its top list joins the candidates (a dense model knows what neither sparse
retriever does: paraphrases and related terms). ``sample=True`` draws
the negatives at random (seeded per query) from the top ``depth`` instead of keeping the best ones: with a
teacher's scores, harder is not better, and varied negatives teach more margins.

``title_queries=True`` adds in-domain pairs without any label: each corpus document with a title and a
text becomes a query (its title) whose positive is its own text, negatives and scores mined against the
texts alone (unsupervised domain adaptation on the target corpus, as in GPL or ICT; no qrels are read).

``sentence_queries=True`` does the same with each document's last sentence (in abstracts, the conclusion: the
kind of statement a claim or a citing sentence makes) as the query and the document without that sentence
(title kept) as its positive, every document of that pass likewise stripped of its last sentence, so the query
never matches its own words (the Inverse Cloze Task). Documents of fewer than three sentences, or whose last
sentence has fewer than ``MIN_SENTENCE_WORDS`` words, give no query. Sentences end at ``.``, ``!`` or ``?``
followed by white space and a capital letter, digit or bracket.
"""

from __future__ import annotations

import json
import logging
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from .atomic import atomic_writer
from .errors import ConfigError, DataError, DependencyError

if TYPE_CHECKING:  # pragma: no cover
    from .beir import BeirData
    from .progress_util import ProgressSpec
    from .shard import Shard

log = logging.getLogger("splade_obs.mining")

METHODS = ("splade", "bm25", "hybrid")
MIN_SENTENCE_WORDS = 6
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(\[])")


def split_last_sentence(text: str) -> tuple[str, str] | None:
    """``(text without its last sentence, last sentence)``, or None when there is no usable last sentence."""
    sentences = [p for p in _SENTENCE_BREAK.split(text.strip()) if p.strip()]
    if len(sentences) < 3 or len(sentences[-1].split()) < MIN_SENTENCE_WORDS:
        return None
    return " ".join(sentences[:-1]), sentences[-1].strip()


@dataclass
class MiningResult:
    records: list[dict[str, Any]]
    num_queries: int
    num_skipped: int = 0          # queries with no negative left after removing positives
    num_short: int = 0            # queries with fewer negatives than asked
    num_title_queries: int = 0    # records made from corpus titles (title_queries=True)
    num_sentence_queries: int = 0  # records made from documents' last sentences (sentence_queries=True)
    teacher_scale: float | None = None  # hybrid: the factor every fused score was multiplied by
    docs_per_rank: list[int] | None = None  # under torchrun: corpus documents each rank encoded
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


def bm25_search(doc_ids: list[str], doc_texts: list[str], queries: list[str], k: int,
                stemmer: Any = None) -> tuple[list[list[str]], list[list[float]]]:
    """Top-``k`` (ids, scores) per query by BM25 (``bm25s``: Lucene scoring, k1=1.5, b=0.75, English stopwords).

    Documents with a zero score (no query term) are not returned. ``stemmer`` is e.g. a PyStemmer stemmer.
    """
    retriever = _bm25_index(doc_texts, stemmer)
    import bm25s  # importable: _bm25_index raised a DependencyError otherwise

    # String tokens (not ids) so the queries are mapped onto the corpus vocabulary.
    query_tokens = bm25s.tokenize(queries, stopwords="en", stemmer=stemmer, return_ids=False, show_progress=False)
    results, scores = retriever.retrieve(query_tokens, k=min(k, len(doc_ids)), show_progress=False)
    ids_out, scores_out = [], []
    for row, srow in zip(results, scores):
        kept = [(doc_ids[int(i)], float(s)) for i, s in zip(row, srow) if s > 0]
        ids_out.append([d for d, _ in kept])
        scores_out.append([s for _, s in kept])
    return ids_out, scores_out


def _bm25_index(doc_texts: list[str], stemmer: Any) -> Any:
    try:
        import bm25s
    except ImportError as exc:
        raise DependencyError("BM25 needs the 'bm25s' package", original_exception=exc,
                              hint="pip install -e '.[bench]' (or pip install bm25s), or use --method splade") from exc
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(doc_texts, stopwords="en", stemmer=stemmer, show_progress=False),
                    show_progress=False)
    return retriever


def load_dense_encoder(name: str, device: str = "cpu") -> Any:
    """A sentence-transformers bi-encoder for the hybrid teacher: a local folder, a hub id, or an embedded name."""
    from .hub import resolve_model

    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise DependencyError("a dense teacher needs the 'sentence-transformers' package", original_exception=exc,
                              hint="pip install -e '.[bench]' (or pip install sentence-transformers)") from exc
    path = resolve_model(name)
    log.info("dense teacher model %s (%s)", name, path)
    return SentenceTransformer(path, device=device)


def make_stemmer(language: str | None) -> Any:
    """A PyStemmer (Snowball) stemmer for BM25, or None for ``language`` None / "none"."""
    if not language or language == "none":
        return None
    try:
        import Stemmer
    except ImportError as exc:
        raise DependencyError("BM25 stemming needs the 'PyStemmer' package", original_exception=exc,
                              hint="pip install PyStemmer (in the bench and test extras), or --stemmer none") from exc
    try:
        return Stemmer.Stemmer(language)
    except KeyError as exc:
        raise ConfigError(f"--stemmer {language}: no Snowball stemmer for this language", field="stemmer",
                          hint=f"one of {', '.join(sorted(Stemmer.algorithms()))}; or none") from exc


class RetrieverScores:
    """Exact scores of one retriever for every query against every document, one query at a time.

    ``row(i)`` is query ``i``'s score for every document (positives included, wherever they rank);
    ``top(i, depth)`` its best document positions with a positive score, best first.
    """

    def __init__(self, method: str, *, encoder: Any, doc_texts: list[str], query_texts: list[str],
                 max_query_length: int, max_doc_length: int, batch_size: int, amp_dtype: Any,
                 stemmer: Any, dense_encoder: Any = None, progress: "ProgressSpec | None" = None,
                 shard: "Shard | None" = None) -> None:
        from .progress_util import as_spec, encode_with_progress
        from .shard import encode_sharded

        spec = as_spec(progress)
        self.method = method
        self.num_docs = len(doc_texts)
        if method == "dense":
            # a sentence-transformers bi-encoder: unit vectors, so a dot product is the cosine
            kwargs = dict(batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
                          show_progress_bar=False)
            with _task(spec, "Encoding documents (dense)", len(doc_texts), "texts") as bar:
                self.docs = dense_encoder.encode(doc_texts, **kwargs)
                if bar is not None:
                    bar.update(len(doc_texts))
            with _task(spec, "Encoding queries (dense)", len(query_texts), "texts") as bar:
                self.queries = dense_encoder.encode(query_texts, **kwargs)
                if bar is not None:
                    bar.update(len(query_texts))
        elif method == "splade":
            # under torchrun each rank encodes a shard; rank 0 gets every row, the other ranks None
            encode = encode_with_progress if shard is None else (lambda e, t, **kw: encode_sharded(e, t, shard, **kw))
            spec = spec if shard is None or shard.is_main else as_spec(None)
            with _task(spec, "Encoding documents", len(doc_texts), "texts") as bar:
                docs = encode(encoder, doc_texts, max_length=max_doc_length, batch_size=batch_size,
                              amp_dtype=amp_dtype, progress=bar)
            with _task(spec, "Encoding queries", len(query_texts), "texts") as bar:
                self.queries = encode(encoder, query_texts, max_length=max_query_length, batch_size=batch_size,
                                      amp_dtype=amp_dtype, progress=bar)
            self.postings = docs.T.tocsr() if docs is not None else None
        else:
            self.retriever = _bm25_index(doc_texts, stemmer)
            import bm25s  # importable: _bm25_index raised a DependencyError otherwise

            self.tokens = bm25s.tokenize(query_texts, stopwords="en", stemmer=stemmer, return_ids=False,
                                         show_progress=False)
        self._row: tuple[int, Any] | None = None

    def row(self, i: int) -> Any:
        """All document scores of query ``i`` (one dense row, cached for the last query asked)."""
        import numpy as np

        if self._row is None or self._row[0] != i:
            if self.method == "dense":
                values = self.docs @ self.queries[i]
            elif self.method == "splade":
                values = np.asarray((self.queries[i] @ self.postings).toarray()).ravel()
            elif not self.tokens[i]:  # only stopwords or one-letter words: BM25 matches nothing
                values = np.zeros(self.num_docs)
            else:
                values = np.asarray(self.retriever.get_scores(list(self.tokens[i])), dtype=np.float64)
            self._row = (i, values.astype(np.float64))
        return self._row[1]

    def top(self, i: int, depth: int) -> list[int]:
        import numpy as np

        row = self.row(i)
        k = min(depth, row.shape[0])
        cand = np.argpartition(-row, k - 1)[:k]
        cand = cand[row[cand] > 0]
        return [int(j) for j in cand[np.lexsort((cand, -row[cand]))]]


def _ticking(items: list[Any], bar: Any) -> Iterator[Any]:
    """``items`` one by one; ``bar`` (if any) advances when the loop body of each is done."""
    for item in items:
        yield item
        if bar is not None:
            bar.update(1)


def _task(spec: "ProgressSpec", desc: str, total: int, unit: str) -> Any:
    """A context giving a running :class:`~splade_obs.progress_util.Progress`, or ``None`` when progress is off."""
    import contextlib

    bar = spec.start(desc, total, unit)
    return bar if bar is not None else contextlib.nullcontext()


def _by_top(row: Any) -> Any:
    """A query's scores divided by its best one (all zeros when nothing scores above zero)."""
    top = float(row.max())
    return row / top if top > 0 else row * 0.0


def fuse_scores(rows: dict[str, Any], bm25_weight: float = 0.5, dense_weight: float = 0.5) -> Any:
    """The hybrid teacher's score of every document for one query, before scaling: BM25 and SPLADE (and the
    dense model's cosine, when ``rows`` has "dense"), each divided by the query's best score, then weighted."""
    normed = {m: _by_top(row) for m, row in rows.items()}
    fused = bm25_weight * normed["bm25"] + (1 - bm25_weight) * normed["splade"]
    if "dense" in normed:
        fused = (1 - dense_weight) * fused + dense_weight * normed["dense"]
    return fused


def mine_negatives(beir: "BeirData", *, method: str = "splade", encoder: Any = None, num_negatives: int = 4,
                   depth: int = 50, max_query_length: int = 64, max_doc_length: int = 256, batch_size: int = 32,
                   amp_dtype: Any = None, teacher_scores: bool = False, bm25_weight: float = 0.5,
                   stemmer: Any = None, sample: bool = False, seed: int = 0,
                   title_queries: bool = False, sentence_queries: bool = False,
                   dense_encoder: Any = None, dense_weight: float = 0.5,
                   dense_candidates: bool = True, progress: "ProgressSpec | str | None" = None,
                   shard: "Shard | None" = None) -> MiningResult:
    """Build training records with hard negatives for every query of ``beir``'s qrels that has a positive.

    See the module docstring for ``teacher_scores``, ``method="hybrid"``, ``sample``, ``title_queries`` and
    ``sentence_queries``.
    ``stemmer`` (see :func:`make_stemmer`) applies to BM25. ``dense_encoder`` (a sentence-transformers
    bi-encoder, hybrid only) adds its cosine to the fusion with weight ``dense_weight`` (module docstring);
    ``dense_candidates=False`` keeps it out of the negative pool: the negatives are drawn from the BM25 + SPLADE
    fusion's top ``depth``, and only their scores are the fusion with the dense model.
    ``progress`` (a :class:`~splade_obs.progress_util.ProgressSpec` or a mode name; off by default) shows the
    encoding and the queries mined; ``MiningResult.seconds`` is the wall time of it all.
    ``shard`` (under torchrun, :mod:`splade_obs.shard`): the SPLADE encoding is split among the ranks, rank 0
    mines alone; only rank 0's result has records (``MiningResult.docs_per_rank``: documents each rank encoded).
    """
    from .beir import beir_doc_text
    from .progress_util import as_spec

    if method not in METHODS:
        raise DataError(f"mining method {method!r} is not known — expected one of {', '.join(METHODS)}")
    if num_negatives < 1 or depth < 1:
        raise DataError(f"num_negatives and depth must be >= 1, got {num_negatives} and {depth}")
    if not 0.0 <= bm25_weight <= 1.0:
        raise DataError(f"bm25_weight must be within [0, 1], got {bm25_weight}", field="bm25_weight")
    if method in ("splade", "hybrid") and encoder is None:
        raise DataError(f"{method} mining needs an encoder")
    if dense_encoder is not None and method != "hybrid":
        raise DataError(f"a dense model joins the hybrid teacher only, not --method {method}", field="dense_model",
                        hint="use --method hybrid with --dense-model")
    if not 0.0 <= dense_weight <= 1.0:
        raise DataError(f"dense_weight must be within [0, 1], got {dense_weight}", field="dense_weight")
    pairs = _training_queries(beir)
    if not pairs:
        raise DataError("no query of the qrels has a text and a relevant document in the corpus",
                        file_path=beir.folder or None)
    start = time.perf_counter()
    options = dict(encoder=encoder, num_negatives=num_negatives, depth=depth, max_query_length=max_query_length,
                   max_doc_length=max_doc_length, batch_size=batch_size, amp_dtype=amp_dtype,
                   teacher_scores=teacher_scores, bm25_weight=bm25_weight, stemmer=stemmer, sample=sample, seed=seed,
                   dense_encoder=dense_encoder, dense_weight=dense_weight, dense_candidates=dense_candidates,
                   progress=as_spec(progress), shard=shard)
    doc_ids = list(beir.corpus)
    doc_texts = [beir_doc_text(beir.corpus[d]) for d in doc_ids]
    queries = [(qid, beir.queries[qid], positives) for qid, positives in pairs]
    result = MiningResult([], len(pairs), method=method)
    if shard is not None and method != "bm25":
        result.docs_per_rank = shard.counts(len(doc_ids))
    result.teacher_scale = _mine_into(result, method, doc_ids, doc_texts, queries, scale=None, label="queries",
                                      **options)
    if title_queries:
        titled = [d for d in doc_ids if (beir.corpus[d].get("title") or "").strip()
                  and (beir.corpus[d].get("text") or "").strip()]
        texts = [beir.corpus[d]["text"].strip() for d in titled]
        before = len(result.records)
        result.num_queries += len(titled)
        _mine_into(result, method, titled, texts,
                   [(f"title:{d}", beir.corpus[d]["title"].strip(), [d]) for d in titled],
                   scale=result.teacher_scale, label="title queries", **options)
        result.num_title_queries = len(result.records) - before
    if sentence_queries:
        splits = {d: split_last_sentence(beir.corpus[d].get("text") or "") for d in doc_ids}
        stripped = [beir_doc_text({"title": beir.corpus[d].get("title") or "",
                                   "text": splits[d][0] if splits[d] else beir.corpus[d].get("text") or ""})
                    for d in doc_ids]
        asked = [(f"sentence:{d}", splits[d][1], [d]) for d in doc_ids if splits[d]]
        before = len(result.records)
        result.num_queries += len(asked)
        _mine_into(result, method, doc_ids, stripped, asked, scale=result.teacher_scale, label="sentence queries",
                   **options)
        result.num_sentence_queries = len(result.records) - before
    result.seconds = time.perf_counter() - start
    return result


def _mine_into(result: MiningResult, method: str, doc_ids: list[str], doc_texts: list[str],
               queries: list[tuple[str, str, list[str]]], *, encoder: Any, num_negatives: int, depth: int,
               max_query_length: int, max_doc_length: int, batch_size: int, amp_dtype: Any, teacher_scores: bool,
               bm25_weight: float, stemmer: Any, sample: bool, seed: int, scale: float | None,
               dense_encoder: Any = None, dense_weight: float = 0.5, dense_candidates: bool = True,
               progress: "ProgressSpec | None" = None, label: str = "queries",
               shard: "Shard | None" = None) -> float | None:
    """Mine ``queries`` against ``doc_ids`` into ``result``; return the hybrid scale used (given or computed).

    ``label`` names the pass in the progress (``Mining queries``, ``Mining title queries``...)."""
    from .progress_util import as_spec

    spec = as_spec(progress)
    position = {d: i for i, d in enumerate(doc_ids)}
    query_texts = [text for _, text, _ in queries]
    common = dict(encoder=encoder, doc_texts=doc_texts, query_texts=query_texts, max_query_length=max_query_length,
                  max_doc_length=max_doc_length, batch_size=batch_size, amp_dtype=amp_dtype, stemmer=stemmer)
    if shard is not None and not shard.is_main:  # this rank only helps rank 0 encode with SPLADE
        if method != "bm25":
            RetrieverScores("splade", shard=shard, **common)
        return None
    methods = ("splade", "bm25") if method == "hybrid" else (method,)
    if dense_encoder is not None:
        methods += ("dense",)
    retrievers = {m: RetrieverScores(m, dense_encoder=dense_encoder, progress=spec, shard=shard, **common)
                  for m in methods}
    if method == "hybrid" and scale is None:
        splade_max = [float(retrievers["splade"].row(i).max()) for i in range(len(queries))]
        scale = sum(splade_max) / max(1, len(splade_max))
    with _task(spec, f"Mining {label}", len(queries), "queries") as bar:
        _mine_queries(result, method, retrievers, doc_ids, doc_texts, queries, position, bar,
                      num_negatives=num_negatives, depth=depth, teacher_scores=teacher_scores,
                      bm25_weight=bm25_weight, sample=sample, seed=seed, scale=scale, dense_weight=dense_weight,
                      dense_candidates=dense_candidates)
    return scale if method == "hybrid" else None


def _mine_queries(result: MiningResult, method: str, retrievers: dict[str, RetrieverScores], doc_ids: list[str],
                  doc_texts: list[str], queries: list[tuple[str, str, list[str]]], position: dict[str, int], bar: Any,
                  *, num_negatives: int, depth: int, teacher_scores: bool, bm25_weight: float, sample: bool,
                  seed: int, scale: float | None, dense_weight: float, dense_candidates: bool) -> None:
    """The per-query loop of :func:`_mine_into`: negatives (and scores) of each query into ``result``."""
    for i, (qid, text, positives) in enumerate(_ticking(queries, bar)):
        if method == "hybrid":
            rows = {m: r.row(i) for m, r in retrievers.items()}
            scores = scale * fuse_scores(rows, bm25_weight, dense_weight)
            # Candidates from every retriever's top list (the dense one's only with dense_candidates), ranked by
            # the fused score (without dense_candidates: by the BM25 + SPLADE fusion alone).
            pool = [m for m in retrievers if dense_candidates or m != "dense"]
            rank = scores if pool == list(retrievers) else fuse_scores({m: rows[m] for m in pool}, bm25_weight)
            candidates = set().union(*(retrievers[m].top(i, depth) for m in pool))
            hits = sorted(candidates, key=lambda j: (-rank[j], j))[:depth]
        else:
            scores = retrievers[method].row(i)
            hits = retrievers[method].top(i, depth)
        known = set(positives)
        pos = [d for d in positives if doc_texts[position[d]].strip()]
        neg = [doc_ids[j] for j in hits if doc_ids[j] not in known and doc_texts[j].strip()]
        if sample and len(neg) > num_negatives:
            neg = random.Random(f"{seed}:{qid}").sample(neg, num_negatives)
        neg = neg[:num_negatives]
        if not pos or not neg:
            result.num_skipped += 1
            continue
        result.num_short += len(neg) < num_negatives
        record = {"query": text, "query_id": qid, "negatives": [doc_texts[position[d]] for d in neg],
                  "negative_ids": neg}
        if not teacher_scores:
            result.records.append({**record, "positives": [doc_texts[position[d]] for d in pos], "positive_ids": pos})
            continue
        neg_scores = [round(float(scores[position[d]]), 4) for d in neg]
        for d in pos:  # one record per positive: MarginMSE needs the score of the positive it trains on
            result.records.append({**record, "positives": [doc_texts[position[d]]], "positive_ids": [d],
                                   "scores": [round(float(scores[position[d]]), 4)] + neg_scores})


def write_jsonl(records: list[dict[str, Any]], path: str | Path) -> Path:
    """Write records as JSONL; the file appears under its name only once complete."""
    with atomic_writer(path) as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return Path(path)
