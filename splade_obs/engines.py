"""Retrieval engines behind one interface: the exact sparse index, and Seismic for large corpora.

An engine is built once from the encoded corpus (a CSR matrix, one row per document, one column per vocabulary
id, plus the document ids) and answers ``search(queries, k)`` with, per query row, the top-k documents and
their scores, best first. Two engines (``--engine``):

* ``exact`` (default): :class:`splade_obs.evaluation.InvertedIndex`, the scipy product ``Q @ D.T``. Exact, no
  extra package, fine up to a few hundred thousand documents; its search time grows with the corpus.
* ``seismic``: `Seismic <https://github.com/TusKANNy/seismic>`_ (``pyseismic-lsr``, the ``engines`` extra), an
  approximate inverted index made for learned sparse vectors: each posting list keeps its heaviest entries
  (``n_postings`` on average per term), is split into blocks by clustering with a summary vector each, and
  a query walks only its ``query_cut`` heaviest terms and skips a block when its summary's score cannot beat
  ``heap_factor`` times the current k-th score. Queries take microseconds to milliseconds whatever the corpus
  size; the price is a small loss of recall, measured against ``exact`` by ``benchmarks/bench_engine.py``.

What this module adds around Seismic:

* documents go in by vocabulary id (``SeismicDataset.add_documents_by_id``, the CSR arrays as they are) under
  their row position as Seismic id, so no token strings and no id mapping are built; a vocabulary wider than
  65,535 ids uses Seismic's large-vocabulary classes;
* the candidates Seismic returns are rescored exactly from the CSR (Seismic's forward index keeps weights in
  reduced precision) and ranked like ``exact`` (score descending, ties by document position, positive scores
  only), so where both engines find the same documents they return the same run;
* Seismic's Rust code prints its progress on the process's standard output; it is sent to stderr, so a
  command's stdout (``evaluate``'s JSON) stays clean, and its memory report is read as the index size.

Defaults (:class:`SeismicParams`) follow Seismic's guidelines for SPLADE vectors (docs/Guidelines.md of the
project): 3,000 postings per term on average (MS MARCO, 8.8M passages, uses 3,000-6,000; a smaller corpus
keeps every posting), centroids for 10% of a list, 40% of a summary's L1 mass, ``query_cut`` 10 and
``heap_factor`` 0.8. docs/recipes.md ("Search engines") says when to switch.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from .errors import DependencyError, EvaluationError

if TYPE_CHECKING:  # pragma: no cover - numpy and scipy load on first use: `splade-obs --help` stays quick
    import numpy as np
    import scipy.sparse as sp

#: The engines ``--engine`` accepts, the default first.
ENGINES = ("exact", "seismic")
ENGINE_HELP = ("exact: scipy sparse product, exact, no extra package. seismic: approximate index for large "
               "corpora (pip install 'splade-obs[engines]'); see docs/recipes.md#search-engines.")
INSTALL_HINT = "pip install 'splade-obs[engines]' (or: pip install pyseismic-lsr)"
#: Seismic's default index stores component ids as 16-bit; wider vocabularies need its ``LV`` classes.
SEISMIC_MAX_DIM = 65535


@dataclass(frozen=True)
class SeismicParams:
    """Seismic's build and search settings (names as in ``SeismicIndex.build_from_dataset`` / ``search``)."""

    n_postings: int = 3000        # postings kept per term on average (global pruning)
    centroid_fraction: float = 0.1  # blocks per posting list, as a fraction of n_postings
    summary_energy: float = 0.4   # fraction of a block summary's L1 mass kept
    max_fraction: float = 1.5     # longest posting list: max_fraction * n_postings
    doc_cut: int = 15             # document terms used by the clustering at build time
    query_cut: int = 10           # query terms (heaviest first) whose posting lists are walked
    heap_factor: float = 0.8      # skip a block whose summary score < heap_factor * current k-th score
    num_threads: int = 0          # build/search threads; 0: Seismic's default (all cores)

    def __post_init__(self) -> None:
        checks = {"n_postings": self.n_postings >= 1, "centroid_fraction": 0 < self.centroid_fraction <= 1,
                  "summary_energy": 0 < self.summary_energy <= 1, "max_fraction": self.max_fraction >= 1,
                  "doc_cut": self.doc_cut >= 1, "query_cut": self.query_cut >= 1,
                  "heap_factor": 0 < self.heap_factor <= 1, "num_threads": self.num_threads >= 0}
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise EvaluationError(f"Seismic setting {bad[0]}={getattr(self, bad[0])!r} is out of range",
                                  field=bad[0], hint="n_postings, doc_cut, query_cut >= 1; fractions, "
                                  "summary_energy and heap_factor in (0, 1]; max_fraction >= 1")


