"""``splade-obs search``: index a corpus with an engine (exact or Seismic), search queries, write a TREC run."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from splade_obs.engines import ENGINE_HELP, ENGINES, SeismicParams
from splade_obs.errors import ErrorCategory

from .common import FiniteFloatRange, check_output_file, debug_option, encoder_options, handle_errors
from .evaluate_cmd import progress_options

_SEISMIC = SeismicParams()


@click.command("search")
@click.option("--model", "model_name", required=True, help="'splade-tiny', a saved model folder or a hub id.")
@click.option("--index-from", "index_from", required=True, type=click.Path(path_type=Path),
              help="The documents: a BEIR folder or a JSONL of texts ('_id'/'id', 'text', optional 'title'), "
                   "encoded with --model; or the vectors of `splade-obs encode --format jsonl` (used as they are).")
@click.option("--queries", "queries_path", required=True, type=click.Path(path_type=Path),
              help="A BEIR folder (its queries.jsonl) or a JSONL of queries ('_id'/'id', 'text').")
@click.option("--engine", type=click.Choice(ENGINES), default="exact", show_default=True, help=ENGINE_HELP)
@click.option("--k", "k", default=10, show_default=True, type=click.IntRange(min=1),
              help="Documents retrieved per query.")
@click.option("--output", required=True, type=click.Path(path_type=Path),
              help="The TREC run file to write (qid Q0 docid rank score tag).")
@click.option("--query-cut", default=_SEISMIC.query_cut, show_default=True, type=click.IntRange(min=1),
              help="seismic: query terms (heaviest first) whose posting lists are searched.")
@click.option("--heap-factor", default=_SEISMIC.heap_factor, show_default=True,
              type=FiniteFloatRange(min=0, max=1, min_open=True),
              help="seismic: skip a block whose summary score is under this times the current k-th score "
                   "(lower: more recall, slower).")
@click.option("--n-postings", default=_SEISMIC.n_postings, show_default=True, type=click.IntRange(min=1),
              help="seismic: postings kept per term on average (higher: more recall, larger index).")
@encoder_options
@progress_options
@debug_option
@handle_errors(ErrorCategory.EVALUATION_ERROR)
def search(model_name: str, index_from: Path, queries_path: Path, engine: str, k: int, output: Path,
           query_cut: int, heap_factor: float, n_postings: int, max_query_length: int, max_doc_length: int,
           batch_size: int, device: str, progress: str, progress_interval: float, debug: bool) -> None:
    """Encode (or read) a corpus, index it with --engine, search every query and write a TREC run.

    The timings (encoding, index build, search and queries/s) and the index size go to stderr, with the
    progress. seismic is approximate: benchmarks/bench_engine.py measures its recall against exact.
    """
    start = time.monotonic()
    from splade_obs.encoding import input_file, iter_records
    from splade_obs.engines import build_engine, require_engine
    from splade_obs.errors import format_bytes
    from splade_obs.evaluation import run_from_search, write_trec_run
    from splade_obs.model import SpladeEncoder
    from splade_obs.progress_util import ProgressSpec
    from splade_obs.shard import rank_device

    require_engine(engine)  # a missing package fails before the model loads
    check_output_file(output, inputs=(queries_path, input_file(queries_path, "queries")))
    params = SeismicParams(query_cut=query_cut, heap_factor=heap_factor, n_postings=n_postings)
    queries = list(iter_records(input_file(queries_path, "queries"), "queries"))
    spec = ProgressSpec(progress, progress_interval)
    encoder = SpladeEncoder.from_pretrained(model_name, device=rank_device(device, None))
    t0 = time.perf_counter()
    doc_ids, docs = _corpus(encoder, index_from, max_doc_length, batch_size, spec)
    q_vectors = _encode(encoder, [t for _, t in queries], "Encoding queries", max_query_length, batch_size, spec)
    encode_s = time.perf_counter() - t0
    index = build_engine(engine, docs, doc_ids, seismic=params)
    t0 = time.perf_counter()
    found, scores = index.search(q_vectors, k)
    search_s = time.perf_counter() - t0
    write_trec_run(run_from_search([q for q, _ in queries], found, scores), output, tag=f"splade-obs-{engine}")
    click.echo(f"{engine}: {len(doc_ids)} documents, index {format_bytes(index.size_bytes)} built in "
               f"{index.build_seconds:.2f}s; {len(queries)} queries searched in {search_s:.3f}s "
               f"({len(queries) / max(search_s, 1e-9):.0f} queries/s); encoding {encode_s:.1f}s; "
               f"{time.monotonic() - start:.1f}s in all -> {output}", err=True)


def _corpus(encoder: Any, path: Path, max_length: int, batch_size: int, spec: Any) -> tuple[list[str], Any]:
    """Document ids and vectors: read from an encoded vectors file, or encoded from a BEIR folder / JSONL."""
    from splade_obs.encoding import input_file, iter_records, vocabulary
    from splade_obs.engines import is_vectors_file, read_vectors

    src = input_file(path, "corpus")
    if is_vectors_file(src):
        return read_vectors(src, vocabulary(encoder.tokenizer, encoder.vocab_size))
    records = list(iter_records(src, "corpus"))
    return [i for i, _ in records], _encode(encoder, [t for _, t in records], "Encoding documents", max_length,
                                            batch_size, spec)


def _encode(encoder: Any, texts: list[str], desc: str, max_length: int, batch_size: int, spec: Any) -> Any:
    import contextlib

    from splade_obs.progress_util import encode_with_progress

    bar = spec.start(desc, len(texts), unit="texts")
    with bar if bar is not None else contextlib.nullcontext():
        return encode_with_progress(encoder, texts, max_length=max_length, batch_size=batch_size, progress=bar)
