"""The SPLADE encoder: an HF masked-LM backbone whose token logits become one sparse vector per text.

``w_j = max_t log(1 + relu(logit_{t,j}))`` over the non-padding tokens ``t``.

Why the head is special: for a small backbone the vocabulary projection (hidden -> 30,522) costs about ten
times the encoder, and its full ``(batch, length, vocab)`` logits tensor is what makes SPLADE trainers need
gigabytes. ``log1p∘relu`` is monotonic, so ``max_t log1p(relu(x_t)) == log1p(relu(max_t x_t))``: we take the
max over tokens first, computing the projection in tiles that stay in cache (on CPU: all of one document's
tokens against a block of the vocabulary) and keep only the max. The backward pass of a max only reaches each
term's argmax token, and relu leaves only a few hundred terms per batch with a gradient, so
:class:`_ChunkedMaxProjection` builds the exact gradient with index_add from those terms' argmax (kept by the
int8 pass's forward, else recomputed for them alone), without ever materialising the ``(B, L, V)`` tensor. The
plain path (``fused_head=False``) stays for tests and benchmarks, and for architectures whose head cannot be
split.
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from .errors import ApplicationError, DeviceError, ModelError, classify
from .hub import resolve_model
from .recovery import retry
from .st_layout import DEFAULT_LENGTHS, trained_lengths, write_st_layout

if TYPE_CHECKING:  # pragma: no cover
    import scipy.sparse

log = logging.getLogger("splade_obs.model")

#: Elements of one ``(B, L, terms)`` tile in the backward's argmax recomputation (64 MiB in fp32).
_BACKWARD_TILE_ELEMENTS = 1 << 24
#: Elements of one ``(vocabulary block, document tokens)`` logits tile of the CPU per-document forward (2 MiB in
#: fp32: with its 1 MiB weight block it stays in a core's L2/L3 while ``amax`` reads it back). 256-token
#: documents get 2,048-term blocks. Against the former ``(30,522 terms, 64 tokens)`` tiles (7.8 MiB, written to
#: and read back from memory) on a 2-core AVX2 AMD EPYC: the head 1.4x faster at 64 tokens, 1.6x at 256 and
#: 1.5x at 512 (``benchmarks/bench_head_tiles.py``); the full SciFact test evaluation 234 s -> 170 s.
_CPU_TILE_ELEMENTS = 1 << 19
#: Texts handed to the tokenizer at once by :func:`token_ids`: a fast tokenizer's working memory for a whole
#: encoding block (4,096 texts) is ~90 MB held until the block ends; 512 at a time keep it near 10 MB.
TOKENIZE_CHUNK = 512


def splade_pool_reference(logits: Tensor, attention_mask: Tensor) -> Tensor:
    """Plain SPLADE pooling: ``max_t log1p(relu(logits))`` over non-padding tokens, ``(B,L,V) -> (B,V)``.

    Padding is filled with 0 (the minimum of ``log1p∘relu``) rather than multiplied by the mask, so a
    padding token with an infinite logit cannot turn into ``inf * 0 = nan``.
    """
    weights = torch.log1p(torch.relu(logits))
    pad = ~attention_mask.bool().unsqueeze(-1)
    return weights.masked_fill(pad, 0.0).amax(dim=1)


# --------------------------------------------------------------------------------------------------------
# The fused head
# --------------------------------------------------------------------------------------------------------

def token_ids(tokenizer: Any, texts: list[str], max_length: int) -> list[np.ndarray]:
    """Each text's token ids (special tokens included, cut at ``max_length``) as an int32 array, tokenized
    :data:`TOKENIZE_CHUNK` texts at a time: the memory a block's ids take is ~4 bytes a token, not a Python
    int's 28, and the tokenizer's own working memory stays that of one chunk."""
    out: list[np.ndarray] = []
    for lo in range(0, len(texts), TOKENIZE_CHUNK):
        enc = tokenizer(texts[lo:lo + TOKENIZE_CHUNK], truncation=True, max_length=max_length,
                        return_attention_mask=False, return_token_type_ids=False)
        out.extend(np.asarray(x, dtype=np.int32) for x in enc["input_ids"])
    return out


def _compute_dtype(t: Tensor) -> torch.dtype:
    """The dtype autocast would give a matmul on ``t``'s device, else ``t``'s own dtype."""
    dev = t.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return t.dtype


def _max_projection_forward(hidden: Tensor, weight: Tensor, bias: Tensor, mask: Tensor, chunk_size: int,
                            per_document: bool, inference: bool = False) -> Tensor:
    """The max over non-padding tokens of ``hidden @ weight.T + bias``, ``(B, V)``; ``-inf`` for empty rows.

    ``per_document`` tiles each document's own tokens against one block of the vocabulary at a time
    (``_CPU_TILE_ELEMENTS`` per tile, which stays in a CPU cache, and no work on padding); otherwise a tile is
    ``chunk_size`` positions of every document at once (``B x chunk_size x V``: few, large kernels and no host
    synchronisation, which is what a GPU wants).
    The per-document plain passes reduce only values (``amax``): a max that also returns indices is ~10x slower
    on CPU, and the backward recomputes the argmax for the few terms that get a gradient. The int8 pass takes the
    argmax of its few candidates only, and training keeps it for the backward; so does training's batch-wide
    pass (:func:`_max_across_batch`), whose backward then recomputes nothing and syncs once (its ``nonzero``).
    """
    if per_document:
        prefilter = _prefilter(hidden, weight) if inference else "fp32"
        if prefilter == "int8":
            return _max_per_document_int8(hidden, weight, bias, mask)[0]
        if prefilter == "bf16":
            return _max_per_document_prefiltered(hidden, weight, bias, mask, chunk_size)
        return _max_per_document(hidden, weight, bias, mask)
    return _max_across_batch(hidden, weight, bias, mask, chunk_size)


#: Bound on |bf16 logit - fp32 logit| relative to ``||h|| * ||w_v|| + |b_v|``: inputs rounded to bf16 (2^-8
#: each), output rounded to bf16 (2^-9), fp32 accumulation; 2^-5 is about 3x the worst case.
_BF16_REL_BOUND = 2.0 ** -5


def _prefilter(hidden: Tensor, weight: Tensor, training: bool = False) -> str:
    """``fp32``, ``bf16`` or ``int8``: the head's pass on a CPU (:func:`splade_obs.cpu.head_pass`, measured once
    per machine); fp32 elsewhere. Inference takes all three; ``training`` takes ``int8`` (its exact maxima come
    with their argmax, which the backward needs) and otherwise the plain pass in the autocast dtype."""
    if hidden.device.type != "cpu" or weight.dtype != torch.float32:
        return "fp32"
    from .cpu import head_pass
    return head_pass(training)


#: Terms per int8 tile of :func:`_max_per_document_int8` (a ``terms x tokens`` int32 tile: 4 MB at 256 tokens).
_INT8_TILE_TERMS = 4096
#: Safety factor on the int8 error bound, for the fp32 rounding of the scales, the bound and the approximation.
_INT8_BOUND_SLACK = 1.0 + 2.0 ** -10
#: Documents per group of the int8 and bf16 passes' batched steps (a group's ``(documents, V)`` temporaries: 4 MB each)
_GROUP_DOCS = 32
#: Logits per slice of :func:`_exact_candidates` (documents x candidates x tokens, fp32: 16 MB).
_EXACT_TILE_ELEMENTS = 1 << 22
_frozen = threading.local()  # .heads: [weight, its int8 form or None] per open frozen_head block, innermost last


def _quantize_rows(weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``weight`` quantized per row (int8, scale ``max|w_v| / 127``), the scales and the rows' L1 norms."""
    w = weight.detach().float()
    work = w.abs()  # (torch.linalg.vector_norm is ~10x slower for these short rows)
    scale = (work.amax(dim=1) / 127.0).clamp_(min=torch.finfo(torch.float32).tiny)
    l1 = work.sum(dim=1)
    q = torch.div(w, scale[:, None], out=work).round_().clamp_(-127, 127).to(torch.int8)  # one scratch buffer
    return q, scale, l1


