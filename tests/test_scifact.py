"""Zero-shot splade-tiny on the real SciFact test split reproduces its known nDCG@10 (0.644 at length 256)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

SCIFACT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "scifact"
EXPECTED_NDCG10 = 0.644


@pytest.mark.slow
@pytest.mark.skipif(not (SCIFACT / "corpus.jsonl").is_file(),
                    reason=f"SciFact not found at {SCIFACT} (the shared data folder is absent here)")
def test_scifact_zero_shot_ndcg(capsys: pytest.CaptureFixture[str]) -> None:
    from splade_obs.beir import load_beir
    from splade_obs.evaluation import RetrievalEvaluator
    from splade_obs.model import SpladeEncoder

    beir = load_beir(SCIFACT, "test")
    assert len(beir.corpus) == 5183
    evaluator = RetrievalEvaluator(beir, max_query_length=64, max_doc_length=256, batch_size=32)
    encoder = SpladeEncoder.from_pretrained("splade-tiny")
    start = time.perf_counter()
    metrics = evaluator.evaluate(encoder)
    elapsed = time.perf_counter() - start
    with capsys.disabled():
        print(f"\nSciFact test, splade-tiny zero-shot: nDCG@10 {metrics['ndcg@10']:.4f}, "
              f"MRR@10 {metrics['mrr@10']:.4f}, R@100 {metrics['recall@100']:.4f}, "
              f"doc nnz {metrics['doc_nnz']:.1f}, query nnz {metrics['query_nnz']:.1f}; "
              f"{elapsed:.1f}s (docs {metrics['encode_docs_s']:.1f}s, queries {metrics['encode_queries_s']:.1f}s, "
              f"search {metrics['search_s']:.2f}s)")
    assert metrics["num_queries"] == 300
    assert metrics["ndcg@10"] == pytest.approx(EXPECTED_NDCG10, abs=0.01)
    assert metrics["recall@100"] > metrics["ndcg@10"]
