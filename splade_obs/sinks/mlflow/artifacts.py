"""What the MLflow run keeps besides metrics: files, the models, the dataset inputs and the note.

``config.yaml`` (the whole config, secrets masked), ``system_info.json``, ``training_metrics.json``, the
non-empty ``*.log`` / ``*.jsonl`` files of the log folder under ``logs/``, the loss/sparsity plot under
``plots/``, the final model in HF format (``model/hf``), the final and best models as MLflow 3 LoggedModels
(``logged_model.py``), optionally registered, and the markdown note shown on the run page.

Every upload is queued on the transport (``Transport.submit``): it happens on the sender thread, after the
metric points due, retried while the store is away; nothing here waits on the network.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from ... import finite
from ...redaction import redact, safe_text
from .logged_model import LoggedModelUpload, ModelSpec, Registration
from .transport import UNSENT_FILE, Transport

log = logging.getLogger("splade_obs.sinks.mlflow")

LOG_FILE_SUFFIXES = (".log", ".jsonl")
HISTORY_LIMIT = 5_000                 # points kept for the plot; halved (every other point) when full
MAX_DATASET_DIGEST_SIZE = 36
CONTEXTS = {"train": "training", "validation": "validation", "eval": "evaluation", "test": "evaluation"}


class History:
    """A bounded, evenly thinned record of loss and sparsity by step (every ``stride``-th step) for the plot."""

    def __init__(self, limit: int = HISTORY_LIMIT) -> None:
        self.limit = limit
        self.points: list[dict[str, float]] = []
        self.stride = 1

    def add(self, step: int, **values: float) -> None:
        if step % self.stride:
            return
        self.points.append({"step": step, **values})
        if len(self.points) >= self.limit:
            self.stride *= 2
            self.points = [h for h in self.points if int(h["step"]) % self.stride == 0]


class Artifacts:
    """Queues the run's files and model on a :class:`Transport` (sent in order, retried while the store is
    away, a refusal logged once)."""

    def __init__(self, transport: Transport) -> None:
        self.t = transport
        self._uploaded_logs: dict[str, int] = {}

    # ------------------------------------------------------------------------------------------ text
    def config(self, config: dict[str, Any]) -> None:
        import yaml

        text = safe_text(yaml.safe_dump(redact(config), sort_keys=False, default_flow_style=False))
        self.t.submit("log_config", self.t.client.log_text, self.t.run_id, text, "config.yaml", kind="artifact")

    def json(self, obj: Any, name: str) -> None:
        if obj:
            self.t.submit(f"log_{name}", self.t.client.log_text, self.t.run_id,
                          safe_text(finite.dumps(obj, indent=2)), name, kind="artifact")

    def metrics_file(self, log_dir: Path, own_record: dict[str, Any]) -> None:
        """The metrics-file sink's ``training_metrics.json``, or (no such sink on the bus) ``own_record``."""
        path = log_dir / "training_metrics.json"
        if path.is_file():
            self.t.submit("log_metrics_file", self.t.client.log_artifact, self.t.run_id, str(path), kind="artifact")
        else:
            self.json(own_record, "training_metrics.json")

    def log_files(self, log_dir: Path) -> None:
        """Non-empty ``*.log`` / ``*.jsonl`` files of the log folder (errors, bad records, traces, logs), each
        queued again only when it grew."""
        for path in _log_files(log_dir):
            size = path.stat().st_size
            if self._uploaded_logs.get(str(path)) == size:
                continue
            self._uploaded_logs[str(path)] = size
            self.t.submit("log_file", self.t.client.log_artifact, self.t.run_id, str(path), "logs", kind="artifact")

    def plot(self, history: History) -> None:
        if history.points:
            points = [dict(h) for h in history.points]
            self.t.submit("log_plot", lambda: self._plot_now(points), kind="artifact")

    def _plot_now(self, points: list[dict[str, float]]) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        steps = [h["step"] for h in points]
        fig = Figure(figsize=(9, 6))
        FigureCanvasAgg(fig)
        ax1, ax2 = fig.subplots(2, 1, sharex=True)
        ax1.plot(steps, [h["loss"] for h in points], label="train/loss")
        ax1.set_ylabel("loss")
        ax1.legend()
        ax2.plot(steps, [h["query_nnz"] for h in points], label="query nnz")
        ax2.plot(steps, [h["doc_nnz"] for h in points], label="doc nnz")
        ax2.set_xlabel("step")
        ax2.set_ylabel("non-zero terms")
        ax2.legend()
        fig.suptitle("loss and sparsity")
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "loss_sparsity.png"
            fig.savefig(out, dpi=90)
            self.t.client.log_artifact(self.t.run_id, str(out), "plots")

    # ----------------------------------------------------------------------------------------- model
    def hf_model(self, model_path: str) -> None:
        self.t.submit("log_model_hf", self.t.client.log_artifacts, self.t.run_id, model_path, "model/hf",
                      kind="artifact")

    def logged_models(self, specs: list[ModelSpec], *, register_as: str | None = None) -> None:
        """Each spec as a LoggedModel (one queued call each, in order), then, with ``register_as``, the
        registration of the best of them (the best model, else the final one; see ``Registration``)."""
        t = self.t
        uploads = [LoggedModelUpload(t.client, t.run_id, spec) for spec in specs]
        for up in uploads:
            t.submit(f"log_model_{up.spec.kind}", up, kind="artifact")
        if register_as and uploads:
            def registered(version: Any) -> None:
                t.set_tags({"splade.registered_model": f"{register_as}/{version.version}"})

            t.submit("register_model", Registration(t.client, t.run_id, register_as, uploads, registered,
                                                    tracking_uri=t.tracking_uri), kind="artifact")

    # -------------------------------------------------------------------------------------- datasets
    def dataset(self, record: dict[str, Any]) -> None:
        """One dataset input (``record``: split, name, source, digest, num_examples, num_skipped, format)."""
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        context = CONTEXTS.get(record["split"], record["split"])
        profile = json.dumps({"num_examples": record["num_examples"], "num_skipped": record["num_skipped"],
                              "format": record["format"]})
        digest = str(record["digest"] or "unknown")
        short = digest.split(":", 1)[-1][:MAX_DATASET_DIGEST_SIZE]  # "sha256:ab.." -> "ab.."
        ds = Dataset(name=record["name"], digest=short, source_type="local",
                     source=json.dumps({"uri": safe_text(str(record["source"]))}), profile=profile)
        self.t.submit("log_inputs", self.t.client.log_inputs, self.t.run_id,
                      datasets=[DatasetInput(ds, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])])


def _log_files(log_dir: Path) -> list[Path]:
    if not log_dir.is_dir():
        return []
    return sorted(p for p in log_dir.iterdir()
                  if p.is_file() and p.suffix in LOG_FILE_SUFFIXES and p.stat().st_size > 0 and p.name != UNSENT_FILE)