@contextmanager
def frozen_head(weight: Tensor | None) -> Iterator[None]:
    """Promise that ``weight`` does not change inside the block: its int8 form is then computed once, at its
    first use, and shared by every int8 pass of the block (an encode call's batches, a training step's
    queries, positives and negatives). Outside such a block every pass quantizes afresh (~15 ms for 30k x 128
    rows): nothing can tell a cached form from a stale one, as an optimizer may update the weight in place
    without bumping its version (torch's fused AdamW does not)."""
    heads = getattr(_frozen, "heads", None)
    if heads is None:
        heads = _frozen.heads = []
    entry: list[Any] = [weight, None]
    heads.append(entry)
    try:
        yield
    finally:  # by identity: list.remove would compare the weights element-wise
        del heads[next(i for i in range(len(heads) - 1, -1, -1) if heads[i] is entry)]


def _int8_weights(weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_quantize_rows` of ``weight``, once per :func:`frozen_head` block that holds it."""
    for entry in reversed(getattr(_frozen, "heads", None) or ()):
        if entry[0] is weight:
            if entry[1] is None:
                entry[1] = _quantize_rows(weight)
            return entry[1]
    return _quantize_rows(weight)


def _max_per_document_int8(hidden: Tensor, weight: Tensor, bias: Tensor,
                           mask: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """The fp32 token-max at int8 speed, on CPUs with fast int8 matmuls (AVX512-VNNI, AMX).

    Per document, the tokens ``h_t`` are quantized with one scale ``s = max|h| / 127`` and each term's weights
    ``w_v`` with their own ``s_v``; ``torch._int_mm`` gives the exact integer products, so
    ``a_v = s * s_v * max_t q(h_t) . q(w_v) + b_v`` is computed with no accumulation error. With
    ``h = s q(h) + e_h``, ``|e_h| <= s / 2`` (and the same for ``w``):
    ``h . w - s s_v q(h) . q(w) = h . e_w + e_h . w - e_h . e_w``, so every token's logit is within
    ``err_v = s_v / 2 * max_t ||h_t||_1 + s / 2 * ||w_v||_1 + H * s * s_v / 4`` of its approximation, and the
    max over tokens too. A term with ``a_v + err_v <= 0`` has an fp32 max <= 0, which relu makes 0 whatever its
    exact value; the others (~600 of 30,522 for splade-tiny on SciFact, ~250 of them non-zero) are computed in
    fp32 over all the document's tokens (:func:`_exact_candidates`). Non-candidates keep a value <= 0.

    Only the integer products run per document (in tiles that stay in cache); the quantization, the bound and
    the fp32 recompute run on groups of up to ``_GROUP_DOCS`` documents at once (a training batch is one
    group), so a step pays a few dozen operator calls for them, not a few dozen per document, and a large
    encoding batch's ``(group, V)`` temporaries stay small.

    Returns the ``(B, V)`` maxima and, for training's backward, ``(terms, rows)``: every candidate term of every
    document and the flat ``hidden`` row (``b * L + t``) of its max.
    """
    batch, length = hidden.shape[:2]
    int8_weights = _int8_weights(weight)
    values = torch.empty((batch, weight.shape[0]), dtype=torch.float32, device=hidden.device)
    terms, rows = [], []
    for start in range(0, batch, _GROUP_DOCS):
        part = slice(start, start + _GROUP_DOCS)
        group_terms, group_rows = _int8_group(values[part], hidden[part], mask[part].bool(), weight, bias,
                                              int8_weights)
        terms.append(group_terms)
        rows.append(group_rows + start * length)
    if len(terms) == 1:
        return values, (terms[0], rows[0])
    if not terms:  # no documents
        empty = torch.empty(0, dtype=torch.long, device=hidden.device)
        return values, (empty, empty)
    return values, (torch.cat(terms), torch.cat(rows))


def _int8_group(out: Tensor, hidden: Tensor, keep: Tensor, weight: Tensor, bias: Tensor,
                int8_weights: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """:func:`_max_per_document_int8` for one group of documents: writes their maxima into ``out``; returns
    ``(terms, rows)`` with rows counted from the group's first document."""
    batch, length, width = hidden.shape
    vocab = weight.shape[0]
    q_w, s_w, w_l1 = int8_weights
    tokens = hidden.float()
    magnitude = tokens.abs().masked_fill_(~keep.unsqueeze(2), 0.0)
    s = (magnitude.amax(dim=(1, 2)) / 127.0).clamp_(min=torch.finfo(torch.float32).tiny)    # (B,)
    longest_l1 = magnitude.sum(dim=2).amax(dim=1)                                            # max_t ||h_t||_1
    q = torch.div(tokens, s[:, None, None], out=magnitude).round_().clamp_(-127, 127).to(torch.int8)
    counts = keep.sum(dim=1)
    prefix = bool(torch.equal(keep, torch.arange(length, device=keep.device) < counts[:, None]))
    best = torch.zeros((batch, vocab), dtype=torch.int32, device=hidden.device)
    for b, n in enumerate(counts.tolist()):
        if n == 0:
            continue
        q_t = (q[b, :n] if prefix else q[b][keep[b]]).t()                                  # (H, n)
        for start in range(0, vocab, _INT8_TILE_TERMS):
            tile = torch._int_mm(q_w[start:start + _INT8_TILE_TERMS], q_t)                  # (terms, n) int32, exact
            torch.amax(tile, dim=1, out=best[b, start:start + _INT8_TILE_TERMS])
    # (documents, V) temporaries made in place where they can be: a large encoding batch's groups keep few
    scale = s[:, None] * s_w
    approx = best.float().mul_(scale).add_(bias)
    del best
    bound = torch.mul(s_w, (0.5 * longest_l1)[:, None]).addcmul_((0.5 * s)[:, None], w_l1)
    bound.add_(scale, alpha=0.25 * width).mul_(_INT8_BOUND_SLACK).add_(approx.abs().mul_(2.0 ** -20))
    del scale
    empty = counts == 0
    candidate = bound.add_(approx).gt_(0).masked_fill_(empty[:, None], 0)  # approx + bound > 0, as 1.0 / 0.0
    torch.clamp(approx, max=0.0, out=out).masked_fill_(empty[:, None], float("-inf"))
    docs, terms = candidate.nonzero(as_tuple=True)                                           # by document
    where = _exact_candidates(out, docs, terms, weight, bias, tokens, keep)
    return terms, docs * length + where


def _exact_candidates(values: Tensor, docs: Tensor, terms: Tensor, weight: Tensor, bias: Tensor, tokens: Tensor,
                      keep: Tensor) -> Tensor:
    """Writes ``values[docs[k], terms[k]]`` = the fp32 max over document ``docs[k]``'s tokens (``keep``) of term
    ``terms[k]``'s logit, for candidate pairs sorted by document; returns each one's token (the argmax).

    The candidates' weight rows are laid out per document (padded to the largest count) and multiplied against
    that document's tokens in one batched matmul, a slice of documents at a time to bound the logits' size."""
    batch, length, width = tokens.shape
    where = torch.zeros_like(terms)
    if terms.numel() == 0:
        return where
    counts = torch.bincount(docs, minlength=batch)
    widest = int(counts.max())
    rank = torch.arange(terms.numel(), device=terms.device) - (counts.cumsum(0) - counts).index_select(0, docs)
    rows = torch.zeros((batch, widest, width), dtype=torch.float32, device=tokens.device)
    rows[docs, rank] = weight.index_select(0, terms).float()
    offset = torch.zeros((batch, widest, 1), dtype=torch.float32, device=tokens.device)
    offset[docs, rank, 0] = bias.index_select(0, terms).float()
    exact = torch.empty((batch, widest), dtype=torch.float32, device=tokens.device)
    at = torch.empty((batch, widest), dtype=torch.long, device=tokens.device)
    step = max(1, _EXACT_TILE_ELEMENTS // max(1, widest * length))
    pad = ~keep.unsqueeze(1)
    for start in range(0, batch, step):
        part = slice(start, start + step)
        logits = torch.baddbmm(offset[part], rows[part], tokens[part].transpose(1, 2))
        logits.masked_fill_(pad[part], float("-inf"))
        torch.max(logits, dim=2, out=(exact[part], at[part]))
    values[docs, terms] = exact[docs, rank]
    return at[docs, rank]


def _max_per_document_prefiltered(hidden: Tensor, weight: Tensor, bias: Tensor, mask: Tensor,
                                  chunk_size: int) -> Tensor:
    """The fp32 token-max at bf16 speed, for inference on CPUs with fast bf16 matmuls.

    A bf16 pass gives every term's max logit within a proven error bound; a term whose bound stays <= 0
    has an fp32 max <= 0 too, so relu makes its weight 0 whatever its exact value. Only the remaining
    candidates (typically a few hundred of 30k terms) are recomputed in fp32 over all the document's tokens.
    Non-candidates keep a value <= 0. The result equals the fp32 path's to fp32 rounding: the recompute
    multiplies a subset of the vocabulary, which a BLAS may sum in another order than full tiles (bit-exact
    with MKL on an AMX Xeon, a few ULPs apart on an AVX2 AMD EPYC), so only a term whose fp32 logit is within
    rounding of 0 can differ in being zero.
    """
    batch, vocab = hidden.shape[0], weight.shape[0]
    values = torch.empty((batch, vocab), dtype=torch.float32, device=hidden.device)
    w16 = weight.to(torch.bfloat16)
    b16 = bias.to(torch.bfloat16).unsqueeze(1)
    w_norm, b_abs = weight.norm(dim=1), bias.abs()
    step = max(chunk_size, 128)  # bf16 tiles are half the size: larger chunks still stay in cache
    for first in range(0, batch, _GROUP_DOCS):
        part = slice(first, first + _GROUP_DOCS)
        keep, tokens = mask[part].bool(), hidden[part].float()
        approx = torch.full((tokens.shape[0], vocab), float("-inf"), dtype=torch.float32, device=hidden.device)
        for b in range(tokens.shape[0]):
            positions = keep[b].nonzero().squeeze(1)
            t16 = tokens[b].index_select(0, positions).to(torch.bfloat16)
            for start in range(0, positions.numel(), step):
                tile = torch.addmm(b16, w16, t16[start:start + step].t())                 # (V, c) bf16
                torch.maximum(approx[b], tile.amax(dim=1).float(), out=approx[b])
        longest = (tokens.norm(dim=2) * keep).amax(dim=1)
        empty = ~keep.any(dim=1)
        candidate = (approx + _BF16_REL_BOUND * (longest[:, None] * w_norm + b_abs)).gt_(0)
        candidate.masked_fill_(empty[:, None], False)
        torch.clamp(approx, max=0.0, out=values[part]).masked_fill_(empty[:, None], float("-inf"))
        docs, terms = candidate.nonzero(as_tuple=True)
        _exact_candidates(values[part], docs, terms, weight, bias, tokens, keep)
    return values


def _max_per_document(hidden: Tensor, weight: Tensor, bias: Tensor, mask: Tensor) -> Tensor:
    """Per document, all its tokens against a vocabulary block at a time: each term's max is one ``amax``."""
    batch, vocab = hidden.shape[0], weight.shape[0]
    values = torch.full((batch, vocab), float("-inf"), dtype=weight.dtype, device=hidden.device)
    bias_col = bias.unsqueeze(1)
    for b in range(batch):
        positions = mask[b].nonzero().squeeze(1)
        if positions.numel() == 0:
            continue
        tokens_t = hidden[b].index_select(0, positions).to(weight.dtype).t().contiguous()  # (H, n)
        block = max(1, _CPU_TILE_ELEMENTS // positions.numel())
        for start in range(0, vocab, block):
            tile = torch.addmm(bias_col[start:start + block], weight[start:start + block], tokens_t)  # (block, n)
            torch.amax(tile, dim=1, out=values[b, start:start + block])
    return values


def _max_across_batch(hidden: Tensor, weight: Tensor, bias: Tensor, mask: Tensor, chunk_size: int,
                      with_argmax: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Batch-wide tiles of ``chunk_size`` positions. ``with_argmax`` (training on an accelerator): also the flat
    ``hidden`` row ``b * L + t`` of each ``(b, v)``'s max in the tiles' precision, ``(B, V)`` int64, so the
    backward needs no argmax recomputed and no host synchronisation to size one (a masked row's entry points at
    one of its padding rows, which no gradient reaches: its max is ``-inf``). A NaN maximum stays NaN, as in
    the values-only pass."""
    batch, length = hidden.shape[:2]
    w_t, pad = weight.t(), ~mask
    values = rows = None
    for start in range(0, length, chunk_size):
        tile = torch.matmul(hidden[:, start:start + chunk_size].to(weight.dtype), w_t).add_(bias)  # (B, c, V)
        tile.masked_fill_(pad[:, start:start + chunk_size, None], float("-inf"))
        if not with_argmax:
            values = tile.amax(dim=1) if values is None else torch.maximum(values, tile.amax(dim=1))
            continue
        best, at = tile.max(dim=1)
        if values is None:
            values, rows = best, at
            continue
        rows = torch.where(best > values, at + start, rows)  # the first chunk's max is kept on a tie
        values = torch.maximum(values, best)  # NaN propagates, as in the values-only pass
    if values is None:  # no positions at all
        values = torch.full((batch, weight.shape[0]), float("-inf"), dtype=weight.dtype, device=hidden.device)
        rows = torch.zeros(values.shape, dtype=torch.long, device=hidden.device)
    if not with_argmax:
        return values
    return values, rows.add_(torch.arange(batch, device=hidden.device).mul_(length).unsqueeze(1))


def _max_projection_backward(grad: Tensor, hidden: Tensor, weight: Tensor, mask: Tensor,
                             need: tuple[bool, bool, bool], argmax: tuple[Tensor, Tensor] | Tensor | None = None,
                             ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Exact gradients of the token-max of a linear projection, visiting only the terms that have one.

    ``d values[b,v] / d hidden[b,t] = weight[v]`` only at the argmax ``t``; ``d / d weight[v] =
    hidden[b, t]``; ``d / d bias[v] = 1``. ``argmax``: what the forward kept of it: ``(terms, rows)`` from the
    int8 pass (the flat ``hidden`` row ``b * L + t`` of every candidate term's max), or the batch-wide pass's
    ``(B, V)`` rows (:func:`_max_across_batch`: the argmax in the forward's precision; one ``nonzero`` of the
    gradient finds the pairs). The int8 pass covers every gradient SPLADE produces: a term it
    did not keep has a max proven <= 0, where relu's gradient is 0 (the function is only applied under
    ``log1p(relu(.))``, in :func:`fused_splade_head`). Without it the argmax is recomputed (in fp32; the bias
    is the same for every token and drops out) for the union of terms with a gradient, typically a few hundred
    of the 30k, in tiles of bounded size. Accumulation is fp32 whatever the forward precision.
    """
    batch, length, hid = hidden.shape
    g = grad.float().masked_fill(~mask.any(dim=1, keepdim=True), 0.0)
    h_flat = hidden.reshape(batch * length, hid).float()
    if isinstance(argmax, Tensor):  # the batch-wide forward's (B, V) rows: one nonzero, no argmax to recompute
        docs, terms = g.nonzero(as_tuple=True)
        rows, gv = argmax[docs, terms], g[docs, terms].unsqueeze(1)
    elif argmax is not None:  # the int8 pass's candidates: those without a gradient are dropped
        terms, rows = argmax
        gv = g[rows // length, terms]
        keep = gv.ne(0)
        terms, rows, gv = terms[keep], rows[keep], gv[keep].unsqueeze(1)
    else:  # pairs of non-zero gradients only
        terms, rows = _recompute_argmax(g, h_flat.view(batch, length, hid), weight, mask)
        gv = g[rows // length, terms].unsqueeze(1)
    grad_h = grad_w = None
    if need[0]:
        grad_h = torch.zeros((batch * length, hid), dtype=torch.float32, device=hidden.device)
        grad_h.index_add_(0, rows, gv * weight.index_select(0, terms).float())
        grad_h = grad_h.view(batch, length, hid)
    if need[1]:
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        grad_w.index_add_(0, terms, gv * h_flat.index_select(0, rows))
    return grad_h, grad_w, (g.sum(0) if need[2] else None)


def _recompute_argmax(g: Tensor, h32: Tensor, weight: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """``(terms, rows)`` for every non-zero ``g[b, v]``: the flat row ``b * L + t`` of term v's max in document b."""
    batch, length, _ = h32.shape
    w32 = weight.float()
    pad = ~mask.unsqueeze(2)
    active = g.ne(0).any(dim=0).nonzero().squeeze(1)
    step = max(1, _BACKWARD_TILE_ELEMENTS // max(1, batch * length))
    terms, rows = [], []
    for s in range(0, active.numel(), step):
        tile = active[s:s + step]
        argmax = torch.matmul(h32, w32.index_select(0, tile).t()).masked_fill_(pad, float("-inf")).argmax(dim=1)
        docs, cols = g.index_select(1, tile).nonzero(as_tuple=True)                  # (B, T) -> pairs
        terms.append(tile[cols])
        rows.append(docs * length + argmax[docs, cols])
    empty = torch.empty(0, dtype=torch.long, device=g.device)
    return (torch.cat(terms) if terms else empty), (torch.cat(rows) if rows else empty)


class _ChunkedMaxProjection(torch.autograd.Function):
    """``values[b,v] = max_{t: mask[b,t]} (hidden[b,t] @ weight[v] + bias[v])`` with a sparse argmax backward.

    Dtypes are handled explicitly instead of through ``custom_fwd``: the projection runs in the autocast
    dtype when autocast is on (the same precision the plain ``nn.Linear`` would get), while ``weight`` and
    ``bias`` arrive in their own (fp32) precision so the cheap, sparse backward works in fp32 and returns
    gradients in each input's dtype. Nothing of size ``(B, L, V)`` is kept or built.
    """

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, bias: Tensor, mask: Tensor, chunk_size: int,
                compute_dtype: torch.dtype, per_document: bool) -> Tensor:
        found: tuple[Tensor, ...] = ()
        with torch.autocast(hidden.device.type, enabled=False):
            if per_document and _prefilter(hidden, weight, training=True) == "int8":  # exact maxima and their argmax
                values, found = _max_per_document_int8(hidden, weight, bias.float(), mask)
            elif not per_document:  # the maxima's rows too: a backward with one host sync (its nonzero)
                values, rows = _max_across_batch(hidden, weight.to(compute_dtype), bias.to(compute_dtype), mask,
                                                 chunk_size, with_argmax=True)
                found = (rows,)
            else:
                values = _max_projection_forward(hidden, weight.to(compute_dtype), bias.to(compute_dtype), mask,
                                                 chunk_size, per_document)
        ctx.save_for_backward(hidden, weight, mask, *found)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype)
        return values

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        hidden, weight, mask, *found = ctx.saved_tensors
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        with torch.autocast(hidden.device.type, enabled=False):
            argmax = (found[0], found[1]) if len(found) == 2 else (found[0] if found else None)
            gh, gw, gb = _max_projection_backward(grad, hidden, weight, mask, need, argmax)
        h_dt, w_dt, b_dt = ctx.dtypes
        return (gh.to(h_dt) if gh is not None else None, gw.to(w_dt) if gw is not None else None,
                gb.to(b_dt) if gb is not None else None, None, None, None, None)


def fused_splade_head(hidden: Tensor, weight: Tensor, bias: Tensor | None, attention_mask: Tensor,
                      chunk_size: int = 64, per_document: bool | None = None) -> Tensor:
    """SPLADE weights from the head-transformed hidden states, equal to the plain path; at least fp32 ``(B,V)``.

    ``per_document=None`` picks per-document tiles on CPU and batch-wide tiles on accelerators. ``chunk_size``
    is the positions per batch-wide tile (and per bf16 prefilter tile); CPU per-document tiles are sized by
    ``_CPU_TILE_ELEMENTS``.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if bias is None:
        bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
    dtype = _compute_dtype(hidden)
    if per_document is None:
        per_document = hidden.device.type == "cpu"
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad or bias.requires_grad):
        max_logits = _ChunkedMaxProjection.apply(hidden, weight, bias, attention_mask.bool(), chunk_size, dtype,
                                                 per_document)
    else:  # inference: no autograd bookkeeping, and the bf16-prefiltered fp32 max where it pays
        with torch.autocast(hidden.device.type, enabled=False):
            max_logits = _max_projection_forward(hidden, weight.to(dtype), bias.to(dtype), attention_mask.bool(),
                                                 chunk_size, per_document, inference=True)
    # fp16/bf16 maxima are upcast: the term weights feed the loss and the regulariser in fp32 (fp64 stays)
    return torch.log1p(torch.relu(max_logits.to(torch.promote_types(max_logits.dtype, torch.float32))))


class _HeadInput(Exception):
    """Carries the decoder's input out of the MLM forward, so the full projection never runs."""

    def __init__(self, hidden: Tensor) -> None:
        super().__init__("head input captured")
        self.hidden = hidden


def _raise_head_input(module: nn.Module, args: tuple[Any, ...]) -> None:
    raise _HeadInput(args[0])


# --------------------------------------------------------------------------------------------------------
# The encoder
# --------------------------------------------------------------------------------------------------------

class SpladeEncoder(nn.Module):
    """A masked-LM backbone plus SPLADE pooling; ``forward`` gives differentiable ``(B, V)`` term weights.

    The head is split generically: ``mlm.get_output_embeddings()`` is the vocabulary projection (weight,
    bias; tied to the input embeddings where the model ties them), and whatever the model computes before
    it (BERT's dense+act+LayerNorm, RoBERTa's ``lm_head`` transform, DistilBERT's ``vocab_*`` layers...) is
    captured by a forward pre-hook on that projection that stops the MLM forward right there. A probe at
    construction checks that ``projection(captured) == logits``; when it is not (a model that post-processes
    its logits, a non-linear decoder) the encoder falls back to the plain full-logits path.
    """

    def __init__(self, mlm: nn.Module, tokenizer: Any, *, chunk_size: int = 64, fused_head: bool = True) -> None:
        super().__init__()
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.mlm = mlm
        self.tokenizer = tokenizer
        self.chunk_size = chunk_size
        self.fused_head = bool(fused_head) and self._head_is_splittable()
        #: ``(max_query_length, max_doc_length)`` the model is trained at: written with it for sentence-transformers
        self.max_lengths: tuple[int, int] = DEFAULT_LENGTHS

    # ---- construction ------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path: str, *, device: str | torch.device = "cpu", chunk_size: int = 64,
                        fused_head: bool = True) -> "SpladeEncoder":
        """Load ``splade-tiny``, a local folder or a hub id; every failure is a :class:`ModelError` naming it."""
        path = resolve_model(name_or_path)
        mlm, tokenizer = _load_mlm_and_tokenizer(path)
        try:
            mlm.to(device)
        except Exception as exc:  # noqa: BLE001 - a bad device string or an unavailable accelerator
            raise DeviceError(f"cannot move the model to device {device!s}", original_exception=exc,
                              device=str(device), hint="check --device and that the accelerator is visible") from exc
        encoder = cls(mlm, tokenizer, chunk_size=chunk_size, fused_head=fused_head)
        encoder.max_lengths = trained_lengths(path) or DEFAULT_LENGTHS
        return encoder

    def _projection(self) -> nn.Module | None:
        out = self.mlm.get_output_embeddings() if hasattr(self.mlm, "get_output_embeddings") else None
        weight = getattr(out, "weight", None)
        if not isinstance(out, nn.Module) or not isinstance(weight, Tensor) or weight.dim() != 2:
            return None
        return out

    def _head_is_splittable(self) -> bool:
        proj = self._projection()
        if proj is None:
            log.info("%s has no linear output embedding; using the full-logits head", type(self.mlm).__name__)
            return False
        vocab = proj.weight.shape[0]
        ids = torch.arange(1, 6, device=proj.weight.device).remainder(vocab).unsqueeze(0)
        mask = torch.ones_like(ids)
        was_training = self.mlm.training
        self.mlm.eval()
        try:
            with torch.no_grad():
                hidden = self._head_input(ids, mask)
                split = torch.nn.functional.linear(hidden, proj.weight, getattr(proj, "bias", None))
                full = self.mlm(input_ids=ids, attention_mask=mask).logits
            ok = split.shape == full.shape and torch.allclose(split.float(), full.float(), rtol=1e-4, atol=1e-4)
        except Exception as exc:  # noqa: BLE001 - any surprise means: do not split this architecture
            log.info("head split probe failed for %s (%s); using the full-logits head", type(self.mlm).__name__, exc)
            return False
        finally:
            self.mlm.train(was_training)
        if not ok:
            log.info("%s post-processes its logits; using the full-logits head", type(self.mlm).__name__)
        return ok

    def _head_input(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Run the MLM up to (not including) the vocabulary projection and return that projection's input."""
        proj = self._projection()
        assert proj is not None
        handle = proj.register_forward_pre_hook(_raise_head_input)
        try:
            self.mlm(input_ids=input_ids, attention_mask=attention_mask)
        except _HeadInput as captured:
            return captured.hidden
        finally:
            handle.remove()
        raise ModelError(f"{type(self.mlm).__name__} never called its output embedding layer",
                         hint="construct SpladeEncoder(..., fused_head=False) for this architecture")

    # ---- properties --------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        proj = self._projection()
        if proj is not None:
            return int(proj.weight.shape[0])
        return int(self.mlm.config.vocab_size)

    @property
    def device(self) -> torch.device:
        return next(self.mlm.parameters()).device

    # ---- compute -----------------------------------------------------------------------------------
    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Differentiable SPLADE term weights, fp32 ``(B, V)``."""
        if self.fused_head:
            hidden = self._head_input(input_ids, attention_mask)
            proj = self._projection()
            return fused_splade_head(hidden, proj.weight, getattr(proj, "bias", None), attention_mask,
                                     self.chunk_size)
        logits = self.mlm(input_ids=input_ids, attention_mask=attention_mask).logits
        return splade_pool_reference(logits, attention_mask).float()

    def tokenize(self, texts: list[str], max_length: int) -> dict[str, Tensor]:
        """Pad to the longest text of this batch (not to ``max_length``) and truncate to ``max_length``."""
        enc = self.tokenizer(list(texts), padding="longest", truncation=True, max_length=max_length,
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    @torch.no_grad()
    def encode(self, texts: list[str], *, max_length: int, batch_size: int = 32, top_k: int | None = None,
               amp_dtype: torch.dtype | None = None, sort_by_length: bool = True) -> "scipy.sparse.csr_matrix":
        """Encode texts into a float32 CSR matrix ``(N, V)`` whose rows follow the input order.

        Sorting by length groups similar lengths into a batch so little compute goes to padding; dropout
        is switched off for the call and the previous mode restored.
        """
        import scipy.sparse

        from .cpu import release_heap

        texts = list(texts)
        on_cpu = self.device.type == "cpu"
        ids = token_ids(self.tokenizer, texts, max_length)
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i])) if sort_by_length else list(range(len(ids)))
        rows, cols, vals = [], [], []
        was_training = self.training
        self.eval()
        try:
            with self.frozen_head():
                for start in range(0, len(order), batch_size):
                    batch_idx = order[start:start + batch_size]
                    input_ids, mask = self._pad([ids[i] for i in batch_idx])
                    with torch.autocast(self.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                        weights = self(input_ids.to(self.device), mask.to(self.device))
                    if top_k is not None:
                        weights = top_k_prune(weights, top_k)
                    r, c = weights.nonzero(as_tuple=True)
                    rows.append(np.asarray(batch_idx, dtype=np.int64)[r.cpu().numpy()])
                    cols.append(c.cpu().numpy())
                    vals.append(weights[r, c].float().cpu().numpy())
                    del weights
                    if on_cpu:
                        release_heap()  # the batch's (B, V) tensors back to the OS: see splade_obs.cpu.release_heap
        finally:
            self.train(was_training)
        cat = (lambda xs, dt: np.concatenate(xs) if xs else np.zeros(0, dtype=dt))
        return scipy.sparse.csr_matrix(
            (cat(vals, np.float32).astype(np.float32), (cat(rows, np.int64), cat(cols, np.int64))),
            shape=(len(texts), self.vocab_size), dtype=np.float32)

    def frozen_head(self) -> Any:
        """A block in which the head's weights do not change (:func:`frozen_head`): their int8 form is computed
        once for all its passes. ``encode`` and a training step's forward open one."""
        proj = self._projection() if self.fused_head else None
        return frozen_head(proj.weight) if proj is not None else nullcontext()

    def _pad(self, sequences: list[np.ndarray]) -> tuple[Tensor, Tensor]:
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        longest = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), longest), dtype=torch.long)
        for i, seq in enumerate(sequences):
            input_ids[i, :len(seq)] = torch.as_tensor(seq, dtype=torch.long)
            mask[i, :len(seq)] = 1
        return input_ids, mask

    def save_pretrained(self, path: str | Path) -> None:
        """Write HF format (safetensors weights, config, tokenizer): ``AutoModelForMaskedLM.from_pretrained(path)``,
        and the sentence-transformers files (:mod:`.st_layout`): ``SparseEncoder(path)`` at ``max_lengths``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.mlm.save_pretrained(str(path))
        self.tokenizer.save_pretrained(str(path))
        write_st_layout(path, max_query_length=self.max_lengths[0], max_doc_length=self.max_lengths[1])


def _load_mlm_and_tokenizer(path: str) -> tuple[nn.Module, Any]:
    """Load with retries for transient faults; whatever still fails becomes a ModelError naming ``path``."""
    try:
        return _load_with_retry(path)
    except ModelError:
        raise
    except ApplicationError as err:
        raise ModelError(f"cannot load the masked-LM model: {err.message}",
                         original_exception=err.original_exception or err, file_path=path,
                         retryable=err.retryable) from err


@retry(max_attempts=3, delay=1.0, backoff_factor=2.0, max_delay=10.0, operation="load masked-LM model")
def _load_with_retry(path: str) -> tuple[nn.Module, Any]:
    """Load model and tokenizer; transient errors (network, timeouts) are retried by the decorator."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    _check_weights_file(path)
    try:
        mlm = AutoModelForMaskedLM.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except ApplicationError:
        raise
    except Exception as exc:  # noqa: BLE001 - typed below; transient ones stay retryable
        typed = classify(exc, operation="load masked-LM model", file_path=path)
        if typed.retryable:
            raise
        raise ModelError(f"cannot load the masked-LM model: {typed.message}", original_exception=exc,
                         file_path=path) from exc
    vocab = int(getattr(mlm.config, "vocab_size", 0) or 0)
    if vocab and len(tokenizer) < vocab // 2:  # transformers builds a 5-token tokenizer when the files are absent
        raise ModelError(f"its tokenizer has {len(tokenizer)} tokens for a vocabulary of {vocab}: the tokenizer "
                         "files are missing or belong to another model (every word would become [UNK])",
                         file_path=path, hint="copy tokenizer.json (or vocab.txt) and tokenizer_config.json from "
                                              "the model it was trained from")
    return mlm, tokenizer


def _check_weights_file(path: str) -> None:
    """A local folder's ``model.safetensors`` whose header does not match its size (a truncated copy) is a
    ModelError naming the file; safetensors' own message names neither the file nor the cause."""
    from .checkpoint import check_safetensors
    from .errors import FileSystemError

    weights = Path(path) / "model.safetensors"
    if not weights.is_file():
        return
    try:
        check_safetensors(weights, "model weights")
    except FileSystemError as err:
        if isinstance(err.original_exception, OSError):  # unreadable, not damaged: the loader says which
            return
        raise ModelError(err.message, file_path=str(weights),
                         original_exception=err.original_exception,
                         hint="the file is damaged (a copy cut short?): copy the model folder again, or pass another "
                              "one") from err


def top_k_prune(weights: Tensor, k: int) -> Tensor:
    """Keep the ``k`` largest weights of each row and zero the rest (a row never gains non-zeros)."""
    if k < 1:
        raise ValueError(f"top_k must be >= 1, got {k}")
    if k >= weights.shape[-1]:
        return weights
    values, index = weights.topk(k, dim=-1)
    return torch.zeros_like(weights).scatter_(-1, index, values)


def sparse_to_dict(row_csr: Any, tokenizer: Any) -> dict[str, float]:
    """``{term: weight}`` for one row of :meth:`SpladeEncoder.encode`'s output, heaviest term first."""
    row = row_csr.tocsr() if hasattr(row_csr, "tocsr") else row_csr
    if row.shape[0] != 1:
        raise ValueError(f"expected a single row, got shape {row.shape}")
    ids, weights = row.indices, row.data
    order = np.argsort(-weights, kind="stable")
    terms = tokenizer.convert_ids_to_tokens([int(i) for i in ids[order]])
    return {term: float(w) for term, w in zip(terms, weights[order]) if w != 0}
