"""The run description (``mlflow.note.content``): what went wrong first, then data, model and result.

MLflow's run page shows the description's first lines and folds the rest behind "Show more", so the first lines
say the status, the errors by category, the skipped batches and the failure; the data, model and final metrics
follow.
"""

from __future__ import annotations

from typing import Any

from ...events import ModelLoaded, RunFinished
from ...redaction import safe_text


def note(e: RunFinished, *, datasets: list[dict[str, Any]], model: ModelLoaded | None, total_steps: int,
         trace_id: str | None, skipped_batches: int = 0, trace_link: str | None = None) -> str:
    """The markdown summary shown on the run page."""
    errors = {k.split("/", 1)[1]: v for k, v in e.counters.items()
              if k.startswith("errors/") and k != "errors/total" and v}
    skipped = max(skipped_batches, int(e.counters.get("train/skipped_batches", 0)))
    head = [f"**{e.status}** at step {e.step}/{total_steps or '?'} in {e.duration_seconds:.1f}s"]
    head.append(f"{sum(errors.values())} errors ({', '.join(f'{k}: {v}' for k, v in sorted(errors.items()))})"
                if errors else "no errors")
    if skipped:
        head.append(f"{skipped} skipped batches")
    lines = [" · ".join(head)]
    if e.error:
        lines += ["", f"**Failure** `{e.error.get('category')}`: {safe_text(str(e.error.get('message')))[:300]}"]
    if trace_id:
        lines += ["", f"**Trace** [`{trace_id}`]({trace_link})" if trace_link else f"**Trace** `{trace_id}`"]
    lines.append("")
    for d in datasets:
        n = f"{d['num_examples']} examples" if d.get("num_examples") is not None else "examples: ?"
        lines.append(f"- **Data ({d['split']})**: `{d['source']}` — {n}, digest `{str(d['digest'])[:12]}`")
    if model is not None:
        lines.append(f"- **Model**: `{model.name}` — {model.num_parameters / 1e6:.1f}M parameters on "
                     f"{model.device}, AMP {model.amp_dtype}")
    for k, v in sorted(e.final_metrics.items()):
        lines.append(f"- {k}: {v:.4g}")
    return "\n".join(lines)

