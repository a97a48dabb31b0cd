"""One source of config: the dataclasses' metadata makes the flags, the docs and the validation.

Real parts throughout: files on disk, the click commands through CliRunner, a real training run tracked in a
real sqlite MLflow store for the params comparison.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from splade_obs.config import PARAM_TRUNCATION_MARKER, TrainConfig, load_config_file
from splade_obs.data import with_demo_defaults
from splade_obs.config_schema import config_fields, render_config_docs
from splade_obs.errors import EXIT_CODES, ConfigError, ErrorCategory
from splade_obs_cli.main import cli
from splade_obs_cli.train_cmd import train

ROOT = Path(__file__).resolve().parents[1]
CONFIG_EXIT = EXIT_CODES[ErrorCategory.CONFIG_ERROR]


def _show(*args: str, fmt: str = "json"):
    res = CliRunner().invoke(cli, ["config", "show", *args, "--format", fmt])
    assert res.exit_code == 0, res.output + res.stderr
    return res


def _shown_config(*args: str) -> TrainConfig:
    return TrainConfig.from_mapping(json.loads(_show(*args).stdout))


# ------------------------------------------------------------------------------------------ round trip
EXPECTED = {
    "model": {"max_query_length": 16, "dropout": 0.0},
    "data": {"num_negatives": 0, "on_bad_record": "skip"},
    "optim": {"batch_size": 4, "max_steps": 3, "learning_rate": 2e-4, "warmup_ratio": 0.25,
              "mixed_precision": "no"},
    "loss": {"distillation": "kl", "lambda_q": 0.0},
    "recovery": {"inject_faults": ("batch:3:oom", "step:5:interrupt")},
    "logging": {"json_logs": True, "log_level": "DEBUG"},
    "tracking": {"enabled": False, "run_name": "r1"},
    "eval": {"eval_idf_power": 0.5},
}

YAML = """\
model:
  max_query_length: 16
  dropout: 0
data: {num_negatives: 0, on_bad_record: skip}
optim:
  batch_size: 4
  max_steps: 3
  learning_rate: 2e-4      # PyYAML reads this as the string "2e-4"
  warmup_ratio: 0.25
  mixed_precision: "no"
loss.distillation: kl      # a dotted key works too
loss:
  lambda_q: 0
recovery:
  inject_faults: [batch:3:oom, step:5:interrupt]
logging:
  json_logs: true
  log_level: debug
tracking:
  enabled: false
  run_name: r1
eval:
  eval_idf_power: 0.5
