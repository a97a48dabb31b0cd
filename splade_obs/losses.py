"""SPLADE training losses: contrastive cross-entropy, FLOPS regularisation with a quadratic warm-up,
optional distillation from teacher scores (pairwise MarginMSE, listwise KL, or both). The loss returns its
named parts as tensors on the loss's device (no device-to-host copy), so the trainer can sum them over
steps and fetch them only when it reports.

Checkpoints and the warm-up: the regulariser weights are a pure function of the optimizer step
(:func:`quadratic_warmup`), so :class:`SpladeLoss` has no state of its own; the trainer saves the global
step and resuming at that step gives the same ``lambda_q`` / ``lambda_d`` as the uninterrupted run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import CONTRASTIVE_NEGATIVES, DISTILLATION_MODES
from .errors import ConfigError, DataError


def flops(reps: Tensor) -> Tensor:
    """FLOPS regulariser ``sum_j (mean_b w_j)^2`` (Paria et al. 2020): penalises terms active across the batch."""
    return reps.mean(dim=0).pow(2).sum()


def quadratic_warmup(step: int, target: float, warmup_steps: int) -> float:
    """``target * min(1, step / warmup_steps)^2``; no warm-up when ``warmup_steps <= 0``."""
    if warmup_steps <= 0:
        return float(target)
    frac = min(1.0, max(0.0, step / warmup_steps))
    return float(target) * frac * frac


def nnz_mean(reps: Tensor) -> Tensor:
    """Mean number of non-zero terms per representation (a 0-dim float32 tensor, no gradient)."""
    with torch.no_grad():
        return (reps.reshape(-1, reps.shape[-1]) != 0).sum(dim=1).float().mean()


def sparsity_stats(reps: Tensor) -> dict[str, Tensor]:
    """Mean non-zero terms per row and the FLOPS value of a batch of representations, as 0-dim tensors on
    the batch's device (no gradient, no device-to-host copy)."""
    with torch.no_grad():
        return {"nnz_mean": nnz_mean(reps), "flops": flops(reps.reshape(-1, reps.shape[-1]).float())}


@dataclass
class LossOutput:
    """``total`` to backpropagate; ``parts`` to log, as detached 0-dim tensors on the loss's device (base,
    query_reg, doc_reg, distill, ...); the step's regulariser weights as plain floats."""

    total: Tensor
    parts: dict[str, Tensor] = field(default_factory=dict)
    lambda_q: float = 0.0
    lambda_d: float = 0.0

    def values(self) -> dict[str, float]:
        """The parts as floats, in one device-to-host copy (for callers outside the training loop)."""
        if not self.parts:
            return {}
        return dict(zip(self.parts, torch.stack(list(self.parts.values())).tolist()))


