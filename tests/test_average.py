"""`splade-obs average`: weight averaging ("model soup") of real splade-tiny models, provenance, typed errors,
atomic output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from splade_obs_cli.main import cli
from splade_obs.errors import EXIT_CODES, ErrorCategory


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_path) -> Path:
    """A real splade-tiny fine-tuned for a few steps on the demo data: weights that differ from the start."""
    from splade_obs.config import TrainConfig
    from splade_obs.run import run_training

    out = tmp_path_factory.mktemp("trained")
    cfg = TrainConfig.from_mapping({
        "checkpoint": {"output_dir": str(out)}, "optim": {"batch_size": 4, "max_steps": 3, "learning_rate": 1e-3},
        "model": {"max_query_length": 16, "max_doc_length": 32}, "tracking": {"enabled": False},
        "tracing": {"exporter": "none"}, "logging": {"progress": "none"}})
    assert run_training(cfg).status == "FINISHED"
    return out / "final"


def _average(*args: str):
    return CliRunner().invoke(cli, ["average", *args])


def test_weighted_average_of_two_real_models_loads_and_records_its_inputs(trained, tiny_model_path, tmp_path):
    out = tmp_path / "soup"
    res = _average(tiny_model_path, str(trained), "--weight", "3", "--weight", "1", "--output", str(out))
    assert res.exit_code == 0, res.output
    a = load_file(str(Path(tiny_model_path) / "model.safetensors"))
    b = load_file(str(trained / "model.safetensors"))
    soup = load_file(str(out / "model.safetensors"))
    assert soup.keys() == a.keys() == b.keys()
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the inputs differ, so the mean is not trivial
    for k in soup:
        assert soup[k].dtype == a[k].dtype
        expected = 0.75 * a[k].double() + 0.25 * b[k].double()
        assert torch.allclose(soup[k].double(), expected, atol=1e-6, rtol=0), k
    record = json.loads((out / "averaged_from.json").read_text())
    assert [m["weight"] for m in record["models"]] == [0.75, 0.25] and record["method"] == "weighted"
    from splade_obs.hub import sha256_file
    assert [m["weights_sha256"] for m in record["models"]] == [sha256_file(Path(tiny_model_path) / "model.safetensors"),
                                                              sha256_file(trained / "model.safetensors")]
    assert json.loads(res.stdout)["output"] == str(out)
    # the soup is a model like any other: it loads and encodes
    from splade_obs.model import SpladeEncoder
    enc = SpladeEncoder.from_pretrained(str(out))
    assert enc.encode(["a query about rivers"], max_length=16).nnz > 0


def test_uniform_average_of_a_model_with_itself_is_that_model(trained, tmp_path):
    out = tmp_path / "same"
    res = _average(str(trained), str(trained), "-o", str(out))
    assert res.exit_code == 0, res.output
    a, soup = load_file(str(trained / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert all(torch.equal(a[k], soup[k]) for k in a)
    assert json.loads((out / "averaged_from.json").read_text())["method"] == "uniform"


@pytest.mark.parametrize("case, category, words", [
    ("one_model", ErrorCategory.CONFIG_ERROR, "at least two models"),
    ("weights", ErrorCategory.CONFIG_ERROR, "1 weights for 2 models"),
    ("negative", ErrorCategory.CONFIG_ERROR, "non-negative"),
    ("nan", ErrorCategory.CONFIG_ERROR, "finite"),  # a NaN weight wrote an all-NaN model
    ("architecture", ErrorCategory.MODEL_ERROR, "not the same architecture"),
    ("vocabulary", ErrorCategory.MODEL_ERROR, "tokenizer.json differs"),
    ("missing", ErrorCategory.MODEL_ERROR, "does not exist"),
])
def test_bad_inputs_are_one_line_typed_errors(trained, tmp_path, case, category, words):
    other = tmp_path / "other"
    shutil.copytree(trained, other)
    if case == "architecture":
        cfg = json.loads((other / "config.json").read_text())
        cfg["num_hidden_layers"] += 1
        (other / "config.json").write_text(json.dumps(cfg))
    if case == "vocabulary":
        tok = json.loads((other / "tokenizer.json").read_text())
        vocab = tok["model"]["vocab"]
        vocab["splade-obs-new-token"] = vocab.pop("[unused0]")
        (other / "tokenizer.json").write_text(json.dumps(tok))
    args = {"one_model": [str(trained)], "weights": [str(trained), str(other), "--weight", "1"],
            "negative": [str(trained), str(other), "--weight", "1", "--weight", "-1"],
            "nan": [str(trained), str(other), "--weight", "nan", "--weight", "1"],
            "architecture": [str(trained), str(other)], "vocabulary": [str(trained), str(other)],
            "missing": [str(trained), str(tmp_path / "nowhere" / "model")]}[case]
    out = tmp_path / "soup"
    res = _average(*args, "--output", str(out))
    assert res.exit_code == EXIT_CODES[category], res.output
    assert res.stderr.startswith(f"error[{category.value}]:") and words in res.stderr
    assert "Traceback" not in res.stderr and not out.exists()


def test_a_failed_write_leaves_the_previous_output_whole(trained, tiny_model_path, tmp_path, monkeypatch):
    out = tmp_path / "soup"
    assert _average(str(trained), str(trained), "-o", str(out)).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def disk_full(*args, **kwargs):  # injected fault: the weights file cannot be written
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", disk_full)
    res = _average(tiny_model_path, str(trained), "-o", str(out))
    assert res.exit_code != 0 and "No space left" in res.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging folder left behind


def test_an_output_folder_that_holds_other_files_is_refused_and_kept(trained, tiny_model_path, tmp_path):
    keep = tmp_path / "runs"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    res = _average(tiny_model_path, str(trained), "--output", str(keep))
    assert res.exit_code == EXIT_CODES[ErrorCategory.FILE_SYSTEM_ERROR], res.output
    assert "no config.json" in res.output and "Traceback" not in res.output
    assert [p.name for p in keep.iterdir()] == ["notes.txt"]
