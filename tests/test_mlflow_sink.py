"""The MLflow sink against a real sqlite store under tmp_path: first fed a realistic synthetic run through a
real EventBus, then driven by a real ``splade-obs train`` (CliRunner, real splade-tiny)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from splade_obs import tracking
from splade_obs.errors import ErrorCategory
from splade_obs.events import EventBus
from splade_obs.sinks import mlflow_sink
from splade_obs.sinks.mlflow_sink import MlflowSink, metric_name
from tests._mlflow_utils import (LONG_VALUE_LEN, artifact_paths, free_port, make_cfg, metric_steps, run_events,
                                 step_event, write_log_files)

pytestmark = pytest.mark.timeout(600)


def _client(cfg):
    from mlflow import MlflowClient
    return MlflowClient(tracking_uri=cfg.tracking.tracking_uri)


def _run_through_bus(cfg, events, shared=None, resume_run_id=None):
    bus = EventBus()
    bus.shared.update(shared or {})
    sink = MlflowSink.create(cfg, bus_shared=bus.shared, resume_run_id=resume_run_id)
    assert sink is not None
    bus.add(sink)
    for e in events:
        bus.emit(e)
    bus.close(timeout=120)
    assert bus.stats()["mlflow"] == {"failures": 0, "dropped": 0, "degraded": False}
    return bus.shared["mlflow.run_id"], bus.shared


# ------------------------------------------------------------------------------------ synthetic runs
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One synthetic FINISHED run (shared by the read-only checks below)."""
    tmp = tmp_path_factory.mktemp("mlflow-finished")
    cfg = make_cfg(tmp)
    write_log_files(cfg.log_dir)
    run_id, shared = _run_through_bus(cfg, run_events(cfg), shared={"otel.trace_id": "ab" * 16})
    return cfg, run_id, shared, _client(cfg).get_run(run_id)


def test_params_hold_the_whole_flattened_config(finished_run):
    cfg, run_id, _, run = finished_run
    params = run.data.params
    flat = cfg.flatten()
    assert set(flat) <= set(params)                       # every dotted key, nothing silently dropped
    assert params["optim.batch_size"] == str(cfg.optim.batch_size)
    assert params["loss.lambda_q"] == str(cfg.loss.lambda_q)
    assert params["data.train_digest"] == "sha256:" + "1" * 40
    long_value = params["data.train_file"]
    assert len(long_value) <= 6000 and long_value.endswith("whole value in config.yaml]")
    whole = yaml.safe_load(Path(_client(cfg).download_artifacts(run_id, "config.yaml")).read_text())
    assert whole["data"]["train_file"] == cfg.data.train_file and len(cfg.data.train_file) >= LONG_VALUE_LEN - 20


def test_metrics_are_stepped_and_named_for_mlflow(finished_run):
    cfg, run_id, _, run = finished_run
    client = _client(cfg)
    for key in ("train/loss", "train/base", "train/query_reg", "train/doc_reg", "train/lr", "train/grad_norm",
                "train/samples_per_second", "train/tokens_per_second", "train/query_nnz", "train/doc_nnz",
                "train/flops"):
        assert metric_steps(client, run_id, key) == [1, 2, 4, 5, 6], key  # step 3 was a skipped batch
    losses = {m.step: m.value for m in client.get_metric_history(run_id, "train/loss")}
    assert losses[4] == pytest.approx(0.5)
    assert metric_steps(client, run_id, "epoch/train_loss") == [6]
    assert run.data.metrics["epoch/val_loss"] == pytest.approx(0.6)
    assert "epoch/duration_seconds" in run.data.metrics
    assert run.data.metrics["eval/ndcg_at_10"] == pytest.approx(0.31)
    assert run.data.metrics["errors/DATA_ERROR"] == 1 and metric_steps(client, run_id, "errors/DATA_ERROR")[0] == 3
    assert run.data.metrics["train/skipped_batches"] == 1
    assert run.data.metrics["final/eval_ndcg_at_10"] == pytest.approx(0.31)


