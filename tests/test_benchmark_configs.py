"""The shipped benchmark configs are valid training configs, and the recipe benchmark's dev split is sound."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from splade_obs.config import TrainConfig, flatten, load_config_file
from tests._eval_utils import QRELS, bench_module, read_jsonl, write_beir

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _recipe_module():
    return bench_module("bench_scifact_recipe")


def _tiny_recipe_module(monkeypatch, in_process: bool = True):
    """The recipe script with short texts and small batches, for real CLI runs on a tiny BEIR folder.

    ``in_process``: the script's CLI calls go to the same click commands in this interpreter (``CliRunner``)
    instead of a new ``python -m splade_obs_cli.main`` each: same commands and arguments, without the ~7 s of torch and
    transformers imports per call that made these tests minutes long on a 2-core CPU. One test keeps the
    script's own subprocess calls."""
    module = _recipe_module()
    monkeypatch.setitem(module.COMMON, "max_doc_length", 32)
    monkeypatch.setitem(module.COMMON, "max_query_length", 16)
    monkeypatch.setitem(module.COMMON, "batch_size", 4)
    if in_process:
        from click.testing import CliRunner

        from splade_obs_cli.main import cli as main

        def run(*args: str) -> None:  # the script's cli(): a failing command raises, as check=True does
            result = CliRunner().invoke(main, list(args), catch_exceptions=False)
            if result.exit_code != 0:
                raise subprocess.CalledProcessError(result.exit_code, ["splade-obs", *args], output=result.output)

        monkeypatch.setattr(module, "cli", run)
    return module


