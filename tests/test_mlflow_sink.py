"""The MLflow sink against a real sqlite store under tmp_path: first fed a realistic synthetic run through a
real EventBus, then driven by a real ``splade-obs train`` (CliRunner, real splade-tiny). Also: the sink
package learns everything from events (it imports nothing from ``splade_obs.config``)."""

from __future__ import annotations

import ast
import json
import logging
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

import splade_obs
from splade_obs.errors import ErrorCategory
from splade_obs.bus import RecordingSink
from splade_obs.events import RunFinished, RunStarted, TraceOpened, TrackingRunOpened, metric_name
from splade_obs.sinks.mlflow import MlflowOptions, MlflowSink, store, transport
from tests._mlflow_utils import (LONG_VALUE_LEN, artifact_paths, create_sink, free_port, make_cfg, metric_steps,
                                 open_bus, run_events, step_event, write_log_files)

pytestmark = pytest.mark.timeout(600)


def _client(cfg):
    from mlflow import MlflowClient
    return MlflowClient(tracking_uri=cfg.tracking.tracking_uri)


TRACE_ID = "ab" * 16
TRACE_OPENED = TraceOpened(trace_id=TRACE_ID, traceparent=f"00-{TRACE_ID}-{'cd' * 8}-01")


def _run_through_bus(cfg, events, resume_run_id=None):
    sink = create_sink(cfg, resume_run_id=resume_run_id)
    assert sink is not None
    bus, ids = open_bus(sink)
    for e in events:
        bus.emit(e)
    bus.close(timeout=120)
    assert bus.stats()["mlflow"] == {"failures": 0, "dropped": 0, "degraded": False}
    return ids.mlflow_run_id, ids


# ------------------------------------------------------------------------------------ synthetic runs
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One synthetic FINISHED run (shared by the read-only checks below)."""
    tmp = tmp_path_factory.mktemp("mlflow-finished")
    cfg = make_cfg(tmp)
    write_log_files(cfg.log_dir)
    run_id, ids = _run_through_bus(cfg, [TRACE_OPENED, *run_events(cfg)])  # the trace is known before RunStarted
    return cfg, run_id, ids, _client(cfg).get_run(run_id)


def test_params_hold_the_whole_flattened_config(finished_run):
    cfg, run_id, _, run = finished_run
    params = run.data.params
    flat = cfg.flatten()
    set_keys = {k for k, v in flat.items() if v is not None}
    assert set_keys <= set(params)                        # every dotted key that is set, nothing silently dropped
    assert not {k for k, v in flat.items() if v is None} & set(params)   # unset settings are left out
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
                "train/retrieval_flops", "train/lambda_q", "train/lambda_d"):
        assert metric_steps(client, run_id, key) == [1, 2, 4, 5, 6], key  # step 3 was a skipped batch
    losses = {m.step: m.value for m in client.get_metric_history(run_id, "train/loss")}
    assert losses[4] == pytest.approx(0.5)
    assert metric_steps(client, run_id, "epoch/loss") == [6]
    assert run.data.metrics["epoch/query_nnz"] == pytest.approx(25.0)
    assert run.data.metrics["val/loss"] == pytest.approx(0.6)
    assert "epoch/duration_seconds" in run.data.metrics and run.data.metrics["epoch/skipped_batches"] == 1
    assert run.data.metrics["eval/ndcg_at_10"] == pytest.approx(0.31)
    assert run.data.metrics["eval/mrr_at_10"] == pytest.approx(0.25) and "eval/duration_seconds" in run.data.metrics
    assert run.data.metrics["errors/DATA_ERROR"] == 1 and metric_steps(client, run_id, "errors/DATA_ERROR")[0] == 3
    assert run.data.metrics["train/skipped_batches"] == 1
    assert "checkpoint/duration_seconds" in run.data.metrics and "run/duration_seconds" in run.data.metrics
    assert not [k for k in run.data.metrics if k.startswith("final/")]   # the last point is the final value


def test_metric_keys_are_the_canonical_names_of_the_events(finished_run):
    """One rule: every key in the run is a name some event's ``metrics()`` returned, unchanged."""
    cfg, _, _, run = finished_run
    names = {n for e in run_events(cfg) for n in e.metrics()}
    assert set(run.data.metrics) == names


