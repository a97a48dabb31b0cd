"""Non-finite numbers never leave the process raw: the one rule every output follows.

JSON has no NaN or infinity. Python's ``json.dumps`` writes them as the bare words ``NaN`` / ``Infinity``,
which strict parsers (``jq``, JavaScript's ``JSON.parse``, MLflow's trace page, Go and Rust decoders) reject:
one NaN loss would make a whole trace, log or metrics file unreadable. So every output that writes JSON or
typed attribute values (span attributes and span events, the JSON log, ``errors.jsonl``,
``training_metrics.json``, ``system_info.json``, MLflow tag values) goes through :func:`json_safe`, which
replaces each non-finite float by a **string**:

====================  ==========
value                 written as
====================  ==========
``float("nan")``      ``"nan"``
``float("inf")``      ``"inf"``
``float("-inf")``     ``"-inf"``
====================  ==========

A string rather than ``null`` or a dropped key, so the fact that the value was not finite is still there
for whoever reads the output (a NaN loss is the finding, not a gap). MLflow *metrics* are MLflow's business
(its store takes NaN); only tag values are text, and they follow the same words.
"""

from __future__ import annotations

import json
import math
from typing import Any

#: How each non-finite value is written.
NAN, POS_INF, NEG_INF = "nan", "inf", "-inf"


def finite_or_text(value: float) -> float | str:
    """``value`` itself when finite, else ``"nan"`` / ``"inf"`` / ``"-inf"``."""
    if math.isfinite(value):
        return value
    if math.isnan(value):
        return NAN
    return POS_INF if value > 0 else NEG_INF


def json_safe(obj: Any) -> Any:
    """A copy of ``obj`` (dicts, lists, tuples, nested) with every non-finite float replaced by its word.

    Other values are returned as they are (the caller's ``default=`` still handles unknown types); tuples
    become lists, as JSON has them. Cheap for the common case: containers are rebuilt, scalars are not.
    """
    if isinstance(obj, float):
        return finite_or_text(obj)
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def _default(o: Any) -> Any:
    item = getattr(o, "item", None)  # numpy / torch scalars
    if callable(item):
        try:
            value = item()
        except Exception:  # noqa: BLE001 - not a scalar: text below
            return str(o)
        return finite_or_text(value) if isinstance(value, float) else value
    return str(o)


def dumps(obj: Any, **kw: Any) -> str:
    """``json.dumps`` that writes strict JSON: non-finite floats as words, unknown objects as text.

    ``allow_nan=False`` guards the rule: a non-finite float that slipped past :func:`json_safe` raises
    instead of writing ``NaN``.
    """
    kw.setdefault("default", _default)
    return json.dumps(json_safe(obj), allow_nan=False, **kw)
