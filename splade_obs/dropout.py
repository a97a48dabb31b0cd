"""Dropout masks drawn fast on CPUs: the training step's largest cost that is not arithmetic.

torch draws CPU dropout masks (``bernoulli_``) one element at a time from its Mersenne twister: ~6 ns an
element on a Zen 4 core (MKL's vectorised generator is used on Intel CPUs only), and BERT's dropout on hidden
states and attention probabilities needs ~20M masks per step of batch 16 at lengths 64/256: ~95 ms, 12% of the
step (docs/benchmarks.md, "Training step profile"). Here each mask comes from numpy's SFC64 generator, 64 random
bits per call cut into four 16-bit draws (~0.9 ns an element), seeded from torch's own CPU generator at every
call, so ``torch.manual_seed`` and a checkpoint's saved torch RNG state still fix every mask (exact resume holds).

An element is dropped when its 16-bit draw is below ``round(p * 65536)``: the drop probability is ``p`` to
within 2^-17 (0.1 becomes 0.1000061); kept elements are scaled by ``1 / (1 - p)`` as torch does, so the
expectation is unchanged. On other devices, in eval mode, or with ``p`` of 0 or 1, torch's own dropout runs.

:func:`install` puts it into a Hugging Face model: each ``nn.Dropout`` becomes a :class:`CpuDropout` (a
subclass, no parameters: saved weights and configs are unchanged), and a model on the ``sdpa`` attention
implementation gets ``splade_obs_cpu``, which runs SDPA's math (scores, softmax, dropout, values) with these
masks when it trains on a CPU with attention dropout on, and calls SDPA itself otherwise, with a padding mask
built without reading it back from the device (:func:`padding_mask`; off a CPU the trainer installs only this
attention, :func:`install_attention`). torch's CPU SDPA
kernels take no dropout, so the training step already ran that math path, with one difference: SDPA's math
upcasts bf16 inputs to fp32, where this one computes in the autocast dtype, as transformers' eager attention
does under autocast. Under bf16 that is ~3x the rounding error of the fp32 computation on random inputs
(1.4e-2 vs 5e-3 at most) and 12% less step time (363 vs 412 ms); the loss curves stay within seed noise
(docs/benchmarks.md, "Training step profile"). In fp32 training nothing but the mask changes.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

log = logging.getLogger("splade_obs.dropout")

#: The attention implementation :func:`install` registers with transformers' ``AttentionInterface``.
ATTENTION = "splade_obs_cpu"
_BITS = 16


def keep_mask(shape: torch.Size | tuple[int, ...], p: float) -> Tensor:
    """A bool mask of ``shape``, True where an element is kept (probability ``1 - p``, to 2^-17)."""
    n = math.prod(shape)
    seed = int(torch.randint(0, 2 ** 63 - 1, (1,), dtype=torch.int64))  # from torch's generator: resumable
    words = np.random.Generator(np.random.SFC64(seed)).bit_generator.random_raw(-(-n // 4))
    draws = torch.from_numpy(words.view(np.uint16)[:n].view(np.int16))  # 16-bit draws, compared signed
    threshold = round(p * (1 << _BITS)) - (1 << (_BITS - 1))
    return draws.ge(threshold).view(shape)


def masked_dropout(x: Tensor, p: float) -> Tensor:
    """Training-mode dropout of ``x`` with a :func:`keep_mask`; differentiable (the backward is ``grad * mask``)."""
    return torch.mul(x, keep_mask(x.shape, p)).mul_(1.0 / (1.0 - p))  # the scale rounded once, in x's dtype


def _fast(x: Tensor, p: float, training: bool) -> bool:
    return training and 0.0 < p < 1.0 and x.device.type == "cpu" and x.numel() > 0


class CpuDropout(nn.Dropout):
    """``nn.Dropout`` whose masks come from :func:`keep_mask` when it trains on a CPU."""

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 - nn.Dropout's own argument name
        if not _fast(input, self.p, self.training):
            return super().forward(input)
        out = masked_dropout(input, self.p)
        return input.copy_(out) if self.inplace else out


def attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
              dropout: float = 0.0, scaling: float | None = None, is_causal: bool | None = None,
              **kwargs: Any) -> tuple[Tensor, None]:
    """transformers' attention-function signature: ``(B, heads, L, d)`` inputs, ``(B, L, heads, d)`` output.

    The math path with :func:`keep_mask` dropout for an encoder (no causal mask, no grouped heads, no position
    bias or softcap) training on a CPU; SDPA for everything else.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    plain = (kwargs.get("position_bias") is None and kwargs.get("softcap") is None
             and getattr(module, "num_key_value_groups", 1) == 1 and key.shape[1] == query.shape[1]
             and not (is_causal if is_causal is not None else getattr(module, "is_causal", True)))
    if not (plain and module.training and _fast(query, dropout, True)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)).mul_(scale)  # the autocast dtype, as eager attention
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:  # True: attend. A finite floor keeps fully masked rows finite
            scores.masked_fill_(~attention_mask, torch.finfo(scores.dtype).min)  # in place: scores is ours
        else:
            scores.add_(attention_mask.to(scores.dtype))
    out = torch.matmul(masked_dropout(torch.softmax(scores, dim=-1), dropout), value)
    return out.transpose(1, 2).contiguous(), None


