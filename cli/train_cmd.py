"""``splade-obs train``: build one frozen config (file < flags), run, turn the outcome into an exit code."""

from __future__ import annotations

import sys
from typing import Any

import click

from splade_obs.errors import EXIT_INTERRUPTED, ConfigError

from .common import debug_option, handle_errors, report_error, debug_enabled

# flag parameter name -> dotted config key
FLAG_KEYS: dict[str, str] = {
    "train_file": "data.train_file", "train_split": "data.train_split", "val_file": "data.val_file",
    "on_bad_record": "data.on_bad_record", "num_negatives": "data.num_negatives",
    "output_dir": "checkpoint.output_dir", "save_steps": "checkpoint.save_steps",
    "keep_last": "checkpoint.keep_last", "resume": "checkpoint.resume",
    "model": "model.name", "dropout": "model.dropout", "max_query_length": "model.max_query_length", "max_doc_length": "model.max_doc_length",
    "epochs": "optim.epochs", "max_steps": "optim.max_steps", "batch_size": "optim.batch_size",
    "gradient_accumulation_steps": "optim.gradient_accumulation_steps", "learning_rate": "optim.learning_rate",
    "weight_decay": "optim.weight_decay", "warmup_ratio": "optim.warmup_ratio", "warmup_steps": "optim.warmup_steps",
    "max_grad_norm": "optim.max_grad_norm", "mixed_precision": "optim.mixed_precision", "seed": "optim.seed",
    "device": "optim.device",
    "lambda_q": "loss.lambda_q", "lambda_d": "loss.lambda_d", "reg_warmup_steps": "loss.reg_warmup_steps",
    "max_skipped_batches": "recovery.max_skipped_batches", "max_skipped_fraction": "recovery.max_skipped_fraction",
    "max_consecutive_failures": "recovery.max_consecutive_failures", "inject_fault": "recovery.inject_faults",
    "log_dir": "logging.log_dir", "log_level": "logging.log_level", "json_logs": "logging.json_logs",
    "progress": "logging.progress",
    "tracking_uri": "tracking.tracking_uri", "experiment_name": "tracking.experiment_name",
    "run_name": "tracking.run_name", "require_tracking": "tracking.require", "register_model": "tracking.register_model",
    "otel_exporter": "tracing.exporter", "trace_batches": "tracing.trace_batches", "otel_to_mlflow": "tracing.to_mlflow",
    "eval_data": "eval.eval_data", "eval_split": "eval.eval_split", "eval_steps": "eval.eval_steps",
    "eval_max_queries": "eval.eval_max_queries", "eval_idf_power": "eval.eval_idf_power",
    "save_best_metric": "eval.save_best_metric",
}

P = click.Path


@click.command("train", context_settings={"max_content_width": 110})
@click.option("--config", "config_file", type=P(dir_okay=False), help="YAML or TOML file with config sections; flags override it.")
@click.option("--train-file", type=P(), help="Training data: JSON array, JSONL, or a BEIR folder. Default: the bundled demo set.")
@click.option("--train-split", default="train", show_default=True, help="qrels split when --train-file is a BEIR folder.")
@click.option("--val-file", type=P(), help="Validation data (same formats); per-epoch validation loss. Optional.")
@click.option("--output-dir", default="outputs/splade-obs", show_default=True, type=P(file_okay=False),
              help="Checkpoints (checkpoints/), final model (final/), logs (logs/).")
@click.option("--model", default="splade-tiny", show_default=True,
              help="'splade-tiny' (embedded), a local HF folder, or a hub id of a masked-LM.")
@click.option("--mixed-precision", type=click.Choice(["auto", "no", "fp16", "bf16"]), default="auto",
              is_flag=False, flag_value="auto", show_default=True,
              help="AMP mode; bare --mixed-precision means auto (bf16 where native, fp16+GradScaler on older GPUs, fp32 otherwise).")
@click.option("--dropout", type=float, help="Override the backbone's dropout probability (e.g. 0 for deterministic comparisons).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--epochs", type=int, default=1, show_default=True)
@click.option("--max-steps", type=int, help="Optimizer steps; overrides --epochs.")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Queries per micro-batch (per process).")
@click.option("--gradient-accumulation-steps", type=int, default=1, show_default=True)
@click.option("--learning-rate", type=float, default=5e-5, show_default=True)
@click.option("--weight-decay", type=float, default=0.01, show_default=True)
@click.option("--warmup-ratio", type=float, default=0.1, show_default=True, help="Linear LR warm-up share of the steps.")
@click.option("--warmup-steps", type=int, help="Linear LR warm-up steps (overrides --warmup-ratio).")
@click.option("--max-grad-norm", type=float, default=1.0, show_default=True)
@click.option("--max-query-length", type=int, default=32, show_default=True)
@click.option("--max-doc-length", type=int, default=128, show_default=True)
@click.option("--num-negatives", type=int, default=1, show_default=True, help="Hard negatives per query when the data has them.")
@click.option("--lambda-q", type=float, default=5e-4, show_default=True, help="FLOPS weight for queries.")
@click.option("--lambda-d", type=float, default=3e-4, show_default=True, help="FLOPS weight for documents.")
@click.option("--reg-warmup-steps", type=int, help="Quadratic FLOPS warm-up steps (default: a third of the run).")
@click.option("--seed", type=int, default=42, show_default=True)
@click.option("--save-steps", type=int, help="Checkpoint every N optimizer steps (always at each epoch end).")
@click.option("--keep-last", type=int, default=2, show_default=True, help="Checkpoints kept.")
@click.option("--resume", help="'auto' (latest checkpoint in --output-dir) or a checkpoint folder.")
@click.option("--on-bad-record", type=click.Choice(["error", "skip"]), default="error", show_default=True,
              help="error: stop before training listing the bad records; skip: drop them into <log-dir>/bad_records.jsonl.")
