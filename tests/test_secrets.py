"""Secrets never leave the process: not in logs, traces, error files, metrics, checkpoints, nor MLflow.

Real short runs of splade-tiny through ``run_training`` with tracing to the default file exporter and
tracking to a sqlite MLflow store under ``tmp_path``. A secret planted in a secret-looking environment
variable is made to appear in event text by injected faults (a sink that raises, a batch that fails,
a model load that fails); every byte written under ``tmp_path`` (output folder, logs, traces.jsonl,
errors.jsonl, metrics, checkpoints, the MLflow database and its artifact store) is then searched for it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from splade_obs.redaction import redact, redact_url_credentials
from splade_obs.collate import PairCollator
from splade_obs.bus import RecordingSink, Sink
from splade_obs.events import ErrorCaught, RunStarted, SinkDegraded
from splade_obs.run import run_training
from splade_obs.trainer import Trainer

pytestmark = pytest.mark.timeout(600)

SECRET = "sk-planted-9876543"
URL_PASSWORD = "hunter2"
CRED_URI = f"https://user:{URL_PASSWORD}@example.invalid/"


class LeakySink(Sink):
    """A threaded sink whose failures quote the secret (as a client library echoing a rejected key would)."""

    name = "leaky"
    scope = "rank"
    threaded = True

    def handle(self, event):  # noqa: ANN001
        raise RuntimeError(f"upstream rejected api key {SECRET}")


def _files_with(root: Path, needle: str) -> list[str]:
    """Every file under ``root`` whose bytes contain ``needle`` (also as JSON-escaped text)."""
    raw = needle.encode()
    hits = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and raw in p.read_bytes():
            hits.append(str(p.relative_to(root)))
    return hits


def _tracked_cfg(tiny_cfg, tmp_path: Path, **extra):
    return tiny_cfg(tracing={"exporter": "file", "trace_batches": "all"},
                    tracking={"enabled": True, "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
                              "experiment_name": "secrets", "flush_interval": 0.0, "log_model": False},
                    **extra)


def _mlflow_run(tmp_path: Path, run_id: str):
    from mlflow import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    return client, client.get_run(run_id)


def _all_mlflow_text(client, run) -> str:
    """Params, tags and the text of every artifact of the run, as the MLflow API returns them."""
    parts = [json.dumps(run.data.params), json.dumps(run.data.tags)]
    art_root = Path(client.download_artifacts(run.info.run_id, ""))
    for p in art_root.rglob("*"):
        if p.is_file():
            parts.append(p.read_bytes().decode("utf-8", "replace"))
    return "\n".join(parts)


def _trace_records(log_dir: Path) -> list[dict]:
    path = log_dir / "traces.jsonl"
    assert path.is_file() and path.stat().st_size > 0, "the file exporter wrote no traces"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_secret_in_failures_reaches_no_file_and_no_mlflow_record(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("MY_SERVICE_API_KEY", SECRET)
    original = PairCollator.__call__
    calls = {"n": 0}

    def failing_once(self, *args, **kwargs):  # fault injection: the first training batch fails
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError(f"collator could not reach the feature store with key {SECRET}")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PairCollator, "__call__", failing_once)
    cfg = _tracked_cfg(tiny_cfg, tmp_path)
    rec = RecordingSink()
    res = run_training(cfg, extra_sinks=[LeakySink(), rec])

    assert res.status == "FINISHED"
    # the faults really put the secret into event text (the events stay in memory; outputs must mask it)
    errors = rec.of(ErrorCaught)
    assert errors and errors[0].skipped_batch and SECRET in (errors[0].exception_message or errors[0].message)
    degraded = rec.of(SinkDegraded)
    assert len(degraded) == 1 and degraded[0].sink == "leaky" and SECRET in degraded[0].message
    assert res.bus_stats["leaky"]["degraded"] is True

    # the traces carry the error and the degraded sink, masked
    spans = _trace_records(cfg.log_dir)
    text = json.dumps(spans)
    assert "splade.sink_degraded" in text and "exception" in text and "***" in text

    # MLflow got the run, its tags, params and artifacts (logs and traces included), all masked
    client, run = _mlflow_run(tmp_path, res.ids.mlflow_run_id)
    assert run.data.tags.get("splade.degraded_sinks") == "leaky"
    # the run links to its trace (TraceOpened from the OTel sink): tag and note carry the trace id
    (root,) = [s for s in spans if s.get("name") == "train"]
    trace_id = root["context"]["trace_id"].removeprefix("0x")
    assert run.data.tags["otel.trace_id"] == trace_id and trace_id in run.data.tags["mlflow.note.content"]
    assert "logs/traces.jsonl" in {f.path for f in client.list_artifacts(run.info.run_id, "logs")}
    assert SECRET not in _all_mlflow_text(client, run)

    leaks = _files_with(tmp_path, SECRET)
    assert leaks == [], f"secret found in {leaks}"


def test_secret_in_a_fatal_error_is_masked_in_traces_and_the_mlflow_note(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("MY_SERVICE_API_KEY", SECRET)

    def failing_load(self, *args, **kwargs):  # fault injection: the model cannot be loaded
        raise RuntimeError(f"model registry refused key {SECRET}")

    monkeypatch.setattr(Trainer, "_load_model", failing_load)
    cfg = _tracked_cfg(tiny_cfg, tmp_path)
    rec = RecordingSink()
    res = run_training(cfg, extra_sinks=[rec])

    assert res.status == "FAILED"
    fatal = [e for e in rec.of(ErrorCaught) if e.fatal]
    assert fatal and SECRET in (fatal[0].exception_message or "") + fatal[0].message

    root = [s for s in _trace_records(cfg.log_dir) if s.get("name") == "train"]
    assert root and "ERROR" in json.dumps(root[0].get("status"))

    client, run = _mlflow_run(tmp_path, res.ids.mlflow_run_id)
    note = run.data.tags["mlflow.note.content"]
    assert "**Failure**" in note and "***" in note
    assert SECRET not in _all_mlflow_text(client, run)

    leaks = _files_with(tmp_path, SECRET)
    assert leaks == [], f"secret found in {leaks}"


# ------------------------------------------------------------------------------------ URL credentials
def test_redact_masks_url_credentials_recursively():
    cfg = {"tracking": {"tracking_uri": CRED_URI, "experiment_name": "x", "api_token": "abcdef123"},
           "mirrors": ["http://alice:pw%40x@mirror.invalid:8080/a?b=c", "s3://bucket/key"],
           "plain": "see https://example.invalid/docs (user@example.invalid)", "n": 3}
    out = redact(cfg)
    assert out["tracking"]["tracking_uri"] == "https://***@example.invalid/"
    assert out["tracking"]["api_token"] == "***"
    assert out["mirrors"] == ["http://***@mirror.invalid:8080/a?b=c", "s3://bucket/key"]
    assert out["plain"] == cfg["plain"] and out["n"] == 3
    assert cfg["tracking"]["tracking_uri"] == CRED_URI          # the input is not modified
    # a password holding "@" is masked up to the host
    assert redact_url_credentials("mlflow at https://u:p@ss@host.invalid:5000/x") == \
        "mlflow at https://***@host.invalid:5000/x"


def test_run_started_config_has_no_url_credentials(tiny_cfg, tmp_path):
    cfg = tiny_cfg(tracking={"enabled": False, "tracking_uri": CRED_URI})
    rec = RecordingSink()
    res = run_training(cfg, extra_sinks=[rec])
    assert res.status == "FINISHED"
    (started,) = rec.of(RunStarted)
    assert started.config["tracking"]["tracking_uri"] == "https://***@example.invalid/"
    assert URL_PASSWORD not in json.dumps(started.config)
    assert _files_with(tmp_path, URL_PASSWORD) == []


def test_mlflow_params_and_config_artifact_have_no_url_credentials(tmp_path):
    """The sink masks credentials itself, even when handed a config and params that were not redacted."""
    from splade_obs.config import TrainConfig, flatten
    from splade_obs.bus import EventBus, RunIds
    from splade_obs.events import RunFinished
    from splade_obs.sinks.mlflow import MlflowOptions, MlflowSink

    cfg = TrainConfig.from_mapping({
        "checkpoint": {"output_dir": str(tmp_path / "out")},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment_name": "p",
                     "flush_interval": 0.0},
    })
    raw = cfg.to_dict()
    raw["tracking"]["tracking_uri"] = CRED_URI                 # what RunStarted.config would hold unredacted
    raw["data"]["train_file"] = f"https://bob:{URL_PASSWORD}@data.invalid/train.jsonl"
    params = {k: str(v) for k, v in flatten(raw).items()}      # what unredacted RunStarted.params would hold
    for given in (params,):                                    # the event's params, unredacted
        sink = MlflowSink.create(MlflowOptions(tracking_uri=cfg.tracking.tracking_uri, experiment_name="p",
                                               flush_interval=0.0))
        assert sink is not None
        ids = RunIds()
        bus = EventBus([ids, sink])
        bus.open()
        bus.emit(RunStarted(run_name="creds", config=raw, params=given, system_info={}, total_steps=1,
                            num_epochs=1, steps_per_epoch=1, output_dir=str(cfg.output_dir),
                            log_dir=str(cfg.log_dir)))
        bus.emit(RunFinished(status="FINISHED", step=0, duration_seconds=0.1))
        bus.close(timeout=60)

        client, run = _mlflow_run(tmp_path, ids.mlflow_run_id)
        assert run.data.params["tracking.tracking_uri"] == "https://***@example.invalid/"
        assert run.data.params["data.train_file"] == "https://***@data.invalid/train.jsonl"
        assert URL_PASSWORD not in _all_mlflow_text(client, run)
        assert _files_with(tmp_path, URL_PASSWORD) == []


# ------------------------------------------------------------------ credentials in error paths (an audit's cases)
def test_url_credentials_are_masked_in_every_form_a_library_prints():
    from splade_obs.redaction import secret_values, url_passwords

    # a password with characters the user did not percent-encode; a gRPC target (no scheme); any scheme
    assert redact_url_credentials("request to http://user:pa/ss#w0rd@127.0.0.1:5/x failed") == \
        "request to http://***@127.0.0.1:5/x failed"
    assert redact_url_credentials("Failed to export traces to user:s3cretpw@127.0.0.1:1, retrying") == \
        "Failed to export traces to ***@127.0.0.1:1, retrying"
    assert redact_url_credentials("unsupported URI 'weird://user:s3cretpw@127.0.0.1:1/x'") == \
        "unsupported URI 'weird://***@127.0.0.1:1/x'"
    assert redact_url_credentials("got list ['http://user:s3cretpw@h.invalid']") == "got list ['http://***@h.invalid']"
    assert redact_url_credentials("http://bob:it'sMyPw@mlflow.invalid:5000") == "http://***@mlflow.invalid:5000"
    assert redact_url_credentials("https://alice@corp.invalid:pa/ss@host.invalid/") == "https://***@host.invalid/"
    for plain in ("see https://example.invalid/docs (user@example.invalid)", "git@github.com:org/repo.git",
                  "http://127.0.0.1:5000/api/2.0/mlflow/runs/get", "loss 1:2 at step 3", "mail bob@example.invalid",
                  "mailto:alice@example.invalid", "12:30@office", "2024-01-01 12:30:45@worker1",
                  "python:3.11@sha256:abc", "http://localhost:5000/#/experiments/1@x", "http://[::1]:5000/x@y",
                  "models:/name@alias", "--run-name exp:baseline@v2"):
        assert redact_url_credentials(plain) == plain
    # the pieces a URL parser may quote alone ("nonnumeric port: 'SEKRIT1'") are secrets too
    assert url_passwords("http://user:SEKRIT1/part22x@h.invalid") == {"SEKRIT1/part22x", "SEKRIT1", "part22x"}
    assert url_passwords("ssh://ubuntu@host.invalid") == set()  # a user name, not a secret to mask everywhere
    assert url_passwords("https://ghp_token123@github.invalid") == {"ghp_token123"}
    env = {"MLFLOW_TRACKING_URI": "https://bob:tracking-pw@mlflow.invalid",
           "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=prod,api_key=resource-secret,team=search"}
    found = set(secret_values(env))  # (with the URL passwords this process was given before, by other tests)
    assert {"tracking-pw", "resource-secret"} <= found and not found & {"prod", "search", "bob", "mlflow.invalid"}


def test_a_failing_tracking_server_and_a_bad_uri_never_print_the_url_password(tmp_path):
    """A tracking server answering 5xx (with --require-tracking: a dependency error), ``runs list`` against it,
    and a password that breaks URL parsing: the console and every file written keep no piece of the password."""
    import http.server
    import threading

    from click.testing import CliRunner

    from cli.main import cli
    from splade_obs.errors import EXIT_CODES, ErrorCategory

    class Failing(http.server.BaseHTTPRequestHandler):  # fault injection: a server that fails every call
        def _answer(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(200 if self.path.startswith("/health") else 500)
            self.end_headers()
            self.wfile.write(b"boom")
        do_GET = do_POST = do_PATCH = _answer

        def log_message(self, *args):  # noqa: ANN002
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Failing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://user:{URL_PASSWORD}-5xx@127.0.0.1:{server.server_address[1]}"
    try:
        runner = CliRunner()
        train = runner.invoke(cli, ["train", "--max-steps", "1", "--output-dir", str(tmp_path / "a"), "--tracking-uri",
                                    uri, "--require-tracking", "--no-system-metrics", "--otel-exporter", "none"])
        listed = runner.invoke(cli, ["runs", "list", "--tracking-uri", uri])
    finally:
        server.shutdown()
        server.server_close()
    for result in (train, listed):
        assert result.exit_code == EXIT_CODES[ErrorCategory.DEPENDENCY_ERROR], (result.output, result.stderr)
        assert "error[DEPENDENCY_ERROR]" in result.stderr and "http://***@127.0.0.1" in result.stderr
        assert URL_PASSWORD not in result.output + result.stderr
    # "/" in a password: urllib reads "SEKRIT1" as a port and says so; tracking turns off with a warning
    broken = CliRunner().invoke(cli, ["train", "--max-steps", "1", "--output-dir", str(tmp_path / "b"),
                                      "--tracking-uri", "http://user:SEKRIT1/part22x@127.0.0.1:1",
                                      "--otel-exporter", "none", "--no-system-metrics"])
    assert broken.exit_code == 0, (broken.output, broken.stderr)
    assert "nonnumeric port: '***'" in broken.output + broken.stderr
    for needle in (URL_PASSWORD, "SEKRIT1", "part22x"):
        assert needle not in broken.output + broken.stderr
        assert _files_with(tmp_path, needle) == [], needle


def test_otlp_credentials_resource_attributes_and_run_names_stay_masked(tiny_cfg, tmp_path, monkeypatch):
    """An OTLP/gRPC endpoint with credentials (its exporter logs the target it fails to reach, without a
    scheme), secrets in OTEL_RESOURCE_ATTRIBUTES (on every span and metric) and a run name that quotes an
    environment secret: none reaches the logs, traces, metrics, MLflow's records or artifacts."""
    from splade_obs.logging_setup import log_file_paths

    monkeypatch.setenv("MY_SERVICE_API_KEY", SECRET)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://user:otlp-password@127.0.0.1:1")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES",
                       "deployment.environment=prod,api_key=resource-secret,endpoint=https://bob:resource-pw@x.invalid")
    cfg = tiny_cfg(tracing={"exporter": "otlp", "shutdown_timeout": 2.0},
                   tracking={"enabled": True, "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
                             "experiment_name": "secrets", "flush_interval": 0.0, "log_model": False,
                             "run_name": f"run-{SECRET}"},
                   optim={"max_steps": 2})
    res = run_training(cfg)
    assert res.status == "FINISHED"
    log_text = log_file_paths(cfg.log_dir)[0].read_text()
    assert "***@127.0.0.1:1" in log_text  # the exporter did log its unreachable target, masked
    # the metrics' resource is the spans' (and the MLflow trace's)
    first = json.loads((cfg.log_dir / "metrics.jsonl").read_text().splitlines()[0])
    resource = first["resource_metrics"][0]["resource"]["attributes"]
    assert resource["api_key"] == "***" and resource["endpoint"] == "https://***@x.invalid"
    assert resource["deployment.environment"] == "prod"
    client, run = _mlflow_run(tmp_path, res.ids.mlflow_run_id)
    assert run.info.run_name == "run-***"
    for needle in (SECRET, "otlp-password", "resource-secret", "resource-pw"):
        assert needle not in _all_mlflow_text(client, run), needle
        assert _files_with(tmp_path, needle) == [], needle