class Engine:
    """The interface: built from a CSR corpus, searched with CSR queries of the same width."""

    name = "engine"

    def __init__(self, docs: sp.spmatrix, doc_ids: Sequence[str] | None) -> None:
        import numpy as np
        import scipy.sparse as sp

        docs = sp.csr_matrix(docs, dtype=np.float32)
        if not docs.has_canonical_format or not np.all(docs.data):  # never edits the caller's (or a mapped) matrix
            docs = docs.copy()
            docs.sum_duplicates()  # also sorts the column ids of each row
            docs.eliminate_zeros()
        if docs.shape[0] == 0:
            raise EvaluationError("no document to index", hint="check the corpus file")
        self.docs = docs
        self.doc_ids = list(doc_ids) if doc_ids is not None else [str(i) for i in range(docs.shape[0])]
        if len(self.doc_ids) != docs.shape[0]:
            raise EvaluationError(f"{len(self.doc_ids)} doc ids for {docs.shape[0]} document vectors")
        #: Seconds the index took to build.
        self.build_seconds = 0.0

    @property
    def num_docs(self) -> int:
        return int(self.docs.shape[0])

    @property
    def size_bytes(self) -> int:  # pragma: no cover - every engine overrides it
        raise NotImplementedError

    def search_positions(self, queries: sp.spmatrix, k: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per query row: document positions (int64) and scores (float32), best first, at most ``k``."""
        raise NotImplementedError  # pragma: no cover

    def search(self, queries: sp.spmatrix, k: int) -> tuple[list[list[str]], list[np.ndarray]]:
        """Per query row: document ids and scores, best first (what ``run_from_search`` takes)."""
        positions, scores = self.search_positions(queries, k)
        return [[self.doc_ids[i] for i in row] for row in positions], scores

    def _queries(self, queries: sp.spmatrix, k: int) -> sp.csr_matrix:
        import numpy as np
        import scipy.sparse as sp

        if k <= 0:
            raise EvaluationError(f"k must be positive, got {k}")
        q = sp.csr_matrix(queries, dtype=np.float32)
        if q.shape[1] != self.docs.shape[1]:
            raise EvaluationError(f"query vectors have {q.shape[1]} dimensions, the index has {self.docs.shape[1]}",
                                  hint="encode queries and documents with the same model")
        if not q.has_canonical_format:
            q = q.copy()
            q.sum_duplicates()  # Seismic wants each term once, in order
        return q


class ExactEngine(Engine):
    """:class:`~splade_obs.evaluation.InvertedIndex` behind the engine interface (exact top-k)."""

    name = "exact"

    def __init__(self, docs: sp.spmatrix, doc_ids: Sequence[str] | None = None) -> None:
        from .csr_store import index_over

        super().__init__(docs, doc_ids)
        start = time.perf_counter()
        postings = self.docs.T.tocsr()  # InvertedIndex's term-major layout, built without touching self.docs
        postings.sort_indices()
        self.index = index_over(postings, self.doc_ids)
        self.build_seconds = time.perf_counter() - start

    @property
    def size_bytes(self) -> int:
        return self.index.size_bytes

    def search_positions(self, queries: sp.spmatrix, k: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        return self.index.search_positions(self._queries(queries, k), k)


class SeismicEngine(Engine):
    """A Seismic index over the documents; candidates rescored exactly (see the module doc)."""

    name = "seismic"

    def __init__(self, docs: sp.spmatrix, doc_ids: Sequence[str] | None = None,
                 params: SeismicParams | None = None) -> None:
        import numpy as np

        super().__init__(docs, doc_ids)
        self.params = params or SeismicParams()
        seismic = import_seismic()
        wide = self.docs.shape[1] > SEISMIC_MAX_DIM
        dataset = (seismic.SeismicDatasetLV if wide else seismic.SeismicDataset)(dim=int(self.docs.shape[1]))
        self._string = seismic.get_seismic_string()
        p = self.params
        start = time.perf_counter()
        with stdout_to(2):  # fd 2: the process's stderr, even where sys.stderr is replaced
            dataset.add_documents_by_id([str(i) for i in range(self.num_docs)], self.docs.indices.astype(np.int64),
                                        self.docs.data, self.docs.indptr.astype(np.int64))
            self.index = (seismic.SeismicIndexLV if wide else seismic.SeismicIndex).build_from_dataset(
                dataset, n_postings=p.n_postings, centroid_fraction=p.centroid_fraction,
                summary_energy=p.summary_energy, max_fraction=p.max_fraction, doc_cut=p.doc_cut,
                num_threads=p.num_threads)
        self.build_seconds = time.perf_counter() - start
        self._size: int | None = None

    @property
    def size_bytes(self) -> int:
        """Seismic's own count of its memory (forward index, posting lists, summaries), read once."""
        if self._size is None:
            with tempfile.TemporaryFile("w+") as out:
                with stdout_to(out.fileno()):
                    self.index.print_space_usage_byte()
                out.seek(0)
                match = re.search(r"Total:\s*(\d+)\s*Bytes", out.read())
            self._size = int(match.group(1)) if match else -1
        return self._size

    def search_positions(self, queries: sp.spmatrix, k: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        import numpy as np

        q = self._queries(queries, k)
        rows = [r for r in range(q.shape[0]) if q.indptr[r + 1] > q.indptr[r]]  # Seismic needs a term
        found: list[Any] = []
        if rows:
            comps = [q.indices[q.indptr[r]:q.indptr[r + 1]].astype(self._string) for r in rows]
            vals = [q.data[q.indptr[r]:q.indptr[r + 1]] for r in rows]
            p = self.params
            found = self.index.batch_search(np.array([str(r) for r in rows], dtype=self._string), comps, vals,
                                            k=k, query_cut=p.query_cut, heap_factor=p.heap_factor,
                                            num_threads=p.num_threads)
        empty = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32))
        out = [empty] * q.shape[0]
        for hits in found:  # batch_search may return the queries in another order: each hit names its query
            if hits:
                r = int(hits[0][0])
                out[r] = self._rescore(q[r], np.fromiter((int(h[2]) for h in hits), dtype=np.int64,
                                                         count=len(hits)))
        return [p for p, _ in out], [s for _, s in out]

    def _rescore(self, query: sp.csr_matrix, cand: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact scores of the candidates; ranked score descending, ties by position, positive only."""
        import numpy as np

        scores = np.asarray((self.docs[cand] @ query.T).toarray()).ravel().astype(np.float32)
        keep = scores > 0
        cand, scores = cand[keep], scores[keep]
        order = np.lexsort((cand, -scores))
        return cand[order], scores[order]


def import_seismic() -> Any:
    """The ``seismic`` module, or a DependencyError naming the extra to install."""
    try:
        import seismic
    except ImportError as exc:
        raise DependencyError("the seismic engine needs the pyseismic-lsr package, which is not installed",
                              original_exception=exc, hint=INSTALL_HINT) from None
    return seismic


def require_engine(name: str) -> None:
    """Fail early (before any encoding) when ``name`` is unknown or its package is missing."""
    if name not in ENGINES:
        raise EvaluationError(f"engine {name!r} is not known — expected one of {', '.join(ENGINES)}",
                              field="engine")
    if name == "seismic":
        import_seismic()


def build_engine(name: str, docs: sp.spmatrix, doc_ids: Sequence[str] | None = None, *,
                 seismic: SeismicParams | None = None) -> Engine:
    """The engine ``name`` over ``docs`` (rows: documents, columns: vocabulary ids) named by ``doc_ids``."""
    require_engine(name)
    if name == "seismic":
        return SeismicEngine(docs, doc_ids, seismic)
    return ExactEngine(docs, doc_ids)


def engine_info(engine: Engine) -> dict[str, Any]:
    """What a command reports about the index: engine, documents, size, build time (and Seismic's settings)."""
    info: dict[str, Any] = {"engine": engine.name, "num_docs": engine.num_docs, "index_bytes": engine.size_bytes,
                            "build_s": engine.build_seconds}
    if isinstance(engine, SeismicEngine):
        info["seismic"] = asdict(engine.params)
    return info


def is_vectors_file(path: str | os.PathLike[str]) -> bool:
    """Whether the first record of a JSONL file carries a ``vector`` (``encode --format jsonl`` output)."""
    import json

    with open(path, encoding="utf-8-sig") as f:
        for line in f:
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    return False  # the record reader names the line
                return isinstance(obj, dict) and "vector" in obj
    return False


def read_vectors(path: str | os.PathLike[str], vocab: Sequence[str]) -> tuple[list[str], sp.csr_matrix]:
    """Ids and a CSR matrix (columns: ``vocab`` positions) from ``{"id", "vector": {term: weight}}`` lines.

    ``vocab`` is the model's term of every vocabulary id (:func:`splade_obs.encoding.vocabulary`); a term it
    lacks, a missing id or a weight that is not a finite number is a DataError naming the line.
    """
    import numpy as np
    import scipy.sparse as sp

    from .errors import DataError

    column = {t: j for j, t in enumerate(vocab)}
    ids: list[str] = []
    cols: list[int] = []
    vals: list[float] = []
    indptr = [0]
    with open(path, encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, 1):
            record = _vector_record(line, {"file_path": str(path), "line_number": line_no}, column)
            if record is not None:
                ids.append(record[0])
                cols.extend(record[1])
                vals.extend(record[2])
                indptr.append(len(cols))
    if not ids:
        raise DataError("no vectors in the file — expected JSONL lines with an id and a vector", file_path=str(path))
    matrix = sp.csr_matrix((np.asarray(vals, dtype=np.float32), np.asarray(cols, dtype=np.int64),
                            np.asarray(indptr, dtype=np.int64)), shape=(len(ids), len(vocab)))
    return ids, matrix


def _vector_record(line: str, where: dict[str, Any],
                   column: dict[str, int]) -> tuple[str, list[int], list[float]] | None:
    """``(id, columns, weights)`` of one line of a vectors file; None for a blank line."""
    import json
    import math

    from .errors import DataError

    if not line.strip():
        return None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"invalid JSON ({exc.msg} at column {exc.colno}) — expected one JSON object per line",
                        **where) from None
    rid = obj.get("id", obj.get("_id")) if isinstance(obj, dict) else None
    vec = obj.get("vector") if isinstance(obj, dict) else None
    if rid is None or str(rid) == "" or not isinstance(vec, dict):
        raise DataError('expected {"id": ..., "vector": {term: weight}} (splade-obs encode --format jsonl)',
                        field="id" if rid is None or str(rid) == "" else "vector", **where)
    cols, vals = [], []
    for term, weight in vec.items():
        if term not in column:
            raise DataError(f"term {term!r} is not in the model's vocabulary", field="vector", **where,
                            hint="search with the --model that encoded the vectors")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise DataError(f"weight of {term!r} is {weight!r} — expected a finite number", field="vector", **where)
        cols.append(column[term])
        vals.append(float(weight))
    return str(rid), cols, vals


@contextlib.contextmanager
def stdout_to(fd: int) -> Iterator[None]:
    """Point file descriptor 1 at ``fd`` for the block: native code printing to stdout lands there."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(fd, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
