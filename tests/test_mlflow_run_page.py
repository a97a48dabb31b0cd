"""What a user sees of a run in MLflow: errors in sight, one name per fact, no clutter (issue 31, points 5 and 7).

One real CLI run of splade-tiny (a skipped batch, in-training evaluation, a best checkpoint) on a sqlite store,
read back with ``MlflowClient``; the failed-run tags through the bus with a secret in the failure message.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from splade_obs.events import RunFinished
from tests._eval_utils import write_beir
from tests._mlflow_utils import create_sink, make_cfg, open_bus, run_events

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def degraded_run(tmp_path_factory):
    from mlflow import MlflowClient

    from splade_obs_cli.main import cli

    tmp = tmp_path_factory.mktemp("run-page")
    uri = f"sqlite:///{tmp}/mlflow.db"
    beir = write_beir(tmp / "beir")
    res = CliRunner().invoke(cli, [
        "train", "--output-dir", str(tmp / "out"), "--max-steps", "8", "--batch-size", "4",
        "--max-query-length", "16", "--max-doc-length", "32", "--tracking-uri", uri, "--experiment-name", "page",
        "--eval-data", str(beir), "--eval-steps", "4", "--save-best-metric", "ndcg@10",
        "--inject-fault", "batch:3:exception", "--progress", "none",
        "--log-every-steps", "2", "--no-log-model"])
    assert res.exit_code == 0, res.output + res.stderr
    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("page").experiment_id])[0]
    return client, run, res.output + res.stderr


def test_errors_are_counted_and_the_run_is_marked_degraded(degraded_run):
    client, run, _ = degraded_run
    m, tags = run.data.metrics, run.data.tags
    assert m["errors/total"] == 1 and m["errors/TRAINING_ERROR"] == 1 and m["train/skipped_batches"] == 1
    assert tags["splade.health"] == "degraded" and tags["splade.errors.total"] == "1"
    assert "splade.error.category" not in tags  # the run did not fail
    first = tags["mlflow.note.content"].splitlines()[0]
    assert first.startswith("**FINISHED**") and "1 errors (TRAINING_ERROR: 1)" in first and "1 skipped batches" in first
    # the runs table can filter on it
    found = client.search_runs([run.info.experiment_id], filter_string="tags.`splade.health` = 'degraded'")
    assert [r.info.run_id for r in found] == [run.info.run_id]


def test_the_console_says_how_to_open_the_run_page(degraded_run):
    client, run, output = degraded_run
    db = client.tracking_uri.removeprefix("sqlite:///")
    page = (f"http://127.0.0.1:5000/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
            "?workflowType=machine_learning")
    line = next(x for x in output.splitlines() if "MLflow UI:" in x)
    assert "mlflow ui --backend-store-uri" in line and db in line and line.rstrip().endswith(page)


def test_the_description_links_to_the_runs_trace(degraded_run):
    client, run, _ = degraded_run
    otel_id = run.data.tags["otel.trace_id"]
    link = f"(#/experiments/{run.info.experiment_id}/traces/tr-{otel_id}?workflowType=machine_learning)"
    assert f"**Trace** [`{otel_id}`]{link}" in run.data.tags["mlflow.note.content"]
    trace = client.get_trace(f"tr-{otel_id}")  # the link's target is in the store, tied to this run
    assert trace.info.request_metadata.get("mlflow.sourceRun") == run.info.run_id


def test_one_point_per_fact(degraded_run):
    client, run, _ = degraded_run
    rid, names = run.info.run_id, set(run.data.metrics)
    assert "epoch/epoch" not in names and not any(k.startswith("final/") for k in names)
    # several checkpoints at one step (the last save, the best, the final model): one point, their sum
    steps = [p.step for p in client.get_metric_history(rid, "checkpoint/duration_seconds")]
    assert steps and len(steps) == len(set(steps)), steps
    # a per-step epoch position for charts: step / steps per epoch (100 examples / 4 per batch = 25 steps)
    epoch = {p.step: p.value for p in client.get_metric_history(rid, "train/epoch")}
    loss_steps = {p.step for p in client.get_metric_history(rid, "train/loss")}
    assert set(epoch) == loss_steps and epoch[max(epoch)] == pytest.approx(max(epoch) / 100)
    assert "epoch/epoch" not in names


def test_params_and_tags_are_set_values_once(degraded_run):
    _, run, _ = degraded_run
    params, tags = run.data.params, run.data.tags
    assert "None" not in params.values() and "tracking.run_name" not in params and "checkpoint.resume" not in params
    assert params["eval.save_best_metric"] == "ndcg@10"
    assert tags["splade.amp_dtype"] and tags["splade.device"] == "cpu"
    assert not {"amp_dtype", "device"} & set(tags)


def test_the_eval_dataset_is_a_run_input_with_context_evaluation(degraded_run):
    _, run, _ = degraded_run
    contexts = {}
    for d in run.inputs.dataset_inputs:
        ctx = {t.key: t.value for t in d.tags}.get("mlflow.data.context")
        contexts[ctx] = d.dataset
    assert set(contexts) >= {"training", "evaluation"}
    ev = contexts["evaluation"]
    assert ev.name == "beir" and json.loads(ev.profile)["format"] == "beir"
    assert run.data.params["data.eval_num_examples"] == str(json.loads(ev.profile)["num_examples"])


def test_a_failed_run_names_its_error_in_tags_without_secrets(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("SPLADE_TEST_TOKEN", "s3cr3t-token-value")
    cfg = make_cfg(tmp_path)
    sink = create_sink(cfg)
    bus, ids = open_bus(sink)
    events = run_events(cfg, status="FAILED", fail_at=5)
    end = events[-1]
    assert isinstance(end, RunFinished)
    events[-1] = RunFinished(status="FAILED", step=end.step, duration_seconds=1.0, counters=end.counters,
                             error={"category": "TRAINING_ERROR",
                                    "message": "loss is NaN (from https://bob:hunter2@host/x, s3cr3t-token-value)"})
    for e in events:
        bus.emit(e)
    bus.close(timeout=60)
    run = MlflowClient(ids.tracking_uri).get_run(ids.mlflow_run_id)
    tags = run.data.tags
    assert tags["splade.health"] == "failed" and tags["splade.error.category"] == "TRAINING_ERROR"
    assert tags["splade.errors.total"] == "2" and run.data.metrics["errors/total"] == 2
    msg = tags["splade.error.message"]
    assert msg.startswith("loss is NaN") and "hunter2" not in msg and "s3cr3t-token-value" not in msg
    note = tags["mlflow.note.content"]
    assert "hunter2" not in note and "s3cr3t" not in note
    assert note.splitlines()[0].startswith("**FAILED**") and "**Failure** `TRAINING_ERROR`" in note.split("\n- ")[0]
