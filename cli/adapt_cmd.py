"""``splade-obs adapt``: masked-LM training on the target corpus (domain adaptation) before fine-tuning."""

from __future__ import annotations

import json
from pathlib import Path

import click

from splade_obs.errors import ErrorCategory

from .common import FiniteFloatRange, debug_option, handle_errors


@click.command("adapt")
@click.option("--model", "model_name", default="splade-tiny", show_default=True,
              help="Model to adapt: 'splade-tiny', a saved folder or a hub id.")
@click.option("--corpus", required=True, type=click.Path(path_type=Path),
              help="BEIR folder (its corpus.jsonl is read) or a corpus JSONL file: {\"_id\", \"title\", \"text\"} per "
                   "line. Only the documents are read: no queries, no labels.")
@click.option("--output", "-o", "output", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder to write the adapted model to (replaced atomically if it exists).")
@click.option("--epochs", default=2, show_default=True, type=click.IntRange(min=1))
@click.option("--learning-rate", default=5e-5, show_default=True, type=FiniteFloatRange(min=0, min_open=True))
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--max-length", default=256, show_default=True, type=click.IntRange(min=1),
              help="Tokens per document (longer ones are cut).")
@click.option("--mask-probability", default=0.15, show_default=True,
              type=FiniteFloatRange(0, 1, min_open=True, max_open=True))
@click.option("--train-part", type=click.Choice(["layers", "all"]), default="layers", show_default=True,
              help="layers: only the transformer layers learn; the embeddings and the MLM head (SPLADE's "
                   "vocabulary weights) stay as they are. all: every weight (the model stops being sparse).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the document order, the masks and dropout.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ...")
@debug_option
@handle_errors(ErrorCategory.TRAINING_ERROR)
def adapt(model_name: str, corpus: Path, output: Path, epochs: int, learning_rate: float, batch_size: int,
          max_length: int, mask_probability: float, train_part: str, seed: int, device: str, debug: bool) -> None:
    """Domain adaptation: masked-LM training of a SPLADE model on the documents it will search, before
    fine-tuning it there (`splade-obs train --model OUTPUT ...`).

    The adapted model is not meant to retrieve on its own: it is denser and worse until fine-tuned. Progress goes to
    stderr; the record written next to the model (adapted_from.json: source, corpus digest, settings, masked-LM
    loss before, per epoch and after) is printed as JSON.
    """
    from splade_obs.adapt import AdaptSettings, adapt_model
    from splade_obs.device import device_name
    from splade_obs.logging_setup import setup_logging, teardown_logging

    settings = AdaptSettings(epochs=epochs, learning_rate=learning_rate, batch_size=batch_size, max_length=max_length,
                             mask_probability=mask_probability, train_part=train_part, seed=seed)
    setup_logging("INFO")  # the project's console logger (colour, secrets redacted) on stderr
    try:
        record = adapt_model(model_name, corpus, output, settings, device=device_name(device))
    finally:
        teardown_logging()
    click.echo(json.dumps(record, indent=2))
