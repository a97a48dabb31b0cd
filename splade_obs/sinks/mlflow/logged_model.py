"""The trained models as MLflow 3 LoggedModels: the experiment's Models tab, the run's "Logged models", a
signature and an input example, and (``--register-model``) a registered version linked to the model.

What a run logs, once, when it finishes (``run_model_specs``): ``splade_model``, the final model, as an
output of the run at its final step, linked to the metrics of the evaluation of that step; and with
``--save-best-metric`` ``best_model``, the last best checkpoint (``<output_dir>/best``) at the step of the
evaluation that made it best, linked to that evaluation's metrics, the metric's name and value as tags. A
best model is not uploaded each time one is found: a long run may find many, each a whole model.
``--register-model NAME`` registers the best model, else the final one (``Registration``).

The model is an MLflow "model from code" (``model_code.py``, which imports no splade_obs: loading needs only
the logged requirements) with the Hugging Face folder as its artifact ``hf`` and ``max_length`` / ``top_k``
as its model config. Its description (tag ``mlflow.note.content``) is the folder's ``README.md`` if any.

Why not ``mlflow.pyfunc.log_model`` / ``mlflow.models.Model.log``: they take a run id but no tracking URI.
They resolve the store from the process-wide tracking URI (``mlflow.set_tracking_uri``, which also writes
``MLFLOW_TRACKING_URI`` into the environment, credentials included), and they finalise the model, copy the
model config into run params and register through the fluent API, which reads that same global.
Pointing them at the sink's store would mean switching that global for the length of an upload, on the
sender thread, while the caller's own threads may be using MLflow, and restoring it afterwards would unset
an ``MLFLOW_TRACKING_URI`` the caller had set. So this module runs the same steps as ``Model.log`` with the
sink's own ``MlflowClient`` (explicit tracking URI and run id, nothing global changed):
``create_logged_model`` (source run, params, tags) -> ``log_outputs`` (the model as an output of the run at
its step) -> metrics linked to the model (``log_batch`` with ``model_id``) -> ``mlflow.pyfunc.save_model``
into a temporary folder with an ``mlflow_model`` that carries the model id -> ``log_model_artifacts`` ->
``finalize_logged_model(READY)``. ``save_model`` runs the code file once; the module it leaves in
``sys.modules`` and the ``set_model`` global it sets are put back as they were.

An upload is one queued call (``Transport.submit``). A transient failure retries the call, which goes on
from the step it had reached: one LoggedModel per upload, never two.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from ...redaction import safe_text
from .failures import is_transient

log = logging.getLogger("splade_obs.sinks.mlflow")

MODEL_CODE = Path(__file__).with_name("model_code.py")
FINAL_MODEL_NAME = "splade_model"
BEST_MODEL_NAME = "best_model"
MODEL_TYPE = "splade-sparse-encoder"
REQUIREMENTS = ("torch", "transformers", "tokenizers", "safetensors", "mlflow", "numpy", "pandas")
MAX_DESCRIPTION_CHARS = 5000          # a model version's description column (String(5000))
MAX_TAG_CHARS = 8000                  # mlflow.utils.validation.MAX_TAG_VAL_LENGTH
MORE = "\n\n[... the whole text: README.md in the model's files]"
EXAMPLE_TEXTS = ["what is a sparse lexical representation?",
                 "SPLADE expands queries and documents with weighted vocabulary terms."]


@dataclass
class ModelSpec:
    """One model to log: its folder, the run step it belongs to, and what the Models tab shows about it."""

    name: str                                   # LoggedModel name (FINAL_MODEL_NAME / BEST_MODEL_NAME)
    kind: str                                   # "final" | "best"
    hf_path: str
    step: int
    max_length: int
    top_k: int | None = None
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    #: points to link to the model: (key, value, step, timestamp ms), as the run already has them
    metrics: list[tuple[str, float, int, int]] = field(default_factory=list)


def requirements() -> list[str]:
    """Pinned requirements of the logged model (no splade-obs; skips MLflow's slow requirement inference)."""
    from importlib import metadata

    reqs = []
    for dist in REQUIREMENTS:
        try:
            reqs.append(f"{dist}=={metadata.version(dist).split('+', 1)[0]}")
        except metadata.PackageNotFoundError:
            continue
    return reqs


def signature() -> Any:
    """Input: one string column; output: one map ``{term: weight}`` per text (``Map(double)``); params
    ``max_length`` and ``top_k`` for one call, whose None default means the model config's value (pyfunc
    fills in a param's default on every call, so a logged value there would hide a ``model_config`` given
    to ``load_model``).

    The input column has no name on purpose: pyfunc then takes a list of strings, one string, a Series, a
    DataFrame whose column is ``text`` (the input example) or a one-column DataFrame of another name; a
    named column would refuse everything but a DataFrame with that column."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, DataType, Map, ParamSchema, ParamSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec(DataType.string)]),
                          outputs=Schema([ColSpec(Map(DataType.double))]),
                          params=ParamSchema([ParamSpec("max_length", DataType.long, None),
                                              ParamSpec("top_k", DataType.long, None)]))


def input_example() -> Any:
    import pandas as pd

    return pd.DataFrame({"text": EXAMPLE_TEXTS})


def description(hf_path: str, limit: int = MAX_TAG_CHARS) -> str | None:
    """The model folder's ``README.md`` (a model card), secrets masked, cut to ``limit`` characters; or None."""
    readme = Path(hf_path) / "README.md"
    try:
        text = safe_text(readme.read_text(encoding="utf-8", errors="replace").strip())
    except OSError:
        return None
    if len(text) > limit:
        text = text[:limit - len(MORE)] + MORE
    return text or None


def eval_points(e: Any) -> list[tuple[str, float, int, int]]:
    """An ``EvaluationDone``'s points as the sink logged them to the run: (key, value, step, timestamp ms)."""
    out = []
    for key, value in e.metrics().items():
        try:
            out.append((key, float(value), int(e.step), e.time_ns // 1_000_000))
        except (TypeError, ValueError):
            continue
    return out


def run_model_specs(*, final_path: str | None, final_step: int, config: dict[str, Any] | None,
                    params: dict[str, str], last_eval: tuple[Any, list] | None = None,
                    best_eval: tuple[Any, list] | None = None, best_checkpoint: Any = None) -> list[ModelSpec]:
    """What a finished run logs: the final model (``final_path``, the run's final step, linked to the last
    evaluation's points when that evaluation was of this step) and, with ``--save-best-metric``, the best one
    (``best_checkpoint.path``, i.e. ``<output_dir>/best`` as the last best evaluation left it, at that
    evaluation's step, linked to its points, the metric's name and value as tags).

    ``last_eval`` / ``best_eval``: (``EvaluationDone``, its points as logged to the run, or [] when the
    resume rule skipped them). ``config``: ``RunStarted.config`` (``model.max_doc_length``, ``model.top_k``,
    ``model.name``, ``eval.save_best_metric``). ``params``: the run's params as sent (masked, truncated).
    """
    config = config or {}
    model_cfg = config.get("model") if isinstance(config.get("model"), dict) else {}
    eval_cfg = config.get("eval") if isinstance(config.get("eval"), dict) else {}
    max_length = int(model_cfg.get("max_doc_length") or 128)
    top_k = int(model_cfg["top_k"]) if model_cfg.get("top_k") is not None else None
    tags = {"splade.base_model": str(model_cfg.get("name") or ""), "splade.max_length": str(max_length),
            "splade.top_k": str(top_k) if top_k is not None else "none"}
    specs = []
    if final_path and Path(final_path).is_dir():
        linked = last_eval[1] if last_eval is not None and last_eval[0].step == final_step else []
        specs.append(ModelSpec(FINAL_MODEL_NAME, "final", final_path, final_step, max_length, top_k,
                               params=dict(params), tags=dict(tags), metrics=list(linked)))
    if best_checkpoint is not None and Path(best_checkpoint.path).is_dir():
        best_tags = dict(tags)
        key = eval_cfg.get("save_best_metric")
        step = best_checkpoint.step
        points: list = []
        if best_eval is not None and best_eval[0].step == step:  # the evaluation of what the folder holds
            step, points = best_eval[0].step, list(best_eval[1])
            if key and key in best_eval[0].scores:
                best_tags["splade.best_metric_value"] = repr(float(best_eval[0].scores[key]))
        if key:
            best_tags["splade.best_metric"] = str(key)
        specs.append(ModelSpec(BEST_MODEL_NAME, "best", best_checkpoint.path, step, max_length, top_k,
                               params=dict(params), tags=best_tags, metrics=points))
    return specs


def save(spec: ModelSpec, dest: str, *, run_id: str, logged_model: Any) -> None:
    """``mlflow.pyfunc.save_model`` of ``spec`` into ``dest``, its MLmodel pointing at ``logged_model``."""
    import mlflow.pyfunc
    from mlflow.models import Model

    mlflow_model = Model(artifact_path=logged_model.artifact_location, model_uuid=logged_model.model_id,
                         run_id=run_id, model_id=logged_model.model_id)
    with _code_model_restored(), _quiet_pyfunc_info():
        mlflow.pyfunc.save_model(
            path=dest, python_model=str(MODEL_CODE), artifacts={"hf": spec.hf_path},
            model_config={"max_length": spec.max_length, "top_k": spec.top_k},
            signature=signature(), input_example=input_example(),
            pip_requirements=requirements(), mlflow_model=mlflow_model,
            metadata={"task": "sparse-encoding", "splade_obs.run_id": run_id, "splade_obs.model_kind": spec.kind,
                      "splade_obs.step": spec.step})


class LoggedModelUpload:
    """One LoggedModel on its way to the store: a queued call (``__call__``) that resumes where a previous
    attempt stopped. ``model_id`` is known once created; ``ready`` once its files are in and it is READY."""

    def __init__(self, client: Any, run_id: str, spec: ModelSpec) -> None:
        self.client, self.run_id, self.spec = client, run_id, spec
        self.model_id: str | None = None
        self.ready = False
        self._model: Any = None
        self._linked = self._uploaded = False

    def __call__(self) -> None:
        try:
            self._steps()
        except Exception as exc:
            if not is_transient(exc) and self.model_id is not None:
                with contextlib.suppress(Exception):  # the store refused: say so on the model, best effort
                    self.client.finalize_logged_model(self.model_id, "FAILED")
            raise

    def _steps(self) -> None:
        from mlflow.entities import LoggedModelOutput, Metric

        c, spec = self.client, self.spec
        if self._model is None:
            experiment_id = c.get_run(self.run_id).info.experiment_id
            tags = {k: safe_text(str(v)) for k, v in spec.tags.items()}
            tags.update({"splade.model_kind": spec.kind, "splade.step": str(spec.step)})
            text = description(spec.hf_path)
            if text:
                tags["mlflow.note.content"] = text  # the model page's Description
            self._model = c.create_logged_model(experiment_id, name=spec.name, source_run_id=self.run_id,
                                                tags=tags, params=spec.params, model_type=MODEL_TYPE)
            self.model_id = self._model.model_id
        if not self._linked:
            c.log_outputs(self.run_id, [LoggedModelOutput(self.model_id, step=spec.step)])
            if spec.metrics:  # the run's own points again (same key, step, time, value: not duplicated)
                c.log_batch(self.run_id, metrics=[Metric(k, v, ts, s, run_id=self.run_id, model_id=self.model_id)
                                                  for k, v, s, ts in spec.metrics])
            self._linked = True
        if not self._uploaded:
            with tempfile.TemporaryDirectory(prefix="splade-model-") as tmp:
                local = str(Path(tmp) / "model")
                save(spec, local, run_id=self.run_id, logged_model=self._model)
                c.log_model_artifacts(self.model_id, local)
            self._uploaded = True
        c.finalize_logged_model(self.model_id, "READY")
        self.ready = True
        log.info("MLflow: logged model %s (%s, step %d) as %s", spec.name, spec.kind, spec.step, self.model_id)


class Registration:
    """Registers the best of ``uploads`` that reached READY (the best model, else the final one) as a new
    version of ``name``, linked to the LoggedModel (``model_id``); ``on_registered(version)`` afterwards.

    The version's source is ``models:/<model_id>`` on a tracking server. On a local database store (sqlite)
    it is the LoggedModel's artifact location instead, the same files (the version page shows the same
    MLmodel and schema): MLflow's SQL registry resolves a ``models:/`` source through the process-wide
    tracking URI (``MlflowClient()``, see ``SqlAlchemyStore.create_model_version``), which may name another
    store or none, and this module changes no global.

    A run resumed in a later process whose best model was logged before (and not beaten since) finds that
    one in the store: the run's latest READY ``best_model``.
    """

    def __init__(self, client: Any, run_id: str, name: str, uploads: list[LoggedModelUpload],
                 on_registered: Callable[[Any], None], *, tracking_uri: str) -> None:
        self.client, self.run_id, self.name, self.uploads = client, run_id, name, uploads
        self.remote = tracking_uri.startswith(("http://", "https://", "databricks"))
        self.on_registered = on_registered
        self._attempted = False

    def __call__(self) -> None:
        from mlflow.exceptions import MlflowException

        chosen = self._choose()
        if chosen is None:
            log.warning("MLflow: no logged model to register as %s", self.name)
            return
        model_id, kind, readme_path = chosen
        c = self.client
        try:
            c.create_registered_model(self.name)
        except MlflowException as exc:
            if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                raise
        source = f"models:/{model_id}" if self.remote else c.get_logged_model(model_id).artifact_location
        version = self._existing(source) if self._attempted else None  # a retry: maybe the last one got there
        self._attempted = True
        if version is None:
            text = description(readme_path, MAX_DESCRIPTION_CHARS) if readme_path else None
            version = c.create_model_version(self.name, source, run_id=self.run_id, model_id=model_id,
                                             tags={"splade.model_kind": kind}, await_creation_for=0,
                                             description=text)
        log.info("MLflow: registered model %s version %s (%s model %s)", self.name, version.version, kind, model_id)
        self.on_registered(version)

    def _choose(self) -> tuple[str, str, str | None] | None:
        ready = {u.spec.kind: u for u in self.uploads if u.ready and u.model_id}
        if "best" in ready:
            return ready["best"].model_id, "best", ready["best"].spec.hf_path
        earlier = self._earlier_best()
        if earlier is not None:
            return earlier, "best", None
        if "final" in ready:
            return ready["final"].model_id, "final", ready["final"].spec.hf_path
        return None

    def _earlier_best(self) -> str | None:
        if any(u.spec.kind == "best" for u in self.uploads):
            return None  # this process had a best and it did not arrive: do not pick an older one
        exp = self.client.get_run(self.run_id).info.experiment_id
        found = self.client.search_logged_models(
            [exp], filter_string=f"source_run_id = '{self.run_id}' AND name = '{BEST_MODEL_NAME}'")
        ready = [m for m in found if str(getattr(m.status, "name", m.status)).upper() == "READY"]
        return max(ready, key=lambda m: m.creation_timestamp).model_id if ready else None

    def _existing(self, source: str) -> Any:
        versions = self.client.search_model_versions(f"name='{self.name}' and run_id='{self.run_id}'")
        return next((v for v in versions if v.source == source), None)


@contextlib.contextmanager
def _code_model_restored() -> Iterator[None]:
    """Undo what saving a model from code leaves behind: the module MLflow creates for the code file
    (``sys.modules["code_model_<hex>"]``) and the ``mlflow.models.model.__mlflow_model__`` it sets."""
    import mlflow.models.model as model_module

    before_modules = {name for name in sys.modules if name.startswith("code_model_")}
    before_model = getattr(model_module, "__mlflow_model__", None)
    try:
        yield
    finally:
        model_module.__mlflow_model__ = before_model
        for name in [n for n in sys.modules if n.startswith("code_model_") and n not in before_modules]:
            sys.modules.pop(name, None)


@contextlib.contextmanager
def _quiet_pyfunc_info() -> Iterator[None]:
    """MLflow's INFO lines on every save ("Validating input example against model signature") stay out of
    the run's console; its warnings still pass."""
    pyfunc_log = logging.getLogger("mlflow.pyfunc")
    level = pyfunc_log.level
    if level == logging.NOTSET or level < logging.WARNING:
        pyfunc_log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        pyfunc_log.setLevel(level)
