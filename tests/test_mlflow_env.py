"""MLflow's environment variables, honoured as MLflow's own clients do: flags (and config files) win over the
variables, the variables over the built-in defaults; a variable that cannot be used is a CONFIG_ERROR naming it.

Real parts: the resolution function, the MLflow sink on a sqlite store, the CLI with a real training run, and
docker/compose.yaml's trainer environment.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from splade_obs.config import TrackingConfig
from splade_obs.errors import ConfigError
from splade_obs.sinks.mlflow import MlflowSink, env
from splade_obs.sinks.mlflow.env import resolve_options, resolve_run_name
from tests._mlflow_utils import make_cfg, open_bus, run_events

ROOT = Path(__file__).resolve().parents[1]


def _resolve(environ: dict[str, str], **tracking):
    return resolve_options(TrackingConfig(**tracking), environ=environ)


# ------------------------------------------------------------------------------------------ resolution
def test_defaults_without_variables():
    o = _resolve({})
    assert (o.tracking_uri, o.experiment_name, o.experiment_id, o.run_name, o.run_id) == (None, "splade-obs", None,
                                                                                          None, None)
    assert o.tags == {} and o.env_sources == ()
    assert o.system_metrics == env.SystemMetricsOptions(10.0, 1, None)     # on by default, MLflow's 10 s


@pytest.mark.parametrize("field, variable, value, attr", [
    ("tracking_uri", "MLFLOW_TRACKING_URI", "http://tracking.example:5000", "tracking_uri"),
    ("experiment_name", "MLFLOW_EXPERIMENT_NAME", "from-env", "experiment_name"),
    ("run_name", "MLFLOW_RUN_NAME", "env-run", "run_name"),
])
def test_a_variable_beats_the_default_and_a_flag_beats_the_variable(field, variable, value, attr):
    o = _resolve({variable: value})
    assert getattr(o, attr) == value and variable in o.env_sources
    o = _resolve({variable: value}, **{field: "given"})
    assert getattr(o, attr) == "given" and variable not in o.env_sources
    assert getattr(_resolve({variable: "  "}), attr) != "  "          # blank: unset, as MLflow reads it


def test_run_name_resolution_used_by_run_training():
    assert resolve_run_name(None, {"MLFLOW_RUN_NAME": "env-run"}) == "env-run"
    assert resolve_run_name("flag-run", {"MLFLOW_RUN_NAME": "env-run"}) == "flag-run"
    assert resolve_run_name(None, {}) is None


def test_experiment_id_is_used_when_no_name_is_given():
    o = _resolve({"MLFLOW_EXPERIMENT_ID": "7"})
    assert (o.experiment_name, o.experiment_id) == (None, "7")
    o = _resolve({"MLFLOW_EXPERIMENT_ID": "7", "MLFLOW_EXPERIMENT_NAME": "n"})
    assert (o.experiment_name, o.experiment_id) == ("n", "7")             # both: checked against each other
    o = _resolve({"MLFLOW_EXPERIMENT_ID": "7"}, experiment_name="flag")
    assert (o.experiment_name, o.experiment_id) == ("flag", None)         # the flag wins over both variables


def test_run_id_and_tags_come_from_the_environment():
    o = _resolve({"MLFLOW_RUN_ID": "abc123", "MLFLOW_TAGS": json.dumps({"team": "search", "n": 3, "ok": True,
                                                                        "api_token": "hunter22"})})
    assert o.run_id == "abc123"
    assert o.tags == {"team": "search", "n": "3", "ok": "true", "api_token": "***"}   # secret-looking key masked
    assert set(o.env_sources) == {"MLFLOW_RUN_ID", "MLFLOW_TAGS"}


@pytest.mark.parametrize("variable, value, words", [
    ("MLFLOW_TAGS", "{not json", "a JSON object"),
    ("MLFLOW_TAGS", '["a", "b"]', "got a JSON list"),
    ("MLFLOW_TAGS", '{"bad\\u0000name": "x"}', "tag name"),
    ("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "maybe", "true, false, 1 or 0"),
    ("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "fast", "seconds > 0"),
    ("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0", "seconds > 0"),
    ("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "nan", "seconds > 0"),
    ("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", "0", "integer >= 1"),
])
def test_a_value_that_cannot_be_used_is_a_config_error_naming_the_variable(variable, value, words):
    with pytest.raises(ConfigError) as info:
        _resolve({variable: value})
    err = info.value
    assert err.category.value == "CONFIG_ERROR" and variable in err.message and words in err.message
    assert err.context.get("field") == variable and err.hint


def test_system_metrics_numbers_from_the_variables():
    o = _resolve({"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "2.5", "MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING": "3",
                  "MLFLOW_SYSTEM_METRICS_NODE_ID": "gpu-box"})
    assert o.system_metrics == env.SystemMetricsOptions(2.5, 3, "gpu-box")
    assert _resolve({"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.001"}).system_metrics.sampling_interval == 0.1
    multi = {"GROUP_WORLD_SIZE": "2", "GROUP_RANK": "1"}                  # a multi-node torchrun
    assert _resolve(multi).system_metrics.node_id == "node_1"
    assert _resolve({**multi, "MLFLOW_SYSTEM_METRICS_NODE_ID": "mine"}).system_metrics.node_id == "mine"
    off = _resolve({"MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false", "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "x"})
    assert off.system_metrics is None                                      # off: the numbers are not read


# ------------------------------------------------------------------------------- the store (sqlite)
@pytest.fixture(scope="module")
def store_uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('env-store') / 'm.db'}"


def _client(uri: str):
    from mlflow import MlflowClient
    return MlflowClient(uri)


def _create(cfg, environ: dict[str, str], **kw):
    return MlflowSink.create(resolve_options(cfg.tracking, log_dir=str(cfg.log_dir), environ=environ), **kw)


def _finish(sink, cfg) -> None:
    bus, _ = open_bus(sink)
    for e in run_events(cfg):
        bus.emit(e)
    bus.close(timeout=30)


def test_mlflow_run_id_continues_that_run(tmp_path, store_uri):
    client = _client(store_uri)
    exp = client.create_experiment("launcher")
    made = client.create_run(exp, run_name="made-by-a-launcher")        # as `mlflow run` hands a run over
    cfg = make_cfg(tmp_path, uri=store_uri, system_metrics=False)
    sink = _create(cfg, {"MLFLOW_RUN_ID": made.info.run_id})
    assert sink.run_id == made.info.run_id and sink.resumed and sink.experiment_id == exp
    _finish(sink, cfg)
    run = client.get_run(made.info.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "made-by-a-launcher"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 4, 5, 6]
    assert run.data.tags["splade.mlflow_env"] == "MLFLOW_RUN_ID"
    assert len(client.search_runs([exp])) == 1                          # no second run


def test_a_checkpoint_run_wins_over_mlflow_run_id(tmp_path, store_uri):
    client = _client(store_uri)
    exp = client.create_experiment("ckpt-vs-env")
    ckpt, other = client.create_run(exp), client.create_run(exp)
    cfg = make_cfg(tmp_path, uri=store_uri, system_metrics=False)
    sink = _create(cfg, {"MLFLOW_RUN_ID": other.info.run_id}, resume_run_id=ckpt.info.run_id)
    assert sink.run_id == ckpt.info.run_id
    sink.close()


@pytest.mark.parametrize("state", ["missing", "deleted"])
def test_a_run_id_the_store_does_not_have_is_a_config_error(tmp_path, store_uri, state):
    client = _client(store_uri)
    run_id = "0" * 32
    if state == "deleted":
        run = client.create_run(client.create_experiment(f"del-{tmp_path.name}"))
        client.delete_run(run.info.run_id)
        run_id = run.info.run_id
    cfg = make_cfg(tmp_path, uri=store_uri)
    with pytest.raises(ConfigError, match="MLFLOW_RUN_ID") as info:
        _create(cfg, {"MLFLOW_RUN_ID": run_id})                         # not "MLflow disabled": the user must fix it
    assert ("deleted" if state == "deleted" else "does not exist") in info.value.message


def test_mlflow_experiment_id_picks_an_existing_experiment(tmp_path, store_uri):
    client = _client(store_uri)
    exp = client.create_experiment("by-id")
    cfg = make_cfg(tmp_path, uri=store_uri, experiment_name=None, system_metrics=False)
    sink = _create(cfg, {"MLFLOW_EXPERIMENT_ID": exp})
    assert sink.experiment_id == exp
    sink.close()
    with pytest.raises(ConfigError, match="MLFLOW_EXPERIMENT_ID='987654'.*no such experiment"):
        _create(cfg, {"MLFLOW_EXPERIMENT_ID": "987654"})
    client.create_experiment("another")
    with pytest.raises(ConfigError, match="name different experiments"):
        _create(cfg, {"MLFLOW_EXPERIMENT_ID": exp, "MLFLOW_EXPERIMENT_NAME": "another"})
    sink = _create(cfg, {"MLFLOW_EXPERIMENT_ID": exp, "MLFLOW_EXPERIMENT_NAME": "by-id"})   # both agree
    assert sink.experiment_id == exp
    sink.close()


def test_mlflow_tags_land_on_the_run(tmp_path, store_uri):
    cfg = make_cfg(tmp_path, uri=store_uri, system_metrics=False)
    sink = _create(cfg, {"MLFLOW_TAGS": '{"team": "search", "mlflow.source.name": "nightly"}'})
    _finish(sink, cfg)
    tags = _client(store_uri).get_run(sink.run_id).data.tags
    assert tags["team"] == "search" and tags["mlflow.source.name"] == "nightly"   # the user's tags win
    assert tags["splade.mlflow_env"] == "MLFLOW_TAGS"


# ------------------------------------------------------------------------------------ the CLI, for real
def _cli(args: list[str], environ: dict[str, str]):
    from splade_obs_cli.main import cli
    return CliRunner().invoke(cli, args, env={**{n: None for n in env.ENV_VARS}, **environ})


@pytest.mark.slow
def test_train_reads_the_variables_and_its_flags_win(tmp_path):
    """A real run: tracking URI, run name and tags from the variables; the experiment flag beats its variable."""
    from tests.conftest import TINY_ARGS

    uri = f"sqlite:///{tmp_path}/env.db"
    res = _cli(["train", "--max-steps", "2", *TINY_ARGS, "--otel-exporter", "none", "--progress", "none",
                "--no-log-model", "--no-system-metrics", "--output-dir", str(tmp_path / "out"),
                "--experiment-name", "from-flag"],
               {"MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": "from-env", "MLFLOW_RUN_NAME": "env-named",
                "MLFLOW_TAGS": '{"ticket": "ML-42"}'})
    assert res.exit_code == 0, res.output
    client = _client(uri)
    assert client.get_experiment_by_name("from-env") is None
    (run,) = client.search_runs([client.get_experiment_by_name("from-flag").experiment_id])
    assert run.info.run_name == "env-named" and run.info.status == "FINISHED"
    assert run.data.tags["ticket"] == "ML-42"
    assert set(run.data.tags["splade.mlflow_env"].split(",")) == {"MLFLOW_TRACKING_URI", "MLFLOW_RUN_NAME",
                                                                  "MLFLOW_TAGS"}
    assert run.data.params.get("tracking.experiment_name") == "from-flag"   # given: a param
    assert "tracking.run_name" not in run.data.params                        # unset: the run's name says it


def test_train_stops_on_bad_mlflow_tags_before_training(tmp_path):
    res = _cli(["train", "--max-steps", "2", "--output-dir", str(tmp_path / "out"), "--progress", "none",
                "--otel-exporter", "none", "--tracking-uri", f"sqlite:///{tmp_path}/m.db"],
               {"MLFLOW_TAGS": "team=search"})
    assert res.exit_code == 11, res.output
    assert "CONFIG_ERROR" in res.output and "MLFLOW_TAGS" in res.output
    assert not (tmp_path / "out" / "checkpoints").exists()


# ------------------------------------------------------------------------------------------- docker
def _compose_trainer_env(shell: dict[str, str]) -> dict[str, str]:
    """The trainer service's environment as compose gives it (``${VAR:-default}`` expanded from ``shell``)."""
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text(encoding="utf-8"))
    raw = compose["services"]["trainer"]["environment"]
    expand = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")
    return {k: expand.sub(lambda m: shell.get(m.group(1)) or (m.group(2) or ""), str(v)) for k, v in raw.items()}


@pytest.mark.parametrize("shell, experiment", [({}, "splade-obs"), ({"MLFLOW_EXPERIMENT_NAME": "ablations"},
                                                                      "ablations")])
def test_the_compose_trainer_experiment_variable_now_works(shell, experiment):
    environ = _compose_trainer_env(shell)
    assert "MLFLOW_EXPERIMENT_NAME" in environ
    o = _resolve(environ)
    assert o.experiment_name == experiment and o.tracking_uri == "http://mlflow:5000"
    assert {"MLFLOW_EXPERIMENT_NAME", "MLFLOW_TRACKING_URI"} <= set(o.env_sources)


def test_mlflow_tags_values_are_masked_like_every_other_output(monkeypatch):
    from splade_obs.sinks.mlflow.env import env_tags

    monkeypatch.setenv("SPLADE_TEST_TOKEN", "s3cr3t-token-value")
    tags = env_tags({"MLFLOW_TAGS": json.dumps({"store": "https://bob:hunter2@host/db", "note": "s3cr3t-token-value",
                                                "api_token": "abc", "team": "search"})})
    assert "hunter2" not in tags["store"] and tags["store"].endswith("@host/db")
    assert tags["note"] == "***" and tags["api_token"] == "***" and tags["team"] == "search"