def test_tags_note_and_status(finished_run):
    _, _, shared, run = finished_run
    tags = run.data.tags
    assert run.info.status == "FINISHED" and run.info.run_name == "synthetic-run-0001"
    assert tags["mlflow.runName"] == "synthetic-run-0001"
    assert tags["mlflow.source.git.commit"] == "a" * 40
    assert tags["host"] == "test-host" and tags["device"] == "cpu" and tags["amp_dtype"] == "float32"
    assert tags["splade.world_size"] == "1"
    assert tags["splade.data.train.digest"] == "sha256:" + "1" * 40
    assert tags["otel.trace_id"] == "ab" * 16
    assert tags["splade.last_checkpoint_step"] == "6"
    note = tags["mlflow.note.content"]
    assert "FINISHED" in note and "/data/train.jsonl" in note and "splade-tiny" in note and "eval_ndcg@10" in note
    assert shared["mlflow.tracking_uri"].startswith("sqlite:///")


def test_artifacts_and_dataset_inputs(finished_run):
    cfg, run_id, _, run = finished_run
    paths = artifact_paths(_client(cfg), run_id)
    assert {"config.yaml", "system_info.json", "training_metrics.json", "logs/train_splade.log",
            "logs/errors.jsonl", "plots/loss_sparsity.png"} <= paths
    assert "logs/bad_records.jsonl" not in paths            # empty files are not uploaded
    png = Path(_client(cfg).download_artifacts(run_id, "plots/loss_sparsity.png")).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    inputs = {(d.dataset.name, d.tags[0].value): d.dataset for d in run.inputs.dataset_inputs}
    assert set(inputs) == {("train.jsonl", "training"), ("val.jsonl", "validation")}
    train = inputs[("train.jsonl", "training")]
    assert train.digest == ("1" * 40)[:36] and json.loads(train.source)["uri"] == "/data/train.jsonl"
    assert json.loads(train.profile)["num_examples"] == 24
    # artifacts live next to the sqlite db, never in the working directory's ./mlruns
    assert run.info.artifact_uri.startswith((Path(cfg.tracking.tracking_uri[10:]).parent / "artifacts").as_uri())


def test_failed_run_is_failed_with_error_counters(tmp_path):
    cfg = make_cfg(tmp_path)
    run_id, _ = _run_through_bus(cfg, run_events(cfg, status="FAILED", fail_at=5))
    run = _client(cfg).get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.metrics["errors/DATA_ERROR"] == 1 and run.data.metrics["errors/TRAINING_ERROR"] == 1
    assert set(metric_steps(_client(cfg), run_id, "errors/TRAINING_ERROR")) == {5}  # at the error (and final)
    assert "TRAINING_ERROR" in run.data.tags["mlflow.note.content"]
    assert run.data.tags["splade.status"] == "FAILED"


def test_metrics_are_batched_not_sent_per_step(tmp_path):
    cfg = make_cfg(tmp_path, flush_interval=3600.0)
    bus = EventBus()
    sink = MlflowSink.create(cfg, bus_shared=bus.shared)
    calls = []
    real = sink.client.log_batch

    def spy(run_id, metrics=(), params=(), tags=(), **kw):  # counts calls, passes everything through
        if metrics:
            calls.append(len(metrics))
        return real(run_id, metrics=metrics, params=params, tags=tags, **kw)

    sink.client.log_batch = spy
    bus.add(sink)
    evs = run_events(cfg, steps=range(1, 41))
    for e in evs[:5] + [e for e in evs if type(e).__name__ == "StepDone"] + [evs[-1]]:
        bus.emit(e)
    bus.close(timeout=60)
    assert sum(calls) >= 39 * 11 and len(calls) <= 2, calls   # 39 steps x 11 metrics in one or two batches
    assert metric_steps(_client(cfg), sink.run_id, "train/loss")[-1] == 40


