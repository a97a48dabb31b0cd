"""BEIR folders: ``corpus.jsonl``, ``queries.jsonl`` and ``qrels/<split>.tsv``, read strictly.

Every broken line raises a :class:`~splade_obs.errors.DataError` naming the file and line; the digest
covers the corpus, the queries and the split's qrels. A BEIR folder is also training data: one example per
(query, relevant document) pair (:func:`beir_to_examples`).

``load_beir(..., lazy_corpus=True)`` keeps the corpus on disk (:class:`CorpusFile`): one validating pass
records each document's id and byte offset, and the texts are read back when asked for, block by block, so
evaluating a corpus larger than memory holds its ids and offsets, never its text.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence, overload

import numpy as np

from .data import BOM, file_digest
from .records import Example, kind_of
from .errors import DataError
from .recovery import validate_file_exists

log = logging.getLogger("splade_obs.beir")

BEIR_FILES = ("corpus.jsonl", "queries.jsonl")


@dataclass
class BeirData:
    corpus: "Mapping[str, dict[str, str]]"  # doc id -> {"title", "text"}: a dict, or a CorpusFile (lazy)
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]  # query id -> doc id -> relevance
    digest: str
    folder: str = ""
    query_locations: dict[str, str] = field(default_factory=dict)  # query id -> "queries.jsonl:line"


def iter_jsonl_objects(path: Path, source: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line, object) pairs of a BEIR jsonl file; any broken line raises a DataError naming it."""
    for line_no, _, obj in _iter_located(path, source):
        yield line_no, obj


def _iter_located(path: Path, source: str) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """(line, byte offset of the line, object) for every non-blank line, each checked by :func:`_parse_line`."""
    offset = 0
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            start, offset = offset, offset + len(raw)
            if line_no == 1 and raw.startswith(BOM):
                raw, start = raw[len(BOM):], start + len(BOM)
            if raw.strip():
                yield line_no, start, _parse_line(raw, source, line_no)


def _parse_line(raw: bytes, source: str, line_no: int) -> dict[str, Any]:
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise DataError(f"line is not valid UTF-8 (byte {exc.start + 1}) — expected UTF-8 text",
                        file_path=source, line_number=line_no) from None
    except json.JSONDecodeError as exc:
        raise DataError(f"invalid JSON ({exc.msg} at column {exc.colno}) — expected one JSON object per "
                        "line", file_path=source, line_number=line_no) from None
    if not isinstance(obj, dict):
        raise DataError(f"record is {kind_of(obj)} — expected a JSON object", file_path=source,
                        line_number=line_no)
    if not isinstance(obj.get("_id"), (str, int)) or isinstance(obj.get("_id"), bool) or obj["_id"] == "":
        raise DataError('field "_id" is missing or empty — expected a string id', file_path=source,
                        line_number=line_no, field="_id")
    return obj


def _document(obj: dict[str, Any]) -> dict[str, str]:
    return {"title": str(obj.get("title") or ""), "text": str(obj.get("text") or "")}


class _StringSequence(Sequence[str]):
    """A sequence of strings made on demand: subclasses give ``__len__`` and :meth:`_get` (strings at positions)."""

    def _get(self, positions: Sequence[int]) -> list[str]:
        raise NotImplementedError

    @overload
    def __getitem__(self, i: int) -> str: ...

    @overload
    def __getitem__(self, i: slice) -> list[str]: ...

    def __getitem__(self, i: int | slice) -> str | list[str]:
        if isinstance(i, slice):
            return self._get(range(*i.indices(len(self))))
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return self._get([int(i) % len(self)])[0]