@pytest.mark.parametrize("path", sorted((BENCH / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_benchmark_configs_are_valid_training_configs(path: Path) -> None:
    cfg = TrainConfig.from_mapping(flatten(load_config_file(path)), source=str(path))
    cfg.validate(str(path))
    assert cfg.model.max_doc_length == 256 and cfg.model.max_query_length == 64


def test_recipe_configs_are_valid_and_mined_negatives_feed_only_distillation(tmp_path) -> None:
    module = _recipe_module()
    for name, recipe in module.RECIPES.items():
        path = module.write_config(tmp_path / f"{name}.toml", recipe)
        cfg = TrainConfig.from_mapping(flatten(load_config_file(path)), source=str(path))
        cfg.validate(str(path))
        assert cfg.optim.learning_rate == recipe["learning_rate"] and cfg.data.num_negatives == recipe["num_negatives"]
        if recipe["mine"]:
            assert "--teacher-scores" in recipe["mine"] and cfg.loss.distillation != "none"
            # mined "negatives" may be unjudged positives: they never enter a cross-entropy
            assert cfg.loss.contrastive_weight == 0.0 or cfg.loss.contrastive_negatives == "in_batch"
    shipped = TrainConfig.from_mapping(flatten(load_config_file(BENCH / "configs" / "scifact_distill.toml")))
    # the shipped config is the recipe best on dev in the recorded results
    dev = json.loads((BENCH / "results" / "scifact_recipe.json").read_text())["dev"]["recipes"]
    chosen = module.RECIPES[module.best_on_dev(dev)]
    assert (shipped.optim.epochs, shipped.optim.learning_rate, shipped.data.num_negatives) == (
        chosen["epochs"], chosen["learning_rate"], chosen["num_negatives"])
    assert (shipped.loss.distillation, shipped.loss.contrastive_weight) == (
        chosen["loss"]["distillation"], chosen["loss"]["contrastive_weight"])
    assert shipped.model.max_doc_length == module.doc_length(chosen)


def test_dev_split_holds_out_whole_queries_and_keeps_every_judgement(tmp_path) -> None:
    module = _recipe_module()
    data = write_beir(tmp_path / "beir", split="train")
    folder = module.dev_split(data, tmp_path / "split", num_dev=2, seed=0)

    def rows(split: str) -> list[tuple[str, str, str]]:
        lines = (folder / "qrels" / f"{split}.tsv").read_text().splitlines()[1:]
        return [tuple(line.split("\t")) for line in lines if line]

    dev, train = rows("dev"), rows("train")
    assert len({q for q, _, _ in dev}) == 2
    assert not {q for q, _, _ in dev} & {q for q, _, _ in train}
    assert sorted(dev + train) == sorted((q, d, str(r)) for q, d, r in QRELS)
    assert (folder / "corpus.jsonl").read_text() == (data / "corpus.jsonl").read_text()
    # the same seed gives the same split
    again = module.dev_split(data, tmp_path / "again", num_dev=2, seed=0)
    assert (again / "qrels" / "dev.tsv").read_text() == (folder / "qrels" / "dev.tsv").read_text()


@pytest.mark.parametrize("init", ["previous", "base"])
def test_recipe_rounds_mine_with_and_train_on_from_the_previous_round(tmp_path, monkeypatch, init) -> None:
    """A two-round recipe through the real CLI on a tiny BEIR folder: round 2's teacher comes from round 1's
    model (the --model of its mining), its training starts from that model (or from splade-tiny when the round
    says ``"init": "base"``), and the result is round 2's, scored at round 2's document length."""
    pytest.importorskip("bm25s", reason="bm25s is in the test extra")
    module = _tiny_recipe_module(monkeypatch)
    stage = {"mine": ["--method", "hybrid", "--teacher-scores", "--num-negatives", "2", "--depth", "5"],
             "epochs": 1, "learning_rate": 1e-4, "num_negatives": 2,
             "loss": {"distillation": "margin_mse", "contrastive_weight": 0.0}}
    second_stage = {**stage, "max_doc_length": 24, **({"init": "base"} if init == "base" else {})}
    monkeypatch.setitem(module.RECIPES, "two-rounds", {**stage, "rounds": [second_stage]})
    data = write_beir(tmp_path / "beir", split="train")
    work = tmp_path / "work" / "two-rounds"
    row = module.run_recipe("two-rounds", data, data, "train", work)
    first, second = work / "run" / "final", work / "round2" / "run" / "final"
    assert row["model"] == str(second) and (second / "config.json").is_file()
    round2 = load_config_file(work / "round2" / "config.toml")
    assert round2["model"]["name"] == (str(first) if init == "previous" else "splade-tiny")
    assert round2["model"]["max_doc_length"] == 24 and load_config_file(work / "config.toml")["model"]["max_doc_length"] == 32
    assert json.loads((work / "train_metrics.json").read_text())["max_doc_length"] == 24  # scored as trained
    teachers = [read_jsonl(p) for p in [*(tmp_path / "work").glob("teacher-*.jsonl"), work / "round2" / "teacher.jsonl"]]
    assert len(teachers) == 2 and len(teachers[0]) == len(teachers[1])
    # the round-2 teacher fuses BM25 with the trained model, not with splade-tiny: its SPLADE half moved
    assert [r["scores"] for r in teachers[0]] != [r["scores"] for r in teachers[1]]
    assert 0.0 <= row["ndcg@10"] <= 1.0 and row["split"] == "train"
    # the TREC run it wrote reads back into the same ranking: its per-query nDCG@10 averages to the row's
    from splade_obs.beir import load_beir
    from splade_obs.evaluation import ndcg_per_query

    per_query = ndcg_per_query(module.read_trec_run(Path(row["trec_run"])), load_beir(data, "train").qrels)
    assert sum(per_query.values()) / len(per_query) == pytest.approx(row["ndcg@10"], abs=1e-9)


def test_a_several_seed_recipe_trains_each_seed_and_scores_their_average(tmp_path, monkeypatch) -> None:
    """``"seeds"``: one training per seed through the real CLI (its config carrying that seed), the models
    averaged into the round's model (``splade-obs average``), the average scored and each seed's model too;
    ``--rescore`` makes the same average again from the seed models without training."""
    pytest.importorskip("bm25s", reason="bm25s is in the test extra")
    from safetensors.torch import load_file

    module = _tiny_recipe_module(monkeypatch)
    recipe = {"mine": ["--method", "hybrid", "--teacher-scores", "--num-negatives", "2", "--depth", "5"],
              "epochs": 1, "learning_rate": 1e-3, "num_negatives": 2, "seeds": [1, 2],
              "loss": {"distillation": "margin_mse", "contrastive_weight": 0.0}}
    monkeypatch.setitem(module.RECIPES, "soup", recipe)
    data = write_beir(tmp_path / "beir", split="train")
    work = tmp_path / "work" / "soup"
    row = module.run_recipe("soup", data, data, "train", work)
    assert [load_config_file(work / f"seed-{s}" / "config.toml")["optim"]["seed"] for s in (1, 2)] == [1, 2]
    w1, w2 = (load_file(str(work / f"seed-{s}" / "run" / "final" / "model.safetensors")) for s in (1, 2))
    assert any(not torch.equal(w1[k], w2[k]) for k in w1)  # two seeds, two different models
    final = work / "run" / "final"
    assert row["model"] == str(final)
    soup = load_file(str(final / "model.safetensors"))
    assert all(torch.allclose(soup[k].double(), (w1[k].double() + w2[k].double()) / 2, atol=1e-6) for k in soup)
    sources = json.loads((final / "averaged_from.json").read_text())["models"]
    assert [(m["path"], m["weight"]) for m in sources] == [
        (str(work / f"seed-{s}" / "run" / "final"), 0.5) for s in (1, 2)]
    assert sorted(row["ingredients"]) == ["1", "2"]
    assert all(0.0 <= r["ndcg@10"] <= 1.0 and Path(r["trec_run"]).is_file() for r in row["ingredients"].values())
    assert Path(row["trec_run"]).parent == work  # the average's run, not an ingredient's
    # --rescore: no training; the average is made again from the same seed models, so it scores the same
    shutil.rmtree(work / "run")
    again = module.run_recipe("soup", data, data, "train", work, train=False)
    assert again["ndcg@10"] == row["ndcg@10"] and "train_s" not in again
    assert load_file(str(final / "model.safetensors")).keys() == soup.keys()


def test_dev_choice_ranks_a_recipe_by_its_mean_over_seeds_where_known() -> None:
    best_on_dev = _recipe_module().best_on_dev
    rows = {"lucky-seed": {"ndcg@10": 0.682, "ndcg@10_seed_mean": 0.669}, "soup": {"ndcg@10": 0.676},
            "other": {"ndcg@10": 0.674}}
    assert best_on_dev(rows) == "soup"
    rows["soup"]["ndcg@10"] = 0.660
    assert best_on_dev(rows) == "other"
    assert best_on_dev({"only": {"ndcg@10": 0.5}}) == "only"


def test_an_adapt_recipe_adapts_once_mines_with_splade_tiny_and_trains_the_adapted_model(tmp_path, monkeypatch) -> None:
    """``"adapt"``: ``splade-obs adapt`` runs on the corpus through the real CLI (once: recipes that adapt alike
    share it), the teacher is still mined with splade-tiny (the same file a recipe without adaptation uses),
    and training starts from the adapted model."""
    pytest.importorskip("bm25s", reason="bm25s is in the test extra")
    module = _tiny_recipe_module(monkeypatch, in_process=False)  # the script's own subprocess calls
    stage = {"mine": ["--method", "hybrid", "--teacher-scores", "--num-negatives", "2", "--depth", "5"],
             "epochs": 1, "learning_rate": 1e-4, "num_negatives": 2,
             "loss": {"distillation": "margin_mse", "contrastive_weight": 0.0}}
    adapt = ["--epochs", "1", "--max-length", "16", "--batch-size", "4", "--learning-rate", "1e-3"]
    monkeypatch.setitem(module.RECIPES, "plain", stage)
    monkeypatch.setitem(module.RECIPES, "adapted", {**stage, "adapt": adapt})
    data = write_beir(tmp_path / "beir", split="train")
    root = tmp_path / "work"
    module.run_recipe("plain", data, data, "train", root / "plain")
    row = module.run_recipe("adapted", data, data, "train", root / "adapted")
    adapted = sorted(root.glob("adapted-*"))
    assert len(adapted) == 1 and (adapted[0] / "model.safetensors").is_file()
    record = json.loads((adapted[0] / "adapted_from.json").read_text())
    assert record["corpus"] == str(data / "corpus.jsonl") and record["settings"]["epochs"] == 1
    assert len(list(root.glob("teacher-*.jsonl"))) == 1  # one teacher for both: mined with splade-tiny
    assert load_config_file(root / "adapted" / "config.toml")["model"]["name"] == str(adapted[0])
    assert load_config_file(root / "plain" / "config.toml")["model"]["name"] == "splade-tiny"
    assert row["model"] == str(root / "adapted" / "run" / "final") and 0.0 <= row["ndcg@10"] <= 1.0
    stamp = (adapted[0] / "model.safetensors").stat().st_mtime_ns
    # a second recipe that adapts alike reuses the model: same folder, not made again
    assert module.adapted_model(module.RECIPES["adapted"], data, root / "another") == str(adapted[0])
    assert sorted(root.glob("adapted-*")) == adapted
    assert (adapted[0] / "model.safetensors").stat().st_mtime_ns == stamp


def test_an_idf_recipe_scores_with_the_weighted_index_and_keeps_the_plain_score(tmp_path, monkeypatch) -> None:
    """``"idf_power"``: the recipe's model is scored through ``evaluate --idf-power``, the row keeps the same
    model's plain scores (``without_idf``), and the significance test adds the paired view between the two."""
    from splade_obs.beir import load_beir
    from splade_obs.evaluation import ndcg_per_query
    from splade_obs.hub import resolve_model

    module = _tiny_recipe_module(monkeypatch)
    assert module.RECIPES["distill-titles-2ep-kl-lr2e-4-idf"]["idf_power"] > 0
    monkeypatch.setitem(module.RECIPES, "idf", {"mine": None, "epochs": 1, "learning_rate": 1e-4,
                                                "num_negatives": 0, "loss": {}, "idf_power": 1.0})
    data = write_beir(tmp_path / "beir", split="train")
    work = tmp_path / "work" / "idf"
    shutil.copytree(resolve_model("splade-tiny"), work / "run" / "final")  # --rescore: a model is there
    row = module.run_recipe("idf", data, data, "train", work, train=False)
    assert row["idf_power"] == 1.0
    weighted = json.loads((work / "train_metrics.json").read_text())
    plain = json.loads((work / "train-idf0_metrics.json").read_text())
    assert (weighted["idf_power"], plain["idf_power"]) == (1.0, 0.0)
    assert row["ndcg@10"] == weighted["metrics"]["ndcg@10"]
    assert row["without_idf"]["ndcg@10"] == plain["metrics"]["ndcg@10"]
    assert row["doc_nnz"] == row["without_idf"]["doc_nnz"]  # one model, two index weightings
    runs = [module.read_trec_run(Path(r["trec_run"])) for r in (row, row["without_idf"])]
    assert runs[0] != runs[1], "the weighting changes the scores"
    qrels = load_beir(data, "train").qrels
    cmp = module.significance(row, [], data, "train")["the same model without idf weighting"]
    per_query = [ndcg_per_query(r, qrels) for r in runs]
    means = [sum(p.values()) / len(qrels) for p in per_query]
    assert cmp["mean_diff"] == pytest.approx(means[0] - means[1])