def test_tags_note_and_status(finished_run):
    cfg, run_id, ids, run = finished_run
    tags = run.data.tags
    assert run.info.status == "FINISHED" and run.info.run_name == "synthetic-run-0001"
    assert tags["mlflow.runName"] == "synthetic-run-0001"
    assert tags["mlflow.source.git.commit"] == "a" * 40
    assert tags["host"] == "test-host" and tags["splade.device"] == "cpu" and tags["splade.amp_dtype"] == "float32"
    assert "device" not in tags and "amp_dtype" not in tags  # one tag per fact
    assert tags["splade.world_size"] == "1"
    assert tags["splade.data.train.digest"] == "sha256:" + "1" * 40
    assert tags["otel.trace_id"] == TRACE_ID
    assert tags["splade.model"] == cfg.model.name and tags["splade.amp_mode"] == cfg.optim.mixed_precision
    assert tags["splade.last_checkpoint_step"] == "6"
    note = tags["mlflow.note.content"]
    assert "FINISHED" in note and "/data/train.jsonl" in note and "splade-tiny" in note
    assert "eval/ndcg_at_10: 0.31" in note and f"`{TRACE_ID}`" in note
    first = note.splitlines()[0]   # errors first: the run page shows them without "Show more"
    assert "1 errors (DATA_ERROR: 1)" in first and "1 skipped batches" in first
    assert tags["splade.health"] == "degraded" and tags["splade.errors.total"] == "1"
    # the run was announced on the bus, with the URI the sink uses (no credentials)
    assert ids.mlflow_run_id == run_id and ids.mlflow_experiment_id == run.info.experiment_id
    assert ids.tracking_uri == cfg.tracking.tracking_uri and ids.tracking_uri.startswith("sqlite:///")


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
    events = run_events(cfg, status="FAILED", fail_at=5)
    events.insert(2, TRACE_OPENED)  # the trace id may also arrive after RunStarted
    run_id, _ = _run_through_bus(cfg, events)
    run = _client(cfg).get_run(run_id)
    assert run.data.tags["otel.trace_id"] == TRACE_ID and TRACE_ID in run.data.tags["mlflow.note.content"]
    assert run.info.status == "FAILED"
    assert run.data.metrics["errors/DATA_ERROR"] == 1 and run.data.metrics["errors/TRAINING_ERROR"] == 1
    assert set(metric_steps(_client(cfg), run_id, "errors/TRAINING_ERROR")) == {5}  # at the error (and final)
    assert "TRAINING_ERROR" in run.data.tags["mlflow.note.content"]
    assert run.data.tags["splade.status"] == "FAILED"


def test_metrics_are_batched_not_sent_per_step(tmp_path):
    cfg = make_cfg(tmp_path, flush_interval=3600.0)
    sink = create_sink(cfg)
    calls = []
    real = sink.transport.client.log_batch

    def spy(run_id, metrics=(), params=(), tags=(), **kw):  # counts calls, passes everything through
        if metrics:
            calls.append(len(metrics))
        return real(run_id, metrics=metrics, params=params, tags=tags, **kw)

    sink.transport.client.log_batch = spy
    bus, _ = open_bus(sink)
    evs = run_events(cfg, steps=range(1, 41))
    for e in evs[:5] + [e for e in evs if type(e).__name__ == "StepDone"] + [evs[-1]]:
        bus.emit(e)
    bus.close(timeout=60)
    per_step = len(step_event(1).metrics())
    assert sum(calls) >= 39 * per_step and len(calls) <= 2, calls   # 39 steps x 13 metrics in one or two batches
    assert metric_steps(_client(cfg), sink.run_id, "train/loss")[-1] == 40


