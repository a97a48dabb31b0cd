"""Links into the MLflow 3 UI that open on a training run's views, and the console line that prints them.

Pure functions: no mlflow import, no I/O. Checked against the UI bundle of MLflow 3.17
(``mlflow/server/js/build``) and in a real browser by ``scripts/ui_check.py``.

How the MLflow 3.17 UI picks what an experiment opens on
--------------------------------------------------------
The UI has two "workflow types", ``genai`` and ``machine_learning`` (the sidebar's "GenAI" / "Model training"
switch). On ``#/experiments/<id>`` it opens the GenAI **Overview** for ``genai`` and the **Runs** table for
``machine_learning``. The workflow type is read, in this order, from:

1. the ``workflowType`` query parameter of the link (``...#/experiments/1?workflowType=machine_learning``);
2. the browser's localStorage key ``mlflow.workflowType_v1`` (JSON ``"machine_learning"``), written only when
   the user clicks the sidebar switch;
3. the default, ``genai``.

The experiment tag ``mlflow.experimentKind`` (``custom_model_development``) is **not** read for this in the
open-source UI: the experiment kind is derived from the workflow type (a feature flag that is always on in
the OSS build), so tagging an experiment changes nothing about where it opens. The tag is still what MLflow
itself defines for "a classic ML experiment" (its kind selector writes it, and Databricks reads it), so
:func:`experiment_tags` returns it; the links below are what actually make the UI open on runs.

Every link carries ``workflowType=machine_learning``: the sidebar then shows Runs / Models / Traces, and the
sidebar's own links keep the parameter. Routes (hash router, so everything after ``#``):

* runs table: ``#/experiments/<experiment_id>/runs``
* run page: ``#/experiments/<experiment_id>/runs/<run_id>`` (+ ``/model-metrics``, ``/system-metrics``,
  ``/traces``, ``/artifacts`` or ``/artifacts/<path>``)
* logged models: ``#/experiments/<experiment_id>/models``
* one trace: ``#/experiments/<experiment_id>/traces/<trace_id>`` (MLflow trace ids look like ``tr-<32 hex>``)
* compare runs: ``#/compare-runs?runs=["a","b"]&experiments=["1"]`` (JSON lists, percent-encoded here)

The compare page, like every page, takes ``workflowType`` too (without it its sidebar is the GenAI one).
"""

from __future__ import annotations

import json
import shlex
import urllib.parse
from typing import Iterable

from ...redaction import redact_url_credentials, safe_text
from .store import scheme, sqlite_path, strip_credentials

#: Experiment tag MLflow uses for an experiment's kind (not read by the OSS 3.17 UI to choose the landing view).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
#: The kind of a classic training experiment (``ExperimentKind.CUSTOM_MODEL_DEVELOPMENT`` of the UI).
CUSTOM_MODEL_DEVELOPMENT = "custom_model_development"
#: The query parameter, and the value of it, that make the UI show the "Model training" (runs) views.
WORKFLOW_PARAM = "workflowType"
MACHINE_LEARNING = "machine_learning"
#: localStorage key where the UI remembers the sidebar's GenAI / Model training switch (JSON string value).
WORKFLOW_STORAGE_KEY = "mlflow.workflowType_v1"
#: The run page's tabs, as path suffixes (the Overview tab has none).
RUN_TABS = ("model-metrics", "system-metrics", "traces", "artifacts")
#: ``mlflow ui`` / ``mlflow server`` defaults used in the hint for a local store.
LOCAL_HOST = "127.0.0.1"
LOCAL_PORT = 5000

_ML_QUERY = f"{WORKFLOW_PARAM}={MACHINE_LEARNING}"


def experiment_tags() -> dict[str, str]:
    """Tags to set on a new experiment (and on an existing one) holding training runs.

    ``{"mlflow.experimentKind": "custom_model_development"}``: MLflow's own marker of a model-training
    experiment. It does not change where the OSS 3.17 UI opens (see the module docstring): use the links of
    :func:`experiment_url` / :func:`run_url` for that.
    """
    return {EXPERIMENT_KIND_TAG: CUSTOM_MODEL_DEVELOPMENT}


def ui_base(base_url: str) -> str:
    """The UI's root for a server URL: no credentials, query or fragment, no trailing slash.

    ``https://user:pw@host:5000/mlflow/?x=1#/y`` gives ``https://host:5000/mlflow``.
    """
    parts = urllib.parse.urlsplit(strip_credentials(base_url.strip()))
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))


