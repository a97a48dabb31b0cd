"""The metric vocabulary as a table: every canonical name and the key each sink derives from it.

The names are declared next to the events that carry them (``Event.METRICS`` in :mod:`splade_obs.events`);
each sink maps them by one rule, and this module asks each sink for its rule rather than restating it.
``scripts/gen_docs.py`` writes the table into ``docs/observability.md`` between the markers below, and a
test fails when the file and the code disagree.
"""

from __future__ import annotations

from .events import METRIC_VOCABULARY

BEGIN = "<!-- metric-vocabulary:begin -->"
END = "<!-- metric-vocabulary:end -->"


def rows() -> list[dict[str, str]]:
    """One row per canonical name (or family): name, event, unit, and each sink's key."""
    from .sinks.metrics_file import file_key
    from .sinks.otel import attribute_name

    out = []
    for cls, m in METRIC_VOCABULARY:
        out.append({"name": m.name, "event": cls.__name__, "unit": m.unit or "-", "mlflow": m.name,
                    "otel": attribute_name(m.name), "file": _file_column(cls.__name__, file_key(m.name)),
                    "description": m.description})
    return out


def _file_column(event: str, key: str) -> str:
    """Where the metrics file keeps it (it records epochs, evaluations, final metrics and counters)."""
    places = {"EpochDone": "metrics_by_epoch.N.{}", "EvaluationDone": "eval[].metrics.{}",
              "RunFinished": "-", "ErrorCaught": "counters.{} (at the end)", "StepDone": "-",
              "CheckpointSaved": "-"}
    fmt = places.get(event, "{}")
    if event == "EvaluationDone" and key == "duration_seconds":
        fmt = "eval[].{}"
    return fmt.format(key) if "{}" in fmt else fmt


def render() -> str:
    """The markdown table (without the markers)."""
    lines = ["| canonical name (= MLflow key) | carried by | unit | OpenTelemetry attribute | "
             "training_metrics.json | meaning |",
             "|---|---|---|---|---|---|"]
    for r in rows():
        lines.append(f"| `{r['name']}` | `{r['event']}` | {r['unit']} | `{r['otel']}` | "
                     f"{_code(r['file'])} | {r['description']} |")
    return "\n".join(lines) + "\n"


def _code(text: str) -> str:
    return text if text == "-" else f"`{text}`"


def observability_page() -> str:
    """docs/observability.md of this checkout with a fresh table (what ``scripts/gen_docs.py`` writes)."""
    from pathlib import Path

    page = Path(__file__).resolve().parents[1] / "docs" / "observability.md"
    return splice(page.read_text(encoding="utf-8"))


def splice(document: str) -> str:
    """``document`` with the text between the markers replaced by :func:`render`."""
    if BEGIN not in document or END not in document:
        raise ValueError(f"the document has no {BEGIN} ... {END} markers")
    head, rest = document.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{render()}{END}{tail}"