def test_resume_continues_the_same_run_without_duplicate_points(tmp_path):
    cfg = make_cfg(tmp_path)
    first = run_events(cfg, steps=range(1, 5), status="KILLED")
    run_id, _ = _run_through_bus(cfg, first)
    assert _client(cfg).get_run(run_id).info.status == "KILLED"
    assert "epoch/loss" not in _client(cfg).get_run(run_id).data.metrics  # a partial epoch is not logged
    # resumed from the checkpoint at step 2, although steps up to 4 already reached MLflow
    cfg2 = cfg.replace(optim={"max_steps": 6})
    sink = create_sink(cfg2, resume_run_id=run_id)
    assert sink.run_id == run_id
    assert _client(cfg).get_run(run_id).info.status == "RUNNING"
    rec = RecordingSink()
    bus, ids = open_bus(sink, rec)
    (opened,) = rec.of(TrackingRunOpened)
    assert ids.mlflow_run_id == run_id and opened.resumed is True
    for e in run_events(cfg2, steps=range(3, 7), start_step=2):
        bus.emit(e)
    bus.close(timeout=60)
    client = _client(cfg)
    run = client.get_run(run_id)
    steps = metric_steps(client, run_id, "train/loss")
    assert steps == [1, 2, 4, 5, 6] and len(steps) == len(set(steps))
    assert metric_steps(client, run_id, "epoch/loss") == [6]
    assert run.info.status == "FINISHED"
    assert run.data.tags["splade.resume_count"] == "1"
    assert json.loads(run.data.tags["splade.resume.changed_params"]) == {"optim.max_steps": "6"}
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_unreachable_store_warns_and_training_goes_on(tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    cfg = make_cfg(tmp_path, uri=f"http://user:s3cret-pw@127.0.0.1:{free_port()}")
    with caplog.at_level(logging.WARNING, logger="splade_obs.sinks.mlflow"):
        t0 = time.monotonic()
        assert create_sink(cfg) is None
        assert time.monotonic() - t0 < 10
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING and r.name == "splade_obs.sinks.mlflow"]
    assert len(warnings) == 1 and "unreachable" in warnings[0] and "s3cret-pw" not in warnings[0]


