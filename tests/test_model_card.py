"""The model card (``README.md``) of ``final/`` and ``best/`` (issue 33.2).

A real ``splade-obs train`` (CliRunner, splade-tiny, retrieval evaluation every 2 steps, ``--save-best-metric``,
a sqlite MLflow store) writes both cards: they parse with ``huggingface_hub.ModelCard.load``, their metadata
holds the sparse-encoder fields and the evaluation in the ``model-index`` format (the scores the run measured
for that model), their body the training facts, and each is the MLflow logged model's description. A run
without evaluation has no model-index; a card that cannot be built leaves the model saved and says why.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests._eval_utils import write_beir

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    from click.testing import CliRunner
    from mlflow import MlflowClient
    from splade_obs_cli.main import cli
    from tests.conftest import TINY_ARGS

    tmp = tmp_path_factory.mktemp("card")
    uri = f"sqlite:///{tmp}/m.db"
    beir = write_beir(tmp / "scifact-mini")
    res = CliRunner().invoke(cli, [
        "train", "--max-steps", "4", *TINY_ARGS, "--otel-exporter", "none", "--progress", "none",
        "--output-dir", str(tmp / "out"), "--tracking-uri", uri, "--experiment-name", "card",
        "--eval-data", str(beir), "--eval-steps", "2", "--save-best-metric", "ndcg@10"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("card").experiment_id])
    return {"out": tmp / "out", "client": client, "run": run}


def _load(folder: Path):
    from huggingface_hub import ModelCard

    return ModelCard.load(folder / "README.md", ignore_metadata_errors=False)


@pytest.mark.parametrize("kind", ["final", "best"])
def test_the_card_parses_and_its_metadata_validates(trained, kind):
    from huggingface_hub import ModelCardData

    card = _load(trained["out"] / kind)
    data = card.data
    assert data.library_name == "sentence-transformers"
    assert {"sparse-encoder", "splade", "learned-sparse-retrieval"} <= set(data.tags)
    assert data.base_model == "splade-tiny" and data.license == "apache-2.0"
    assert data.datasets == ["splade-obs-demo", "scifact-mini"]
    # the metadata round-trips through ModelCardData (model-index parsed back into EvalResults)
    again = ModelCardData(**data.to_dict(), ignore_metadata_errors=False)
    assert [r.metric_type for r in again.eval_results] == [r.metric_type for r in data.eval_results]
    index = data.to_dict()["model-index"][0]["results"][0]
    assert index["task"]["type"] == "sparse-information-retrieval"
    assert index["dataset"] == {"name": "scifact-mini", "type": "scifact-mini", "split": "test"}
    assert {"ndcg_at_10", "mrr_at_10", "recall_at_100"} <= {m["type"] for m in index["metrics"]}
    for section in ("## Training", "## Sparsity", "## Evaluation", "## Usage", "SparseEncoder(", "splade-obs encode"):
        assert section in card.text, section


def test_the_scores_are_those_the_run_measured_for_that_model(trained):
    client, run = trained["client"], trained["run"]
    final = {r.metric_type: r.metric_value for r in _load(trained["out"] / "final").data.eval_results}
    for key, value in final.items():  # the last evaluation, of the final step's weights
        assert run.data.metrics[f"eval/{key}"] == pytest.approx(value), key
    history = client.get_metric_history(run.info.run_id, "eval/ndcg_at_10")
    assert max(h.step for h in history) == 4
    best_json = json.loads((trained["out"] / "best" / "metrics.json").read_text())
    best = {r.metric_type: r.metric_value for r in _load(trained["out"] / "best").data.eval_results}
    assert best["ndcg_at_10"] == pytest.approx(best_json["ndcg@10"])
    assert f"optimizer step {best_json['step']}." in _load(trained["out"] / "best").text


def test_the_body_says_how_the_model_was_trained(trained):
    text = _load(trained["out"] / "final").text
    assert "| optimizer steps | 4 |" in text
    assert "| max length (query / document tokens) | 16 / 32 |" in text
    assert "| batch size x accumulation | 4 x 1 |" in text
    assert "CPU cores" in text and "torch " in text       # hardware
    assert "non-zero terms per query (evaluation)" in text and "(training, last epoch's mean)" in text
    assert "| ndcg@10 |" in text


def test_the_card_is_the_logged_models_description(trained):
    client, run = trained["client"], trained["run"]
    models = {m.name: m for m in client.search_logged_models([run.info.experiment_id])}
    for name, kind in (("splade_model", "final"), ("best_model", "best")):
        readme = (trained["out"] / kind / "README.md").read_text(encoding="utf-8")
        assert models[name].tags["mlflow.note.content"] == readme.strip(), kind


def test_a_run_without_evaluation_has_no_model_index(tiny_cfg):
    from splade_obs.run import run_training

    cfg = tiny_cfg(optim={"max_steps": 2})
    assert run_training(cfg).status == "FINISHED"
    card = _load(cfg.output_dir / "final")
    assert not card.data.eval_results and "model-index" not in card.data.to_dict()
    assert "did not evaluate retrieval" in card.text and "(training, last epoch's mean)" in card.text
    assert card.data.datasets == ["splade-obs-demo"]


def test_a_card_that_cannot_be_built_leaves_the_model_saved(tiny_cfg, monkeypatch):
    from splade_obs import model_card
    from splade_obs.bus import RecordingSink
    from splade_obs.events import Message
    from splade_obs.run import run_training

    def broken(facts):
        raise ValueError("injected: no card")

    monkeypatch.setattr(model_card, "build_card", broken)
    sink = RecordingSink()
    cfg = tiny_cfg(optim={"max_steps": 1})
    assert run_training(cfg, extra_sinks=[sink]).status == "FINISHED"
    assert (cfg.output_dir / "final" / "model.safetensors").exists()
    assert not (cfg.output_dir / "final" / "README.md").exists()
    texts = [m.text for m in sink.of(Message)]
    assert any("no model card for final/" in t and "injected: no card" in t for t in texts), texts


def test_a_local_base_model_is_named_by_its_folder_and_keeps_its_license(tmp_path, tiny_model_path):
    import shutil

    from splade_obs.config import TrainConfig
    from splade_obs.model_card import CardFacts, write_model_card

    base = tmp_path / "private" / "my-base-model"
    shutil.copytree(tiny_model_path, base)
    (base / "README.md").write_text("---\nlicense: mit\n---\n# base\n", encoding="utf-8")
    cfg = TrainConfig.from_mapping({"model": {"name": str(base)}, "data": {"train_file": str(tmp_path / "pairs.jsonl")},
                                    "checkpoint": {"output_dir": str(tmp_path / "out")}})
    (tmp_path / "out").mkdir()
    text = write_model_card(tmp_path / "out", CardFacts(kind="final", step=3, epoch=1, config=cfg,
                                                       train_means={"epoch/query_nnz": 12.5}))
    card = _load(tmp_path / "out")
    assert card.data.base_model == "my-base-model" and card.data.license == "mit"
    assert card.data.datasets == ["pairs.jsonl"] and not card.data.eval_results
    assert str(tmp_path) not in text and "private" not in text    # no local path in a card meant to be shared
    assert "| non-zero terms per query (training, last epoch's mean) | 12.5000 |" in text