def _segment(value: str) -> str:
    return urllib.parse.quote(str(value), safe="")


def experiment_url(base_url: str, experiment_id: str) -> str:
    """The experiment's runs table, with the sidebar on "Model training"."""
    return f"{ui_base(base_url)}/#/experiments/{_segment(experiment_id)}/runs?{_ML_QUERY}"


def run_url(base_url: str, experiment_id: str, run_id: str, tab: str | None = None) -> str:
    """A run's page; ``tab`` is one of :data:`RUN_TABS` (or ``artifacts/<path>``), None for its Overview."""
    url = f"{ui_base(base_url)}/#/experiments/{_segment(experiment_id)}/runs/{_segment(run_id)}"
    if tab:
        head = tab.strip("/").split("/", 1)[0]
        if head not in RUN_TABS:
            raise ValueError(f"unknown run page tab {tab!r}; expected one of {', '.join(RUN_TABS)}")
        url += "/" + "/".join(_segment(p) for p in tab.strip("/").split("/"))
    return f"{url}?{_ML_QUERY}"


def models_url(base_url: str, experiment_id: str) -> str:
    """The experiment's Models tab (MLflow 3 logged models)."""
    return f"{ui_base(base_url)}/#/experiments/{_segment(experiment_id)}/models?{_ML_QUERY}"


def trace_url(base_url: str, experiment_id: str, trace_id: str) -> str:
    """One trace, opened in the experiment's Traces tab (``trace_id`` as MLflow has it, ``tr-...``)."""
    return f"{ui_base(base_url)}/#/experiments/{_segment(experiment_id)}/traces/{_segment(trace_id)}?{_ML_QUERY}"


def trace_link(experiment_id: str, otel_trace_id: str) -> str:
    """A link to the run's trace that works on any host serving the store (a fragment-only URL, for the run
    description): MLflow stores an OpenTelemetry trace id ``<32 hex>`` as ``tr-<32 hex>``."""
    return trace_url("", experiment_id, f"tr-{otel_trace_id.strip().lower()}").lstrip("/")


def compare_url(base_url: str, experiment_ids: Iterable[str], run_ids: Iterable[str]) -> str:
    """The compare page of ``run_ids`` (from ``experiment_ids``)."""
    def as_list(values: Iterable[str]) -> str:
        return urllib.parse.quote(json.dumps([str(v) for v in values], separators=(",", ":")), safe="")
    return (f"{ui_base(base_url)}/#/compare-runs?runs={as_list(run_ids)}&experiments={as_list(experiment_ids)}"
            f"&{_ML_QUERY}")


def local_ui_command(tracking_uri: str, port: int = LOCAL_PORT) -> str:
    """The shell command that serves a local store's UI on ``127.0.0.1:<port>``.

    No artifact flag is needed for runs logged by splade-obs: their experiments carry an absolute
    ``file://`` artifact location (``store.artifact_location_for``: ``<db folder>/artifacts/<experiment>``),
    which ``mlflow ui`` reads directly whatever its working directory. Credentials in a database URI are
    masked (``***``): the user puts them back.
    """
    uri = redact_url_credentials(tracking_uri)
    return f"mlflow ui --backend-store-uri {shlex.quote(uri)} --port {int(port)}"


def ui_hint(tracking_uri: str, experiment_id: str, run_id: str, port: int = LOCAL_PORT) -> str:
    """The console line telling where to see the run.

    * http(s) store: ``MLflow run: <run page URL>``;
    * a local store (sqlite, file, another database): the ``mlflow ui`` command that serves it, then the
      ``http://127.0.0.1:<port>/...`` run page URL;
    * Databricks: where the run is (its workspace URL is not known here).

    The line never holds credentials (URL userinfo is dropped or masked, secret environment values masked).
    """
    kind = scheme(tracking_uri)
    if kind in ("http", "https"):
        line = f"MLflow run: {run_url(tracking_uri, experiment_id, run_id)}"
    elif kind.startswith("databricks"):
        line = f"MLflow run {run_id} (experiment {experiment_id}) in Databricks"
    else:
        local = f"http://{LOCAL_HOST}:{int(port)}"
        where = ""
        db = sqlite_path(tracking_uri)
        if kind == "sqlite" and db is None:
            where = " (in-memory store: gone when the process ends)"
        line = (f"MLflow UI{where}: {local_ui_command(tracking_uri, port)}  then open "
                f"{run_url(local, experiment_id, run_id)}")
    return safe_text(line)
