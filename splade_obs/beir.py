"""BEIR folders: ``corpus.jsonl``, ``queries.jsonl`` and ``qrels/<split>.tsv``, read strictly.

Every broken line raises a :class:`~splade_obs.errors.DataError` naming the file and line; the digest
covers the corpus, the queries and the split's qrels. A BEIR folder is also training data: one example per
query whose qrels give it at least one relevant document (:func:`beir_to_examples`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .data import BOM, file_digest
from .records import Example, kind_of
from .errors import DataError
from .recovery import validate_file_exists

log = logging.getLogger("splade_obs.beir")

BEIR_FILES = ("corpus.jsonl", "queries.jsonl")


@dataclass
class BeirData:
    corpus: dict[str, dict[str, str]]  # doc id -> {"title", "text"}
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]  # query id -> doc id -> relevance
    digest: str
    folder: str = ""
    query_locations: dict[str, str] = field(default_factory=dict)  # query id -> "queries.jsonl:line"


def iter_jsonl_objects(path: Path, source: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line, object) pairs of a BEIR jsonl file; any broken line raises a DataError naming it."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            if line_no == 1:
                raw = raw.removeprefix(BOM)
            if not raw.strip():
                continue
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
            yield line_no, obj


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


def load_beir(folder: str | Path, split: str = "test") -> BeirData:
    """Read a BEIR folder; the digest covers corpus, queries and the split's qrels."""
    root = validate_file_exists(folder, kind="dir", what="BEIR folder")
    missing = _beir_missing(root, split)
    if missing:
        splits = sorted(p.stem for p in (root / "qrels").glob("*.tsv")) if (root / "qrels").is_dir() else []
        have = f" (qrels splits present: {', '.join(splits)})" if splits else ""
        raise DataError(f"folder is not a BEIR dataset for split {split!r}: missing {', '.join(missing)}{have} — "
                        "expected corpus.jsonl, queries.jsonl and qrels/<split>.tsv, or a JSON/JSONL file",
                        file_path=str(folder), hint="pass a JSON/JSONL training file or a BEIR folder")
    corpus_path, queries_path, qrels_path = root / "corpus.jsonl", root / "queries.jsonl", root / "qrels" / f"{split}.tsv"
    corpus: dict[str, dict[str, str]] = {}
    for _, obj in iter_jsonl_objects(corpus_path, str(corpus_path)):
        corpus[str(obj["_id"])] = {"title": str(obj.get("title") or ""), "text": str(obj.get("text") or "")}
    queries: dict[str, str] = {}
    locations: dict[str, str] = {}
    for line_no, obj in iter_jsonl_objects(queries_path, str(queries_path)):
        qid = str(obj["_id"])
        queries[qid] = str(obj.get("text") or "")
        locations[qid] = f"{queries_path}:{line_no}"
    qrels = _read_qrels(qrels_path, str(qrels_path))
    h = hashlib.sha256()
    for name, p in (("corpus.jsonl", corpus_path), ("queries.jsonl", queries_path), (f"qrels/{split}.tsv", qrels_path)):
        h.update(f"{name}:{file_digest(p)}\n".encode())
    return BeirData(corpus, queries, qrels, h.hexdigest(), str(root), locations)


def beir_doc_text(doc: dict[str, str]) -> str:
    """A BEIR document as one string: title and text."""
    return f"{doc.get('title') or ''} {doc.get('text') or ''}".strip()


def beir_to_examples(beir: BeirData, source: str) -> list[Example]:
    """One example per query with at least one relevant (rel > 0) document found in the corpus."""
    examples: list[Example] = []
    dangling = 0
    for qid, rels in beir.qrels.items():
        query = beir.queries.get(qid, "").strip()
        docs = [beir_doc_text(beir.corpus[d]) for d, rel in rels.items() if rel > 0 and d in beir.corpus]
        dangling += sum(1 for d, rel in rels.items() if rel > 0 and d not in beir.corpus)
        docs = [d for d in docs if d]
        if not query or not docs:
            continue
        examples.append(Example(query=query, positives=tuple(docs),
                                location=beir.query_locations.get(qid, f"{source}[{qid}]")))
    if dangling:
        log.warning("%s: %d qrels rows name documents missing from corpus.jsonl; ignored", source, dangling)
    return examples
