"""Training data: JSON / JSONL query-document records, BEIR folders, and the batch collator.

Why this module is strict: a malformed record found after an hour of training wastes the hour, so every
file is validated in full *before* the model is loaded, and every problem names its place
(``file:line`` for JSONL, ``file[index]`` for a JSON array), the field and the form that was expected.

Record format (one JSON object per line, or a JSON array of such objects)::

    {"query": "...", "positive": "..."}                      # or "positives": ["...", ...]
    {"query": "...", "positives": ["..."], "negatives": ["...", "..."], "scores": [9.1, 2.0, 1.5]}

``scores`` are teacher scores, the positive's first, then one per negative (length 1 + len(negatives));
when a record has several positives they share the first score. Unknown extra keys are allowed.

A folder is read as BEIR (``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``): one example per
query whose qrels give it at least one relevant document.

Randomness here never touches the global RNGs: the epoch order and the collator's choice of positive and
negatives are pure functions of (seed, epoch, position), which is what makes an exact resume possible.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from .errors import DataError
from .recovery import validate_file_exists

log = logging.getLogger("splade_obs.data")

#: A JSONL line longer than this is reported as a bad record without being parsed (or kept in memory).
MAX_LINE_BYTES = 10 * 1024 * 1024
#: Characters of a bad record kept in ``bad_records.jsonl``.
MAX_RECORD_CHARS = 2000
#: Problems kept in memory (``LoadedData.problems``); the count of bad records is always exact.
MAX_KEPT_PROBLEMS = 10_000

DEMO_DIR = Path(__file__).resolve().parent / "demo"
BEIR_FILES = ("corpus.jsonl", "queries.jsonl")
SKIP_HINT = "fix the records or pass --on-bad-record skip"
_BOM = b"\xef\xbb\xbf"
_STRING = "a non-empty string"
_STRING_LIST = "a non-empty list of non-empty strings"


# ----------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class Example:
    """One training query with its relevant documents, optional hard negatives and teacher scores."""

    query: str
    positives: tuple[str, ...]
    negatives: tuple[str, ...] = ()
    scores: tuple[float, ...] | None = None
    location: str = ""  # "file:line" or "file[index]"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one record: where, which field, what was found, what was expected."""

    location: str
    field: str
    message: str
    expected: str
    file_path: str = field(default="", compare=False)
    line_number: int | None = field(default=None, compare=False)
    index: int | None = field(default=None, compare=False)

    def __str__(self) -> str:
        return f"{self.location}: {self.describe()}"

    def describe(self) -> str:
        """The problem without its location: ``field "query" is missing — expected a non-empty string``."""
        what = f'field "{self.field}" {self.message}' if self.field else self.message
        return f"{what} — expected {self.expected}"

    def context(self) -> dict[str, Any]:
        ctx: dict[str, Any] = {"file_path": self.file_path}
        if self.line_number is not None:
            ctx["line_number"] = self.line_number
        if self.index is not None:
            ctx["index"] = self.index
        if self.field:
            ctx["field"] = self.field
        return ctx


@dataclass
class LoadedData:
    examples: list[Example]
    source: str
    fmt: str  # "jsonl" | "json" | "beir" | "demo"
    digest: str
    num_skipped: int = 0
    problems: list[Problem] = field(default_factory=list)


@dataclass
class BeirData:
    corpus: dict[str, dict[str, str]]  # doc id -> {"title", "text"}
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]  # query id -> doc id -> relevance
    digest: str
    folder: str = ""
    query_locations: dict[str, str] = field(default_factory=dict)  # query id -> "queries.jsonl:line"


# ----------------------------------------------------------------------------------------- helpers
def demo_path(name: str = "train") -> Path:
    """The bundled demo set (``train`` or ``val``), written for this project by ``demo/make_demo.py``."""
    return DEMO_DIR / f"{name}.jsonl"


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """A permutation of range(n) that depends only on (seed, epoch): a private generator, no global RNG."""
    gen = torch.Generator().manual_seed(int(seed) + int(epoch))
    return torch.randperm(n, generator=gen).tolist()


