"""Sparse vectors on disk: a CSR matrix written block by block, read back memory-mapped.

``evaluate --index-dir DIR`` encodes the corpus in blocks of :data:`splade_obs.encoding.BLOCK_SIZE` texts and
appends each block's rows here instead of keeping them, then turns the document-major matrix into the
term-major one the index searches (its posting lists) on disk, a bounded chunk of rows at a time; retrieval
reads that matrix memory-mapped, so the operating system pages in only the posting lists the queries touch.
The encoder's working memory is one block; what stays in memory is the sparse index's pages in use. Under
torchrun every rank writes its shard to its own folder ``DIR/docs.partR-of-W`` and rank 0 concatenates them on
disk (:func:`concat_to`) before the transpose: the vectors never pass through memory or the process group.

A folder holds one matrix: ``data.f32`` (float32 weights), ``indices.i32`` (int32 column of each weight),
``indptr.i64`` (int64 row starts, ``rows + 1`` of them), all little-endian raw arrays, and ``meta.json``
(``format``, ``rows``, ``cols``, ``nnz``), written last, so a folder without it is incomplete. ``DIR/docs``
is the corpus (a row per document, in corpus order), ``DIR/postings`` its transpose (a row per vocabulary
term, document positions ascending in each: what :class:`~splade_obs.evaluation.InvertedIndex` builds in
memory, value for value, so the ranking from disk is the in-memory one).
"""

from __future__ import annotations

import json
import mmap
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import scipy.sparse as sp

from .atomic import atomic_write_text
from .errors import DataError

FORMAT = "splade-obs-csr/1"
_FILES = (("data.f32", "<f4"), ("indices.i32", "<i4"), ("indptr.i64", "<i8"))
#: Non-zeros handled at once while transposing on disk (~15 MB of working arrays). 100k SciFact-like rows (2.2M
#: non-zeros) transpose in 0.23 s at 256k with +20 MB of working memory, +66 MB at 1M, in the same time; 500k
#: rows peaked 350 MB higher at 8M. SciFact itself (5k rows) fills one chunk: the peak stays flat with the size.
TRANSPOSE_CHUNK = 256 * 1024


class CsrWriter:
    """Append CSR rows (blocks of a float32 matrix with ``cols`` columns) to a folder; :meth:`close` seals it."""

    def __init__(self, folder: str | Path, cols: int) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "meta.json").unlink(missing_ok=True)  # incomplete until closed
        self.cols, self.rows, self.nnz = int(cols), 0, 0
        self._files = {name: open(self.folder / name, "wb") for name, _ in _FILES}
        self._files["indptr.i64"].write(np.zeros(1, dtype="<i8").tobytes())

    def append(self, block: sp.spmatrix) -> None:
        m = sp.csr_matrix(block, dtype=np.float32)
        if m.shape[1] != self.cols:
            raise DataError(f"a block of {m.shape[1]} columns for a matrix of {self.cols}")
        m.sum_duplicates()
        m.eliminate_zeros()
        self._files["data.f32"].write(m.data.astype("<f4").tobytes())
        self._files["indices.i32"].write(m.indices.astype("<i4").tobytes())
        self._files["indptr.i64"].write((m.indptr[1:].astype(np.int64) + self.nnz).astype("<i8").tobytes())
        self.rows += m.shape[0]
        self.nnz += int(m.nnz)

    def close(self) -> Path:
        for f in self._files.values():
            f.close()
        meta = {"format": FORMAT, "rows": self.rows, "cols": self.cols, "nnz": self.nnz}
        atomic_write_text(self.folder / "meta.json", json.dumps(meta) + "\n")
        return self.folder


