"""Evaluate a model on a BEIR folder and get the metrics dict.

    python examples/evaluate_model.py [MODEL] [BEIR_DIR]

MODEL: 'splade-tiny' (default), a saved model folder (e.g. outputs/example-records/final) or a hub id.
BEIR_DIR: corpus.jsonl, queries.jsonl, qrels/test.tsv; default: the bundled demo retrieval set.
"""

from __future__ import annotations

import json
import sys

from splade_obs import evaluate
from splade_obs.data import DEMO_RETRIEVAL_DIR


def _arg(i: int) -> str:
    """The i-th command-line argument, '' when not given."""
    return sys.argv[i] if len(sys.argv) > i else ""


def main() -> None:
    model = _arg(1) or "splade-tiny"
    beir_dir = _arg(2) or str(DEMO_RETRIEVAL_DIR)
    metrics = evaluate(model, beir_dir, max_query_length=32, max_doc_length=64, device="cpu")
    print(f"nDCG@10 {metrics['ndcg@10']:.4f}, MRR@10 {metrics['mrr@10']:.4f}, Recall@100 {metrics['recall@100']:.4f}")
    print(json.dumps(metrics, sort_keys=True))


if __name__ == "__main__":
    main()
