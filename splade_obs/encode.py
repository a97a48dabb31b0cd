"""Encode a corpus or a query set into sparse JSONL: one ``{"id": ..., "vector": {term: weight}}`` per line.

Why this format: it is what Lucene-style impact indexes read (Anserini's ``JsonVectorCollection`` takes
``id`` + ``vector``; with ``quantize_scale`` the weights become the positive integers those indexes
store: ``int(w * scale + 0.5)``, terms that round to 0 dropped). Terms are the tokenizer's word pieces,
heaviest first.

Input: a BEIR folder (``corpus.jsonl`` or ``queries.jsonl`` by ``kind``) or any JSONL file whose records
carry an id (``_id`` or ``id``) and a ``text`` (documents may add a ``title``, joined before the text the
way evaluation does). Records are read and encoded in blocks, so memory stays flat on large corpora, and
the output appears under its final name only when complete.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import scipy.sparse as sp

from .atomic import atomic_writer
from .errors import DataError
from .recovery import validate_file_exists

if TYPE_CHECKING:  # pragma: no cover
    from .progress_util import ProgressSpec

KINDS = ("corpus", "queries")
DEFAULT_MAX_LENGTH = {"corpus": 256, "queries": 64}
#: Texts encoded per block: bounds memory (the sparse rows of one block) on large corpora.
BLOCK_SIZE = 4096


@dataclass
class EncodeStats:
    count: int
    avg_nnz: float
    seconds: float
    output: str


def input_file(path: str | Path, kind: str) -> Path:
    """The JSONL to read: ``path`` itself, or ``corpus.jsonl`` / ``queries.jsonl`` inside a BEIR folder."""
    if kind not in KINDS:
        raise DataError(f"kind {kind!r} is not known — expected one of {', '.join(KINDS)}")
    p = validate_file_exists(path, kind="any", what="encode input")
    if p.is_dir():
        name = "corpus.jsonl" if kind == "corpus" else "queries.jsonl"
        return validate_file_exists(p / name, kind="file", what=f"BEIR {name}")
    return p


def iter_records(path: Path, kind: str) -> Iterator[tuple[str, str]]:
    """Yield ``(id, text)`` per JSONL line; a malformed line is a DataError naming ``file:line``."""
    from .beir import beir_doc_text

    with open(path, encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = {"file_path": str(path), "line_number": line_no}
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"invalid JSON ({exc.msg} at column {exc.colno}) — expected one JSON object "
                                "per line", **where) from None
            if not isinstance(obj, dict):
                raise DataError("record is not a JSON object — expected {\"_id\" or \"id\", \"text\"}", **where)
            rid = obj.get("_id", obj.get("id"))
            if rid is None or isinstance(rid, (bool, dict, list)) or str(rid) == "":
                raise DataError('field "_id"/"id" is missing or empty — expected a string id', field="id",
                                **where)
            text = obj.get("text")
            if not isinstance(text, str):
                raise DataError(f'field "text" is {"missing" if text is None else type(text).__name__} — '
                                "expected a string", field="text", **where)
            if kind == "corpus":
                text = beir_doc_text({"title": str(obj.get("title") or ""), "text": text})
            yield str(rid), text


def vocabulary(tokenizer: Any, size: int) -> list[str]:
    """Term of every vocabulary id, looked up once (instead of once per row)."""
    return list(tokenizer.convert_ids_to_tokens(list(range(size))))


def row_vector(indices: np.ndarray, weights: np.ndarray, terms: list[str],
               quantize_scale: float | None = None) -> dict[str, float | int]:
    """``{term: weight}`` heaviest first; with ``quantize_scale`` integer ``int(w * scale + 0.5)`` > 0 only."""
    order = np.lexsort((indices, -weights))
    if quantize_scale is None:
        return {terms[int(indices[i])]: float(weights[i]) for i in order if weights[i] != 0}
    out: dict[str, float | int] = {}
    for i in order:
        q = int(math.floor(float(weights[i]) * quantize_scale + 0.5))
        if q > 0:
            out[terms[int(indices[i])]] = q
    return out


def write_vectors(f: Any, ids: list[str], matrix: sp.csr_matrix, terms: list[str],
                  quantize_scale: float | None) -> int:
    """Write one JSON line per row; returns the number of (kept) non-zeros written."""
    nnz = 0
    for r, rid in enumerate(ids):
        lo, hi = matrix.indptr[r], matrix.indptr[r + 1]
        vec = row_vector(matrix.indices[lo:hi], matrix.data[lo:hi], terms, quantize_scale)
        nnz += len(vec)
        f.write(json.dumps({"id": rid, "vector": vec}, ensure_ascii=False) + "\n")
    return nnz


def encode_file(encoder: Any, input_path: str | Path, output: str | Path, *, kind: str,
                max_length: int | None = None, batch_size: int = 32, top_k: int | None = None,
                quantize_scale: float | None = None, amp_dtype: Any = None,
                block_size: int = BLOCK_SIZE, progress: "ProgressSpec | str | None" = None) -> EncodeStats:
    """Encode every record of ``input_path`` to sparse JSONL at ``output`` (written atomically).

    ``progress`` (a :class:`~splade_obs.progress_util.ProgressSpec` or a mode name; off by default) shows
    records encoded out of the input's non-blank lines (counted first, only when progress is on).
    """
    from .progress_util import as_spec, encode_with_progress

    if quantize_scale is not None and not quantize_scale > 0:
        raise DataError(f"quantize scale must be > 0, got {quantize_scale}")
    src = input_file(input_path, kind)
    length = max_length or DEFAULT_MAX_LENGTH[kind]
    terms = vocabulary(encoder.tokenizer, encoder.vocab_size)
    spec = as_spec(progress)
    start = time.perf_counter()
    count = nnz = 0
    bar = spec.start(f"Encoding {'documents' if kind == 'corpus' else 'queries'}", _count_lines(src) if spec.enabled
                     else 0, unit="texts")
    with bar if bar is not None else contextlib.nullcontext(), atomic_writer(output) as f:
        # a failure anywhere leaves no output (or the previous one) behind
        for ids, texts in _blocks(iter_records(src, kind), block_size):
            matrix = encode_with_progress(encoder, texts, max_length=length, batch_size=batch_size, top_k=top_k,
                                          amp_dtype=amp_dtype, progress=bar)
            nnz += write_vectors(f, ids, matrix, terms, quantize_scale)
            count += len(ids)
        if count == 0:
            raise DataError("no records to encode — expected JSONL lines with an id and a text",
                            file_path=str(src))
    return EncodeStats(count, nnz / count, time.perf_counter() - start, str(Path(output)))


def _count_lines(path: Path) -> int:
    """Non-blank lines of ``path``: the records to come, for a progress total (a quick pass over the bytes)."""
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def _blocks(records: Iterator[tuple[str, str]], size: int) -> Iterator[tuple[list[str], list[str]]]:
    ids: list[str] = []
    texts: list[str] = []
    for rid, text in records:
        ids.append(rid)
        texts.append(text)
        if len(ids) >= size:
            yield ids, texts
            ids, texts = [], []
    if ids:
        yield ids, texts
