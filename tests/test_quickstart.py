"""Issue 37: the README's quickstart (`splade-obs train --output-dir outputs/quickstart`, no data flags) shows
what the seed article promises: several epochs, a validation loss per epoch, retrieval metrics at the end, and
the seed's console lines.

One real run of the exact quickstart command (splade-tiny, the bundled demo set, the default sqlite MLflow
store under a temporary working directory) feeds the first tests; it is marked slow (75 optimizer steps, about
45 s on 2 idle CPU cores). The others check the defaults' resolution and the demo generator without training.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from splade_obs.config import TrainConfig
from splade_obs.data import DEMO_DIR, DEMO_EPOCHS, DEMO_RETRIEVAL_DIR, demo_path, with_demo_defaults
from splade_obs_cli.main import cli

#: What `make_demo.py` writes, relative to splade_obs/demo.
DEMO_FILES = ("train.jsonl", "val.jsonl", "retrieval/corpus.jsonl", "retrieval/queries.jsonl",
              "retrieval/qrels/test.tsv")
LOSS_LINE = r"\d+\.\d{4}"  # the seed's format: 4 decimals


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """The README's command, as a new user types it, in an empty working directory."""
    cwd = tmp_path_factory.mktemp("quickstart")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
        mp.chdir(cwd)
        res = CliRunner().invoke(cli, ["train", "--output-dir", "outputs/quickstart"])
        listed = CliRunner().invoke(cli, ["runs", "list"])
    assert res.exit_code == 0, res.output + res.stderr
    return {"cwd": cwd, "res": res, "listed": listed, "logs": cwd / "outputs" / "quickstart" / "logs",
            "uri": f"sqlite:///{cwd / 'mlruns' / 'mlflow.db'}"}


@pytest.mark.slow
def test_quickstart_metrics_file_has_val_loss_every_epoch_and_retrieval_metrics(quickstart):
    metrics = json.loads((quickstart["logs"] / "training_metrics.json").read_text())
    assert metrics["status"] == "FINISHED" and metrics["num_epochs"] == DEMO_EPOCHS == 3
    epochs = metrics["metrics_by_epoch"]
    assert list(epochs) == ["1", "2", "3"]
    for row in epochs.values():  # the seed's keys, each a real number
        assert {"train_loss", "val_loss", "learning_rate", "epoch_duration_seconds"} <= set(row)
        assert all(0 < row[k] < 10 for k in ("train_loss", "val_loss"))
    assert len({row["val_loss"] for row in epochs.values()}) == 3  # measured each epoch, not copied
    (evaluation,) = metrics["eval"]  # once, at the end, on the demo's retrieval set
    assert evaluation["split"] == "test" and evaluation["step"] == metrics["total_steps"] == 75
    scores = evaluation["metrics"]
    assert 0 < scores["ndcg_at_10"] <= 1 and 0 < scores["mrr_at_10"] <= 1
    assert scores["num_queries"] == len(_lines(DEMO_RETRIEVAL_DIR / "queries.jsonl"))


@pytest.mark.slow
def test_quickstart_mlflow_run_has_val_loss_per_epoch_and_retrieval_metrics(quickstart):
    from mlflow import MlflowClient

    client = MlflowClient(quickstart["uri"])
    (run,) = client.search_runs([client.get_experiment_by_name("splade-obs").experiment_id])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")] == [25, 50, 75]
    for name in ("eval/ndcg_at_10", "eval/mrr_at_10"):
        assert 0 < run.data.metrics[name] <= 1
    params = run.data.params
    assert params["optim.epochs"] == "3" and "data.train_file" not in params
    assert Path(params["data.val_file"]) == demo_path("val") and Path(params["eval.eval_data"]) == DEMO_RETRIEVAL_DIR
    # `runs list` shows both retrieval metrics of the run
    listed = quickstart["listed"]
    assert listed.exit_code == 0, listed.output
    header, _, row = listed.stdout.splitlines()[:3]
    starts = [m.start() for m in re.finditer(r"\S+", header)]  # columns by position: "started" holds a space
    cells = {header[a:b].strip(): row[a:b].strip() for a, b in zip(starts, [*starts[1:], None])}
    assert cells["run_id"] == run.info.run_id[:8]
    assert float(cells["ndcg@10"]) == pytest.approx(run.data.metrics["eval/ndcg_at_10"], rel=1e-3)
    assert float(cells["mrr@10"]) == pytest.approx(run.data.metrics["eval/mrr_at_10"], rel=1e-3)


@pytest.mark.slow
def test_quickstart_epoch_spans_carry_the_validation_loss(quickstart):
    spans = [json.loads(line) for line in _lines(quickstart["logs"] / "traces.jsonl")]
    epochs = [s["attributes"] for s in spans if s["name"] == "epoch"]
    assert len(epochs) == 3 and all(isinstance(a.get("splade.val.loss"), float) for a in epochs)
    metrics = json.loads((quickstart["logs"] / "training_metrics.json").read_text())["metrics_by_epoch"]
    assert [a["splade.val.loss"] for a in epochs] == [metrics[str(n)]["val_loss"] for n in (1, 2, 3)]


