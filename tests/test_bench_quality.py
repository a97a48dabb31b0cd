"""The quality benchmark's two claims: sentence-transformers trains the same loss as ours, and the BM25
target is judged query by query from the rows it scored."""

from __future__ import annotations

import pytest
import torch

from tests._eval_utils import bench_module


def _bench_quality():
    return bench_module("bench_quality")


@pytest.mark.parametrize("distillation", ["margin_mse", "kl", "kl_margin_mse"])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_sentence_transformers_side_trains_the_same_distillation_loss_as_ours(distillation, tau) -> None:
    """On the same sparse vectors and teacher scores, ST's loss (as the benchmark builds it) equals ours."""
    pytest.importorskip("sentence_transformers", reason="sentence-transformers is in the test extra")
    from sentence_transformers.sparse_encoder import SparseEncoder

    from splade_obs.hub import resolve_model
    from splade_obs.losses import SpladeLoss

    model = SparseEncoder(resolve_model("splade-tiny"), device="cpu")
    loss = _bench_quality().st_distill_loss(model, distillation, tau)
    gen = torch.Generator().manual_seed(0)
    batch, k, vocab = 5, 3, 40
    q = torch.relu(torch.randn(batch, vocab, generator=gen))
    pos = torch.relu(torch.randn(batch, vocab, generator=gen))
    neg = torch.relu(torch.randn(batch, k, vocab, generator=gen))
    teacher = torch.randn(batch, 1 + k, generator=gen) * 4 + 10

    theirs = loss.compute_loss_from_embeddings([q, pos, *neg.unbind(1)], teacher)
    total = sum(theirs.values()) if isinstance(theirs, dict) else theirs
    ours = SpladeLoss(lambda_q=0.0, lambda_d=0.0, distillation=distillation, contrastive_weight=0.0,
                      distillation_temperature=tau)(q, pos, neg, step=0, teacher_scores=teacher)
    assert total.item() == pytest.approx(ours.total.item(), rel=1e-5)
    if distillation == "kl_margin_mse":  # each term, not only the sum
        assert theirs["distill_margin_mse"].item() == pytest.approx(ours.values()["distill_margin_mse"], rel=1e-5)
        assert theirs["distill_kl"].item() == pytest.approx(ours.values()["distill_kl"], rel=1e-5)


def test_an_unmatched_distillation_mode_is_refused() -> None:
    with pytest.raises(SystemExit, match="no sentence-transformers loss"):
        _bench_quality().st_distill_loss(None, "listnet", 1.0)


def _row(system: str, kind: str, per_query: list[float]) -> dict:
    values = {f"q{i}": v for i, v in enumerate(per_query)}
    return {"system": system, "kind": kind, "ndcg@10": sum(per_query) / len(per_query), "ndcg@10_per_query": values}


def test_target_is_met_only_by_a_trained_row_above_every_bm25_row() -> None:
    bq = _bench_quality()
    bm25 = _row("BM25", "bm25", [0.5, 0.6, 0.7, 0.4, 0.5, 0.6])
    bm25_stem = _row("BM25 stemmed", "bm25", [0.6, 0.6, 0.7, 0.5, 0.5, 0.6])
    zero_shot = _row("zero-shot", "zero-shot", [0.9] * 6)          # not trained: never meets the target
    between = _row("between", "trained", [0.6, 0.6, 0.7, 0.4, 0.5, 0.6])  # above BM25, below stemmed
    above = _row("above", "trained", [0.7, 0.7, 0.8, 0.6, 0.6, 0.7])

    target = bq.target_check([bm25, bm25_stem, zero_shot, between])
    assert not target["met"] and target["met_by"] == []
    assert set(target["rows"]) == {"between"}
    assert target["rows"]["between"]["vs"]["BM25"]["mean_diff"] == pytest.approx(1 / 60)
    assert target["rows"]["between"]["vs"]["BM25 stemmed"]["mean_diff"] == pytest.approx(-1 / 60)
    assert "NOT MET" in bq.target_lines(target)[0]

    target = bq.target_check([bm25, bm25_stem, zero_shot, between, above])
    assert target["met"] and target["met_by"] == ["above"]
    comparison = target["rows"]["above"]["vs"]["BM25 stemmed"]
    assert comparison["mean_diff"] == pytest.approx(0.1) and comparison["ci95_low"] > 0
    assert comparison["queries"] == 6
    assert bq.target_lines(target)[0].endswith("MET") and "above (0.6833)" in "\n".join(bq.target_lines(target))

    assert not bq.target_check([above])["met"]  # no BM25 row, nothing to beat


def test_the_two_trainers_are_compared_query_by_query_only_when_both_trained() -> None:
    bq = _bench_quality()
    ours = _row(bq.OURS_ROW, "trained", [0.5, 0.6, 0.7, 0.4, 0.5, 0.6])
    st = _row(bq.ST_ROW, "trained", [0.6, 0.6, 0.7, 0.5, 0.5, 0.6])
    assert bq.trainer_comparison([ours]) == {}
    comparison = bq.trainer_comparison([ours, st])["st_minus_ours"]
    assert comparison["mean_diff"] == pytest.approx(1 / 30) and comparison["queries"] == 6
