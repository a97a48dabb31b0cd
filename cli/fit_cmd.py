"""``splade-obs fit``: a BEIR folder in, a better model out (dev split, teacher, training, report)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import click

from splade_obs.errors import ErrorCategory

from .common import debug_option, handle_errors


@click.command("fit", context_settings={"max_content_width": 110})
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path),
              help="BEIR folder with qrels/train.tsv (its test split, when present, is scored in the report).")
@click.option("--output-dir", type=click.Path(path_type=Path), default=None,
              help="Where the stages write (default runs/fit-<folder name>); a rerun resumes there.")
@click.option("--model", default="splade-tiny", show_default=True,
              help="The model fine-tuned (and the teacher's SPLADE part): 'splade-tiny', a folder or a hub id.")
@click.option("--seeds", default=1, show_default=True, type=click.IntRange(1, 8),
              help="Seeds trained (42, 1, 2, ...); with 2 or more their average is kept when it wins on dev. "
                   "Each seed costs one more training stage (SciFact: 732 steps, 15 min on 2 CPU cores).")
@click.option("--dev-queries", type=click.IntRange(min=1), default=None,
              help="Train queries held out as dev (default a quarter, at most 200).")
@click.option("--split-seed", default=0, show_default=True, help="Seed of the dev split's draw.")
@click.option("--dense-model", default="all-minilm-l6-v2", show_default=True,
              help="Dense bi-encoder in the teacher ('none': BM25 + SPLADE only; skipped with a warning when "
                   "sentence-transformers is not installed).")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A config file (TOML/YAML/JSON, keys of docs/config.md) over the fit recipe.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--no-mlflow", is_flag=True, help="Do not track in MLflow (the report file has every number).")
@click.option("--tracking-uri", default=None, help="MLflow tracking URI (default as train's).")
@click.option("--experiment-name", default=None, help="MLflow experiment (default as train's).")
@click.option("--run-name", default=None, help="The fit's MLflow run name (seeds: <name>-seed-N).")
@click.option("--otel-exporter", type=click.Choice(["file", "otlp", "console", "none"]), default=None,
              help="Span exporter (default as train's: file = <output-dir>/logs/traces.jsonl).")
@click.option("--progress", type=click.Choice(["auto", "bar", "lines", "none"]), default="auto",
              show_default=True, help="Progress of training and encoding (on stderr).")
@debug_option
@handle_errors(ErrorCategory.TRAINING_ERROR)
def fit(data_dir: Path, output_dir: Path | None, model: str, seeds: int, dev_queries: int | None, split_seed: int,
        dense_model: str, config_file: Path | None, device: str, no_mlflow: bool, tracking_uri: str | None,
        experiment_name: str | None, run_name: str | None, otel_exporter: str | None, progress: str,
        debug: bool) -> None:
    """Fine-tune on a BEIR folder's train split, every choice made on a dev split held out of it.

    Holds out a seeded dev split of the train queries, builds the hybrid teacher file (BM25 + SPLADE + dense,
    cached by a digest of its inputs), trains the distillation recipe evaluating on dev at each epoch (best
    checkpoint kept), averages the seeds when that wins on dev, and reports dev and test metrics of the
    chosen model against zero-shot and BM25 (stemmed and not). One MLflow run with a nested run per seed; one
    trace with a span per stage. Rerunning with the same --output-dir resumes at the stage that stopped.
    The report table goes to stderr, the report JSON to stdout; the model to <output-dir>/model.
    """
    import json

    from splade_obs.fit import fit as run_fit, format_report
    from splade_obs.fit_stages import FitOptions
    from splade_obs.recovery import validate_file_exists

    validate_file_exists(data_dir, kind="dir", what="BEIR folder")
    out = output_dir or Path("runs") / f"fit-{data_dir.resolve().name}"
    overrides: dict[str, Any] = {"logging.progress": progress, "optim.device": device}
    if no_mlflow:
        overrides["tracking.enabled"] = False
    for key, value in (("tracking.tracking_uri", tracking_uri), ("tracking.experiment_name", experiment_name),
                       ("tracking.run_name", run_name), ("tracing.exporter", otel_exporter)):
        if value is not None:
            overrides[key] = value
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    fit_log = logging.getLogger("splade_obs.fit")
    fit_log.addHandler(handler)
    fit_log.setLevel(logging.INFO)
    try:
        result = run_fit(FitOptions(data=data_dir, output_dir=out, model=model, seeds=seeds, split_seed=split_seed,
                                    dev_queries=dev_queries, config_file=config_file, overrides=overrides,
                                    dense_model=None if dense_model == "none" else dense_model, device=device,
                                    progress=progress))
    finally:
        fit_log.removeHandler(handler)
    click.echo(format_report(result.report), err=True)
    click.echo(f"model: {result.model_path}" + (f"; MLflow run {result.mlflow_run_id}" if result.mlflow_run_id
                                                else ""), err=True)
    click.echo(json.dumps({"model": result.model_path, "chosen": result.chosen, "mlflow_run_id": result.mlflow_run_id,
                           "trace_id": result.trace_id, **result.report}, indent=2))