class IdTable(_StringSequence):
    """Document ids packed in one UTF-8 buffer with their offsets: ~13 bytes an id plus 8 for its offset, where
    a list of Python strings takes ~60 more (500k SciFact-like ids: 9 MB instead of ~45 MB). ``table[i]`` and
    iteration decode on demand; :meth:`position` (id -> index) builds its dictionary on first use."""

    def __init__(self, blob: bytes, offsets: np.ndarray) -> None:
        self._blob = bytes(blob)
        self._offsets = offsets  # int64, len(ids) + 1: id i is blob[offsets[i]:offsets[i + 1]]
        self._positions: dict[str, int] | None = None

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def _get(self, positions: Sequence[int]) -> list[str]:
        return [self._at(j) for j in positions]

    def _at(self, i: int) -> str:
        return self._blob[int(self._offsets[i]):int(self._offsets[i + 1])].decode("utf-8")

    def __iter__(self) -> Iterator[str]:
        blob, offsets = self._blob, self._offsets.tolist()
        for lo, hi in zip(offsets, offsets[1:]):
            yield blob[lo:hi].decode("utf-8")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and not isinstance(other, str) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]

    def position(self, doc_id: str) -> int | None:
        """The index of ``doc_id``, or None (a dictionary built on the first call, kept for the next)."""
        if self._positions is None:
            self._positions = {d: k for k, d in enumerate(self)}
        return self._positions.get(doc_id)

    def index(self, value: Any, start: int = 0, stop: int | None = None) -> int:
        at = self.position(value) if isinstance(value, str) else None
        if at is None or not start <= at < (len(self) if stop is None else stop):
            raise ValueError(f"{value!r} is not in the ids")
        return at

    def __contains__(self, value: object) -> bool:
        return isinstance(value, str) and self.position(value) is not None

    @property
    def nbytes(self) -> int:
        return len(self._blob) + int(self._offsets.nbytes)


class CorpusFile(Mapping[str, dict[str, str]]):
    """A ``corpus.jsonl`` read on demand: the mapping ``doc id -> {"title", "text"}`` of :func:`load_beir`,
    holding only the ids (an :class:`IdTable`) and each document's byte offset (a repeated id keeps its first
    place and its last record, as the dict does). :meth:`texts` is the documents' text as a sequence read from
    the file. Nothing per document is a Python object: 500k documents take ~25 MB, not ~90."""

    def __init__(self, path: str | Path) -> None:
        from array import array

        self.path = Path(path)
        source, blob, ends, hashes = str(self.path), bytearray(), array("q"), array("q")
        offsets, lines = array("q"), array("q")
        for line_no, start, obj in _iter_located(self.path, source):  # every line checked, as load_beir does
            doc_id = str(obj["_id"])
            blob += doc_id.encode("utf-8")
            ends.append(len(blob))
            hashes.append(hash(doc_id))
            offsets.append(start)
            lines.append(line_no)
        starts = np.concatenate([[0], np.frombuffer(ends, dtype=np.int64)]).astype(np.int64)
        self.offsets = np.frombuffer(offsets, dtype=np.int64).copy()
        self._lines = np.frombuffer(lines, dtype=np.int64).copy()
        keep = self._merge_repeated_ids(bytes(blob), starts, np.frombuffer(hashes, dtype=np.int64))
        if keep is not None:  # rare: rebuild the ids without the repeats
            kept = [bytes(blob[starts[i]:starts[i + 1]]) for i in np.flatnonzero(keep)]
            blob, starts = bytearray(b"".join(kept)), np.cumsum([0, *map(len, kept)], dtype=np.int64)
            self.offsets, self._lines = self.offsets[keep], self._lines[keep]
        self.ids = IdTable(blob=bytes(blob), offsets=starts)

    def _merge_repeated_ids(self, blob: bytes, starts: np.ndarray, hashes: np.ndarray) -> "np.ndarray | None":
        """Find repeated ids by their hashes (then by their bytes); the first place takes the last record's
        offset and line. The rows to keep, or None when no id repeats."""
        order = np.argsort(hashes, kind="stable")  # equal hashes: ascending positions
        sorted_hashes = hashes[order]
        same = np.flatnonzero(sorted_hashes[1:] == sorted_hashes[:-1])
        if same.size == 0:
            return None
        keep = np.ones(len(hashes), dtype=bool)
        groups: dict[int, list[int]] = {}
        for k in same:
            groups.setdefault(int(sorted_hashes[k]), []).extend((int(order[k]), int(order[k + 1])))
        for members in groups.values():
            first: dict[bytes, int] = {}
            for i in sorted(set(members)):
                key = blob[starts[i]:starts[i + 1]]
                at = first.setdefault(key, i)
                if at != i:
                    self.offsets[at], self._lines[at] = self.offsets[i], self._lines[i]
                    keep[i] = False
        return keep if not keep.all() else None

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator[str]:
        return iter(self.ids)

    def __contains__(self, doc_id: object) -> bool:
        return doc_id in self.ids

    def __getitem__(self, doc_id: str) -> dict[str, str]:
        at = self.ids.position(doc_id)
        if at is None:
            raise KeyError(doc_id)
        return self.read([at])[0]

    def read(self, positions: Sequence[int]) -> list[dict[str, str]]:
        """The documents at ``positions`` (0-based, in corpus order), read from the file with one handle."""
        out = []
        with open(self.path, "rb") as f:
            for i in positions:
                f.seek(int(self.offsets[i]))
                out.append(_document(_parse_line(f.readline(), str(self.path), int(self._lines[i]))))
        return out

    def texts(self) -> "CorpusTexts":
        return CorpusTexts(self)


