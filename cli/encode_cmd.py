"""``splade-obs encode``: a corpus or a query set to sparse JSONL or Anserini's impact formats."""

from __future__ import annotations

import time
from pathlib import Path

import click

from splade_obs.errors import ErrorCategory

from .common import FiniteFloatRange, check_output_file, debug_option, handle_errors, head_pass_option
from .evaluate_cmd import progress_options


@click.command("encode")
@click.option("--model", "model_name", required=True, help="'splade-tiny', a saved model folder or a hub id.")
@click.option("--input", "input_path", required=True, type=click.Path(path_type=Path),
              help="A BEIR folder, or a JSONL file with '_id' (or 'id') and 'text' (and optional 'title').")
@click.option("--kind", type=click.Choice(["corpus", "queries"]), required=True,
              help="corpus: title + text, default max length 256; queries: text, default max length 64.")
@click.option("--output", required=True, type=click.Path(path_type=Path),
              help="The file to write, in --format's shape.")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "anserini"]), default="jsonl", show_default=True,
              help='jsonl: {"id", "vector": {term: weight}} per line, float weights (integers with '
                   "--quantize-scale). anserini: integer impacts (scale 100 unless --quantize-scale) for "
                   "Anserini's -impact -pretokenized search: corpus as JsonVectorCollection JSONL "
                   '{"id", "contents", "vector"}, queries as TSV "id<TAB>terms", each term repeated by its weight.')
@click.option("--max-length", default=None, type=click.IntRange(min=1), help="Token limit (default by --kind).")
@click.option("--top-k", default=None, type=click.IntRange(min=1), help="Keep only the K heaviest terms.")
@click.option("--quantize-scale", default=None, type=FiniteFloatRange(min=0, min_open=True),
              help="Integer weights int(w * S + 0.5), terms rounding to 0 dropped; with --format anserini "
                   "it replaces the default scale 100.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ...")
@head_pass_option
@progress_options
@debug_option
@handle_errors(ErrorCategory.INFERENCE_ERROR)
def encode(model_name: str, input_path: Path, kind: str, output: Path, fmt: str, max_length: int | None,
           top_k: int | None, quantize_scale: float | None, batch_size: int, device: str, progress: str,
           progress_interval: float, debug: bool) -> None:
    """Encode texts into SPLADE sparse vectors, one line per record, in input order.

    The progress and a summary with the time taken go to stderr. Under torchrun each rank encodes its
    contiguous share of the records and rank 0 writes the merged output (docs/recipes.md).
    """
    start = time.monotonic()
    from splade_obs.encoding import encode_file, input_file
    from splade_obs.model import SpladeEncoder
    from splade_obs.progress_util import ProgressSpec
    from splade_obs.shard import rank_device, shard_session

    source = input_file(input_path, kind)  # a wrong path fails before the model loads
    check_output_file(output, inputs=(input_path, source))  # a BEIR folder's corpus.jsonl / queries.jsonl too
    with shard_session() as shard:
        encoder = SpladeEncoder.from_pretrained(model_name, device=rank_device(device, shard))
        stats = encode_file(encoder, input_path, output, kind=kind, max_length=max_length, batch_size=batch_size,
                            top_k=top_k, quantize_scale=quantize_scale, fmt=fmt,
                            progress=ProgressSpec(progress, progress_interval), shard=shard)
    if shard is not None and not shard.is_main:
        return  # rank 0 merged the parts and reports
    if stats.rank_counts is not None:
        click.echo(f"{len(stats.rank_counts)} ranks encoded {', '.join(map(str, stats.rank_counts))} records",
                   err=True)
    if stats.skipped:
        click.echo(f"warning: {stats.skipped} queries had no term left at this scale and were left out "
                   "(Anserini cannot read an empty query); a larger --quantize-scale keeps more terms", err=True)
    click.echo(f"encoded {stats.count} {kind} records in {stats.seconds:.1f}s "
               f"({stats.avg_nnz:.1f} terms per vector) -> {stats.output}; "
               f"{time.monotonic() - start:.1f}s in all (model loading included)", err=True)
