"""What the MLflow run keeps besides metrics: files, the model, the dataset inputs and the note.

``config.yaml`` (the whole config, secrets masked), ``system_info.json``, ``training_metrics.json``, the
non-empty ``*.log`` / ``*.jsonl`` files of the log folder under ``logs/``, the loss/sparsity plot under
``plots/``, the model in HF format (``model/hf``) and as an MLflow pyfunc model (``splade_model``),
optionally registered, and the markdown note shown on the run page.

Every upload is queued on the transport (``Transport.submit``): it happens on the sender thread, after the
metric points due, retried while the store is away; nothing here waits on the network.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator

from ...events import ModelLoaded, RunFinished
from ...redaction import redact
from . import pyfunc
from ...redaction import safe_text
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


@contextlib.contextmanager
def _quiet_pyfunc_save() -> Iterator[None]:
    """Silence two advisory notes MLflow prints on every pyfunc save (type hints, cloudpickle): they are
    about choices made on purpose here (inputs of several shapes, a class importable from splade_obs)."""
    pyfunc_log = logging.getLogger("mlflow.pyfunc")
    level = pyfunc_log.level
    pyfunc_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*type hints.*", category=UserWarning)
            yield
    finally:
        pyfunc_log.setLevel(level)


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
                          safe_text(json.dumps(obj, indent=2, default=str)), name, kind="artifact")

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

    def pyfunc_model(self, model_path: str, *, max_length: int, top_k: int | None,
                     register_as: str | None = None) -> None:
        """The HF folder wrapped as an MLflow pyfunc model ``splade_model``; registered as ``register_as``."""
        self.t.submit("log_pyfunc", lambda: self._pyfunc_now(model_path, max_length=max_length, top_k=top_k,
                                                             register_as=register_as), kind="artifact")

    def _pyfunc_now(self, model_path: str, *, max_length: int, top_k: int | None, register_as: str | None) -> None:
        import mlflow.pyfunc

        with tempfile.TemporaryDirectory() as tmp, _quiet_pyfunc_save():
            cls = pyfunc.SpladePyfuncModel  # built on first access: MLflow checks its hints then
            local = Path(tmp) / "splade_model"
            mlflow.pyfunc.save_model(
                path=str(local), python_model=cls(max_length=max_length, top_k=top_k),
                artifacts={"hf": model_path}, pip_requirements=pyfunc.pip_requirements(),
                metadata={"splade_obs.run_id": self.t.run_id, "task": "sparse-encoding"})
            self.t.client.log_artifacts(self.t.run_id, str(local), "splade_model")
        if register_as:
            self.register(register_as)

    def register(self, name: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.t.client.create_registered_model(name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        run = self.t.client.get_run(self.t.run_id)
        version = self.t.client.create_model_version(name, f"{run.info.artifact_uri}/splade_model",
                                                     run_id=self.t.run_id)
        self.t.set_tags({"splade.registered_model": f"{name}/{version.version}"})
        log.info("MLflow: registered model %s version %s", name, version.version)

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


def note(e: RunFinished, *, datasets: list[dict[str, Any]], model: ModelLoaded | None, total_steps: int,
         trace_id: str | None) -> str:
    """The markdown summary shown on the run page: data, model, result, errors, failure, trace."""
    lines = [f"### splade-obs run — {e.status}", ""]
    for d in datasets:
        n = f"{d['num_examples']} examples" if d.get("num_examples") is not None else "examples: ?"
        lines.append(f"- **Data ({d['split']})**: `{d['source']}` — {n}, digest `{str(d['digest'])[:12]}`")
    if model is not None:
        lines.append(f"- **Model**: `{model.name}` — {model.num_parameters / 1e6:.1f}M parameters on "
                     f"{model.device}, AMP {model.amp_dtype}")
    lines.append(f"- **Result**: step {e.step}/{total_steps or '?'} in {e.duration_seconds:.1f}s")
    for k, v in sorted(e.final_metrics.items()):
        lines.append(f"  - {k}: {v:.4g}")
    errors = {k: v for k, v in e.counters.items() if v}
    if errors:
        lines.append("- **Errors**: " + ", ".join(f"{k}: {v}" for k, v in sorted(errors.items())))
    if e.error:
        lines.append(f"- **Failure**: `{e.error.get('category')}` — {str(e.error.get('message'))[:500]}")
    if trace_id:
        lines.append(f"- **Trace**: `{trace_id}`")
    return "\n".join(lines)