class CorpusTexts(_StringSequence):
    """The documents' text (:func:`beir_doc_text`) in corpus order, read from the file when indexed: a slice
    reads just its documents, so encoding block by block holds one block's text at a time."""

    def __init__(self, corpus: CorpusFile) -> None:
        self.corpus = corpus

    def __len__(self) -> int:
        return len(self.corpus)

    def _get(self, positions: Sequence[int]) -> list[str]:
        return [beir_doc_text(d) for d in self.corpus.read(positions)]


def _read_qrels(path: Path, source: str) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    expected = "three tab-separated columns: query-id, corpus-id, integer score"
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise DataError("line is not valid UTF-8 — expected UTF-8 text", file_path=source,
                                line_number=line_no) from None
            if not line:
                continue
            parts = line.split("\t") if "\t" in line else line.split()
            if line_no == 1 and parts and parts[0].strip().lower() in ("query-id", "query_id", "qid"):
                continue
            if len(parts) != 3 or not parts[0].strip() or not parts[1].strip():
                raise DataError(f"row has {len(parts)} column{'s' if len(parts) != 1 else ''} — expected {expected}",
                                file_path=source, line_number=line_no)
            try:
                score = int(parts[2].strip())
            except ValueError:
                raise DataError(f'score "{parts[2].strip()}" is not an integer — expected {expected}',
                                file_path=source, line_number=line_no, field="score") from None
            qrels.setdefault(parts[0].strip(), {})[parts[1].strip()] = score
    return qrels


def _beir_missing(folder: Path, split: str) -> list[str]:
    need = [*BEIR_FILES, f"qrels/{split}.tsv"]
    return [name for name in need if not (folder / name).is_file()]