class SpladeLoss(torch.nn.Module):
    """Contrastive loss over in-batch positives plus each query's own hard negatives, FLOPS-regularised.

    ``base``: ``contrastive_weight`` times the cross-entropy of query ``i``'s scores against
    ``[d_pos_0 .. d_pos_{B-1} ; d_neg_{i,0..K-1}]`` with target ``i`` (``contrastive_negatives="in_batch"``
    leaves the hard negatives out of it: they then feed only distillation and FLOPS, the usual set-up when
    mined negatives may be unlabelled positives). ``query_reg = lambda_q(step) * flops(q)``; ``doc_reg = lambda_d(step) * flops(all
    documents)``. With teacher scores ``(B, 1+K)`` (positive first), ``distill = distillation_weight * D`` is
    added, where ``D`` depends on ``distillation``:

    - ``auto`` / ``margin_mse``: MarginMSE (Hofstaetter et al. 2020), ``mse(s_pos - s_neg, t_pos - t_neg)``;
      it matches each pairwise margin, so it needs teacher scores on the student's scale.
    - ``kl``: listwise ``KL(softmax(t / tau) || softmax(s / tau)) * tau^2`` over each query's ``1+K`` candidates
      (``tau`` = ``distillation_temperature``; the ``tau^2`` keeps gradients comparable across temperatures,
      Hinton et al. 2015); it only asks the student to rank the candidates like the teacher, at any scale.
    - ``kl_margin_mse``: the sum of both (as SPLADE-v3 trains, Lassance et al. 2024).

    The unweighted terms are also logged as ``distill_margin_mse`` / ``distill_kl`` when both are on.
    """

    #: every part a :class:`LossOutput` may carry, in the order it carries them
    PART_NAMES = ("base", "query_reg", "doc_reg", "distill", "distill_margin_mse", "distill_kl")

    def __init__(self, lambda_q: float = 5e-4, lambda_d: float = 3e-4, reg_warmup_steps: int = 0,
                 temperature: float = 1.0, distillation: str = "auto", distillation_weight: float = 1.0,
                 contrastive_weight: float = 1.0, contrastive_negatives: str = "all",
                 distillation_temperature: float = 1.0) -> None:
        super().__init__()
        if contrastive_negatives not in CONTRASTIVE_NEGATIVES:
            raise ConfigError(f"unknown contrastive_negatives {contrastive_negatives!r}; expected one of "
                              f"{', '.join(CONTRASTIVE_NEGATIVES)}", field="loss.contrastive_negatives")
        if contrastive_weight < 0 or distillation_weight < 0:
            raise ConfigError("contrastive_weight and distillation_weight must be >= 0",
                              field="loss.contrastive_weight" if contrastive_weight < 0 else "loss.distillation_weight")
        if distillation not in DISTILLATION_MODES:
            raise ConfigError(f"unknown distillation {distillation!r}; expected one of {', '.join(DISTILLATION_MODES)}",
                              field="loss.distillation")
        if temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {temperature}", field="loss.temperature")
        if not distillation_temperature > 0:
            raise ConfigError(f"distillation_temperature must be > 0, got {distillation_temperature}",
                              field="loss.distillation_temperature")
        self.lambda_q = lambda_q
        self.lambda_d = lambda_d
        self.reg_warmup_steps = reg_warmup_steps
        self.temperature = temperature
        self.distillation = distillation
        self.distillation_weight = distillation_weight
        self.distillation_temperature = distillation_temperature
        self.contrastive_weight = contrastive_weight
        self.contrastive_negatives = contrastive_negatives

    def regularizer_weights(self, step: int) -> tuple[float, float]:
        """``(lambda_q, lambda_d)`` at optimizer step ``step``."""
        return (quadratic_warmup(step, self.lambda_q, self.reg_warmup_steps),
                quadratic_warmup(step, self.lambda_d, self.reg_warmup_steps))

    def forward(self, q: Tensor, d_pos: Tensor, d_neg: Tensor | None, *, step: int,
                teacher_scores: Tensor | None = None, positive_offset: int = 0,
                reg_queries: Tensor | None = None, reg_docs: Tensor | None = None) -> LossOutput:
        """``d_pos`` may hold more rows than ``q`` (positives gathered from other processes): query ``i``'s
        own positive is row ``positive_offset + i``. ``reg_queries`` / ``reg_docs`` replace the local
        batch in the FLOPS terms (the gathered global batch under torchrun)."""
        batch, vocab = q.shape
        in_batch = q @ d_pos.t()                                       # (B, B_global)
        neg = torch.einsum("bv,bkv->bk", q, d_neg) if d_neg is not None else None  # (B, K)
        hard = neg is not None and self.contrastive_negatives == "all"
        scores = torch.cat([in_batch, neg], dim=1) if hard else in_batch
        target = torch.arange(batch, device=q.device) + positive_offset
        base = self.contrastive_weight * F.cross_entropy(scores.float() / self.temperature, target)

        lam_q, lam_d = self.regularizer_weights(step)
        if reg_docs is None:
            reg_docs = torch.cat([d_pos, d_neg.reshape(-1, vocab)]) if d_neg is not None else d_pos
        query_reg = lam_q * flops((q if reg_queries is None else reg_queries).float())
        doc_reg = lam_d * flops(reg_docs.float())
        own_pos = in_batch[torch.arange(batch, device=q.device), target]

        named = {"base": base, "query_reg": query_reg, "doc_reg": doc_reg}
        terms = self._distillation(own_pos, neg, teacher_scores)
        if terms:
            named["distill"] = self.distillation_weight * torch.stack(list(terms.values())).sum()
        total = torch.stack(list(named.values())).sum()
        logged = {**named, **(terms if len(terms) > 1 else {})}
        parts = {k: t.detach() for k, t in logged.items()}
        return LossOutput(total=total, parts=parts, lambda_q=lam_q, lambda_d=lam_d)

    def _distillation(self, s_pos: Tensor, s_neg: Tensor | None, teacher: Tensor | None) -> dict[str, Tensor]:
        """The unweighted distillation terms, by name (empty when distillation is off or there is no teacher)."""
        if self.distillation == "none" or teacher is None:
            if self.distillation not in ("none", "auto") and teacher is None:
                raise DataError(f"distillation {self.distillation!r} needs teacher scores in the training data",
                                field="scores", hint="add \"scores\" to each example or use --distillation auto")
            return {}
        if s_neg is None:
            raise DataError("distillation needs hard negatives next to the teacher scores", field="negatives")
        expected = (s_neg.shape[0], 1 + s_neg.shape[1])
        if tuple(teacher.shape) != expected:
            raise DataError(f"teacher scores have shape {tuple(teacher.shape)}, expected {expected} "
                            "(positive first, then one per negative)", field="scores")
        teacher = teacher.to(device=s_pos.device, dtype=torch.float32)
        terms: dict[str, Tensor] = {}
        if self.distillation in ("auto", "margin_mse", "kl_margin_mse"):
            student_margin = s_pos.float().unsqueeze(1) - s_neg.float()
            teacher_margin = teacher[:, :1] - teacher[:, 1:]
            terms["distill_margin_mse"] = F.mse_loss(student_margin, teacher_margin)
        if self.distillation in ("kl", "kl_margin_mse"):
            tau = self.distillation_temperature
            student = torch.cat([s_pos.float().unsqueeze(1), s_neg.float()], dim=1) / tau
            terms["distill_kl"] = F.kl_div(F.log_softmax(student, dim=1), F.log_softmax(teacher / tau, dim=1),
                                           log_target=True, reduction="batchmean") * (tau * tau)
        return terms