def _kind(value: Any) -> str:
    """How a JSON value is named in messages: 'a number (5)', 'a list', 'null'."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _truncate(text: str, limit: int = MAX_RECORD_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + f"… [{len(text) - limit} more characters]"


# ----------------------------------------------------------------------------------------- validation
class _Where:
    """Builds Problems for one record's place in a file."""

    def __init__(self, file_path: str, line_number: int | None = None, index: int | None = None) -> None:
        self.file_path = file_path
        self.line_number = line_number
        self.index = index
        if line_number is not None:
            self.location = f"{file_path}:{line_number}"
        elif index is not None:
            self.location = f"{file_path}[{index}]"
        else:
            self.location = file_path

    def problem(self, field_name: str, message: str, expected: str) -> Problem:
        return Problem(self.location, field_name, message, expected, self.file_path, self.line_number, self.index)


def _check_string(value: Any, name: str, where: _Where, out: list[Problem]) -> str | None:
    if not isinstance(value, str):
        out.append(where.problem(name, f"is {_kind(value)}", _STRING))
        return None
    if not value.strip():
        out.append(where.problem(name, "is empty", _STRING))
        return None
    return value


def _check_string_list(value: Any, name: str, where: _Where, out: list[Problem],
                       allow_empty: bool) -> tuple[str, ...] | None:
    expected = "a list of non-empty strings" if allow_empty else _STRING_LIST
    if not isinstance(value, list):
        out.append(where.problem(name, f"is {_kind(value)}", expected))
        return None
    if not value and not allow_empty:
        out.append(where.problem(name, "is an empty list", expected))
        return None
    before = len(out)
    items = [_check_string(v, f"{name}[{i}]", where, out) for i, v in enumerate(value)]
    return None if len(out) > before else tuple(items)  # type: ignore[arg-type]


def _check_scores(value: Any, num_negatives: int | None, where: _Where, out: list[Problem]) -> tuple[float, ...] | None:
    expected = "a list of numbers: the positive's teacher score, then one per negative"
    if not isinstance(value, list):
        out.append(where.problem("scores", f"is {_kind(value)}", expected))
        return None
    before = len(out)
    for i, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            out.append(where.problem(f"scores[{i}]", f"is {_kind(v)}", "a number"))
        elif not math.isfinite(v):
            out.append(where.problem(f"scores[{i}]", f"is {v}", "a finite number"))
    if num_negatives is not None and len(value) != 1 + num_negatives:
        out.append(where.problem("scores", f"has {len(value)} value{'s' if len(value) != 1 else ''}",
                                 f"1 + len(negatives) = {1 + num_negatives} numbers (the positive's first)"))
    return None if len(out) > before else tuple(float(v) for v in value)


def validate_record(record: Any, where: _Where) -> tuple[Example | None, list[Problem]]:
    """Check one parsed record; return the Example (or None) and every problem found in it."""
    out: list[Problem] = []
    if not isinstance(record, dict):
        out.append(where.problem("", f"record is {_kind(record)}",
                                 'a JSON object with "query" and "positive" or "positives"'))
        return None, out
    query = None
    if "query" not in record:
        out.append(where.problem("query", "is missing", _STRING))
    else:
        query = _check_string(record["query"], "query", where, out)

    positives: tuple[str, ...] | None = None
    has_one, has_many = "positive" in record, "positives" in record
    if has_one and has_many:
        out.append(where.problem("positives", 'and "positive" are both given', "exactly one of the two"))
    elif has_one:
        single = _check_string(record["positive"], "positive", where, out)
        positives = (single,) if single is not None else None
    elif has_many:
        positives = _check_string_list(record["positives"], "positives", where, out, allow_empty=False)
    else:
        out.append(where.problem("positive", "is missing",
                                 f'{_STRING} in "positive" or {_STRING_LIST} in "positives"'))

    negatives: tuple[str, ...] | None = ()
    if "negatives" in record and record["negatives"] is not None:
        negatives = _check_string_list(record["negatives"], "negatives", where, out, allow_empty=True)

    scores = None
    if "scores" in record and record["scores"] is not None:
        scores = _check_scores(record["scores"], len(negatives) if negatives is not None else None, where, out)

    if out:
        return None, out
    return Example(query=query, positives=positives, negatives=negatives,  # type: ignore[arg-type]
                   scores=scores, location=where.location), out


# ----------------------------------------------------------------------------------------- readers
@dataclass
class _Collected:
    """What a reader found: good examples and bad records (problems plus the raw text)."""

    examples: list[Example] = field(default_factory=list)
    bad: list[tuple[list[Problem], str]] = field(default_factory=list)
    num_bad: int = 0
    digest: str = ""

    def add_bad(self, problems: list[Problem], raw: str) -> None:
        self.num_bad += 1
        if len(self.bad) < MAX_KEPT_PROBLEMS:
            self.bad.append((problems, _truncate(raw)))


