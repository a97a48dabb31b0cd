"""``splade-obs evaluate``: retrieval quality and sparsity of a model on a BEIR split."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, TypeVar

import click

from splade_obs import finite
from splade_obs.engines import ENGINE_HELP, ENGINES
from splade_obs.errors import ErrorCategory

from .common import FiniteFloatRange, check_output_file, debug_option, encoder_options, handle_errors

F = TypeVar("F", bound=Callable[..., Any])


def progress_options(fn: F) -> F:
    """``--progress`` and ``--progress-interval`` (as train's ``logging.progress``): shared by evaluate, encode and
    mine-negatives. Progress goes to stderr; stdout keeps the results."""
    fn = click.option("--progress-interval", default=10.0, show_default=True, type=FiniteFloatRange(min=0),
                      metavar="SECONDS", help="Seconds between progress lines when not on a terminal.")(fn)
    return click.option("--progress", "progress", type=click.Choice(["auto", "bar", "lines", "none"]),
                        default="auto", show_default=True,
                        help="auto: a bar on a terminal, lines otherwise (on stderr).")(fn)


@click.command("evaluate")
@click.option("--model", "model_name", required=True, help="'splade-tiny', a saved model folder or a hub id.")
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path),
              help="BEIR folder: corpus.jsonl, queries.jsonl, qrels/<split>.tsv.")
@click.option("--split", default="test", show_default=True, help="Which qrels/<split>.tsv to evaluate.")
@encoder_options
@click.option("--max-queries", default=None, type=click.IntRange(min=1),
              help="Evaluate a fixed random subset of this many queries (seed 0).")
@click.option("--top-k-docs", default=100, show_default=True, type=click.IntRange(min=1),
              help="Documents retrieved per query (and written to --trec-run).")
@click.option("--idf-power", default=0.0, show_default=True, type=FiniteFloatRange(min=0),
              help="Index-time weighting: every document term weight times idf^POWER, idf from the document "
                   "frequencies of the encoded corpus (BM25's formula). 0 is off.")
@click.option("--index-dir", type=click.Path(path_type=Path), default=None,
              help="Encode the corpus block by block into a sparse matrix on disk here (docs/ and its transpose "
                   "postings/) and retrieve from it memory-mapped: the vectors are not held in memory.")
@click.option("--engine", type=click.Choice(ENGINES), default="exact", show_default=True, help=ENGINE_HELP)
@click.option("--output", type=click.Path(path_type=Path), default=None, help="Also write the JSON here.")
@click.option("--trec-run", type=click.Path(path_type=Path), default=None,
              help="Write the ranking as a TREC run file (qid Q0 docid rank score tag).")
@progress_options
@debug_option
@handle_errors(ErrorCategory.EVALUATION_ERROR)
def evaluate(model_name: str, data_dir: Path, split: str, max_query_length: int, max_doc_length: int,
             batch_size: int, max_queries: int | None, top_k_docs: int, idf_power: float, index_dir: Path | None,
             engine: str, device: str, output: Path | None, trec_run: Path | None, progress: str,
             progress_interval: float, debug: bool) -> None:
    """Encode a BEIR corpus and its queries, retrieve exactly by sparse dot product, and score.

    Prints JSON (nDCG@10, MRR@10, Recall@100, MAP@100, sparsity, timings, the command's duration_seconds) on
    stdout; the progress, a table and the time taken on stderr. Under torchrun each rank encodes a contiguous
    share of the corpus and queries, rank 0 retrieves and reports, and the JSON adds world_size and
    docs_per_rank (docs/recipes.md).
    """
    start = time.monotonic()
    from splade_obs.beir import load_beir
    from splade_obs.evaluation import RetrievalEvaluator, format_metrics_table, write_trec_run
    from splade_obs.model import SpladeEncoder
    from splade_obs.shard import rank_device, shard_session

    check_output_file(output)  # before hours of encoding, not after
    check_output_file(trec_run, "--trec-run")
    beir = load_beir(data_dir, split, lazy_corpus=True)  # checked before the model loads; text stays on disk
    evaluator = RetrievalEvaluator(beir, max_query_length=max_query_length, max_doc_length=max_doc_length,
                                   batch_size=batch_size, max_queries=max_queries, top_k_retrieve=top_k_docs,
                                   idf_power=idf_power, progress=progress, progress_interval=progress_interval,
                                   index_dir=index_dir, engine=engine)
    with shard_session() as shard:
        encoder = SpladeEncoder.from_pretrained(model_name, device=rank_device(device, shard))
        metrics = evaluator.evaluate(encoder, shard=shard)
    if shard is not None and not shard.is_main:
        return  # rank 0 reports
    result = {"model": model_name, "data": str(data_dir), "split": split, "max_query_length": max_query_length,
              "max_doc_length": max_doc_length, "top_k_docs": top_k_docs, "idf_power": idf_power, "engine": engine,
              "head_pass": _head_pass(encoder), "metrics": metrics}
    if shard is not None:
        result.update(world_size=shard.world_size, docs_per_rank=evaluator.docs_per_rank)
    if trec_run is not None:
        write_trec_run(evaluator.run(), trec_run)
    result["duration_seconds"] = time.monotonic() - start  # the whole command: loading, encoding, retrieval
    text = finite.dumps(result, indent=2)  # a NaN score is "nan": strict JSON for jq and JavaScript
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text + "\n", encoding="utf-8")
    click.echo(format_metrics_table(metrics), err=True)
    encoding = metrics["encode_docs_s"] + metrics["encode_queries_s"]
    click.echo(f"evaluated {len(evaluator.query_ids)} queries against {len(evaluator.doc_ids)} documents in "
               f"{result['duration_seconds']:.1f}s (encoding {encoding:.1f}s, retrieval {metrics['search_s']:.1f}s)",
               err=True)
    click.echo(text)


def _head_pass(encoder: object) -> str:
    """The vocabulary pass the documents were encoded with (``--head-pass``; accelerators: always fp32)."""
    from splade_obs.cpu import head_pass

    device = getattr(encoder, "device", None)
    return head_pass() if getattr(device, "type", "cpu") == "cpu" else "fp32"