@pytest.mark.slow
def test_quickstart_console_reads_like_the_seed(quickstart):
    lines = [re.sub(r"^\[\w+\] \S+ \S+ - ", "", line) for line in quickstart["res"].stderr.splitlines()]
    seed = [line for line in lines if re.fullmatch(
        rf"Starting training for \d+ epochs?|Epoch \d+/\d+|Training loss: {LOSS_LINE}|Validation loss: {LOSS_LINE}",
        line)]
    shape = [re.sub(LOSS_LINE, "X", line) for line in seed]
    assert shape == ["Starting training for 3 epochs"] + [
        line.format(n) for n in (1, 2, 3) for line in ("Epoch {}/3", "Training loss: X", "Validation loss: X")]
    # the seed's line comes first; the fuller lines stay
    assert lines.index("Starting training for 3 epochs") < next(i for i, ln in enumerate(lines) if ln.startswith("Run "))
    assert sum(line.startswith("Step ") for line in lines) >= 3
    assert sum(bool(re.match(r"Epoch \d/3 done: epoch/loss=\S+ val/loss=", line)) for line in lines) == 3
    # the values printed are the epoch's own
    metrics = json.loads((quickstart["logs"] / "training_metrics.json").read_text())["metrics_by_epoch"]
    printed = [float(line.split(": ")[1]) for line in seed if line.startswith("Validation loss")]
    assert printed == [round(metrics[str(n)]["val_loss"], 4) for n in (1, 2, 3)]


# ------------------------------------------------------------------------------------- defaults, no training
def test_demo_defaults_apply_to_the_demo_set_only():
    demo = with_demo_defaults(TrainConfig())
    assert demo.optim.epochs == 3 and Path(demo.data.val_file) == demo_path("val")
    assert Path(demo.eval.eval_data) == DEMO_RETRIEVAL_DIR
    assert with_demo_defaults(demo) == demo  # filling in twice changes nothing

    short = with_demo_defaults(TrainConfig.from_mapping({"optim.max_steps": 5}))
    assert short.optim.epochs == 1 and short.data.val_file and short.eval.eval_data  # max_steps rules the length
    assert with_demo_defaults(TrainConfig.from_mapping({"optim.epochs": 1})).optim.epochs == 1  # given: kept

    user = with_demo_defaults(TrainConfig.from_mapping({"data.train_file": "mine.jsonl"}))
    assert (user.optim.epochs, user.data.val_file, user.eval.eval_data) == (1, None, None)
    mine = with_demo_defaults(TrainConfig.from_mapping({"data.val_file": "v.jsonl", "eval.eval_data": "beir"}))
    assert (mine.data.val_file, mine.eval.eval_data) == ("v.jsonl", "beir")


@pytest.mark.parametrize("word", ["none", "None", "null"])
def test_none_turns_the_demo_validation_and_evaluation_off(word):
    flags = ["--val-file", word, "--eval-data", word]
    res = CliRunner().invoke(cli, ["config", "show", "--format", "json", *flags])
    assert res.exit_code == 0, res.output
    shown = json.loads(res.stdout)
    assert shown["data"]["val_file"] is None and shown["eval"]["eval_data"] is None
    assert shown["optim"]["epochs"] == 3
    plain = json.loads(CliRunner().invoke(cli, ["config", "show", "--format", "json"]).stdout)
    assert Path(plain["data"]["val_file"]) == demo_path("val")


def test_demo_retrieval_set_is_small_and_well_formed():
    from splade_obs.beir import load_beir

    beir = load_beir(DEMO_RETRIEVAL_DIR, "test")
    assert 60 <= len(beir.queries) <= 150 and 150 <= len(beir.corpus) <= 500
    assert set(beir.qrels) == set(beir.queries)
    assert all(len(rel) == 1 and set(rel) <= set(beir.corpus) for rel in beir.qrels.values())
    # built from entities of its own: no query of the retrieval set is a training or validation query
    seen = {json.loads(line)["query"] for name in ("train", "val") for line in _lines(demo_path(name))}
    assert not seen & set(beir.queries.values())


def test_make_demo_regenerates_every_committed_file_byte_for_byte(tmp_path):
    from splade_obs.demo.make_demo import main

    main(["--out-dir", str(tmp_path)])
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == sorted(DEMO_FILES)
    for name in DEMO_FILES:
        assert (tmp_path / name).read_bytes() == (DEMO_DIR / name).read_bytes(), name


def test_the_demo_files_are_package_data():
    import tomllib

    globs = tomllib.loads((DEMO_DIR.parents[1] / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["splade_obs"]
    for name in DEMO_FILES:
        assert any(Path("demo", name).match(g) for g in globs), name


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