def _first_char(path: Path) -> str:
    """The first non-whitespace character of the file ('' when there is none), BOM skipped."""
    with open(path, "rb") as f:
        head = f.read(4096)
        if head.startswith(_BOM):
            head = head[3:]
        while head:
            stripped = head.lstrip()
            if stripped:
                return chr(stripped[0])
            head = f.read(4096)
    return ""


def _read_jsonl(path: Path, source: str) -> _Collected:
    """Stream a JSONL file: each line is one record; broken lines become problems, not exceptions."""
    out = _Collected()
    h = hashlib.sha256()
    limit = MAX_LINE_BYTES
    with open(path, "rb") as f:
        line_no = 0
        while True:
            raw = f.readline(limit + 2)
            if not raw:
                break
            line_no += 1
            h.update(raw)
            where = _Where(source, line_number=line_no)
            if len(raw.rstrip(b"\r\n")) > limit:
                size = _size_bytes(_skip_rest_of_line(f, raw, h))
                out.add_bad([where.problem("", f"line is {size} long",
                                           f"one JSON object per line, at most {_size_bytes(limit)}")],
                            f"<{size} line not kept>")
                continue
            if line_no == 1 and raw.startswith(_BOM):
                raw = raw[3:]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                out.add_bad([where.problem("", f"line is not valid UTF-8 (byte 0x{raw[exc.start]:02x} at byte "
                                               f"{exc.start + 1} of the line)", "UTF-8 text")], raw.decode("utf-8", "replace").rstrip("\r\n"))
                continue
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                out.add_bad([where.problem("", f"invalid JSON ({exc.msg} at column {exc.colno})",
                                           "one JSON object per line")], text.rstrip("\r\n"))
                continue
            example, problems = validate_record(record, where)
            if example is None:
                out.add_bad(problems, text.rstrip("\r\n"))
            else:
                out.examples.append(example)
    out.digest = h.hexdigest()
    return out


def _skip_rest_of_line(f: Any, head: bytes, h: Any) -> int:
    """Read past the rest of an over-long line in 1 MB chunks (hashing, never keeping it); its size."""
    total = len(head)
    while not head.endswith(b"\n"):
        head = f.readline(1 << 20)
        if not head:
            break
        h.update(head)
        total += len(head)
    return total


def _size_bytes(n: int) -> str:
    if n >= 1024 * 1024:
        return f"{n / (1024 * 1024):.1f} MB"
    if n >= 1024:
        return f"{n / 1024:.1f} KB"
    return f"{n} bytes"


def _line_col(data: bytes, pos: int) -> tuple[int, int]:
    line = data.count(b"\n", 0, pos) + 1
    return line, pos - (data.rfind(b"\n", 0, pos) + 1) + 1


def _read_json_array(path: Path, source: str) -> _Collected:
    """A JSON array of records: file-level faults raise at once; record faults become problems."""
    data = path.read_bytes()
    out = _Collected(digest=hashlib.sha256(data).hexdigest())
    body = data[3:] if data.startswith(_BOM) else data
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        line, col = _line_col(body, exc.start)
        raise DataError(f"file is not valid UTF-8 (byte 0x{body[exc.start]:02x} at column {col})",
                        original_exception=exc, file_path=source, line_number=line, column=col,
                        hint="save the file as UTF-8") from None
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"invalid JSON: {exc.msg} at column {exc.colno} — expected a JSON array of records",
                        file_path=source, line_number=exc.lineno, column=exc.colno) from None
    if not isinstance(records, list):
        raise DataError(f"top-level JSON value is {_kind(records)} — expected an array of records",
                        file_path=source, line_number=1)
    for i, record in enumerate(records):
        where = _Where(source, index=i)
        example, problems = validate_record(record, where)
        if example is None:
            out.add_bad(problems, json.dumps(record, ensure_ascii=False))
        else:
            out.examples.append(example)
    return out


def _check_single_object(path: Path, source: str) -> None:
    """A pretty-printed JSON object (not an array, not JSONL) gets one clear top-level error."""
    try:
        if path.stat().st_size > 256 * 1024 * 1024:
            return
        value = json.loads(path.read_bytes().removeprefix(_BOM).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, OSError):
        return
    if isinstance(value, dict):
        first = path.read_bytes()
        line = first.count(b"\n", 0, len(first) - len(first.lstrip())) + 1
        raise DataError(
            "top-level JSON value is an object spanning several lines — expected a JSON array of records "
            "or one JSON object per line (JSONL)", file_path=source, line_number=line)