def test_unreachable_store_with_require_fails_fast_and_typed(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    cfg = make_cfg(tmp_path, uri=f"http://127.0.0.1:{free_port()}", require=True)
    with pytest.raises(store.TrackingUnavailableError) as info:
        create_sink(cfg)
    assert info.value.category is ErrorCategory.DEPENDENCY_ERROR and info.value.exit_code == 10


def test_disabled_tracking_creates_nothing(tmp_path):
    from splade_obs.run import build_sinks

    cfg = make_cfg(tmp_path, enabled=False).replace(tracing={"exporter": "none"})
    assert not [s for s in build_sinks(cfg) if isinstance(s, MlflowSink)]
    assert not (tmp_path / "m.db").exists()


def _until(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def test_outage_keeps_points_and_sends_them_later_once(tmp_path):
    """Injected connection errors: points wait in the buffer and are sent once the store answers again."""
    cfg = make_cfg(tmp_path)
    sink = create_sink(cfg)
    t = sink.transport
    t.breaker.first_wait = 0.05
    real = t.client.log_batch
    outage = {"on": True, "refused": 0}

    def flaky(*a, **kw):  # fault injection: the store refuses connections while outage["on"]
        if outage["on"] and kw.get("metrics"):
            outage["refused"] += 1
            raise ConnectionRefusedError(111, "Connection refused")
        return real(*a, **kw)

    t.client.log_batch = flaky
    evs = run_events(cfg)
    per_step = len(step_event(1).metrics())
    sink.handle(evs[0])
    for s in (1, 2):
        sink.handle(step_event(s))
    assert _until(lambda: outage["refused"] >= 2)          # retried with backoff, not given up
    assert len(t.unsent()) == 2 * per_step and t.sent_points == 0
    outage["on"] = False
    sink.handle(step_event(4))
    assert t.wait_idle(10)
    assert t.unsent() == [] and t.sent_points == 3 * per_step
    sink.close(timeout=10)
    assert metric_steps(_client(cfg), sink.run_id, "train/loss") == [1, 2, 4]
    assert not (cfg.log_dir / transport.UNSENT_FILE).exists()   # everything arrived: no unsent file


def test_full_buffer_spills_oldest_to_the_unsent_file_and_close_keeps_the_rest(tmp_path, monkeypatch):
    monkeypatch.setattr(transport, "PENDING_LIMIT", 50)
    cfg = make_cfg(tmp_path)
    sink = create_sink(cfg)
    t = sink.transport

    def down(*a, **kw):  # fault injection: the store is gone for good
        raise ConnectionRefusedError(111, "Connection refused")

    t.client.log_batch = down
    t.client.set_terminated = down
    sink.handle(run_events(cfg)[0])
    for s in range(1, 11):
        sink.handle(step_event(s))
    total = 10 * len(step_event(1).metrics())
    assert len(t.unsent()) <= 50 and t.spilled_points == total - len(t.unsent()) and t.dropped_points == 0
    t0 = time.monotonic()
    sink.close(timeout=3)
    assert time.monotonic() - t0 < 5
    lines = (cfg.log_dir / transport.UNSENT_FILE).read_text().splitlines()
    header, points = json.loads(lines[0]), [json.loads(x) for x in lines[1:]]
    assert header["unsent"] == total and header["dropped"] == 0 and header["run_id"] == sink.run_id
    assert header["status"] == "KILLED" and header["terminated"] is False and isinstance(header["end_time"], int)
    queued = [(s, k, v) for s in range(1, 11) for k, v in step_event(s).metrics().items()]
    assert [(p["step"], p["key"]) for p in points] == [(s, k) for s, k, _ in queued]  # all of them, in order
    assert points[-1]["value"] == pytest.approx(queued[-1][2]) and isinstance(points[-1]["timestamp"], int)


def test_points_go_out_within_the_flush_interval_without_further_events(tmp_path):
    cfg = make_cfg(tmp_path, flush_interval=0.3)
    sink = create_sink(cfg)
    t = sink.transport
    sink.handle(run_events(cfg)[0])
    assert _until(lambda: not t._ops, 10)  # the run's params and tags went out
    time.sleep(0.5)                          # the sender is idle now
    sink.handle(step_event(1))
    assert _until(lambda: t.sent_points == len(step_event(1).metrics()), 3)
    sink.close(timeout=10)


def test_unsent_file_sections_compaction_and_sent_lines(tmp_path):
    """The file format: another process's section is kept byte for byte; ``sent_lines`` drop the points that
    arrived later; compaction leaves the header and the unsent points, renumbered, each once."""
    from splade_obs.sinks.mlflow.unsent import Point, UnsentFile

    path = tmp_path / transport.UNSENT_FILE
    earlier = '{"run_id": "old", "tracking_uri": "x"}\n{"key": "a", "value": 1, "step": 1, "timestamp": 5}\n'
    path.write_text(earlier)
    f = UnsentFile(path)
    pts = [Point(i, "train/loss", float(i), i, 1000 + i) for i in range(6)]
    assert f.append({"run_id": "new", "tracking_uri": "y"}, pts[:4])
    assert [p.line for p in pts[:4]] == [0, 1, 2, 3]
    f.mark_sent([1, 2])
    lines = path.read_text().splitlines()
    assert lines[:2] == earlier.splitlines() and json.loads(lines[-1]) == {"run_id": "new", "sent_lines": [1, 2]}
    n = f.compact({"run_id": "new", "tracking_uri": "y", "status": "FINISHED"}, [pts[3], pts[4], pts[5]],
                  keep_section=False)
    assert n == 4 and [p.line for p in pts[3:]] == [1, 2, 3]
    lines = path.read_text().splitlines()
    assert lines[:2] == earlier.splitlines()
    assert json.loads(lines[2])["status"] == "FINISHED" and json.loads(lines[2])["unsent"] == 4
    assert [json.loads(x)["step"] for x in lines[3:]] == [0, 3, 4, 5]
    f2 = UnsentFile(tmp_path / "only.jsonl")
    f2.append({"run_id": "r"}, [Point(0, "k", float("nan"), 1, 2)])
    assert json.loads((tmp_path / "only.jsonl").read_text().splitlines()[1])["value"] == "nan"
    f2.mark_sent([0])
    assert f2.compact({"run_id": "r"}, [], keep_section=False) == 0 and not (tmp_path / "only.jsonl").exists()


def test_failures_are_sorted_into_transient_and_refused():
    import requests
    from mlflow.exceptions import MlflowException, RestException

    from splade_obs.sinks.mlflow.failures import describe, is_transient

    def wrapped(inner):  # how MLflow's REST client reports a failed request
        try:
            try:
                raise inner
            except Exception as e:
                raise MlflowException(f"API request to http://user:pw@h/api failed with exception {e}")
        except MlflowException as outer:
            return outer

    retry_503 = wrapped(requests.exceptions.RetryError("Max retries exceeded (Caused by ResponseError('too "
                                                        "many 503 error responses'))"))
    assert is_transient(retry_503) and describe(retry_503) == "HTTP 503"
    refused = wrapped(requests.exceptions.ConnectionError("[Errno 111] Connection refused"))
    assert is_transient(refused) and describe(refused) == "connection refused"
    assert is_transient(ConnectionRefusedError(111, "Connection refused"))
    assert is_transient(wrapped(requests.exceptions.ReadTimeout("Read timed out. (read timeout=10)")))
    missing = MlflowException("API request to endpoint /api/2.0/mlflow/runs/log-batch failed with error code 404 "
                              "!= 200. Response body: 'not found'", error_code="ENDPOINT_NOT_FOUND")
    assert not is_transient(missing) and describe(missing).startswith("HTTP 404")
    bad = RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "bad metric"})
    assert not is_transient(bad) and describe(bad) == "HTTP 400 INVALID_PARAMETER_VALUE"
    assert is_transient(RestException({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "later"}))
    assert not is_transient(ValueError("not a number"))