@click.option("--max-skipped-batches", type=int, default=50, show_default=True, help="Error budget: failed batches skipped before the run stops.")
@click.option("--max-skipped-fraction", type=float, default=0.1, show_default=True, help="Error budget: share of failed batches.")
@click.option("--max-consecutive-failures", type=int, default=5, show_default=True)
@click.option("--inject-fault", multiple=True,
              help="Fault injection for demos/tests: batch:N:{oom,nan,overflow,exception,data}, step:N:{interrupt,sigterm,exception}; prefix rankR: for one rank. Repeatable.")
@click.option("--log-dir", type=P(file_okay=False), help="Default: <output-dir>/logs.")
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
              default="INFO", show_default=True)
@click.option("--json-logs", is_flag=True, help="Also write <log-dir>/train_splade.jsonl (one JSON object per record).")
@click.option("--progress", type=click.Choice(["auto", "bar", "lines", "none"]), default="auto", show_default=True)
@click.option("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlruns/mlflow.db).")
@click.option("--experiment-name", default="splade-obs", show_default=True)
@click.option("--run-name", help="MLflow run name (default: a generated readable name).")
@click.option("--no-mlflow", is_flag=True, help="Do not track the run in MLflow.")
@click.option("--require-tracking", is_flag=True, help="Fail at start if the tracking server is unreachable.")
@click.option("--register-model", help="Register the logged model under this name in the MLflow registry.")
@click.option("--otel-exporter", type=click.Choice(["file", "otlp", "console", "none"]), default="file", show_default=True,
              help="Span exporter: file = <log-dir>/traces.jsonl; otlp uses OTEL_EXPORTER_OTLP_* env vars.")
@click.option("--trace-batches", default="every:50", show_default=True,
              help="Batch spans kept: all, none or every:N (failed and slow batches always kept).")
@click.option("--otel-to-mlflow", is_flag=True, help="Also send spans to the MLflow server's /v1/traces endpoint.")
@click.option("--eval-data", type=P(), help="BEIR folder for retrieval evaluation during and after training.")
@click.option("--eval-split", default="test", show_default=True)
@click.option("--eval-steps", type=int, help="Evaluate every N optimizer steps (and at the end).")
@click.option("--eval-max-queries", type=int, help="Evaluate on a seeded subset of queries.")
@click.option("--eval-idf-power", type=float,
              help="Weight the evaluation index by idf^POWER (as `evaluate --idf-power`; default 0: off).")
@click.option("--save-best-metric", help="Keep the best model by this eval metric (e.g. ndcg@10) in <output-dir>/best.")
@debug_option
@click.pass_context
@handle_errors()
def train(ctx: click.Context, config_file: str | None, no_mlflow: bool, debug: bool, **flags: Any) -> None:
    """Train a SPLADE model with AMP, tracked in MLflow and traced with OpenTelemetry.

    With no data flags it trains splade-tiny on the bundled demo set (a few minutes on 2 CPU cores).
    """
    from splade_obs.config import TrainConfig, load_config_file
    from splade_obs.run import run_training

    values: dict[str, Any] = {}
    if config_file:
        values.update(_dotted(load_config_file(config_file)))
    for name, value in flags.items():
        src = ctx.get_parameter_source(name)
        explicit = src is not None and src.name not in ("DEFAULT", "DEFAULT_MAP")
        if explicit or FLAG_KEYS[name] not in values:
            if name == "inject_fault":
                value = tuple(value)
                if not explicit and not value:
                    continue
            if value is None and FLAG_KEYS[name] not in values and not explicit:
                continue
            values[FLAG_KEYS[name]] = value
    if no_mlflow:
        values["tracking.enabled"] = False
    if "logging.log_level" in values and isinstance(values["logging.log_level"], str):
        values["logging.log_level"] = values["logging.log_level"].upper()
    cfg = TrainConfig.from_mapping(values, source=config_file or "command line")
    outcome = run_training(cfg)
    result = outcome.result
    if result.status == "FINISHED":
        if result.model_path:  # rank 0 under torchrun
            click.echo(f"model saved to {result.model_path}", err=True)
        return
    if result.status == "KILLED":
        click.echo(f"run stopped ({result.error.message if result.error else 'interrupted'}); "
                   f"resume with --resume auto --output-dir {cfg.output_dir}", err=True)
        sys.exit(EXIT_INTERRUPTED)
    assert result.error is not None
    report_error(result.error, debug_enabled())
    sys.exit(result.error.exit_code)


def _dotted(data: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            for k2, v2 in value.items():
                out[f"{key}.{k2}"] = v2
        else:
            if "." not in key:
                raise ConfigError(f"unknown top-level key {key!r}", field=key,
                                  hint="use sections like [optim] batch_size = 8, or dotted keys optim.batch_size")
            out[key] = value
    return out