"""

TOML = """\
[model]
max_query_length = 16
dropout = 0.0
[data]
num_negatives = 0
on_bad_record = "skip"
[optim]
batch_size = 4
max_steps = 3
learning_rate = 2e-4
warmup_ratio = 0.25
mixed_precision = "no"
[loss]
distillation = "kl"
lambda_q = 0.0
[recovery]
inject_faults = ["batch:3:oom", "step:5:interrupt"]
[logging]
json_logs = true
log_level = "DEBUG"
[tracking]
enabled = false
run_name = "r1"
[eval]
eval_idf_power = 0.5
"""

FLAGS = ["--max-query-length", "16", "--dropout", "0", "--num-negatives", "0", "--on-bad-record", "skip",
         "--batch-size", "4", "--max-steps", "3", "--learning-rate", "2e-4", "--warmup-ratio", "0.25",
         "--mixed-precision", "no", "--distillation", "kl", "--lambda-q", "0",
         "--inject-fault", "batch:3:oom", "--inject-fault", "step:5:interrupt",
         "--json-logs", "--log-level", "debug", "--no-mlflow", "--run-name", "r1", "--eval-idf-power", "0.5"]


def test_the_same_config_from_yaml_toml_and_flags_is_equal(tmp_path):
    (tmp_path / "c.yaml").write_text(YAML)
    (tmp_path / "c.toml").write_text(TOML)
    expected = TrainConfig.from_mapping(EXPECTED)
    from_yaml = TrainConfig.load(tmp_path / "c.yaml")
    from_toml = TrainConfig.load(tmp_path / "c.toml")
    from_flags = _shown_config(*FLAGS)
    assert from_yaml == from_toml == expected
    # `config show` prints what the run uses: the demo's defaults filled in as the run fills them in
    assert from_flags == with_demo_defaults(expected) != expected
    assert _shown_config("--config", str(tmp_path / "c.yaml")) == with_demo_defaults(expected)
    # typed: ints stay ints, text numbers become floats, lists become tuples, choices are normalized
    assert type(from_yaml.optim.batch_size) is int and type(from_yaml.optim.learning_rate) is float
    assert type(from_yaml.model.dropout) is float and from_yaml.recovery.inject_faults == ("batch:3:oom",
                                                                                           "step:5:interrupt")
    assert from_yaml.logging.log_level == "DEBUG"
    # and what `config show` prints loads back as the same config, in YAML and JSON
    for fmt, suffix in (("yaml", ".yaml"), ("json", ".json")):
        shown = tmp_path / f"shown{suffix}"
        shown.write_text(_show("--config", str(tmp_path / "c.toml"), fmt=fmt).stdout)
        assert TrainConfig.load(shown) == with_demo_defaults(expected)


def test_yaml_scientific_notation_is_a_float(tmp_path):
    conf = tmp_path / "lr.yaml"
    conf.write_text("optim:\n  learning_rate: 5e-5\n  max_steps: 1e3\n")
    assert load_config_file(conf)["optim"]["learning_rate"] == "5e-5"  # what PyYAML gives
    cfg = TrainConfig.load(conf)
    assert cfg.optim.learning_rate == 5e-05 and type(cfg.optim.learning_rate) is float
    assert cfg.optim.max_steps == 1000 and type(cfg.optim.max_steps) is int
    params = _params_of(_show("--config", str(conf), fmt="params").stdout)
    assert params["optim.learning_rate"] == "5e-05" and params["optim.max_steps"] == "1000"


def test_flags_override_the_file_only_when_given(tmp_path):
    conf = tmp_path / "c.yaml"
    conf.write_text("optim: {batch_size: 4, max_steps: 7, learning_rate: 1e-4}\nlogging: {json_logs: true}\n"
                    "recovery: {inject_faults: [batch:2:nan]}\ntracking: {enabled: false}\n")
    kept = _shown_config("--config", str(conf), "--learning-rate", "3e-4")
    assert (kept.optim.batch_size, kept.optim.max_steps, kept.optim.learning_rate) == (4, 7, 3e-4)
    assert kept.logging.json_logs and kept.recovery.inject_faults == ("batch:2:nan",) and not kept.tracking.enabled
    over = _shown_config("--config", str(conf), "--no-json-logs", "--max-steps", "none", "--mlflow",
                         "--inject-fault", "step:1:exception")
    assert not over.logging.json_logs and over.optim.max_steps is None and over.tracking.enabled
    assert over.recovery.inject_faults == ("step:1:exception",) and over.optim.batch_size == 4


def test_mapping_api_accepts_nested_dotted_and_paths(tmp_path):
    cfg = TrainConfig.from_mapping({"optim.batch_size": "8", "checkpoint": {"output_dir": tmp_path / "o"}})
    assert cfg.optim.batch_size == 8 and cfg.output_dir == tmp_path / "o" and cfg.log_dir == tmp_path / "o" / "logs"
    assert cfg.replace(optim={"max_steps": 2}).optim.max_steps == 2
    with pytest.raises(ConfigError) as info:
        cfg.replace(optim={"warmup_ratio": "x"})
    assert info.value.context["field"] == "optim.warmup_ratio"
    assert cfg.flatten()["optim.batch_size"] == 8 and cfg.to_dict()["optim"]["batch_size"] == 8


# ------------------------------------------------------------------------------------------ bad configs
#: name -> (file name, text, dotted key named, words of the expected type / fix)
BAD = {
    "int_as_word": ("c.yaml", "optim:\n  batch_size: eight\n", "optim.batch_size", "expected int"),
    "float_as_word": ("c.yaml", 'optim:\n  warmup_ratio: "x"\n', "optim.warmup_ratio", "expected float"),
    "fractional_int": ("c.toml", "[optim]\nepochs = 1.5\n", "optim.epochs", "expected int"),
    "bool_as_word": ("c.yaml", "logging:\n  json_logs: maybe\n", "logging.json_logs", "expected bool"),
    "bool_for_int": ("c.toml", "[optim]\nbatch_size = true\n", "optim.batch_size", "expected int"),
    "optional_int": ("c.yaml", "optim:\n  max_steps: many\n", "optim.max_steps", "expected int | null"),
    "null_for_required": ("c.yaml", "model:\n  name: null\n", "model.name", "expected str"),
    "bad_choice": ("c.toml", '[optim]\nmixed_precision = "fp8"\n', "optim.mixed_precision",
                   "one of auto, no, fp16, bf16"),
    "unknown_key": ("c.yaml", "optim:\n  batch_sz: 4\n", "optim.batch_sz", "did you mean optim.batch_size"),
    "unknown_section": ("c.toml", "[optimizer]\nbatch_size = 4\n", "optimizer", "known sections: model"),
    "negative": ("c.yaml", "optim:\n  batch_size: -1\n", "optim.batch_size", "must be >= 1"),
    "out_of_range": ("c.yaml", "optim:\n  warmup_ratio: 1.5\n", "optim.warmup_ratio", "must be <= 1"),
    "list_for_scalar": ("c.yaml", "optim:\n  learning_rate: [1e-4, 2e-4]\n", "optim.learning_rate",
                        "expected float"),
    "scalar_for_list": ("c.toml", '[recovery]\ninject_faults = "batch:3:oom"\n', "recovery.inject_faults",
                        "expected list[str]"),
    "section_not_a_table": ("c.yaml", "optim: 5\n", "optim", "expected a mapping"),
    "infinite": ("c.yaml", "eval:\n  eval_idf_power: .inf\n", "eval.eval_idf_power", "expected a finite float"),
    "bad_trace_batches": ("c.json", '{"tracing": {"trace_batches": "every:0"}}', "tracing.trace_batches",
                          "every:N"),
    "bad_device": ("c.yaml", "optim:\n  device: tpu:7\n", "optim.device", "one of auto, cpu, cuda, cuda:N, mps"),
    "dropout_one": ("c.toml", "[model]\ndropout = 1.0\n", "model.dropout", "must be < 1 (within [0, 1))"),
    "nan_rate": ("c.yaml", "optim:\n  learning_rate: .nan\n", "optim.learning_rate", "expected a finite float"),
    "negative_count": ("c.json", '{"recovery": {"max_skipped_batches": -3}}', "recovery.max_skipped_batches",
                       "must be >= 0"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_config_is_a_typed_error_naming_key_file_and_type(name, tmp_path):
    fname, text, key, says = BAD[name]
    path = tmp_path / fname
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        TrainConfig.load(path)
    err = info.value
    assert err.category is ErrorCategory.CONFIG_ERROR and err.context["field"] == key
    assert err.one_line().startswith(f"error[CONFIG_ERROR]: {path}: ") and key in err.one_line()
    assert says in err.one_line() + " " + (err.hint_text() or "")

    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["train", "--config", str(path), "--output-dir", str(out), "--no-mlflow"])
    assert res.exit_code == CONFIG_EXIT, res.output + res.stderr
    first = res.stderr.splitlines()[0]
    assert first.startswith(f"error[CONFIG_ERROR]: {path}: ") and key in first, first
    assert says in res.stderr and "Traceback" not in res.stderr + res.stdout
    assert not out.exists()  # failed before anything was written


@pytest.mark.parametrize("flags, key, says", [
    (["--batch-size", "x"], "optim.batch_size", "expected int (--batch-size)"),
    (["--learning-rate", "fast"], "optim.learning_rate", "expected float (--learning-rate)"),
    (["--warmup-ratio", "-0.1"], "optim.warmup_ratio", "must be >= 0"),
    (["--eval-idf-power", "nan"], "eval.eval_idf_power", "expected a finite float"),
    # non-finite and out-of-range numbers name the flag (issue 30)
    (["--learning-rate", "inf"], "optim.learning_rate", "expected a finite float (--learning-rate)"),
    (["--learning-rate", "-inf"], "optim.learning_rate", "expected a finite float (--learning-rate)"),
    (["--weight-decay", "nan"], "optim.weight_decay", "expected a finite float (--weight-decay)"),
    (["--dropout", "2"], "model.dropout", "must be < 1 (within [0, 1)), got 2.0 (--dropout)"),
    (["--dropout", "1"], "model.dropout", "must be < 1 (within [0, 1)), got 1.0 (--dropout)"),
    (["--dropout", "-0.1"], "model.dropout", "must be >= 0 (within [0, 1)), got -0.1 (--dropout)"),
    (["--warmup-ratio", "2"], "optim.warmup_ratio", "must be <= 1 (within [0, 1]), got 2.0 (--warmup-ratio)"),
    (["--num-negatives", "-1"], "data.num_negatives", "must be >= 0, got -1 (--num-negatives)"),
    (["--keep-last", "0"], "checkpoint.keep_last", "must be >= 1, got 0 (--keep-last)"),  # it kept 1 anyway
    (["--save-best-metric", "ndcg"], "eval.save_best_metric", "must be one of ndcg@10, mrr@10, recall@100, map@100, "
                                                              "got 'ndcg'"),  # no best model was ever kept
    (["--register-model", "m", "--no-mlflow"], "tracking.register_model", "needs tracking"),
    (["--max-skipped-fraction", "1.5"], "recovery.max_skipped_fraction", "must be <= 1 (within [0, 1]), got 1.5"),
    (["--seed", "-1"], "optim.seed", "must be >= 0"),
    # a malformed --device is a usage mistake (CONFIG_ERROR naming the flag and the accepted forms)
    (["--device", "tpu:7"], "optim.device", "must be one of auto, cpu, cuda, cuda:N, mps, got 'tpu:7' (--device)"),
    (["--device", "cuda:x"], "optim.device", "got 'cuda:x' (--device)"),
    (["--device", "gpu"], "optim.device", "got 'gpu' (--device)"),
])
def test_bad_flag_is_a_config_error_naming_the_command_line(flags, key, says, tmp_path):
    for command in (["train", "--output-dir", str(tmp_path / "out")], ["config", "show"]):
        res = CliRunner().invoke(cli, [*command, *flags])
        assert res.exit_code == CONFIG_EXIT, res.output + res.stderr
        first = res.stderr.splitlines()[0]
        assert first.startswith(f"error[CONFIG_ERROR]: command line: {key}: "), first
        assert says in first and "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()


def test_a_file_value_that_fails_names_the_file_and_a_flag_the_command_line(tmp_path):
    conf = tmp_path / "c.yaml"
    conf.write_text("optim:\n  warmup_ratio: 0.5\n")
    res = CliRunner().invoke(cli, ["config", "show", "--config", str(conf), "--warmup-ratio", "2"])
    assert res.exit_code == CONFIG_EXIT and res.stderr.startswith("error[CONFIG_ERROR]: command line: optim.warmup_ratio")
    conf.write_text("optim:\n  warmup_ratio: 2\n")
    res = CliRunner().invoke(cli, ["config", "show", "--config", str(conf), "--batch-size", "8"])
    assert res.exit_code == CONFIG_EXIT and res.stderr.startswith(f"error[CONFIG_ERROR]: {conf}: optim.warmup_ratio")


def test_every_numeric_key_is_bounded_and_finite():
    """No number goes unchecked: every int/float key has a lower bound (counts >= 0 or 1, rates > 0,
    probabilities within [0, 1] or [0, 1)), and no float key takes inf or nan."""
    numeric = [s for s in config_fields() if s.base in (int, float)]
    assert len(numeric) > 20
    unbounded = [s.key for s in numeric if s.ge is None and s.gt is None]
    assert not unbounded, f"numeric keys without a lower bound: {unbounded}"
    for key, interval in (("model.dropout", (0, None, None, 1)), ("optim.warmup_ratio", (0, None, 1, None)),
                          ("recovery.max_skipped_fraction", (0, None, 1, None))):
        spec = next(s for s in numeric if s.key == key)
        assert (spec.ge, spec.gt, spec.le, spec.lt) == interval, key
    for spec in numeric:
        if spec.base is float:
            for bad in ("inf", "-inf", "nan", float("inf"), float("nan")):
                with pytest.raises(ConfigError, match="finite"):
                    TrainConfig.from_mapping({spec.key: bad})


@pytest.mark.parametrize("device, ok", [("auto", True), ("cpu", True), ("cuda", True), ("cuda:0", True),
                                        ("cuda:12", True), ("mps", True), ("tpu:7", False), ("cuda:x", False),
                                        ("gpu", False), ("CPU", False), ("cuda:", False), ("cuda:-1", False),
                                        ("", False)])
def test_device_forms_are_checked_in_the_config(device, ok):
    """The form is checked with the config (a ConfigError before anything starts); whether the machine has
    that device is decided when the run starts (a DeviceError, exit 8)."""
    if ok:
        assert TrainConfig.from_mapping({"optim.device": device}).optim.device == device
    else:
        with pytest.raises(ConfigError, match=r"optim\.device: must be one of auto, cpu, cuda, cuda:N, mps"):
            TrainConfig.from_mapping({"optim.device": device})


# ------------------------------------------------------------------------------------------ flags from metadata
#: Every flag `train` had before the options were generated (flag parameter -> dotted key): all must remain.
LEGACY_FLAGS = {
    "train_file": "data.train_file", "train_split": "data.train_split", "val_file": "data.val_file",
    "on_bad_record": "data.on_bad_record", "num_negatives": "data.num_negatives",
    "output_dir": "checkpoint.output_dir", "save_steps": "checkpoint.save_steps",
    "keep_last": "checkpoint.keep_last", "resume": "checkpoint.resume",
    "model": "model.name", "dropout": "model.dropout", "max_query_length": "model.max_query_length",
    "max_doc_length": "model.max_doc_length", "epochs": "optim.epochs", "max_steps": "optim.max_steps",
    "batch_size": "optim.batch_size", "gradient_accumulation_steps": "optim.gradient_accumulation_steps",
    "learning_rate": "optim.learning_rate", "weight_decay": "optim.weight_decay", "warmup_ratio": "optim.warmup_ratio",
    "warmup_steps": "optim.warmup_steps", "max_grad_norm": "optim.max_grad_norm",
    "mixed_precision": "optim.mixed_precision", "seed": "optim.seed", "device": "optim.device",
    "lambda_q": "loss.lambda_q", "lambda_d": "loss.lambda_d", "reg_warmup_steps": "loss.reg_warmup_steps",
    "max_skipped_batches": "recovery.max_skipped_batches", "max_skipped_fraction": "recovery.max_skipped_fraction",
    "max_consecutive_failures": "recovery.max_consecutive_failures", "inject_fault": "recovery.inject_faults",
    "log_dir": "logging.log_dir", "log_level": "logging.log_level", "json_logs": "logging.json_logs",
    "progress": "logging.progress", "tracking_uri": "tracking.tracking_uri",
    "experiment_name": "tracking.experiment_name", "run_name": "tracking.run_name",
    "require_tracking": "tracking.require", "register_model": "tracking.register_model",
    "otel_exporter": "tracing.exporter", "trace_batches": "tracing.trace_batches",
    "otel_to_mlflow": "tracing.to_mlflow", "eval_data": "eval.eval_data", "eval_split": "eval.eval_split",
    "eval_steps": "eval.eval_steps", "eval_max_queries": "eval.eval_max_queries",
    "eval_idf_power": "eval.eval_idf_power", "save_best_metric": "eval.save_best_metric",
}


def test_every_field_has_a_flag_or_is_marked_file_only():
    import click

    options = {p.name: p for p in train.params if isinstance(p, click.Option)}
    by_param = {s.param: s for s in config_fields() if s.flag}
    specs = {s.key: s for s in config_fields()}
    for sect in dataclasses.fields(TrainConfig):
        for f in dataclasses.fields(sect.default_factory):  # type: ignore[arg-type]
            spec = specs[f"{sect.name}.{f.name}"]
            assert f.metadata.get("help"), f"{spec.key} has no help text (declare it with setting())"
            if f.metadata.get("file_only"):
                assert spec.flag is None
                continue
            opt = options[spec.param]  # a flag of its own
            assert spec.flag in opt.opts and opt.help == spec.help
    # nothing but the config flags, --config, --debug and --sink (sinks of other packages, by name)
    assert set(options) == set(by_param) | {"config_file", "debug", "sink_names"}
    for param, key in LEGACY_FLAGS.items():
        assert param in by_param and by_param[param].key == key, param
        assert f"--{param.replace('_', '-')}" in options[param].opts
    assert "--no-mlflow" in options["mlflow"].secondary_opts
    assert by_param["mlflow"].key == "tracking.enabled"


def test_flag_behaviours_are_kept():
    ctx = train.make_context("train", ["--mixed-precision", "--no-mlflow"])
    assert ctx.params["mixed_precision"] == "auto" and ctx.params["mlflow"] is False
    assert train.make_context("train", ["--mixed-precision", "bf16"]).params["mixed_precision"] == "bf16"
    assert _shown_config("--log-level", "warning").logging.log_level == "WARNING"
    shown = _shown_config("--require-tracking", "--otel-to-mlflow", "--inject-fault", "batch:1:nan",
                          "--inject-fault", "batch:2:oom", "--model", "splade-tiny")
    assert shown.tracking.require and shown.tracing.to_mlflow
    assert shown.recovery.inject_faults == ("batch:1:nan", "batch:2:oom")
    assert _shown_config() == with_demo_defaults(TrainConfig())  # no flag: the defaults, the demo's filled in


def test_help_shows_defaults_and_help_texts():
    res = CliRunner().invoke(cli, ["train", "--help"], terminal_width=200)
    assert res.exit_code == 0
    text = res.output
    for spec in config_fields():
        if spec.flag:
            assert spec.flag in text, spec.flag
    assert "[default: splade-tiny]" in text and "[default: 5e-05]" in text and "[default: every:50]" in text
    assert "bare --mixed-precision means auto" in text and "[auto|no|fp16|bf16]" in text
    show = CliRunner().invoke(cli, ["config", "show", "--help"], terminal_width=200).output
    assert "--format [yaml|json|params]" in show and "--learning-rate FLOAT" in show


# ------------------------------------------------------------------------------------------ params
def _params_of(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if line)


def test_config_show_params_equals_what_the_run_logs(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    flags = ["--max-steps", "2", "--batch-size", "4", "--max-query-length", "16", "--max-doc-length", "32",
             "--output-dir", str(tmp_path / "out"), "--tracking-uri", uri, "--experiment-name", "cfg",
             "--otel-exporter", "none", "--progress", "none", "--inject-fault", "batch:99:nan"]
    res = CliRunner().invoke(cli, ["train", *flags])
    assert res.exit_code == 0, res.output + res.stderr
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("cfg").experiment_id])
    assert len(runs) == 1
    logged = client.get_run(runs[0].info.run_id).data.params
    keys = {s.key for s in config_fields()}
    shown = _params_of(_show(*flags, fmt="params").stdout)
    unset = {k for k, v in _shown_config(*flags).flatten().items() if v is None}
    assert unset and "tracking.run_name" in unset  # settings left unset are not params
    assert set(shown) == keys - unset and not set(logged) & unset
    assert {k: v for k, v in logged.items() if k in keys} == shown
    assert shown["recovery.inject_faults"] == '["batch:99:nan"]' and shown["optim.learning_rate"] == "5e-05"


def test_params_are_redacted_and_cut_like_mlflow_params(tmp_path, monkeypatch):
    monkeypatch.setenv("SPLADE_TEST_TOKEN", "s3cr3t-value-123")
    long_path = "d" * 7000
    cfg = TrainConfig.from_mapping({"tracking": {"tracking_uri": "https://user:pw@mlflow.example/",
                                                 "run_name": "run-s3cr3t-value-123"},
                                    "data": {"train_file": long_path}})
    params = cfg.params()
    assert params["tracking.tracking_uri"] == "https://***@mlflow.example/"
    assert params["tracking.run_name"] == "run-***"
    assert len(params["data.train_file"]) == 6000 and params["data.train_file"].endswith(PARAM_TRUNCATION_MARKER)
    assert all(isinstance(v, str) for v in params.values())


# ------------------------------------------------------------------------------------------ docs and packaging
def _gen_docs_module():
    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "scripts" / "gen_docs.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def test_generated_config_docs_are_current(tmp_path):
    text = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    assert text == render_config_docs().rstrip("\n") + "\n", "docs/config.md is stale: python scripts/gen_docs.py"
    rows = {line.split("`")[1]: line for line in text.splitlines() if line.startswith("| `")}
    assert list(rows) == [spec.key for spec in config_fields()]  # every key, in order
    for spec in config_fields():
        assert (f"`{spec.flag}" if spec.flag else "(file only)") in rows[spec.key]
        assert f"`{spec.type_name.replace('|', chr(92) + '|')}`" in rows[spec.key]
    gen = _gen_docs_module()
    assert gen.stale(ROOT) == []
    assert gen.stale(tmp_path) == ["docs/config.md", "docs/observability.md"]  # missing pages are reported
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_docs.py"), "--check"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_every_package_folder_is_installed():
    """pyproject lists packages explicitly (the CLI folder is mapped to another name): none may be missing."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(tool["packages"])
    assert tool["package-dir"] == {"splade_obs_cli": "cli"} and "splade_obs_cli" in listed
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "splade_obs").rglob("*.py")
             if "__pycache__" not in p.parts}
    assert found - listed == set(), f"add to [tool.setuptools] packages in pyproject.toml: {sorted(found - listed)}"
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"splade-obs": "splade_obs_cli.main:main"}


