"""The training objective on one batch: queries, positives and negatives in one forward call, and the SPLADE
loss over the global batch (under torchrun the representations of every rank are gathered, with gradient)."""

from __future__ import annotations

from typing import Any, Callable

import torch

from .collate import Batch
from .losses import LossOutput, SpladeLoss
from .model import SpladeEncoder

Reps = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]


class PairForward(torch.nn.Module):
    """Queries, positives and negatives in one forward call (one call per step is what DDP expects).

    Positives and negatives go through the encoder as one batch of documents, two encoder passes a step instead
    of three (29% fewer kernels on a GPU's code path, docs/benchmarks.md "GPU check"): on an accelerator, whose
    step is bound by the host's kernel launches, the shorter group is padded to the longer (padding is masked, so
    the weights are those of separate passes, and the GPU has time to spare for the padding's arithmetic); on a
    CPU, whose step is bound by arithmetic, only when both groups have the same padded length (the usual case at
    256 tokens), so no padding is added.
    """

    def __init__(self, encoder: SpladeEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, q_ids: torch.Tensor, q_mask: torch.Tensor, p_ids: torch.Tensor, p_mask: torch.Tensor,
                n_ids: torch.Tensor | None = None, n_mask: torch.Tensor | None = None) -> Reps:
        with self.encoder.frozen_head():  # one int8 form of the head for the passes of the step
            q = self.encoder(q_ids, q_mask)
            if n_ids is None or n_mask is None:
                return q, self.encoder(p_ids, p_mask), None
            if not one_document_pass(p_ids, n_ids):
                return q, self.encoder(p_ids, p_mask), self.encoder(n_ids, n_mask)
            length = max(p_ids.shape[1], n_ids.shape[1])
            pad_id = getattr(self.encoder.tokenizer, "pad_token_id", None) or 0
            docs = self.encoder(torch.cat([_pad_to(p_ids, length, pad_id), _pad_to(n_ids, length, pad_id)]),
                                torch.cat([_pad_to(p_mask, length, 0), _pad_to(n_mask, length, 0)]))
        return q, docs[:p_ids.shape[0]], docs[p_ids.shape[0]:]


def one_document_pass(p_ids: torch.Tensor, n_ids: torch.Tensor) -> bool:
    """Whether :class:`PairForward` encodes positives and negatives in one pass (see there)."""
    return p_ids.device.type != "cpu" or p_ids.shape[1] == n_ids.shape[1]


def _pad_to(t: torch.Tensor, length: int, value: int) -> torch.Tensor:
    """``t`` with columns of ``value`` appended up to ``length``."""
    return t if t.shape[1] == length else torch.nn.functional.pad(t, (0, length - t.shape[1]), value=value)


def encode_batch(model: torch.nn.Module, batch: Batch) -> Reps:
    """``(q, d_pos, d_neg)``: ``(B, V)``, ``(B, V)`` and ``(B, K, V)`` (None without hard negatives)."""
    negs = batch.neg_docs if (batch.neg_docs is not None and batch.num_negatives > 0) else None
    n_ids, n_mask = (None, None) if negs is None else (negs["input_ids"], negs["attention_mask"])
    q, d_pos, flat = model(batch.queries["input_ids"], batch.queries["attention_mask"],
                           batch.pos_docs["input_ids"], batch.pos_docs["attention_mask"], n_ids, n_mask)
    return q, d_pos, None if flat is None else flat.view(batch.size, batch.num_negatives, -1)


def all_docs(d_pos: torch.Tensor, d_neg: torch.Tensor | None) -> torch.Tensor:
    """Positives and flattened negatives, one row per document."""
    return d_pos if d_neg is None else torch.cat([d_pos, d_neg.reshape(-1, d_pos.shape[-1])])


def batch_loss(loss_fn: SpladeLoss, reps: Reps, batch: Batch, *, step: int, rank: int = 0,
               distributed: bool = False) -> LossOutput:
    """The loss in fp32. ``distributed``: in-batch negatives and FLOPS over the global batch, gathered (with
    gradient) from every rank; each rank scores its own queries against every rank's positives."""
    q, d_pos, d_neg = (None if t is None else t.float() for t in reps)
    if not distributed:
        return loss_fn(q, d_pos, d_neg, step=step, teacher_scores=batch.teacher_scores)
    from torch.distributed.nn.functional import all_gather
    all_q, all_pos = torch.cat(all_gather(q)), torch.cat(all_gather(d_pos))
    gathered_docs = torch.cat(all_gather(all_docs(d_pos, d_neg))) if d_neg is not None else all_pos
    return loss_fn(q, all_pos, d_neg, step=step, teacher_scores=batch.teacher_scores,
                   positive_offset=rank * q.shape[0], reg_queries=all_q, reg_docs=gathered_docs)


@torch.no_grad()
def validation_loss(model: torch.nn.Module, loss_fn: SpladeLoss, collator: Any, examples: list, *, batch_size: int,
                    device: torch.device, autocast: Callable[[], Any], step: int) -> float | None:
    """Mean loss over the validation set in batches of ``batch_size`` (one device-to-host copy at the end);
    ``model`` is left in eval mode, the caller puts it back."""
    model.eval()
    losses = []
    for i in range(0, len(examples) - 1, batch_size):
        if len(examples[i:i + batch_size]) < 2:
            break
        batch = collator(examples[i:i + batch_size], epoch=0, batch_index=i // batch_size).to(device)
        with autocast():
            losses.append(batch_loss(loss_fn, encode_batch(model, batch), batch, step=step).total.detach())
    values = torch.stack(losses).tolist() if losses else []
    return sum(values) / len(values) if values else None
