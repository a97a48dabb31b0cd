"""splade_obs.sinks.mlflow.ui: the links into the MLflow UI and the console hint.

The links themselves are proved in a real browser by tests/test_ui_browser.py (scripts/ui_check.py); here:
their exact form, that the routes and keys they rely on are those of the installed MLflow UI bundle, and that
the hint's ``mlflow ui`` command parses back to the store and never carries credentials.
"""

from __future__ import annotations

import json
import shlex
import urllib.parse
from pathlib import Path

import mlflow
import pytest

from splade_obs.sinks.mlflow import ui
from splade_obs.sinks.mlflow.store import artifact_location_for

BASE = "http://127.0.0.1:5000"
RUN = "0123456789abcdef0123456789abcdef"
TRACE = "tr-fedcba9876543210fedcba9876543210"


def _bundle_text() -> str:
    """All JavaScript of the installed MLflow UI (about 25 MB)."""
    js = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"
    files = sorted(js.glob("*.js"))
    if not files:
        pytest.skip(f"this MLflow install has no UI bundle under {js}")
    return "\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)


def test_links_open_the_model_training_views() -> None:
    assert ui.experiment_url(BASE, "7") == f"{BASE}/#/experiments/7/runs?workflowType=machine_learning"
    assert ui.run_url(BASE, "7", RUN) == f"{BASE}/#/experiments/7/runs/{RUN}?workflowType=machine_learning"
    assert (ui.run_url(BASE, "7", RUN, "system-metrics")
            == f"{BASE}/#/experiments/7/runs/{RUN}/system-metrics?workflowType=machine_learning")
    assert (ui.run_url(BASE, "7", RUN, "artifacts/model/MLmodel")
            == f"{BASE}/#/experiments/7/runs/{RUN}/artifacts/model/MLmodel?workflowType=machine_learning")
    assert ui.models_url(BASE, "7") == f"{BASE}/#/experiments/7/models?workflowType=machine_learning"
    assert ui.trace_url(BASE, "7", TRACE) == f"{BASE}/#/experiments/7/traces/{TRACE}?workflowType=machine_learning"


def test_compare_url_carries_json_lists_of_runs_and_experiments() -> None:
    url = ui.compare_url(BASE, ["7"], [RUN, "b" * 32])
    head, query = url.split("?", 1)
    assert head == f"{BASE}/#/compare-runs"
    q = urllib.parse.parse_qs(query)
    assert json.loads(q["runs"][0]) == [RUN, "b" * 32]
    assert json.loads(q["experiments"][0]) == ["7"]
    assert q["workflowType"] == ["machine_learning"]


def test_base_url_loses_credentials_query_and_trailing_slash_but_keeps_a_path_prefix() -> None:
    assert ui.ui_base("https://alice:s3cr3t-pw@mlflow.example.com:8443/mlflow/?token=x#/old") == \
        "https://mlflow.example.com:8443/mlflow"
    url = ui.run_url("https://alice:s3cr3t-pw@mlflow.example.com/mlflow/", "1", RUN)
    assert url.startswith("https://mlflow.example.com/mlflow/#/experiments/1/runs/")
    assert "s3cr3t" not in url and "alice" not in url


def test_ids_are_path_segments() -> None:
    url = ui.run_url(BASE, "1/../2", "a b")
    assert "/#/experiments/1%2F..%2F2/runs/a%20b?" in url


def test_unknown_run_tab_is_refused() -> None:
    with pytest.raises(ValueError, match="model-metrics"):
        ui.run_url(BASE, "1", RUN, "metrics")


def test_experiment_tags_name_a_model_training_experiment() -> None:
    assert ui.experiment_tags() == {"mlflow.experimentKind": "custom_model_development"}
    ui.experiment_tags()["x"] = "y"  # a fresh dict each call: callers may add to it
    assert "x" not in ui.experiment_tags()


def test_routes_and_keys_are_those_of_the_installed_ui() -> None:
    """What the links rely on, in the MLflow UI bundle this project installs: a new MLflow that renames a
    route or the workflow switch fails here (then re-check with scripts/ui_check.sh)."""
    js = _bundle_text()
    for route in ("/experiments/:experimentId/runs", "/experiments/:experimentId/runs/:runUuid/*",
                  "/experiments/:experimentId/models", "/experiments/:experimentId/traces/:traceId",
                  "/compare-runs"):
        assert f'"{route}"' in js, route
    for tab in ui.RUN_TABS:
        assert f'"{tab}"' in js, tab
    assert 'get("workflowType")' in js  # the query parameter the workflow context reads
    assert f'"{ui.MACHINE_LEARNING}"' in js and f'"{ui.CUSTOM_MODEL_DEVELOPMENT}"' in js
    assert f'"{ui.EXPERIMENT_KIND_TAG}"' in js
    key, version = ui.WORKFLOW_STORAGE_KEY.rsplit("_v", 1)  # the UI stores `${key}_v${version}`
    assert f'key:"{key}",version:{version}' in js


def test_hint_for_a_server_is_the_run_page() -> None:
    line = ui.ui_hint("https://bob:hunter2-pw@mlflow.example.com/", "3", RUN)
    assert line == f"MLflow run: https://mlflow.example.com/#/experiments/3/runs/{RUN}?workflowType=machine_learning"


def test_hint_for_a_sqlite_store_is_a_command_that_parses_back_to_the_store(tmp_path: Path) -> None:
    db = tmp_path / "my runs" / "mlruns" / "mlflow.db"  # a space: the command must quote it
    uri = f"sqlite:///{db}"
    line = ui.ui_hint(uri, "1", RUN)
    command, url = line.split(": ", 1)[1].split("  then open ")
    argv = shlex.split(command)
    assert argv[:2] == ["mlflow", "ui"]
    assert argv[argv.index("--backend-store-uri") + 1] == uri
    assert argv[argv.index("--port") + 1] == "5000"
    assert "--default-artifact-root" not in argv  # the experiment's own artifact location is absolute:
    assert artifact_location_for(uri, "splade-obs").startswith("file:///")  # mlflow ui reads it as it is
    assert url == f"http://127.0.0.1:5000/#/experiments/1/runs/{RUN}?workflowType=machine_learning"
    assert ":5001/" in ui.ui_hint(uri, "1", RUN, port=5001) and "--port 5001" in ui.ui_hint(uri, "1", RUN, port=5001)


def test_hint_never_shows_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    line = ui.ui_hint("postgresql://mlflow:pg-pass-123@db.internal:5432/mlflow", "1", RUN)
    assert "pg-pass-123" not in line
    # masked, and quoted for the shell (the *): the user puts the credentials back
    assert "--backend-store-uri 'postgresql://***@db.internal:5432/mlflow'" in line
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok-abcdef-987")
    line = ui.ui_hint("sqlite:////data/tok-abcdef-987/mlflow.db", "1", RUN)  # a secret value in the path
    assert "tok-abcdef-987" not in line and "***" in line


def test_hint_for_an_in_memory_store_says_it_is_gone() -> None:
    assert "in-memory" in ui.ui_hint("sqlite:///:memory:", "1", RUN)