def open_csr(folder: str | Path) -> sp.csr_matrix:
    """The matrix of ``folder``, its arrays memory-mapped read-only (nothing is read until used)."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{folder} holds no complete sparse matrix (meta.json: {exc})", file_path=str(folder),
                        hint="write it again (an interrupted write leaves no meta.json)") from None
    if meta.get("format") != FORMAT:
        raise DataError(f"{folder}: format {meta.get('format')!r}, expected {FORMAT!r}", file_path=str(folder))
    rows, nnz = int(meta["rows"]), int(meta["nnz"])
    arrays = [_map(folder / name, dtype, n) for (name, dtype), n in zip(_FILES, (nnz, nnz, rows + 1))]
    return sp.csr_matrix(tuple(arrays), shape=(rows, int(meta["cols"])), copy=False)


def _map(path: Path, dtype: str, count: int) -> np.ndarray:
    if count == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


def transpose_to(rows: sp.csr_matrix, folder: str | Path, chunk: int = TRANSPOSE_CHUNK) -> sp.csr_matrix:
    """Write ``rows.T`` (CSR, column positions ascending in each row) to ``folder``, reading ``rows`` a chunk of
    about ``chunk`` non-zeros at a time; returns it memory-mapped."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "meta.json").unlink(missing_ok=True)
    n_rows, n_cols = rows.shape
    nnz = int(rows.indptr[-1])
    df = np.zeros(n_cols, dtype=np.int64)
    for start in range(0, nnz, chunk):
        df += np.bincount(rows.indices[start:start + chunk], minlength=n_cols)
    indptr = np.concatenate([[0], np.cumsum(df)]).astype("<i8")
    indptr.tofile(folder / "indptr.i64")
    out = {name: _create(folder / name, dtype, nnz)
           for name, dtype in _FILES[:2]}
    cursor = indptr[:-1].copy()
    for r0, r1 in _row_chunks(rows, chunk):
        lo, hi = int(rows.indptr[r0]), int(rows.indptr[r1])
        terms = np.asarray(rows.indices[lo:hi], dtype=np.int64)
        docs = np.repeat(np.arange(r0, r1, dtype=np.int64), np.diff(np.asarray(rows.indptr[r0:r1 + 1])))
        order = np.argsort(terms, kind="stable")  # by term; documents stay ascending within a term
        terms, docs = terms[order], docs[order]
        starts = np.flatnonzero(np.r_[True, terms[1:] != terms[:-1]]) if terms.size else np.zeros(0, np.int64)
        within = np.arange(terms.size) - np.repeat(starts, np.diff(np.r_[starts, terms.size]))
        dest = cursor[terms] + within
        if nnz:
            out["data.f32"][dest] = np.asarray(rows.data[lo:hi])[order]
            out["indices.i32"][dest] = docs
        cursor += np.bincount(terms, minlength=n_cols)
        release_pages(rows.data, rows.indices)  # the rows read stay in the page cache, out of this process's RSS
    for array in out.values():
        if isinstance(array, np.memmap):
            array.flush()
    del out
    meta = {"format": FORMAT, "rows": n_cols, "cols": n_rows, "nnz": nnz}
    atomic_write_text(folder / "meta.json", json.dumps(meta) + "\n")
    return open_csr(folder)


def _row_chunks(rows: sp.csr_matrix, chunk: int) -> Iterator[tuple[int, int]]:
    """``[r0, r1)`` row ranges of ``rows`` holding about ``chunk`` non-zeros each (at least one row)."""
    n_rows, r0 = rows.shape[0], 0
    while r0 < n_rows:
        r1 = max(r0 + 1, int(np.searchsorted(rows.indptr, rows.indptr[r0] + chunk, side="right")) - 1)
        r1 = min(r1, n_rows)
        yield r0, r1
        r0 = r1


def concat_to(parts: Sequence[str | Path], folder: str | Path, chunk: int = TRANSPOSE_CHUNK) -> sp.csr_matrix:
    """The rows of the matrices in the folders ``parts``, one after the other, written to ``folder`` a chunk of
    about ``chunk`` non-zeros at a time (the pages read dropped); the parts are deleted after. Returns it
    memory-mapped. How rank 0 merges the shards every torchrun rank wrote (:func:`encode_rows`)."""
    import shutil

    matrices = [open_csr(p) for p in parts]
    if not matrices:
        raise DataError("no part to concatenate")
    writer = CsrWriter(folder, matrices[0].shape[1])
    for m in matrices:
        for r0, r1 in _row_chunks(m, chunk):
            writer.append(m[r0:r1])
            release_pages(m.data, m.indices)
    merged = open_csr(writer.close())
    del matrices
    for p in parts:
        shutil.rmtree(p, ignore_errors=True)
    return merged


def _create(path: Path, dtype: str, count: int) -> np.ndarray:
    if count == 0:
        path.write_bytes(b"")
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="w+", shape=(count,))


