"""One training record: what it must hold, and the checks that say exactly what is wrong with it.

Record format (one JSON object per line, or a JSON array of such objects)::

    {"query": "...", "positive": "..."}                      # or "positives": ["...", ...]
    {"query": "...", "positives": ["..."], "negatives": ["...", "..."], "scores": [9.1, 2.0, 1.5]}

``scores`` are teacher scores, the positive's first, then one per negative (length 1 + len(negatives));
when a record has several positives they share the first score. Unknown extra keys are allowed. Every
problem names its place (``file:line`` or ``file[index]``), the field and the form that was expected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

_STRING = "a non-empty string"
_STRING_LIST = "a non-empty list of non-empty strings"


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


def kind_of(value: Any) -> str:
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


class Where:
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


def _check_string(value: Any, name: str, where: Where, out: list[Problem]) -> str | None:
    if not isinstance(value, str):
        out.append(where.problem(name, f"is {kind_of(value)}", _STRING))
        return None
    if not value.strip():
        out.append(where.problem(name, "is empty", _STRING))
        return None
    return value


def _check_string_list(value: Any, name: str, where: Where, out: list[Problem],
                       allow_empty: bool) -> tuple[str, ...] | None:
    expected = "a list of non-empty strings" if allow_empty else _STRING_LIST
    if not isinstance(value, list):
        out.append(where.problem(name, f"is {kind_of(value)}", expected))
        return None
    if not value and not allow_empty:
        out.append(where.problem(name, "is an empty list", expected))
        return None
    before = len(out)
    items = [_check_string(v, f"{name}[{i}]", where, out) for i, v in enumerate(value)]
    return None if len(out) > before else tuple(items)  # type: ignore[arg-type]


def _check_scores(value: Any, num_negatives: int | None, where: Where, out: list[Problem]) -> tuple[float, ...] | None:
    expected = "a list of numbers: the positive's teacher score, then one per negative"
    if not isinstance(value, list):
        out.append(where.problem("scores", f"is {kind_of(value)}", expected))
        return None
    before = len(out)
    for i, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            out.append(where.problem(f"scores[{i}]", f"is {kind_of(v)}", "a number"))
        elif not math.isfinite(v):
            out.append(where.problem(f"scores[{i}]", f"is {v}", "a finite number"))
    if num_negatives is not None and len(value) != 1 + num_negatives:
        out.append(where.problem("scores", f"has {len(value)} value{'s' if len(value) != 1 else ''}",
                                 f"1 + len(negatives) = {1 + num_negatives} numbers (the positive's first)"))
    return None if len(out) > before else tuple(float(v) for v in value)


def validate_record(record: Any, where: Where) -> tuple[Example | None, list[Problem]]:
    """Check one parsed record; return the Example (or None) and every problem found in it."""
    out: list[Problem] = []
    if not isinstance(record, dict):
        out.append(where.problem("", f"record is {kind_of(record)}",
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
