"""``splade-obs train``: build one frozen config (defaults < file < flags), run, turn the outcome into an exit code.

The options are generated from the config dataclasses (``cli/options.py``); see ``docs/config.md``.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from splade_obs.errors import EXIT_INTERRUPTED

from .common import debug_enabled, debug_option, handle_errors, report_error
from .options import config_from_flags, config_options, sink_option


@click.command("train", context_settings={"max_content_width": 110})
@config_options
@sink_option
@debug_option
@click.pass_context
@handle_errors()
def train(ctx: click.Context, config_file: str | None, sink_names: tuple[str, ...], debug: bool,
          **flags: Any) -> None:
    """Train a SPLADE model with AMP, tracked in MLflow and traced with OpenTelemetry.

    With no data flags it trains splade-tiny on the bundled demo set for 3 epochs with a validation loss per
    epoch, then evaluates retrieval on the demo's BEIR set (under a minute on 2 CPU cores; --val-file none,
    --eval-data none: without them).

    With --train-file a BEIR folder: one example per (query, relevant document) pair, each with a hard negative
    drawn each epoch from its query's BM25 top 50 (judged positives removed; --beir-negatives none: in-batch
    negatives only), and enough epochs for 200 optimizer steps (at most 10) unless --epochs or --max-steps is
    given. On SciFact (4 epochs, about 3 min on 2 CPU cores) that lifts splade-tiny from 0.644 to 0.663 nDCG@10
    (in-batch only: 0.672); why, and the measurements: docs/recipes.md#training-data.

    Every option is a key of docs/config.md; `splade-obs config show` prints the effective config.
    """
    cfg = config_from_flags(ctx, config_file, flags)  # before importing torch: a bad config fails fast
    from splade_obs.api import train as train_api

    # the process is ours: every library's log records go to the run's files; an unknown --sink fails here
    outcome = train_api(cfg, sinks=sink_names, raise_on_failure=False, capture_root_logger=True)
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