def encode_rows(encoder: Any, texts: Sequence[str], folder: str | Path, *, start: int = 0, stop: int | None = None,
                block_size: int | None = None, progress: Any = None, **kwargs: Any) -> Path:
    """Encode ``texts[start:stop]`` block by block (:data:`splade_obs.encoding.BLOCK_SIZE` texts) into the matrix
    folder ``folder``, sealed (``meta.json``) when complete; returns the folder."""
    from .encoding import BLOCK_SIZE
    from .progress_util import encode_with_progress

    block_size = block_size or BLOCK_SIZE
    stop = len(texts) if stop is None else stop
    writer = CsrWriter(folder, encoder.vocab_size)
    for lo in range(start, stop, block_size):
        writer.append(encode_with_progress(encoder, list(texts[lo:min(lo + block_size, stop)]), progress=progress,
                                           **kwargs))
    return writer.close()


def encode_to_disk(encoder: Any, texts: Sequence[str], folder: str | Path, *, block_size: int | None = None,
                   progress: Any = None, **kwargs: Any) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """Encode ``texts`` block by block into ``folder/docs``, transpose it into ``folder/postings``; returns both,
    memory-mapped (documents x terms, terms x documents)."""
    docs = open_csr(encode_rows(encoder, texts, Path(folder) / "docs", block_size=block_size, progress=progress,
                                **kwargs))
    return docs, transpose_to(docs, Path(folder) / "postings")


def disk_index(docs: sp.spmatrix, postings: sp.csr_matrix, doc_ids: Sequence[str], queries: sp.csr_matrix,
               idf_power: float) -> tuple[sp.csr_matrix, Any, sp.csr_matrix]:
    """For :class:`~splade_obs.evaluation.RetrievalEvaluator` with an index folder: the documents and the index
    on disk (:func:`encode_to_disk`, or :func:`splade_obs.shard.encode_sharded_to_disk` under torchrun) and the
    queries to search with; ``idf_power`` > 0 weights the queries, the same product as weighting the documents
    (:func:`~splade_obs.evaluation.idf_reweight`) without writing the index again."""
    from .evaluation import _idf_power

    weighted = sp.csr_matrix(queries, dtype=np.float32, copy=True)
    if idf_power:
        df = np.diff(np.asarray(postings.indptr))
        weighted.data *= _idf_power(df, postings.shape[1], idf_power).astype(np.float32)[weighted.indices]
    return docs, index_over(postings, doc_ids), weighted


def index_over(postings: sp.csr_matrix, doc_ids: Sequence[str]) -> Any:
    """An :class:`~splade_obs.evaluation.InvertedIndex` searching ``postings`` (terms x documents) as they are:
    a memory-mapped matrix stays memory-mapped, nothing is copied or read until searched."""
    from .evaluation import InvertedIndex

    if len(doc_ids) != postings.shape[1]:
        raise DataError(f"{len(doc_ids)} doc ids for {postings.shape[1]} documents in the postings")
    index = InvertedIndex(sp.csr_matrix((0, postings.shape[0]), dtype=postings.dtype), [])  # then its postings:
    index.postings, index.doc_ids, index.num_docs, index.doc_nnz = postings, doc_ids, len(doc_ids), postings.nnz
    return index


def release_pages(*arrays: np.ndarray) -> None:
    """Drop from this process the pages it has read of file-mapped arrays (``MADV_DONTNEED``; a no-op for arrays
    in memory): the file's pages stay in the operating system's page cache and come back on the next read, but
    no longer count in the process's resident memory. Only for read-only maps (:func:`open_csr`)."""
    advise = getattr(mmap, "MADV_DONTNEED", None)
    for array in arrays:
        base: Any = array
        while base is not None and not isinstance(base, mmap.mmap):
            base = getattr(base, "base", None)
        if base is not None and advise is not None and len(base):
            base.madvise(advise)


def is_memory_mapped(array: np.ndarray) -> bool:
    """Whether ``array``'s memory is a file mapping (a view of an ``np.memmap``), not a copy in memory."""
    base: Any = array
    while base is not None:
        if isinstance(base, np.memmap) or type(base).__name__ == "mmap":
            return True
        base = getattr(base, "base", None)
    return False