def test_params_come_from_the_event_and_options_default_the_store(tmp_path, monkeypatch):
    """The params are ``RunStarted.params`` as they are (masked again on the way out, for safety);
    ``tracking_uri=None`` is the default store of the working directory."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    sink = MlflowSink.create(MlflowOptions(experiment_name="defaults", flush_interval=0.0))
    assert sink is not None
    bus, ids = open_bus(sink)
    assert ids.tracking_uri == f"sqlite:///{tmp_path.resolve()}/mlruns/mlflow.db"
    config = {"model": {"name": "splade-tiny", "max_doc_length": 32}, "optim": {"lr": 1e-3, "faults": ["a", "b"]},
              "tracking": {"api_token": "abcdef123"}}
    params = {"model.name": "splade-tiny", "model.max_doc_length": "32", "optim.lr": "0.001",
              "optim.faults": '["a", "b"]', "tracking.api_token": "abcdef123"}   # unmasked: the sink masks it
    bus.emit(RunStarted(run_name="fallback", config=config, params=params, system_info={}, total_steps=1,
                        num_epochs=1, steps_per_epoch=1, log_dir=str(tmp_path / "logs")))
    bus.emit(RunFinished(status="FINISHED", step=0, duration_seconds=0.1))
    bus.close(timeout=60)
    from mlflow import MlflowClient
    run = MlflowClient(ids.tracking_uri).get_run(ids.mlflow_run_id)
    assert run.data.params == {"model.name": "splade-tiny", "model.max_doc_length": "32", "optim.lr": "0.001",
                               "optim.faults": '["a", "b"]', "tracking.api_token": "***"}
    assert run.data.tags["splade.model"] == "splade-tiny" and run.info.run_name == "fallback"
    assert run.data.metrics == {"run/duration_seconds": pytest.approx(0.1), "errors/total": 0.0}


def _imported_modules(path: Path, package: str) -> set[str]:
    """Every module ``path`` imports (relative imports resolved against ``package``), plus ``from m import n``
    as ``m.n``."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def test_the_mlflow_sink_package_imports_nothing_from_the_config():
    """The sink consumes events only: no ``splade_obs.config``, no ``TrainConfig``, in any of its modules."""
    root = Path(splade_obs.__file__).parent / "sinks" / "mlflow"
    modules = sorted(root.glob("*.py"))
    assert {p.name for p in modules} >= {"__init__.py", "sink.py", "transport.py", "artifacts.py", "store.py",
                                         "pyfunc.py"}
    for path in modules:
        package = "splade_obs.sinks.mlflow"
        imported = _imported_modules(path, package)
        bad = sorted(m for m in imported if m == "splade_obs.config" or m.startswith("splade_obs.config.")
                     or m.endswith(".TrainConfig"))
        assert not bad, f"{path.name} imports {bad}"
        assert "TrainConfig" not in path.read_text(encoding="utf-8"), path.name
        assert len(path.read_text(encoding="utf-8").splitlines()) <= 450, path.name


