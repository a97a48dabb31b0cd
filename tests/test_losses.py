"""SPLADE losses checked against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from splade_obs.errors import ConfigError, DataError
from splade_obs.losses import SpladeLoss, flops, quadratic_warmup, sparsity_stats

# q0 = (1, 0), q1 = (0, 1); positives d0 = (3, 0), d1 = (1, 1) -> scores [[3, 1], [0, 1]].
Q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
D_POS = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
# one hard negative each: q0 gets (5, 0) -> score 5; q1 gets (0, 0) -> score 0.
D_NEG = torch.tensor([[[5.0, 0.0]], [[0.0, 0.0]]])


def test_flops_hand_example() -> None:
    reps = torch.tensor([[1.0, 0.0, 2.0], [3.0, 0.0, 0.0]])
    # column means (2, 0, 1) -> 4 + 0 + 1
    assert flops(reps).item() == pytest.approx(5.0)


def test_quadratic_warmup_values() -> None:
    assert quadratic_warmup(0, 2.0, 10) == 0.0
    assert quadratic_warmup(5, 2.0, 10) == pytest.approx(0.5)  # 2 * (1/2)^2
    assert quadratic_warmup(10, 2.0, 10) == pytest.approx(2.0)
    assert quadratic_warmup(25, 2.0, 10) == pytest.approx(2.0)
    assert quadratic_warmup(3, 2.0, 0) == 2.0
    assert quadratic_warmup(3, 2.0, -1) == 2.0


def test_cross_entropy_two_by_two_by_hand() -> None:
    loss = SpladeLoss(lambda_q=0.0, lambda_d=0.0)
    out = loss(Q, D_POS, None, step=0)
    # row 0: -log(e^3 / (e^3 + e^1)) = log(1 + e^-2); row 1: -log(e^1 / (e^0 + e^1)) = log(1 + e^-1)
    expected = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-1))) / 2
    assert expected == pytest.approx(0.2200948, abs=1e-6)
    assert out.values()["base"] == pytest.approx(expected, rel=1e-6)
    assert out.total.item() == pytest.approx(expected, rel=1e-6)


def test_hard_negatives_change_the_loss_by_hand() -> None:
    loss = SpladeLoss(lambda_q=0.0, lambda_d=0.0)
    without = loss(Q, D_POS, None, step=0).values()["base"]
    out = loss(Q, D_POS, D_NEG, step=0).values()
    # row 0 scores [3, 1, 5]: log(1 + e^-2 + e^2); row 1 scores [0, 1, 0]: log(1 + 2 e^-1)
    expected = (math.log(1 + math.exp(-2) + math.exp(2)) + math.log(1 + 2 * math.exp(-1))) / 2
    assert out["base"] == pytest.approx(expected, rel=1e-6)
    assert out["base"] != pytest.approx(without)


def test_parts_present_and_sum_to_total() -> None:
    torch.manual_seed(0)
    q = torch.rand(4, 50, requires_grad=True)
    d_pos, d_neg = torch.rand(4, 50), torch.rand(4, 2, 50)
    loss = SpladeLoss(lambda_q=0.1, lambda_d=0.2, reg_warmup_steps=10)
    out = loss(q, d_pos, d_neg, step=5)
    assert set(out.parts) == {"base", "query_reg", "doc_reg"}
    # the parts stay tensors on the loss's device, detached: the trainer fetches them when it reports
    assert all(isinstance(t, torch.Tensor) and t.ndim == 0 and not t.requires_grad for t in out.parts.values())
    assert out.lambda_q == pytest.approx(0.1 * 0.25)
    assert out.lambda_d == pytest.approx(0.2 * 0.25)
    parts = out.values()
    assert parts["query_reg"] == pytest.approx(0.025 * flops(q).item(), rel=1e-5)
    # the document regulariser covers the positives and the flattened negatives
    docs = torch.cat([d_pos, d_neg.reshape(-1, 50)])
    assert parts["doc_reg"] == pytest.approx(0.05 * flops(docs).item(), rel=1e-5)
    summed = parts["base"] + parts["query_reg"] + parts["doc_reg"]
    assert out.total.item() == pytest.approx(summed, rel=1e-6)
    out.total.backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_regularizer_follows_the_step() -> None:
    q, d = torch.rand(2, 8), torch.rand(2, 8)
    loss = SpladeLoss(lambda_q=1.0, lambda_d=1.0, reg_warmup_steps=4)
    assert loss(q, d, None, step=0).values()["query_reg"] == 0.0
    assert loss(q, d, None, step=4).values()["query_reg"] == pytest.approx(flops(q).item(), rel=1e-6)


def test_margin_mse_by_hand() -> None:
    teacher = torch.tensor([[10.0, 8.0], [4.0, 4.0]])
    loss = SpladeLoss(lambda_q=0.0, lambda_d=0.0, distillation_weight=0.5)
    out = loss(Q, D_POS, D_NEG, step=0, teacher_scores=teacher)
    # student margins: 3 - 5 = -2, 1 - 0 = 1; teacher margins: 2, 0 -> ((-4)^2 + 1^2) / 2 = 8.5, weighted 0.5
    assert out.values()["distill"] == pytest.approx(4.25, rel=1e-6)
    assert out.total.item() == pytest.approx(out.values()["base"] + 4.25, rel=1e-6)


def test_distillation_modes() -> None:
    teacher = torch.tensor([[10.0, 8.0], [4.0, 4.0]])
    out = SpladeLoss(distillation="none")(Q, D_POS, D_NEG, step=0, teacher_scores=teacher)
    assert "distill" not in out.parts
    assert "distill" not in SpladeLoss()(Q, D_POS, D_NEG, step=0).parts  # auto without teacher scores
    with pytest.raises(DataError):
        SpladeLoss(distillation="margin_mse")(Q, D_POS, D_NEG, step=0)
    with pytest.raises(DataError):
        SpladeLoss()(Q, D_POS, D_NEG, step=0, teacher_scores=torch.ones(2, 3))
    with pytest.raises(DataError):
        SpladeLoss(distillation="kl")(Q, D_POS, D_NEG, step=0)  # kl needs teacher scores too
    with pytest.raises(ConfigError) as info:
        SpladeLoss(distillation="listnet")
    assert info.value.context["field"] == "loss.distillation"
    with pytest.raises(ConfigError) as info:
        SpladeLoss(distillation="kl", distillation_temperature=0.0)
    assert info.value.context["field"] == "loss.distillation_temperature"


def _kl_by_hand(teacher: list[float], student: list[float], tau: float) -> float:
    """sum_i p_i * (log p_i - log q_i), p = softmax(teacher / tau), q = softmax(student / tau), times tau^2."""
    def softmax(xs: list[float]) -> list[float]:
        exps = [math.exp(x / tau) for x in xs]
        return [e / sum(exps) for e in exps]
    p, q = softmax(teacher), softmax(student)
    return tau * tau * sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_listwise_kl_by_hand(tau: float) -> None:
    teacher = torch.tensor([[10.0, 8.0], [4.0, 4.0]])
    out = SpladeLoss(lambda_q=0.0, lambda_d=0.0, distillation="kl", distillation_weight=0.5,
                     distillation_temperature=tau)(Q, D_POS, D_NEG, step=0, teacher_scores=teacher)
    # student candidate scores (positive, negative): q0 (3, 5), q1 (1, 0); batchmean over the 2 queries
    expected = (_kl_by_hand([10, 8], [3, 5], tau) + _kl_by_hand([4, 4], [1, 0], tau)) / 2
    parts = out.values()
    assert parts["distill"] == pytest.approx(0.5 * expected, rel=1e-6)
    assert "distill_kl" not in parts  # one term: it is the distill part itself
    assert out.total.item() == pytest.approx(parts["base"] + 0.5 * expected, rel=1e-6)


def test_kl_ignores_the_teacher_scale_offset_and_margin_mse_does_not() -> None:
    """KL compares rankings as distributions: shifting every teacher score of a query changes nothing."""
    teacher = torch.tensor([[10.0, 8.0], [4.0, 4.0]])
    kl = SpladeLoss(lambda_q=0.0, lambda_d=0.0, distillation="kl")
    assert kl(Q, D_POS, D_NEG, step=0, teacher_scores=teacher + 100).values()["distill"] == pytest.approx(
        kl(Q, D_POS, D_NEG, step=0, teacher_scores=teacher).values()["distill"], rel=1e-6)
    # the student ranks q0's negative first and q1's positive first: a teacher that agrees costs less KL
    agree = torch.tensor([[1.0, 3.0], [1.0, 0.0]])  # teacher prefers the negative of q0, the positive of q1
    reverse = torch.tensor([[3.0, 1.0], [0.0, 1.0]])
    assert kl(Q, D_POS, D_NEG, step=0, teacher_scores=agree).values()["distill"] < \
        kl(Q, D_POS, D_NEG, step=0, teacher_scores=reverse).values()["distill"]


def test_kl_plus_margin_mse_sums_both_and_logs_each() -> None:
    teacher = torch.tensor([[10.0, 8.0], [4.0, 4.0]])
    q = Q.clone().requires_grad_(True)
    out = SpladeLoss(lambda_q=0.0, lambda_d=0.0, distillation="kl_margin_mse", distillation_weight=2.0,
                     contrastive_weight=0.0)(q, D_POS, D_NEG, step=0, teacher_scores=teacher)
    kl = (_kl_by_hand([10, 8], [3, 5], 1.0) + _kl_by_hand([4, 4], [1, 0], 1.0)) / 2
    parts = out.values()
    assert parts["distill_margin_mse"] == pytest.approx(8.5, rel=1e-6)  # as in test_margin_mse_by_hand
    assert parts["distill_kl"] == pytest.approx(kl, rel=1e-6)
    assert parts["distill"] == pytest.approx(2.0 * (8.5 + kl), rel=1e-6)
    assert out.total.item() == pytest.approx(parts["distill"], rel=1e-6)  # the logged terms are not added twice
    out.total.backward()
    assert q.grad is not None and q.grad.abs().sum() > 0


def test_sparsity_stats() -> None:
    reps = torch.tensor([[1.0, 0.0, 2.0], [3.0, 0.0, 0.0]])
    stats = sparsity_stats(reps)
    assert all(isinstance(t, torch.Tensor) and t.ndim == 0 for t in stats.values())  # no device-to-host copy
    assert {k: t.item() for k, t in stats.items()} == {"nnz_mean": pytest.approx(1.5), "flops": pytest.approx(5.0)}


@pytest.mark.parametrize("options", [{}, {"contrastive_negatives": "in_batch"},
                                     {"contrastive_weight": 0.0, "distillation": "margin_mse"},
                                     {"contrastive_weight": 0.0, "distillation": "kl_margin_mse",
                                      "distillation_temperature": 2.0}],
                         ids=["all", "in_batch", "pure_distillation", "kl_margin_mse"])
def test_split_batch_with_offsets_equals_full_batch(options):
    """What each torchrun rank computes (its queries vs the gathered positives, FLOPS over the gathered
    batch), averaged over ranks, is the single-process loss of the global batch."""
    torch.manual_seed(0)
    q, p, n = torch.rand(4, 50), torch.rand(4, 50), torch.rand(4, 2, 50)
    teacher = torch.rand(4, 3) * 5
    loss = SpladeLoss(lambda_q=1e-2, lambda_d=2e-2, reg_warmup_steps=0, **options)
    full = loss(q, p, n, step=10, teacher_scores=teacher)
    docs = torch.cat([p, n.reshape(-1, 50)])
    halves = [loss(q[2 * r:2 * r + 2], p, n[2 * r:2 * r + 2], step=10, positive_offset=2 * r,
                   reg_queries=q, reg_docs=docs, teacher_scores=teacher[2 * r:2 * r + 2]) for r in range(2)]
    assert torch.allclose((halves[0].total + halves[1].total) / 2, full.total)
    assert halves[0].values()["query_reg"] == pytest.approx(full.values()["query_reg"])
    # the offset matters: without it rank 1's queries would be scored against rank 0's positives
    wrong = loss(q[2:], p, n[2:], step=10, reg_queries=q, reg_docs=docs, teacher_scores=teacher[2:])
    assert not torch.allclose(wrong.total, halves[1].total)


def test_in_batch_contrastive_leaves_hard_negatives_to_distillation_by_hand() -> None:
    teacher = torch.tensor([[10.0, 8.0], [4.0, 4.0]])
    out = SpladeLoss(lambda_q=0.0, lambda_d=0.0, contrastive_negatives="in_batch")(
        Q, D_POS, D_NEG, step=0, teacher_scores=teacher)
    # the cross-entropy is the in-batch one of the 2x2 example (the negatives scoring 5 and 0 are left out) ...
    in_batch = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-1))) / 2
    assert out.values()["base"] == pytest.approx(in_batch, rel=1e-6)
    # ... while MarginMSE still sees them: ((-2 - 2)^2 + (1 - 0)^2) / 2
    assert out.values()["distill"] == pytest.approx(8.5, rel=1e-6)


def test_contrastive_weight_scales_the_cross_entropy_and_zero_is_pure_distillation() -> None:
    teacher = torch.tensor([[10.0, 8.0], [4.0, 4.0]])
    full = SpladeLoss(lambda_q=0.0, lambda_d=0.0)(Q, D_POS, D_NEG, step=0, teacher_scores=teacher)
    half = SpladeLoss(lambda_q=0.0, lambda_d=0.0, contrastive_weight=0.5)(Q, D_POS, D_NEG, step=0,
                                                                          teacher_scores=teacher)
    assert half.values()["base"] == pytest.approx(0.5 * full.values()["base"], rel=1e-6)
    pure = SpladeLoss(lambda_q=0.0, lambda_d=0.0, contrastive_weight=0.0)
    q = Q.clone().requires_grad_(True)
    out = pure(q, D_POS, D_NEG, step=0, teacher_scores=teacher)
    assert out.values()["base"] == 0.0 and out.total.item() == pytest.approx(8.5, rel=1e-6)
    out.total.backward()
    assert q.grad is not None and q.grad.abs().sum() > 0  # the distillation term alone trains the model


def test_contrastive_options_are_validated() -> None:
    with pytest.raises(ConfigError) as info:
        SpladeLoss(contrastive_negatives="everything")
    assert info.value.context["field"] == "loss.contrastive_negatives"
    with pytest.raises(ConfigError):
        SpladeLoss(contrastive_weight=-1.0)
