"""Encode a corpus and its queries for Anserini's impact search, and look at a vector in Python.

    python examples/encode_for_anserini.py [MODEL] [BEIR_DIR] [OUT_DIR]

Writes OUT_DIR/corpus/docs.jsonl (a JsonVectorCollection: id, contents, integer impacts) and
OUT_DIR/queries.tsv (id, then each term repeated by its integer weight), which Anserini indexes and
searches with:

    python -m pyserini.index.lucene --collection JsonVectorCollection --input OUT_DIR/corpus \\
        --index OUT_DIR/index --generator DefaultLuceneDocumentGenerator --impact --pretokenized
    python -m pyserini.search.lucene --index OUT_DIR/index --topics OUT_DIR/queries.tsv \\
        --output OUT_DIR/run.txt --impact --hits 100
"""

from __future__ import annotations

import sys
from pathlib import Path

from splade_obs import SpladeEncoder, encode
from splade_obs.data import DEMO_RETRIEVAL_DIR


def _arg(i: int) -> str:
    """The i-th command-line argument, '' when not given."""
    return sys.argv[i] if len(sys.argv) > i else ""


def main() -> None:
    model = _arg(1) or "splade-tiny"
    beir_dir = _arg(2) or str(DEMO_RETRIEVAL_DIR)
    out = Path(_arg(3) or "outputs/example-anserini")
    encoder = SpladeEncoder(model, device="cpu", max_query_length=32, max_doc_length=64)  # loaded once

    # In Python: a float sparse matrix, or {term: weight} dicts (integer impacts with quantize_scale).
    vector = encoder.encode_queries(["which river flows through Lyon?"], output="dict", quantize_scale=100)[0]
    print("query impacts:", dict(list(vector.items())[:8]))

    # To files: --format anserini of `splade-obs encode` (integer impacts at scale 100 by default).
    docs = encode(encoder, beir_dir, out / "corpus" / "docs.jsonl", kind="corpus", fmt="anserini")
    queries = encode(encoder, beir_dir, out / "queries.tsv", kind="queries", fmt="anserini")
    print(f"{docs.count} documents -> {docs.output}; {queries.count} queries -> {queries.output}")


if __name__ == "__main__":
    main()