def reads_back(mask: Tensor) -> bool:
    """Whether reading ``mask``'s values on the host waits for a device (a tensor off the CPU)."""
    return mask.device.type != "cpu"


def padding_mask(*args: Any, **kwargs: Any) -> Tensor | None:
    """SDPA's mask function, except that a padding mask on an accelerator is always turned into a mask.

    transformers' SDPA mask is skipped when no token is padded, which it learns by reading ``mask.all()`` back
    from the device: a host synchronisation at the start of every encoder pass. A mask of all ``True`` gives SDPA
    the same attention; the padded batches of training have a mask anyway (an unpadded batch, rare in training,
    runs SDPA's memory-efficient kernel instead of flash attention; that includes encoding with the trained
    model in the same process).
    """
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    mask = kwargs.get("attention_mask")
    if mask is not None and reads_back(mask):
        for skip in ("allow_is_bidirectional_skip", "allow_is_causal_skip"):  # those this transformers passes
            if skip in kwargs:
                kwargs[skip] = False
    return ALL_MASK_ATTENTION_FUNCTIONS["sdpa"](*args, **kwargs)


def install_attention(model: nn.Module) -> bool:
    """``splade_obs_cpu`` as ``model``'s attention implementation where it is on ``sdpa`` (see the module's
    docstring; off a CPU it is SDPA with :func:`padding_mask`). Returns whether the model has it.

    The swap is checked on a padded probe batch: the outputs at its real positions must equal SDPA's (a
    transformers that handled a registered implementation or its mask function otherwise would attend to the
    padding silently); when they do not, the model goes back to ``sdpa`` with a warning."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) == ATTENTION:
        return True
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(ATTENTION, attention)
        # the masks SDPA gets: an implementation without a registered mask function gets no padding mask
        AttentionMaskInterface.register(ATTENTION, padding_mask)
        before = _probe(model)
        model.set_attn_implementation(ATTENTION)
        after = _probe(model)
        if not torch.allclose(after, before, rtol=1e-3, atol=1e-3):
            model.set_attn_implementation("sdpa")
            log.warning("attention stays SDPA's for %s: the swapped attention changed a padded batch's outputs "
                        "by up to %.3g", type(model).__name__, float((after - before).abs().max()))
    except Exception as exc:  # noqa: BLE001 - an architecture off the attention interface keeps SDPA
        log.debug("attention stays SDPA's for %s: %s", type(model).__name__, exc)
        if config._attn_implementation == ATTENTION:  # swapped, then failed its check: back, unchecked
            with contextlib.suppress(Exception):
                model.set_attn_implementation("sdpa")
    return config._attn_implementation == ATTENTION


def _probe(model: nn.Module) -> Tensor:
    """``model``'s outputs in eval mode at the real positions of two sequences, the second one padded."""
    param = next(model.parameters())
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 108)
    ids = (torch.arange(100, 108, device=param.device) % vocab).repeat(2, 1)
    mask = torch.ones_like(ids)
    mask[1, 3:] = 0
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask)
    finally:
        model.train(training)
    first = out[0] if isinstance(out, tuple) else next(iter(out.values()))
    return first[mask.bool()].float()


def install(model: nn.Module) -> dict[str, int | bool]:
    """Fast CPU dropout in ``model`` (in place): ``{"dropouts": modules replaced, "attention": bool}``.

    Idempotent; the model's outputs in eval mode, its parameters and its saved config are unchanged.
    """
    replaced = 0
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                setattr(parent, name, CpuDropout(child.p, inplace=child.inplace))
                replaced += 1
    return {"dropouts": replaced, "attention": install_attention(model)}