def test_resume_continues_the_same_run_without_duplicate_points(tmp_path):
    cfg = make_cfg(tmp_path)
    first = run_events(cfg, steps=range(1, 5), status="KILLED")
    run_id, _ = _run_through_bus(cfg, first)
    assert _client(cfg).get_run(run_id).info.status == "KILLED"
    # resumed from the checkpoint at step 2, although steps up to 4 already reached MLflow
    cfg2 = cfg.replace(optim={"max_steps": 6})
    bus = EventBus()
    sink = MlflowSink.create(cfg2, bus_shared=bus.shared, resume_run_id=run_id)
    assert sink.run_id == run_id and bus.shared["mlflow.run_id"] == run_id
    assert _client(cfg).get_run(run_id).info.status == "RUNNING"
    bus.add(sink)
    for e in run_events(cfg2, steps=range(3, 7), start_step=2):
        bus.emit(e)
    bus.close(timeout=60)
    client = _client(cfg)
    run = client.get_run(run_id)
    steps = metric_steps(client, run_id, "train/loss")
    assert steps == [1, 2, 4, 5, 6] and len(steps) == len(set(steps))
    assert run.info.status == "FINISHED"
    assert run.data.tags["splade.resume_count"] == "1"
    assert json.loads(run.data.tags["splade.resume.changed_params"]) == {"optim.max_steps": "6"}
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_unreachable_store_warns_and_training_goes_on(tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    cfg = make_cfg(tmp_path, uri=f"http://user:s3cret-pw@127.0.0.1:{free_port()}")
    shared: dict = {}
    with caplog.at_level(logging.WARNING, logger="splade_obs.sinks.mlflow"):
        t0 = time.monotonic()
        assert MlflowSink.create(cfg, bus_shared=shared) is None
        assert time.monotonic() - t0 < 10
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING and r.name == "splade_obs.sinks.mlflow"]
    assert len(warnings) == 1 and "unreachable" in warnings[0] and "s3cret-pw" not in warnings[0]
    assert shared == {}