def test_a_config_error_quoting_a_credentialed_value_masks_it(tmp_path):
    from click.testing import CliRunner

    from cli.main import cli
    from splade_obs.errors import EXIT_CODES, ErrorCategory

    config = tmp_path / "cfg.toml"
    config.write_text(f'[tracking]\ntracking_uri = ["http://user:{URL_PASSWORD}@127.0.0.1:1"]\n')
    for args in ([], ["--debug"]):
        result = CliRunner().invoke(cli, [*args, "train", "--config", str(config), "--output-dir", str(tmp_path / "o")])
        assert result.exit_code == EXIT_CODES[ErrorCategory.CONFIG_ERROR], (result.output, result.stderr)
        assert "tracking.tracking_uri" in result.stderr and "http://***@127.0.0.1:1" in result.stderr
        assert URL_PASSWORD not in result.output + result.stderr


def test_click_usage_errors_mask_url_credentials():
    """click prints its own usage errors, quoting the argument: they bypass the command's error lines."""
    from click.testing import CliRunner

    from cli.main import cli

    for args in (["runs", "list", f"http://bob:{URL_PASSWORD}@mlflow.invalid:5000"],
                 ["search", "--engine", f"http://bob:{URL_PASSWORD}@mlflow.invalid:5000"]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2 and "http://***@mlflow.invalid:5000" in result.output, result.output
        assert URL_PASSWORD not in result.output
