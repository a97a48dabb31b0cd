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

    Groups share an encoder pass as :func:`pass_groups` says: on an accelerator, whose step is bound by the host's
    kernel launches, all three go through one pass, the shorter groups padded to the longest (padding is masked,
    so the weights are those of separate passes, and the GPU has time to spare for the padding's arithmetic):
    one pass a step instead of three, 60% fewer kernels (docs/benchmarks.md, "GPU check"), unless that pads too
    much (:data:`MAX_ADDED_PADDING`). On a CPU, whose step is bound by arithmetic, only groups of the same padded
    length share a pass (positives and negatives at 256 tokens, the usual case), so no padding is added.
    """

    def __init__(self, encoder: SpladeEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, q_ids: torch.Tensor, q_mask: torch.Tensor, p_ids: torch.Tensor, p_mask: torch.Tensor,
                n_ids: torch.Tensor | None = None, n_mask: torch.Tensor | None = None) -> Reps:
        groups = [(q_ids, q_mask), (p_ids, p_mask)] + ([] if n_ids is None or n_mask is None else [(n_ids, n_mask)])
        reps: list[torch.Tensor | None] = [None, None, None]
        pad_id = getattr(self.encoder.tokenizer, "pad_token_id", None) or 0
        with self.encoder.frozen_head():  # one int8 form of the head for the passes of the step
            for members in pass_groups([tuple(ids.shape) for ids, _ in groups], q_ids.device):
                if len(members) == 1:
                    reps[members[0]] = self.encoder(*groups[members[0]])
                    continue
                length = max(groups[i][0].shape[1] for i in members)
                out = self.encoder(torch.cat([_pad_to(groups[i][0], length, pad_id) for i in members]),
                                   torch.cat([_pad_to(groups[i][1], length, 0) for i in members]))
                for i, part in zip(members, out.split([groups[i][0].shape[0] for i in members])):
                    reps[i] = part
        return reps[0], reps[1], reps[2]  # type: ignore[return-value]


#: On an accelerator, the most padding the queries' joining the documents' pass may add, as a share of the step's
#: tokens: at lengths 64 / 256 with one negative a query adds a third (merged); without negatives, three fifths
#: (the queries keep their own pass), so a step's activations grow by at most half.
MAX_ADDED_PADDING = 0.5


def pass_groups(shapes: list[tuple[int, int]], device: torch.device) -> list[list[int]]:
    """Which of a step's groups (queries, positives, negatives: their ``(rows, padded length)``) share an encoder
    pass, by index. On an accelerator all three when that pads at most :data:`MAX_ADDED_PADDING` more tokens,
    else the queries apart and the documents together; on a CPU those of the same length (see
    :class:`PairForward`)."""
    every = list(range(len(shapes)))
    if device.type != "cpu":
        tokens = sum(rows * length for rows, length in shapes)
        padded = sum(rows for rows, _ in shapes) * max(length for _, length in shapes)
        return [every] if padded <= (1 + MAX_ADDED_PADDING) * tokens else [[0], every[1:]]
    shared: dict[int, list[int]] = {}
    for i, (_, length) in enumerate(shapes):
        shared.setdefault(length, []).append(i)
    return list(shared.values())


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