def test_cli_installs_as_splade_obs_cli_not_cli(tmp_path):
    code = ("import importlib.util, splade_obs_cli.main as m; "
            "assert importlib.util.find_spec('cli') is None, 'cli importable'; print(m.__name__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env={k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0 and proc.stdout.strip() == "splade_obs_cli.main", proc.stderr


def test_config_show_into_a_closed_pipe_prints_no_error():
    """`splade-obs config show | head -1`: the reader leaves early; that is not an error to report."""
    cmd = f"{shlex.quote(sys.executable)} -m splade_obs_cli.main config show --format params"
    # `true` exits without reading: by the time the CLI (a fraction of a second to start) writes, the pipe is closed
    proc = subprocess.run(f"{cmd} | true; echo $? ${{PIPESTATUS[0]}}", shell=True, executable="/bin/bash",
                          capture_output=True, text=True, timeout=120)
    assert proc.stderr == "", proc.stderr
    assert proc.stdout.split() == ["0", "1"]


def test_a_config_file_that_is_not_utf8_names_its_line(tmp_path):
    """Was a DATA_ERROR with the codec's bare message and no file (the read was outside the parse errors)."""
    path = tmp_path / "c.toml"
    path.write_bytes(b'[optim]\nbatch_size = 4\nname = "\xff"\n')
    with pytest.raises(ConfigError) as info:
        TrainConfig.load(path)
    line = info.value.one_line()
    assert line.startswith(f"error[CONFIG_ERROR]: {path}:3: not UTF-8 text (byte 0xff"), line
    assert "UTF-8" in (info.value.hint_text() or "")
    with pytest.raises(ConfigError, match="is a folder"):
        TrainConfig.load(tmp_path)


def test_the_best_model_metrics_are_the_evaluations():
    from splade_obs.config import BEST_METRICS
    from splade_obs.evaluation import METRIC_KEYS

    assert BEST_METRICS == METRIC_KEYS
