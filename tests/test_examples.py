"""examples/ runs as documented: each script in its own process, on splade-tiny, in a scratch folder.

The evaluate and encode examples get the small BEIR folder of tests/_eval_utils.py (their default, the demo
retrieval set, takes longer to encode on 2 CPU cores) and the model the training example saved.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ._eval_utils import DOCS, QUERIES, read_jsonl, write_beir
from .conftest import REPO

EXAMPLES = REPO / "examples"


def run_example(name: str, *args: str, cwd: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """examples/train_from_records.py, run once: (its working folder, its stdout)."""
    cwd = tmp_path_factory.mktemp("examples")
    return cwd, run_example("train_from_records.py", "run", cwd=cwd)


def test_every_example_is_tested() -> None:
    tested = {"train_from_records.py", "evaluate_model.py", "encode_for_anserini.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested


def test_train_from_records_with_a_custom_sink(trained: tuple[Path, str]) -> None:
    import mlflow

    cwd, out = trained
    steps = [line for line in out.splitlines() if line.startswith("step ")]
    assert [s.split(":")[0] for s in steps] == ["step 1/3", "step 2/3", "step 3/3"]  # the user's sink, each step
    assert "run finished after 3 steps" in out
    assert (cwd / "run" / "final" / "config.json").is_file()
    assert (cwd / "run" / "train_records.jsonl").is_file()
    run_id = out.split("MLflow run: ")[1].split(",")[0]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlruns' / 'mlflow.db'}")
    assert client.get_run(run_id).info.status == "FINISHED"


def test_evaluate_example_prints_the_metrics(trained: tuple[Path, str], tmp_path: Path) -> None:
    cwd, _ = trained
    beir = write_beir(tmp_path / "beir")
    out = run_example("evaluate_model.py", str(cwd / "run" / "final"), str(beir), cwd=cwd)
    metrics = json.loads(out.strip().splitlines()[-1])
    assert metrics["num_docs"] == len(DOCS) and metrics["num_queries"] == len(QUERIES)
    assert 0.0 <= metrics["ndcg@10"] <= 1.0 and metrics["recall@100"] == 1.0  # 10 documents: all retrieved
    assert out.startswith(f"nDCG@10 {metrics['ndcg@10']:.4f}")


def test_encode_for_anserini_example_writes_impact_files(trained: tuple[Path, str], tmp_path: Path) -> None:
    cwd, _ = trained
    beir = write_beir(tmp_path / "beir")
    out = run_example("encode_for_anserini.py", str(cwd / "run" / "final"), str(beir), str(tmp_path / "ans"),
                      cwd=cwd)
    assert "query impacts: {" in out
    docs = read_jsonl(tmp_path / "ans" / "corpus" / "docs.jsonl")
    assert [d["id"] for d in docs] == list(DOCS)
    for doc in docs:  # JsonVectorCollection: integer impacts (Anserini reads them with asInt)
        assert doc["contents"] and doc["vector"]
        assert all(isinstance(w, int) and w > 0 for w in doc["vector"].values())
    lines = (tmp_path / "ans" / "queries.tsv").read_text(encoding="utf-8").splitlines()
    assert [line.split("\t")[0] for line in lines] == list(QUERIES)
    assert all(len(line.split("\t")) == 2 and line.split("\t")[1].split() for line in lines)
