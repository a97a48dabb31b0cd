"""The Python API (docs/api.md): ``from splade_obs import train, TrainConfig, SpladeEncoder, evaluate, encode, Sink``.

Real parts: splade-tiny, the demo records, a sqlite MLflow store and the OTel file exporter under tmp_path.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from splade_obs.errors import ConfigError, DataError

from ._eval_utils import read_jsonl, write_beir

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "splade_obs" / "demo" / "train.jsonl"
HEAVY = ("torch", "mlflow", "transformers", "scipy", "opentelemetry.sdk")


def demo_records(n: int = 16) -> list[dict]:
    return read_jsonl(DEMO)[:n]


def test_the_public_names_import_without_torch_or_mlflow() -> None:
    code = ("import sys, splade_obs; before = [m for m in %r if m in sys.modules];"
            "from splade_obs import train, TrainConfig, SpladeEncoder, evaluate, encode, Sink, RecordingSink;"
            "after = [m for m in %r if m in sys.modules];"
            "print(before, after, sorted(splade_obs.__all__))") % (HEAVY, HEAVY)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("[] [] "), out  # nothing heavy at import, nor when the names are taken
    import splade_obs

    for name in splade_obs.__all__:
        assert getattr(splade_obs, name) is not None, name
    assert (REPO / "splade_obs" / "py.typed").is_file()
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"py.typed"' in pyproject  # shipped as package data: type checkers use the annotations


def test_entries_are_the_api_functions_and_no_module_shadows_them() -> None:
    """``splade_obs.train`` / ``.encode`` / ``.evaluate`` are the API functions, also after every module loaded
    (the modules behind them are ``trainer``, ``encoding`` and ``evaluation``)."""
    import inspect

    import splade_obs
    import splade_obs.encoding  # noqa: F401
    import splade_obs.evaluation  # noqa: F401
    import splade_obs.trainer  # noqa: F401
    from splade_obs import api

    for name in ("train", "encode", "evaluate"):
        assert getattr(splade_obs, name) is getattr(api, name), name
        assert f"splade_obs.{name}" not in sys.modules, f"a module named splade_obs.{name} shadows the function"
    assert "data" in inspect.signature(splade_obs.train).parameters


def _user_sink_class():
    """A user's sink: what it sees, and the root logger's handlers as they stand while the run goes."""
    from splade_obs import Sink

    class StepCollector(Sink):
        name = "step-collector"

        def __init__(self) -> None:
            self.events: list = []
            self.root_handlers_during_run: list | None = None

        def handle(self, event) -> None:  # noqa: ANN001
            self.events.append(event)
            super().handle(event)

        def on_step_done(self, e) -> None:  # noqa: ANN001
            self.root_handlers_during_run = list(logging.getLogger().handlers)

    return StepCollector


def test_train_a_dataset_with_a_user_sink_leaves_the_callers_root_logger_alone(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets", reason="datasets (the test extra) is not installed")
    import mlflow

    from splade_obs import RecordingSink, Sink, TrainConfig, train

    root = logging.getLogger()
    caller_records: list[logging.LogRecord] = []

    class CallerHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            caller_records.append(record)

    mine = CallerHandler()
    root.addHandler(mine)
    old_level = root.level
    root.setLevel(logging.ERROR)
    before = list(root.handlers)
    try:
        cfg = TrainConfig.from_mapping({
            "checkpoint": {"output_dir": str(tmp_path / "out")}, "optim": {"batch_size": 4, "max_steps": 3, "seed": 7},
            "model": {"max_query_length": 16, "max_doc_length": 32}, "logging": {"progress": "none"},
            "data": {"val_file": "none"}, "eval": {"eval_data": "none"}, "tracing": {"exporter": "file"}})
        user, rec = _user_sink_class()(), RecordingSink()

        class Broken(Sink):  # a user sink that fails is isolated like a built-in one: the run goes on
            name = "broken"

            def on_step_done(self, e) -> None:  # noqa: ANN001
                raise RuntimeError("user bug")

        result = train(cfg, data=datasets.Dataset.from_list(demo_records()), sinks=[Broken(), user, rec])
        assert root.handlers == before and root.level == logging.ERROR  # unchanged after the run ...
        assert user.root_handlers_during_run == before  # ... and while it ran
    finally:
        root.removeHandler(mine)
        root.setLevel(old_level)
    assert logging.getLogger("splade_obs").handlers == []  # the run's handlers are gone
    # the caller's own handler still hears the run's records, through propagation
    assert any(r.name == "splade_obs.train" and r.levelno == logging.INFO for r in caller_records)

    assert result.status == "FINISHED" and result.bus_stats["broken"]["failures"] == 3
    assert Path(result.model_path, "config.json").is_file()
    assert "epoch/loss" in result.metrics and np.isfinite(result.metrics["epoch/loss"])
    run = mlflow.MlflowClient(tracking_uri=result.ids.tracking_uri).get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert len(result.trace_id or "") == 32
    assert [e.to_dict() for e in user.events] == [e.to_dict() for e in rec.events]  # same events, same order
    kinds = [e.kind for e in user.events]
    assert "run_started" in kinds and kinds.count("step_done") == 3 and kinds[-1] == "run_finished"
    data_file = tmp_path / "out" / "train_records.jsonl"
    assert read_jsonl(data_file) == demo_records()  # the records, as the run read and digested them


def test_records_list_dataset_and_file_give_the_same_training_file(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets", reason="datasets (the test extra) is not installed")
    from splade_obs import TrainConfig
    from splade_obs.api import _data_file

    from splade_obs.data import load_training_data

    records = [{"query": f"q{i}", "positives": [f"p{i}"], "negatives": [f"n{i}"], "scores": [2.0 + i, 0.5]}
               for i in range(4)]
    a = _data_file(records, TrainConfig.from_mapping({"checkpoint": {"output_dir": str(tmp_path / "a")}}))
    frame_like = [{**r, "scores": np.asarray(r["scores"], dtype=np.float64)} for r in records]  # numpy values
    b = _data_file(datasets.Dataset.from_list(frame_like),
                   TrainConfig.from_mapping({"checkpoint": {"output_dir": str(tmp_path / "b")}}))
    assert read_jsonl(Path(a)) == records and Path(a).read_bytes() == Path(b).read_bytes()
    examples = load_training_data(b).examples
    assert [(e.query, e.positives, e.negatives, e.scores) for e in examples] == [
        (r["query"], tuple(r["positives"]), tuple(r["negatives"]), tuple(r["scores"])) for r in records]
    assert examples[1].location == f"{b}:2"  # errors in the run name the written file's lines
    assert _data_file(str(DEMO), TrainConfig()) == str(DEMO)  # a path is used as it is


def test_bad_records_fail_before_the_run_naming_record_numbers(tmp_path: Path) -> None:
    from splade_obs import train

    records = demo_records(6)
    records[2] = {"query": "q only"}
    records[4] = {"query": "", "positive": "p"}
    with pytest.raises(DataError) as info:
        train({"checkpoint.output_dir": str(tmp_path / "out")}, data=records)
    err = info.value
    assert err.location == "records[2]" and err.context["field"] == "positive"
    assert "records[4]" in err.message and 'field "query" is empty' in err.message
    assert not (tmp_path / "out" / "final").exists()
    with pytest.raises(ConfigError, match="data is dict"):
        train({"checkpoint.output_dir": str(tmp_path / "out")}, data={"train": records})
    with pytest.raises(DataError) as info:
        train({"checkpoint.output_dir": str(tmp_path / "out")}, data=[{"query": "q", "positive": "p", "x": object()}])
    assert info.value.location == "records[0]"


def test_a_failed_run_raises_its_typed_error_after_the_sinks_closed(tiny_cfg, tmp_path: Path) -> None:
    from splade_obs import RecordingSink, train
    from splade_obs.errors import TrainingError

    rec = RecordingSink()
    cfg = tiny_cfg(recovery={"inject_faults": ("step:1:exception",), "max_consecutive_failures": 1})
    with pytest.raises(TrainingError) as info:
        train(cfg, data=demo_records(), sinks=[rec])
    outcome = info.value.run_result
    assert outcome.status == "FAILED" and outcome.result.error is info.value
    assert rec.events[-1].kind == "run_finished" and rec.events[-1].status == "FAILED"  # every sink heard the end
    assert logging.getLogger("splade_obs").handlers == []


def test_unknown_sink_name_is_a_config_error_listing_the_installed_ones(tmp_path: Path) -> None:
    from splade_obs import train

    with pytest.raises(ConfigError) as info:
        train({"checkpoint.output_dir": str(tmp_path / "out")}, data=demo_records(), sinks=["no-such-sink"])
    assert "'no-such-sink' is not an installed sink; available:" in info.value.message
    assert info.value.context["field"] == "--sink"


@pytest.fixture(scope="module")
def encoder():
    from splade_obs import SpladeEncoder

    return SpladeEncoder("splade-tiny", device="cpu", max_doc_length=32, max_query_length=16)


def test_splade_encoder_gives_a_sparse_matrix_or_dicts(encoder) -> None:
    import scipy.sparse as sp

    texts = ["Coffee is a brewed drink.", "Insulin regulates blood glucose.", "Jupiter is a gas giant."]
    matrix = encoder.encode(texts)
    assert sp.issparse(matrix) and matrix.shape == (3, len(encoder.vocabulary)) and matrix.nnz > 0
    assert np.allclose(matrix.toarray(), encoder.module.encode(texts, max_length=32).toarray())
    dicts = encoder.encode_documents(texts, output="dict")
    for row, vec in zip(matrix.toarray(), dicts):
        nz = np.flatnonzero(row)
        assert vec == {encoder.vocabulary[i]: pytest.approx(float(row[i])) for i in nz}
        assert list(vec.values()) == sorted(vec.values(), reverse=True)  # heaviest first
    impacts = encoder.encode_queries(texts, output="dict", quantize_scale=100)
    assert all(isinstance(w, int) and w > 0 for vec in impacts for w in vec.values())
    with pytest.raises(ConfigError, match="one string"):
        encoder.encode("not a list")


def test_evaluate_and_encode_match_the_cli(encoder, tmp_path: Path) -> None:
    from splade_obs import encode, evaluate
    from splade_obs_cli.main import cli

    beir = write_beir(tmp_path / "beir")
    metrics = evaluate(encoder, beir, max_query_length=16, max_doc_length=32)
    out = CliRunner().invoke(cli, ["evaluate", "--model", "splade-tiny", "--data", str(beir), "--max-query-length",
                                   "16", "--max-doc-length", "32", "--progress", "none", "--device", "cpu"])
    assert out.exit_code == 0, out.output
    cli_metrics = json.loads(out.stdout)["metrics"]
    for key in ("ndcg@10", "mrr@10", "recall@100", "map@100"):
        assert metrics[key] == pytest.approx(cli_metrics[key]), key

    stats = encode(encoder, beir, tmp_path / "api.jsonl", kind="corpus", max_length=32, quantize_scale=100)
    out = CliRunner().invoke(cli, ["encode", "--model", "splade-tiny", "--input", str(beir), "--kind", "corpus",
                                   "--max-length", "32", "--quantize-scale", "100", "--device", "cpu",
                                   "--output", str(tmp_path / "cli.jsonl"), "--progress", "none"])
    assert out.exit_code == 0, out.output
    assert stats.count == 10
    assert (tmp_path / "api.jsonl").read_text() == (tmp_path / "cli.jsonl").read_text()


def test_package_scoped_logging_captures_the_libraries_and_restores_their_levels(tmp_path: Path) -> None:
    """What train() sets up: library records reach the run's files; the root logger is never touched."""
    import warnings

    import transformers.utils.logging as hf_logging  # its first use adds handlers of its own: not ours to judge

    hf_logging.get_logger("transformers")
    from splade_obs.logging_setup import CAPTURED_LOGGERS, setup_logging, teardown_logging

    root = logging.getLogger()
    root_before = (list(root.handlers), root.level)
    levels_before = {name: logging.getLogger(name).level for name in CAPTURED_LOGGERS}
    handlers_before = {name: list(logging.getLogger(name).handlers) for name in CAPTURED_LOGGERS}
    setup_logging("INFO", tmp_path, capture_root=False)
    assert (list(root.handlers), root.level) == root_before
    logging.getLogger("splade_obs.train").info("our line")
    logging.getLogger("transformers.modeling_utils").warning("a transformers warning")
    logging.getLogger("mlflow.tracking").warning("an mlflow warning")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("a python warning", UserWarning)
    teardown_logging()
    assert {name: logging.getLogger(name).level for name in CAPTURED_LOGGERS} == levels_before
    assert {name: logging.getLogger(name).handlers for name in CAPTURED_LOGGERS} == handlers_before
    text = (tmp_path / "train_splade.log").read_text()
    for line in ("our line", "a transformers warning", "an mlflow warning", "a python warning"):
        assert line in text, line
