"""``splade-obs average``: one model whose weights are the (weighted) average of several fine-tuned models."""

from __future__ import annotations

import json
from pathlib import Path

import click

from splade_obs.errors import ErrorCategory

from .common import debug_option, handle_errors


@click.command("average")
@click.argument("models", nargs=-1, required=True)
@click.option("--output", "-o", "output", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder to write the averaged model to (replaced atomically if it exists).")
@click.option("--weight", "weights", type=float, multiple=True,
              help="One weight per model, normalised to sum to 1 (default: uniform). Repeatable.")
@debug_option
@handle_errors(ErrorCategory.MODEL_ERROR)
def average(models: tuple[str, ...], output: Path, weights: tuple[float, ...], debug: bool) -> None:
    """Average the weights of MODELS (local folders or splade-tiny) fine-tuned from one starting point:
    a "model soup", e.g. of one recipe trained with several seeds. They must share the architecture and the
    tokenizer. Prints the output folder and the inputs' weights as JSON."""
    from splade_obs.average import average_models

    click.echo(json.dumps(average_models(list(models), output, list(weights) or None), indent=2))