def load_beir(folder: str | Path, split: str = "test", *, lazy_corpus: bool = False) -> BeirData:
    """Read a BEIR folder; the digest covers corpus, queries and the split's qrels. ``lazy_corpus``: the
    corpus is a :class:`CorpusFile` (ids and offsets in memory, text read on demand), not a dict."""
    root = validate_file_exists(folder, kind="dir", what="BEIR folder")
    missing = _beir_missing(root, split)
    if missing:
        splits = sorted(p.stem for p in (root / "qrels").glob("*.tsv")) if (root / "qrels").is_dir() else []
        have = f" (qrels splits present: {', '.join(splits)})" if splits else ""
        raise DataError(f"folder is not a BEIR dataset for split {split!r}: missing {', '.join(missing)}{have} — "
                        "expected corpus.jsonl, queries.jsonl and qrels/<split>.tsv, or a JSON/JSONL file",
                        file_path=str(folder), hint="pass a JSON/JSONL training file or a BEIR folder")
    corpus_path, queries_path, qrels_path = root / "corpus.jsonl", root / "queries.jsonl", root / "qrels" / f"{split}.tsv"
    corpus: Mapping[str, dict[str, str]]
    if lazy_corpus:
        corpus = CorpusFile(corpus_path)
    else:
        corpus = {str(obj["_id"]): _document(obj) for _, obj in iter_jsonl_objects(corpus_path, str(corpus_path))}
    queries: dict[str, str] = {}
    locations: dict[str, str] = {}
    for line_no, obj in iter_jsonl_objects(queries_path, str(queries_path)):
        qid = str(obj["_id"])
        queries[qid] = str(obj.get("text") or "")
        locations[qid] = f"{queries_path}:{line_no}"
    qrels = _read_qrels(qrels_path, str(qrels_path))
    unjudgeable = [q for q in qrels if not queries.get(q, "").strip()]
    if unjudgeable:  # every consumer leaves them out; say so once, here
        log.warning("%s: %d judged %s no text in %s (%s%s); left out", qrels_path, len(unjudgeable),
                    "query has" if len(unjudgeable) == 1 else "queries have", queries_path.name,
                    ", ".join(unjudgeable[:5]), ", ..." if len(unjudgeable) > 5 else "")
    h = hashlib.sha256()
    for name, p in (("corpus.jsonl", corpus_path), ("queries.jsonl", queries_path), (f"qrels/{split}.tsv", qrels_path)):
        h.update(f"{name}:{file_digest(p)}\n".encode())
    return BeirData(corpus, queries, qrels, h.hexdigest(), str(root), locations)


def beir_doc_text(doc: dict[str, str]) -> str:
    """A BEIR document as one string: title and text."""
    return f"{doc.get('title') or ''} {doc.get('text') or ''}".strip()


def beir_to_examples(beir: BeirData, source: str, negatives: "Mapping[str, Sequence[str]] | None" = None,
                     ) -> list[Example]:
    """One example per (query, relevant document) pair: each qrels row with label > 0 whose query has a text and
    whose document is in the corpus, in qrels order. Its location is the query's ``queries.jsonl:line`` and the
    document id (``queries.jsonl:12 [doc 4983]``), so each pair draws its own negatives in the collator.
    ``negatives``: query id -> doc ids of its hard negatives (:mod:`splade_obs.beir_negatives`), given to every
    pair of that query."""
    examples: list[Example] = []
    dangling = 0
    texts: dict[str, str] = {}

    def text(doc_id: str) -> str:
        if doc_id not in texts:
            texts[doc_id] = beir_doc_text(beir.corpus[doc_id])
        return texts[doc_id]

    for qid, rels in beir.qrels.items():
        query = beir.queries.get(qid, "").strip()
        dangling += sum(1 for d, rel in rels.items() if rel > 0 and d not in beir.corpus)
        if not query:
            continue
        negs = tuple(t for t in (text(d) for d in (negatives or {}).get(qid, ()) if d in beir.corpus) if t)
        where = beir.query_locations.get(qid, f"{source}[{qid}]")
        for doc_id, rel in rels.items():
            if rel > 0 and doc_id in beir.corpus and text(doc_id):
                examples.append(Example(query=query, positives=(text(doc_id),), negatives=negs,
                                        location=f"{where} [doc {doc_id}]"))
    if dangling:
        log.warning("%s: %d qrels rows name documents missing from corpus.jsonl; ignored", source, dangling)
    return examples


def training_query_ids(beir: BeirData) -> list[str]:
    """Query ids with a text and at least one relevant (label > 0) document in the corpus, in qrels order."""
    return [q for q, rels in beir.qrels.items() if beir.queries.get(q, "").strip()
            and any(rel > 0 and d in beir.corpus for d, rel in rels.items())]