def _first_line_parses(path: Path) -> bool:
    with open(path, "rb") as f:
        for raw in f:
            if raw.strip():
                try:
                    json.loads(raw.removeprefix(_BOM))
                    return True
                except (json.JSONDecodeError, UnicodeDecodeError):
                    return False
    return True


# ----------------------------------------------------------------------------------------- BEIR
def _iter_jsonl_objects(path: Path, source: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line, object) pairs of a BEIR jsonl file; any broken line raises a DataError naming it."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            if line_no == 1:
                raw = raw.removeprefix(_BOM)
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
                raise DataError(f"record is {_kind(obj)} — expected a JSON object", file_path=source,
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
    for _, obj in _iter_jsonl_objects(corpus_path, str(corpus_path)):
        corpus[str(obj["_id"])] = {"title": str(obj.get("title") or ""), "text": str(obj.get("text") or "")}
    queries: dict[str, str] = {}
    locations: dict[str, str] = {}
    for line_no, obj in _iter_jsonl_objects(queries_path, str(queries_path)):
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


# ----------------------------------------------------------------------------------------- entry point
def load_training_data(path: str | Path | None, *, split: str = "train", on_bad_record: str = "error",
                       bad_records_path: Path | None = None, max_reported: int = 20) -> LoadedData:
    """Read and validate a training file (JSON array or JSONL), a BEIR folder, or the demo set (``None``).

    ``on_bad_record="error"`` checks every record, then raises one DataError listing all problems (up to
    ``max_reported``); ``"skip"`` drops bad records, counts them and appends each to ``bad_records_path``.
    """
    if on_bad_record not in ("error", "skip"):
        raise ValueError(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
    fmt = None
    if path is None:
        path, fmt = demo_path("train"), "demo"
    source = str(path)
    p = validate_file_exists(path, kind="any", what="training data")
    if p.is_dir():
        beir = load_beir(p, split)
        examples = beir_to_examples(beir, source)
        if not examples:
            raise DataError(f"no training examples: no query in qrels/{split}.tsv has a relevant document in "
                            "corpus.jsonl", file_path=source)
        return LoadedData(examples, source, "beir", beir.digest)

    first = _first_char(p)
    if first == "":
        raise DataError("no training examples: the file is empty — expected JSONL records or a JSON array",
                        file_path=source)
    if first == "[":
        collected, detected = _read_json_array(p, source), "json"
    else:
        if first == "{" and not _first_line_parses(p):
            _check_single_object(p, source)
        collected, detected = _read_jsonl(p, source), "jsonl"
    return _finish(collected, source, fmt or detected, on_bad_record, bad_records_path, max_reported)


def _finish(collected: _Collected, source: str, fmt: str, on_bad_record: str,
            bad_records_path: Path | None, max_reported: int) -> LoadedData:
    problems = [pr for probs, _ in collected.bad for pr in probs]
    if collected.num_bad and on_bad_record == "error":
        raise _aggregate_error(problems, collected.num_bad, source, max_reported)
    if collected.num_bad:
        if bad_records_path is not None:
            _write_bad_records(collected.bad, Path(bad_records_path))
        log.warning("%s: skipped %d bad record(s)%s", source, collected.num_bad,
                    f"; written to {bad_records_path}" if bad_records_path else "")
    if not collected.examples:
        why = f" ({collected.num_bad} bad record(s) skipped)" if collected.num_bad else ""
        raise DataError(f"no training examples{why} — expected JSONL records or a JSON array of records",
                        file_path=source)
    return LoadedData(collected.examples, source, fmt, collected.digest, collected.num_bad, problems)


def _aggregate_error(problems: list[Problem], num_bad: int, source: str, max_reported: int) -> DataError:
    """One DataError: the first problem on the first line (with its place), then the list up to the cap."""
    first = problems[0]
    message = first.describe()
    if len(problems) > 1:
        shown = problems[: max(1, max_reported)]
        lines = [f"{len(problems)} problems in {num_bad} bad record(s) of {source}:"]
        lines += [f"  {pr}" for pr in shown]
        if len(problems) > len(shown):
            lines.append(f"  ... and {len(problems) - len(shown)} more")
        message += "\n" + "\n".join(lines)
    err = DataError(message, hint=SKIP_HINT, num_problems=len(problems), num_bad_records=num_bad,
                    **first.context())
    err.problems = problems  # type: ignore[attr-defined]
    return err


def _write_bad_records(bad: list[tuple[list[Problem], str]], path: Path) -> None:
    """Append one JSON line per dropped record: where, the first problem, all problems, the record text."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for probs, raw in bad:
            first = probs[0]
            f.write(json.dumps({
                "location": first.location, "field": first.field, "message": first.describe(),
                "expected": first.expected, "problems": [str(pr) for pr in probs], "record": raw,
            }, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------------------- batches
@dataclass
class Batch:
    """Tokenized tensors of one batch, padded to the longest sequence in it."""

    queries: dict[str, torch.Tensor]
    pos_docs: dict[str, torch.Tensor]
    neg_docs: dict[str, torch.Tensor] | None  # B*K rows: query i's negatives at rows i*K .. i*K+K-1
    num_negatives: int
    teacher_scores: torch.Tensor | None  # (B, 1+K): positive first
    size: int
    num_tokens: int

    def to(self, device: torch.device | str) -> "Batch":
        def move(d: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
            return None if d is None else {k: v.to(device, non_blocking=True) for k, v in d.items()}

        return Batch(move(self.queries), move(self.pos_docs), move(self.neg_docs), self.num_negatives,  # type: ignore[arg-type]
                     None if self.teacher_scores is None else self.teacher_scores.to(device),
                     self.size, self.num_tokens)


class PairCollator:
    """Turns a list of Examples into a Batch with dynamic padding.

    Choice rule (deterministic in (seed, epoch, the example's identity), no global RNG — so the same example
    gets the same positive/negatives whatever batch or process it lands in, which keeps a torchrun run
    comparable with a single-process run of the same global batch):
    one positive per example; K = ``num_negatives`` hard negatives per query when *every* example in the
    batch has at least one negative, else K = 0 for the whole batch. An example with fewer than K
    negatives repeats its own (shuffled) negatives to fill K, so all queries have the same K.
    Teacher scores are returned only when every example carries them.
    """

    def __init__(self, tokenizer: Any, max_query_length: int, max_doc_length: int, num_negatives: int = 1,
                 seed: int = 42) -> None:
        self.tokenizer = tokenizer
        self.max_query_length = max_query_length
        self.max_doc_length = max_doc_length
        self.num_negatives = max(0, int(num_negatives))
        self.seed = int(seed)

    def _rng(self, epoch: int, example: Example) -> random.Random:
        return random.Random(f"{self.seed}:{epoch}:{example.location or example.query}")

    def _tokenize(self, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(texts, padding="longest", truncation=True, max_length=max_length,
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def choose(self, example: Example, k: int, rng: random.Random) -> tuple[int, list[int]]:
        """Index of the chosen positive and the indices of the k chosen negatives."""
        pos = rng.randrange(len(example.positives))
        if k == 0:
            return pos, []
        n = len(example.negatives)
        order = rng.sample(range(n), n)
        return pos, [order[j % n] for j in range(k)]

    def negatives_for(self, examples: list[Example]) -> int:
        """K for this batch: ``num_negatives`` when every example has a negative, else 0."""
        return self.num_negatives if examples and all(ex.negatives for ex in examples) else 0

    def __call__(self, examples: list[Example], epoch: int = 0, batch_index: int = 0,
                 num_negatives: int | None = None) -> Batch:
        """``num_negatives`` may lower K (torchrun ranks agree on the smallest K so their gathers match)."""
        if not examples:
            raise DataError("empty batch — expected at least one example")
        k = self.negatives_for(examples)
        if num_negatives is not None:
            k = min(k, num_negatives)
        queries, positives, negatives, scores = [], [], [], []
        with_scores = all(ex.scores is not None for ex in examples)
        for i, ex in enumerate(examples):
            pos, negs = self.choose(ex, k, self._rng(epoch, ex))
            queries.append(ex.query)
            positives.append(ex.positives[pos])
            negatives.extend(ex.negatives[j] for j in negs)
            if with_scores:
                scores.append([ex.scores[0]] + [ex.scores[1 + j] for j in negs])  # type: ignore[index]
        q = self._tokenize(queries, self.max_query_length)
        d = self._tokenize(positives, self.max_doc_length)
        n = self._tokenize(negatives, self.max_doc_length) if k else None
        tokens = sum(int(t["attention_mask"].sum()) for t in (q, d, n) if t is not None)
        teacher = torch.tensor(scores, dtype=torch.float32) if with_scores else None
        return Batch(q, d, n, k, teacher, len(examples), tokens)