def test_unreachable_store_with_require_fails_fast_and_typed(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    cfg = make_cfg(tmp_path, uri=f"http://127.0.0.1:{free_port()}", require=True)
    with pytest.raises(tracking.TrackingUnavailableError) as info:
        MlflowSink.create(cfg, bus_shared={})
    assert info.value.category is ErrorCategory.DEPENDENCY_ERROR and info.value.exit_code == 10


def test_disabled_tracking_creates_nothing(tmp_path):
    cfg = make_cfg(tmp_path, enabled=False)
    assert MlflowSink.create(cfg, bus_shared={}) is None
    assert not (tmp_path / "m.db").exists()


def test_outage_keeps_points_and_sends_them_later_once(tmp_path):
    """Injected connection errors: points wait in the buffer and are sent once the store answers again."""
    cfg = make_cfg(tmp_path)
    bus = EventBus()
    sink = MlflowSink.create(cfg, bus_shared=bus.shared)
    sink._breaker.first_wait = 0.05
    real = sink.client.log_batch
    outage = {"on": True}

    def flaky(*a, **kw):  # fault injection: the store refuses connections while outage["on"]
        if outage["on"] and kw.get("metrics"):
            raise ConnectionRefusedError(111, "Connection refused")
        return real(*a, **kw)

    sink.client.log_batch = flaky
    evs = run_events(cfg)
    sink.handle(evs[0])
    for s in (1, 2):
        sink.handle(step_event(s))
    assert len(sink.unsent()) == 22 and sink.sent_points == 0
    outage["on"] = False
    time.sleep(0.1)
    sink.handle(step_event(4))
    assert sink.unsent() == [] and sink.sent_points == 33
    sink.close(timeout=10)
    assert metric_steps(_client(cfg), sink.run_id, "train/loss") == [1, 2, 4]


def test_full_buffer_drops_oldest_and_close_records_what_was_not_sent(tmp_path, monkeypatch):
    monkeypatch.setattr(mlflow_sink, "PENDING_LIMIT", 50)
    cfg = make_cfg(tmp_path)
    sink = MlflowSink.create(cfg, bus_shared={})

    def down(*a, **kw):  # fault injection: the store is gone for good
        raise ConnectionRefusedError(111, "Connection refused")

    sink.client.log_batch = down
    sink.client.set_terminated = down
    sink.handle(run_events(cfg)[0])
    for s in range(1, 11):
        sink.handle(step_event(s))
    assert len(sink.unsent()) == 50 and sink.dropped_points == 110 - 50
    t0 = time.monotonic()
    sink.close(timeout=3)
    assert time.monotonic() - t0 < 5
    lines = (cfg.log_dir / mlflow_sink.UNSENT_FILE).read_text().splitlines()
    header, points = json.loads(lines[0]), [json.loads(x) for x in lines[1:]]
    assert header["unsent"] == 50 and header["dropped"] == 60 and header["run_id"] == sink.run_id
    assert {p["step"] for p in points if p["key"] == "train/loss"} == {7, 8, 9, 10}  # the newest are kept
    assert len(points) == 50 and points[-1] == {"key": "train/doc_reg", "value": pytest.approx(0.2), "step": 10,
                                                "timestamp": points[-1]["timestamp"]}


# ------------------------------------------------------------------------------------- helpers' units
def test_default_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking.default_tracking_uri(tmp_path)
    assert uri == f"sqlite:///{tmp_path.resolve()}/mlruns/mlflow.db" and (tmp_path / "mlruns").is_dir()
    assert tracking.artifact_location_for(uri, "splade-obs") == (tmp_path.resolve() / "mlruns" / "artifacts" /
                                                                "splade-obs").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.default_tracking_uri(tmp_path) == "http://127.0.0.1:5000"


def test_strip_credentials_and_run_names():
    assert tracking.strip_credentials("https://bob:pw@mlflow.example:443/x") == "https://mlflow.example:443/x"
    assert tracking.strip_credentials("sqlite:////tmp/a.db") == "sqlite:////tmp/a.db"
    name = tracking.generate_run_name(7)
    assert name == tracking.generate_run_name(7) and len(name.split("-")) == 3 and name[-4:].isdigit()
    assert len({tracking.generate_run_name(i) for i in range(50)}) > 40


@pytest.mark.parametrize("raw", ["ndcg@10", "eval/recall@100", "weird name!(x)", "a//b", "/lead"])
def test_metric_names_pass_mlflow_validation(raw):
    from mlflow.utils.validation import _validate_metric_name
    _validate_metric_name(metric_name(raw))  # raises MlflowException when invalid
    assert metric_name("ndcg@10") == "ndcg_at_10"


# ------------------------------------------------------------------------------------------ runs CLI
def test_runs_list_and_compare(finished_run, tmp_path):
    from cli.main import cli

    cfg, run_id, _, _ = finished_run
    cfg2 = make_cfg(tmp_path, uri=cfg.tracking.tracking_uri).replace(optim={"batch_size": 8})
    second, _ = _run_through_bus(cfg2, run_events(cfg2))
    runner = CliRunner()
    uri = cfg.tracking.tracking_uri
    out = runner.invoke(cli, ["runs", "list", "--tracking-uri", uri, "--experiment-name", "t"])
    assert out.exit_code == 0, out.output
    assert run_id in out.output and second in out.output and "FINISHED" in out.output
    out = runner.invoke(cli, ["runs", "compare", run_id, second, "--tracking-uri", uri])
    assert out.exit_code == 0, out.output
    row = next(line for line in out.output.splitlines() if "optim.batch_size" in line)
    assert row.startswith("* ") and "16" in row and "8" in row          # differing values are marked
    assert any("final/train_loss" in line for line in out.output.splitlines())
    bad = runner.invoke(cli, ["runs", "compare", "0" * 32, "--tracking-uri", uri])
    assert bad.exit_code == 9 and "error[FILE_SYSTEM_ERROR]" in bad.output


# ----------------------------------------------------------------------------------- real training
def _train(tmp_path, *extra):
    from cli.main import cli
    from tests.conftest import TINY_ARGS

    args = ["train", "--max-steps", "4", *TINY_ARGS, "--otel-exporter", "none", "--progress", "none",
            "--output-dir", str(tmp_path / "out"), "--tracking-uri", f"sqlite:///{tmp_path}/m.db",
            "--experiment-name", "e2e", *extra]
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def _only_run(tmp_path):
    from mlflow import MlflowClient
    client = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    runs = client.search_runs([client.get_experiment_by_name("e2e").experiment_id])
    assert len(runs) == 1
    return client, runs[0]


@pytest.mark.slow
def test_train_cli_tracks_everything_and_resume_appends(tmp_path):
    import mlflow.pyfunc

    res = _train(tmp_path, "--run-name", "e2e-run", "--save-steps", "2", "--json-logs")
    assert res.exit_code == 0, res.output
    client, run = _only_run(tmp_path)
    rid = run.info.run_id
    assert run.info.status == "FINISHED" and run.info.run_name == "e2e-run"
    assert run.data.params["optim.batch_size"] == "4" and run.data.params["model.max_doc_length"] == "32"
    assert metric_steps(client, rid, "train/loss") == [1, 2, 3, 4]
    for key in ("train/lr", "train/grad_norm", "train/query_nnz", "train/doc_nnz", "train/flops",
                "train/samples_per_second", "epoch/train_loss"):
        assert key in run.data.metrics, key
    assert run.data.tags["device"] == "cpu" and "mlflow.note.content" in run.data.tags
    assert {d.tags[0].value for d in run.inputs.dataset_inputs} == {"training"}
    paths = artifact_paths(client, rid)
    assert {"config.yaml", "system_info.json", "training_metrics.json", "logs/train_splade.log",
            "logs/train_splade.jsonl", "model/hf/config.json", "splade_model/MLmodel"} <= paths
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/m.db")
    try:
        model = mlflow.pyfunc.load_model(f"runs:/{rid}/splade_model")
    finally:
        mlflow.set_tracking_uri(None)
    weights = model.predict(["a query about proteins"])
    assert len(weights) == 1 and weights[0] and all(w > 0 for w in weights[0].values())

    res = _train(tmp_path, "--resume", "auto", "--max-steps", "6")
    assert res.exit_code == 0, res.output
    client, run = _only_run(tmp_path)
    steps = metric_steps(client, rid, "train/loss")
    assert run.info.run_id == rid and run.info.status == "FINISHED"
    assert steps == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_train_cli_failed_run_is_failed_with_error_counters(tmp_path):
    res = _train(tmp_path, "--inject-fault", "batch:1:exception", "--max-skipped-batches", "0")
    assert res.exit_code != 0
    _, run = _only_run(tmp_path)
    assert run.info.status == "FAILED"
    errors = {k: v for k, v in run.data.metrics.items() if k.startswith("errors/")}
    assert errors and all(v >= 1 for v in errors.values())
    assert run.data.tags["splade.status"] == "FAILED"


@pytest.mark.slow
def test_train_cli_register_model_creates_one_version_of_this_run(tmp_path):
    from mlflow import MlflowClient

    res = _train(tmp_path, "--max-steps", "1", "--register-model", "splade-e2e")
    assert res.exit_code == 0, res.output
    client, run = _only_run(tmp_path)
    versions = MlflowClient(f"sqlite:///{tmp_path}/m.db").search_model_versions("name='splade-e2e'")
    assert [(v.name, v.run_id) for v in versions] == [("splade-e2e", run.info.run_id)]
    assert metric_steps(client, run.info.run_id, "train/loss") == [1]
    assert versions[0].source.endswith("/splade_model")
    assert run.data.tags["splade.registered_model"] == f"splade-e2e/{versions[0].version}"
