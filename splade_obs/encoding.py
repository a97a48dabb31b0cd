"""Encode a corpus or a query set into sparse vectors, one record per line, in input order.

Two formats (``fmt``):

* ``jsonl`` (default): ``{"id": ..., "vector": {term: weight}}`` with float weights, or, with ``quantize_scale``,
  the positive integers ``int(w * scale + 0.5)`` (terms that round to 0 dropped).
* ``anserini``: what Anserini's impact search (``-impact -pretokenized``) reads. Documents are
  ``JsonVectorCollection`` lines ``{"id", "contents", "vector": {term: int}}`` (``contents``: the text that was
  encoded); queries are TSV topics ``id<TAB>terms`` where each term is repeated as many times as its integer
  weight (``-topicreader TsvString``). Anserini reads every weight with ``asInt()`` (a float 0.73 would count
  as 0), so this format is always integer: ``quantize_scale`` or :data:`ANSERINI_SCALE` (100, the usual SPLADE
  practice). Anserini then scores a document by ``sum(query_count * doc_weight)``: the dot product of the two
  integer vectors, ``scale**2`` times the float score up to rounding. Terms are made safe for the
  whitespace-tokenized analyzer (:func:`anserini_terms`); a query left with no term is skipped (Anserini's TSV
  reader fails on an empty one) and counted in :attr:`EncodeStats.skipped`.

Terms are the tokenizer's word pieces, heaviest first. Input: a BEIR folder (``corpus.jsonl`` or
``queries.jsonl`` by ``kind``) or any JSONL file whose records carry an id (``_id`` or ``id``) and a ``text``
(documents may add a ``title``, joined before the text the way evaluation does). Records are read and encoded
in blocks, so memory stays flat on large corpora, and the output appears under its final name only when
complete.
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
    from .shard import Shard

KINDS = ("corpus", "queries")
FORMATS = ("jsonl", "anserini")
#: Integer scale of ``--format anserini`` when no ``quantize_scale`` is given: ``int(w * 100 + 0.5)``.
ANSERINI_SCALE = 100.0
#: Longest token Lucene's WhitespaceTokenizer keeps whole (CharTokenizer's default); longer terms would split.
LUCENE_MAX_TOKEN_CHARS = 255
DEFAULT_MAX_LENGTH = {"corpus": 256, "queries": 64}
#: Texts encoded per block: bounds memory (the sparse rows of one block) on large corpora.
BLOCK_SIZE = 4096


@dataclass
class EncodeStats:
    count: int
    avg_nnz: float
    seconds: float
    output: str
    #: Records not written: queries with no term left after quantisation in ``--format anserini``.
    skipped: int = 0
    #: Under torchrun: the records each rank encoded, in rank order (None in a single process).
    rank_counts: list[int] | None = None


def input_file(path: str | Path, kind: str) -> Path:
    """The JSONL to read: ``path`` itself, or ``corpus.jsonl`` / ``queries.jsonl`` inside a BEIR folder."""
    if kind not in KINDS:
        raise DataError(f"kind {kind!r} is not known — expected one of {', '.join(KINDS)}")
    p = validate_file_exists(path, kind="any", what="encode input")
    if p.is_dir():
        name = "corpus.jsonl" if kind == "corpus" else "queries.jsonl"
        return validate_file_exists(p / name, kind="file", what=f"BEIR {name}")
    return p


def iter_records(path: Path, kind: str, *, span: tuple[int, int] | None = None) -> Iterator[tuple[str, str]]:
    """Yield ``(id, text)`` per JSONL line; a malformed line is a DataError naming ``file:line``.

    ``span`` ``(lo, hi)``: only the records at positions ``lo <= i < hi`` (counting non-blank lines from 0);
    the lines before ``lo`` are skipped without being parsed.
    """
    from .beir import beir_doc_text

    lo, hi = span if span is not None else (0, None)
    with open(path, encoding="utf-8-sig") as f:
        position = -1
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            position += 1
            if position < lo:
                continue
            if hi is not None and position >= hi:
                break
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


def anserini_terms(terms: list[str]) -> list[str | None]:
    """The vocabulary as Anserini's ``-pretokenized`` (whitespace) analyzer will see it, one entry per term id.

    Each whitespace character of a term becomes ``%XX`` (its code point in hex), so a term stays one token and
    the same term maps the same way in documents and queries. Lucene query syntax (``+ - ( ) [ ] : ! ^``,
    e.g. ``[CLS]``, ``(``, ``##s``) is left as is: the impact search builds term queries from the whitespace
    tokens and never parses it. ``None`` marks a term that cannot be made safe (empty, longer than
    :data:`LUCENE_MAX_TOKEN_CHARS`, or equal to another term once escaped); writing one is a DataError.
    """
    safe = ["".join(f"%{ord(c):02X}" if c.isspace() else c for c in t) for t in terms]
    counts: dict[str, int] = {}
    for t in safe:
        counts[t] = counts.get(t, 0) + 1
    return [t if t and len(t) <= LUCENE_MAX_TOKEN_CHARS and counts[t] == 1 else None for t in safe]


def _anserini_line(rid: str, text: str, vec: dict[str, Any], kind: str) -> str | None:
    if kind == "corpus":
        return json.dumps({"id": rid, "contents": text, "vector": vec}, ensure_ascii=False) + "\n"
    if not vec:
        return None  # Anserini's TsvString topic reader cannot read a query with no terms
    if any(c in rid for c in "\t\r\n"):
        raise DataError(f"query id {rid!r} holds a tab or line break, which Anserini's TSV topics cannot",
                        field="id", hint="rename the query, or write --format jsonl")
    return rid + "\t" + " ".join(" ".join([term] * weight) for term, weight in vec.items()) + "\n"


def write_vectors(f: Any, ids: list[str], matrix: sp.csr_matrix, terms: list[Any],
                  quantize_scale: float | None, *, texts: list[str] | None = None, fmt: str = "jsonl",
                  kind: str = "corpus") -> tuple[int, int]:
    """Write one line per row (see the module doc for ``fmt``); returns (kept non-zeros, rows skipped).

    For ``anserini``, ``terms`` is :func:`anserini_terms`'s list (``None`` for an unsafe term) and ``texts`` the
    encoded texts.
    """
    nnz = skipped = 0
    for r, rid in enumerate(ids):
        lo, hi = matrix.indptr[r], matrix.indptr[r + 1]
        vec = row_vector(matrix.indices[lo:hi], matrix.data[lo:hi], terms, quantize_scale)
        if fmt == "jsonl":
            line: str | None = json.dumps({"id": rid, "vector": vec}, ensure_ascii=False) + "\n"
        else:
            if None in vec:
                bad = next(int(j) for j in matrix.indices[lo:hi] if terms[int(j)] is None)
                raise DataError(f"record {rid!r} gives weight to vocabulary id {bad}, a term Anserini cannot index "
                                f"(empty, over {LUCENE_MAX_TOKEN_CHARS} characters, or clashing once its "
                                "whitespace is escaped)", hint="use --format jsonl for this tokenizer")
            line = _anserini_line(rid, texts[r] if texts is not None else "", vec, kind)
        if line is None:
            skipped += 1
            continue
        nnz += len(vec)
        f.write(line)
    return nnz, skipped


def encode_file(encoder: Any, input_path: str | Path, output: str | Path, *, kind: str,
                max_length: int | None = None, batch_size: int = 32, top_k: int | None = None,
                quantize_scale: float | None = None, fmt: str = "jsonl", amp_dtype: Any = None,
                block_size: int = BLOCK_SIZE, progress: "ProgressSpec | str | None" = None,
                shard: "Shard | None" = None) -> EncodeStats:
    """Encode every record of ``input_path`` to ``output`` in format ``fmt`` (written atomically).

    ``fmt="anserini"`` quantises with ``quantize_scale`` or, when it is None, :data:`ANSERINI_SCALE`.

    ``progress`` (a :class:`~splade_obs.progress_util.ProgressSpec` or a mode name; off by default) shows
    records encoded out of the input's non-blank lines (counted first, only when progress is on).

    ``shard`` (:func:`splade_obs.shard.shard_from_env`, under torchrun): this rank encodes its contiguous share
    of the records into a part file; rank 0 merges the parts into ``output`` (:mod:`splade_obs.shard`).
    """
    from .progress_util import as_spec

    if quantize_scale is not None and not quantize_scale > 0:
        raise DataError(f"quantize scale must be > 0, got {quantize_scale}")
    if fmt not in FORMATS:
        raise DataError(f"format {fmt!r} is not known — expected one of {', '.join(FORMATS)}")
    src = input_file(input_path, kind)
    length = max_length or DEFAULT_MAX_LENGTH[kind]
    terms: list[Any] = vocabulary(encoder.tokenizer, encoder.vocab_size)
    if fmt == "anserini":
        terms = anserini_terms(terms)
        quantize_scale = ANSERINI_SCALE if quantize_scale is None else quantize_scale
    spec = as_spec(progress)
    start = time.perf_counter()
    options = dict(kind=kind, terms=terms, length=length, batch_size=batch_size, top_k=top_k,
                   quantize_scale=quantize_scale, fmt=fmt, amp_dtype=amp_dtype, block_size=block_size)
    desc = f"Encoding {'documents' if kind == 'corpus' else 'queries'}"
    if shard is not None:
        return _encode_shard(encoder, src, Path(output), shard, spec, desc, start, **options)
    bar = spec.start(desc, _count_lines(src) if spec.enabled else 0, unit="texts")
    with bar if bar is not None else contextlib.nullcontext(), atomic_writer(output) as f:
        # a failure anywhere leaves no output (or the previous one) behind
        count, nnz, skipped = _encode_into(f, encoder, iter_records(src, kind), bar, **options)
        _require_records(count, src)
    return EncodeStats(count, nnz / max(count - skipped, 1), time.perf_counter() - start, str(Path(output)),
                       skipped)


def _require_records(count: int, src: Path) -> None:
    if count == 0:
        raise DataError("no records to encode — expected JSONL lines with an id and a text", file_path=str(src))


def _encode_into(f: Any, encoder: Any, records: Iterator[tuple[str, str]], bar: Any, *, kind: str,
                 terms: list[Any], length: int, batch_size: int, top_k: int | None, quantize_scale: float | None,
                 fmt: str, amp_dtype: Any, block_size: int) -> tuple[int, int, int]:
    """Encode ``records`` block by block into ``f``; returns (records, kept non-zeros, records skipped)."""
    from .progress_util import encode_with_progress

    count = nnz = skipped = 0
    for ids, texts in _blocks(records, block_size):
        matrix = encode_with_progress(encoder, texts, max_length=length, batch_size=batch_size, top_k=top_k,
                                      amp_dtype=amp_dtype, progress=bar)
        kept, dropped = write_vectors(f, ids, matrix, terms, quantize_scale, texts=texts, fmt=fmt, kind=kind)
        nnz += kept
        skipped += dropped
        count += len(ids)
    return count, nnz, skipped


def _encode_shard(encoder: Any, src: Path, output: Path, shard: "Shard", spec: Any, desc: str, start: float,
                  **options: Any) -> EncodeStats:
    """:func:`encode_file` on one rank: its records into its part file, then rank 0 merges every part."""
    from .shard import merge_parts, part_path

    lo, hi = shard.bounds(_count_lines(src))
    part = part_path(output, shard.rank, shard.world_size)
    bar = spec.start(f"{desc} (rank 0 of {shard.world_size})", hi - lo, unit="texts") if shard.is_main else None

    def work() -> tuple[int, int, int]:
        with bar if bar is not None else contextlib.nullcontext(), atomic_writer(part) as f:
            return _encode_into(f, encoder, iter_records(src, options["kind"], span=(lo, hi)), bar, **options)

    try:
        stats = shard.collect(work)
    except BaseException:
        part.unlink(missing_ok=True)  # a failure anywhere: no part is left behind
        raise
    if stats is None:  # not rank 0: rank 0 merges and reports
        return EncodeStats(0, 0.0, time.perf_counter() - start, str(output), 0)
    parts = [part_path(output, r, shard.world_size) for r in range(shard.world_size)]
    try:
        count, nnz, skipped = (sum(s[i] for s in stats) for i in range(3))
        _require_records(count, src)
        merge_parts(output, parts)
    finally:
        for p in parts:
            p.unlink(missing_ok=True)
    return EncodeStats(count, nnz / max(count - skipped, 1), time.perf_counter() - start, str(output), skipped,
                       rank_counts=[s[0] for s in stats])


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
