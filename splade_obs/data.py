"""Training data: JSON / JSONL query-document records (and BEIR folders through :mod:`splade_obs.beir`).

Why this module is strict: a malformed record found after an hour of training wastes the hour, so every
file is validated in full *before* the model is loaded, and every problem names its place
(``file:line`` for JSONL, ``file[index]`` for a JSON array), the field and the form that was expected.

Record format (one JSON object per line, or a JSON array of such objects)::

    {"query": "...", "positive": "..."}                      # or "positives": ["...", ...]
    {"query": "...", "positives": ["..."], "negatives": ["...", "..."], "scores": [9.1, 2.0, 1.5]}

``scores`` are teacher scores, the positive's first, then one per negative (length 1 + len(negatives));
when a record has several positives they share the first score. Unknown extra keys are allowed.

A folder is read as BEIR (``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``): one example per
(query, relevant document) pair, with BM25 hard negatives mined on the fly (:mod:`splade_obs.beir_negatives`).

Randomness here never touches the global RNGs: the epoch order (and the collator's choice of positive and
negatives, :mod:`splade_obs.collate`) are pure functions of (seed, epoch, position), which is what makes an
exact resume possible.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .beir_negatives import BEIR_NEGATIVES_DEPTH
from .errors import DataError, DependencyError
from .records import Example, Problem, Where, kind_of, validate_record
from .recovery import validate_file_exists

if TYPE_CHECKING:
    from .config import TrainConfig

log = logging.getLogger("splade_obs.data")

#: A JSONL line longer than this is reported as a bad record without being parsed (or kept in memory).
MAX_LINE_BYTES = 10 * 1024 * 1024
#: Characters of a bad record kept in ``bad_records.jsonl``.
MAX_RECORD_CHARS = 2000
#: Problems kept in memory (``LoadedData.problems``); the count of bad records is always exact.
MAX_KEPT_PROBLEMS = 10_000

DEMO_DIR = Path(__file__).resolve().parent / "demo"
#: The demo's retrieval set (a BEIR folder), evaluated at the end of a run on the demo set.
DEMO_RETRIEVAL_DIR = DEMO_DIR / "retrieval"
#: Epochs of a run on the demo set when neither --epochs nor --max-steps is given (user data: 1).
DEMO_EPOCHS = 3
#: Values of ``data.val_file`` / ``eval.eval_data`` that turn the demo's default off.
OFF_WORDS = ("none", "null")
SKIP_HINT = "fix the records or pass --on-bad-record skip"
BOM = b"\xef\xbb\xbf"


# ----------------------------------------------------------------------------------------- loaded data
@dataclass
class LoadedData:
    examples: list[Example]
    source: str
    fmt: str  # "jsonl" | "json" | "beir" | "demo"
    digest: str
    num_skipped: int = 0
    problems: list[Problem] = field(default_factory=list)



# ----------------------------------------------------------------------------------------- helpers
def demo_path(name: str = "train") -> Path:
    """The bundled demo set (``train`` or ``val``), written for this project by ``demo/make_demo.py``."""
    return DEMO_DIR / f"{name}.jsonl"


def with_demo_defaults(cfg: "TrainConfig") -> "TrainConfig":
    """The config a run uses: unset defaults that depend on the data filled in, once, at the start of a run.

    On the demo set (no ``data.train_file``): ``optim.epochs`` 3 (1 with ``max_steps``), the demo's validation
    set and its retrieval set (evaluated at the end). On a BEIR folder: the epochs that reach
    ``MIN_BEIR_STEPS`` optimizer steps over its (query, positive) pairs, at most ``MAX_BEIR_EPOCHS``
    (:func:`splade_obs.beir_negatives.beir_epochs`; 1 with ``max_steps``). On other data: ``optim.epochs`` 1
    and nothing else. ``none`` as ``val_file`` / ``eval_data`` turns that part off; any value given is kept.
    """
    from .beir_negatives import beir_epochs, count_beir_pairs, is_beir_folder

    demo = cfg.data.train_file is None
    changes: dict[str, dict[str, Any]] = {}
    if cfg.optim.epochs is None:
        epochs = DEMO_EPOCHS if demo and cfg.optim.max_steps is None else 1
        if cfg.optim.max_steps is None and is_beir_folder(cfg.data.train_file):
            pairs = count_beir_pairs(cfg.data.train_file, cfg.data.train_split)  # type: ignore[arg-type]
            if pairs:
                epochs = beir_epochs(pairs, cfg.optim.batch_size, cfg.optim.gradient_accumulation_steps)
        changes["optim"] = {"epochs": epochs}
    for section, key, demo_value in (("data", "val_file", demo_path("val")), ("eval", "eval_data", DEMO_RETRIEVAL_DIR)):
        value = getattr(getattr(cfg, section), key)
        if value is None and demo:
            changes.setdefault(section, {})[key] = str(demo_value)
        elif value is not None and value.strip().lower() in OFF_WORDS:
            changes.setdefault(section, {})[key] = None
    return cfg.replace(**changes) if changes else cfg


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """A permutation of range(n) that depends only on (seed, epoch): a private generator, no global RNG."""
    import torch  # here: `config show` reads this module's defaults without loading torch

    gen = torch.Generator().manual_seed(int(seed) + int(epoch))
    return torch.randperm(n, generator=gen).tolist()


def _truncate(text: str, limit: int = MAX_RECORD_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + f"… [{len(text) - limit} more characters]"


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
        if head.startswith(BOM):
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
            where = Where(source, line_number=line_no)
            if len(raw.rstrip(b"\r\n")) > limit:
                size = _size_bytes(_skip_rest_of_line(f, raw, h))
                out.add_bad([where.problem("", f"line is {size} long",
                                           f"one JSON object per line, at most {_size_bytes(limit)}")],
                            f"<{size} line not kept>")
                continue
            if line_no == 1 and raw.startswith(BOM):
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
    body = data[3:] if data.startswith(BOM) else data
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
        raise DataError(f"top-level JSON value is {kind_of(records)} — expected an array of records",
                        file_path=source, line_number=1)
    for i, record in enumerate(records):
        where = Where(source, index=i)
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
        value = json.loads(path.read_bytes().removeprefix(BOM).decode("utf-8"))
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
                    json.loads(raw.removeprefix(BOM))
                    return True
                except (json.JSONDecodeError, UnicodeDecodeError):
                    return False
    return True


# ----------------------------------------------------------------------------------------- entry point
def load_training_data(path: str | Path | None, *, split: str = "train", on_bad_record: str = "error",
                       bad_records_path: Path | None = None, max_reported: int = 20,
                       beir_negatives: str = "bm25", beir_negatives_depth: int = BEIR_NEGATIVES_DEPTH) -> LoadedData:
    """Read and validate a training file (JSON array or JSONL), a BEIR folder, or the demo set (``None``).

    ``on_bad_record="error"`` checks every record, then raises one DataError listing all problems (up to
    ``max_reported``); ``"skip"`` drops bad records, counts them and appends each to ``bad_records_path``.
    A BEIR folder gives one example per (query, relevant document) pair, with the query's BM25 hard negatives
    (``beir_negatives="bm25"``, top ``beir_negatives_depth``; :mod:`splade_obs.beir_negatives`) or none
    (``"none"``). Files are read as they are: their negatives, if any, are the data's.
    """
    if on_bad_record not in ("error", "skip"):
        raise ValueError(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
    fmt = None
    if path is None:
        path, fmt = demo_path("train"), "demo"
    source = str(path)
    p = validate_file_exists(path, kind="any", what="training data")
    if p.is_dir():
        from .beir import beir_to_examples, load_beir, training_query_ids

        beir = load_beir(p, split)
        pools = None
        if beir_negatives == "bm25":
            from .beir_negatives import bm25_negative_pools

            try:
                pools = bm25_negative_pools(beir, training_query_ids(beir), beir_negatives_depth)
            except DependencyError as err:  # an optional part: train on in-batch negatives, say so
                log.warning("%s: no BM25 hard negatives (%s): training with in-batch negatives only; pip install "
                            "bm25s PyStemmer, or --beir-negatives none", source, err.message)
        elif beir_negatives != "none":
            raise ValueError(f"beir_negatives must be 'bm25' or 'none', got {beir_negatives!r}")
        examples = beir_to_examples(beir, source, pools)
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