def test_importing_the_package_does_not_import_mlflow():
    import subprocess
    import sys
    code = ("import sys; import splade_obs.sinks.mlflow as m; from splade_obs.sinks.mlflow import pyfunc; "
            "assert 'mlflow' not in sys.modules, 'mlflow imported'; "
            "assert pyfunc.SpladePyfuncModel.__module__ == 'splade_obs.sinks.mlflow.pyfunc'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


# ------------------------------------------------------------------------------------- helpers' units
def test_default_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = store.default_tracking_uri(tmp_path)
    assert uri == f"sqlite:///{tmp_path.resolve()}/mlruns/mlflow.db" and (tmp_path / "mlruns").is_dir()
    assert store.artifact_location_for(uri, "splade-obs") == (tmp_path.resolve() / "mlruns" / "artifacts" /
                                                             "splade-obs").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert store.default_tracking_uri(tmp_path) == "http://127.0.0.1:5000"


def test_strip_credentials_and_run_names():
    assert store.strip_credentials("https://bob:pw@mlflow.example:443/x") == "https://mlflow.example:443/x"
    assert store.strip_credentials("sqlite:////tmp/a.db") == "sqlite:////tmp/a.db"
    name = store.generate_run_name(7)
    assert name == store.generate_run_name(7) and len(name.split("-")) == 3 and name[-4:].isdigit()
    assert len({store.generate_run_name(i) for i in range(50)}) > 40


@pytest.mark.parametrize("raw", ["ndcg@10", "eval/recall@100", "weird name!(x)", "a//b", "/lead"])
def test_metric_names_pass_mlflow_validation(raw):
    from mlflow.utils.validation import _validate_metric_name
    _validate_metric_name(metric_name(raw))  # raises MlflowException when invalid
    assert metric_name("ndcg@10") == "ndcg_at_10"


# ------------------------------------------------------------------------------------------ runs CLI
def test_runs_list_and_compare(finished_run, tmp_path):
    from splade_obs_cli.main import cli

    cfg, run_id, _, _ = finished_run
    cfg2 = make_cfg(tmp_path, uri=cfg.tracking.tracking_uri).replace(optim={"batch_size": 8})
    second, _ = _run_through_bus(cfg2, run_events(cfg2))
    runner = CliRunner()
    uri = cfg.tracking.tracking_uri
    out = runner.invoke(cli, ["runs", "list", "--tracking-uri", uri, "--experiment-name", "t"])
    assert out.exit_code == 0, out.output
    assert run_id[:8] in out.output and second[:8] in out.output and "FINISHED" in out.output
    out = runner.invoke(cli, ["runs", "compare", run_id, second, "--tracking-uri", uri])
    assert out.exit_code == 0, out.output
    row = next(line for line in out.output.splitlines() if "optim.batch_size" in line)
    assert row.startswith("* ") and "16" in row and "8" in row          # differing values are marked
    assert any("epoch/loss" in line for line in out.output.splitlines())
    assert not any("final/" in line for line in out.output.splitlines())
    bad = runner.invoke(cli, ["runs", "compare", "0" * 32, "--tracking-uri", uri])
    assert bad.exit_code == 11 and "error[CONFIG_ERROR]" in bad.output


# ----------------------------------------------------------------------------------- real training
def _train(tmp_path, *extra):
    from splade_obs_cli.main import cli
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
    for key in ("train/lr", "train/grad_norm", "train/query_nnz", "train/doc_nnz", "train/retrieval_flops",
                "train/samples_per_second", "epoch/loss", "run/duration_seconds"):
        assert key in run.data.metrics, key
    assert run.data.tags["splade.device"] == "cpu" and "mlflow.note.content" in run.data.tags
    assert {d.tags[0].value for d in run.inputs.dataset_inputs} == {"training"}
    paths = artifact_paths(client, rid)
    assert {"config.yaml", "system_info.json", "training_metrics.json", "logs/train_splade.log",
            "logs/train_splade.jsonl", "model/hf/config.json"} <= paths
    assert not any(p.startswith("splade_model/") for p in paths)        # the model is a LoggedModel now
    (logged,) = client.search_logged_models([run.info.experiment_id])
    assert logged.name == "splade_model" and logged.source_run_id == rid
    assert [(o.model_id, o.step) for o in run.outputs.model_outputs] == [(logged.model_id, 4)]
    model = mlflow.pyfunc.load_model(logged.artifact_location)          # its files: no tracking URI needed
    weights = model.predict(["a query about proteins"])
    assert len(weights) == 1 and weights[0] and all(w > 0 for w in weights[0].values())

    res = _train(tmp_path, "--resume", "auto", "--max-steps", "6")
    assert res.exit_code == 0, res.output
    client, run = _only_run(tmp_path)
    steps = metric_steps(client, rid, "train/loss")
    assert run.info.run_id == rid and run.info.status == "FINISHED"
    assert steps == [1, 2, 3, 4, 5, 6]
    assert sorted(o.step for o in run.outputs.model_outputs) == [4, 6]   # each process logs its final model


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
    (logged,) = client.search_logged_models([run.info.experiment_id])     # no evaluation, no best: the final
    assert versions[0].source == logged.artifact_location and versions[0].tags["splade.model_kind"] == "final"
    assert run.data.tags["splade.registered_model"] == f"splade-e2e/{versions[0].version}"
