"""SPLADE encoder: pooling by hand, the fused chunked head against the plain path (values and gradients),
autocast, HF save/load, encode, and typed load errors — on the real splade-tiny."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from splade_obs import model as model_module
from splade_obs.errors import ModelError
from splade_obs.hub import resolve_model
from splade_obs.model import (SpladeEncoder, fused_splade_head, sparse_to_dict, splade_pool_reference,
                              top_k_prune)

TEXTS = [
    "what is sparse retrieval with learned term weights",
    "splade",
    "a document about inverted indexes, query expansion and the vocabulary of a masked language model",
    "short query here",
]

# Hand example: batch 2, 3 tokens, vocab 2. Document 0 has a padding token with huge logits.
HAND_LOGITS = torch.tensor([
    [[1.0, -2.0], [3.0, 0.5], [1e6, 1e6]],
    [[-1.0, 2.0], [7.0, 9.0], [5.0, 5.0]],
])
HAND_MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])
# doc 0: term 0 max(log 2, log 4) = log 4; term 1 max(log1p(0), log1p(0.5)) = log 1.5
# doc 1: only token 0 counts: term 0 log1p(relu(-1)) = 0; term 1 log 3
HAND_EXPECTED = torch.tensor([[math.log(4.0), math.log(1.5)], [0.0, math.log(3.0)]])


@pytest.fixture(scope="module")
def encoder() -> SpladeEncoder:
    torch.manual_seed(0)
    enc = SpladeEncoder.from_pretrained("splade-tiny", chunk_size=64)
    enc.eval()  # no dropout: the two paths must see the same network
    return enc


def _batch(enc: SpladeEncoder, texts: list[str] = TEXTS) -> dict[str, torch.Tensor]:
    batch = enc.tokenize(texts, max_length=24)
    assert (batch["attention_mask"] == 0).any(), "the batch must be ragged"
    return batch


def _with_head(enc: SpladeEncoder, fused: bool, chunk: int = 64) -> SpladeEncoder:
    enc.fused_head, enc.chunk_size = fused, chunk
    return enc


def _grads(enc: SpladeEncoder, batch: dict[str, torch.Tensor], fused: bool, coef: torch.Tensor,
           autocast: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    enc.zero_grad(set_to_none=True)
    _with_head(enc, fused)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        weights = enc(**batch)
        (weights * coef).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in enc.named_parameters() if p.grad is not None}
    enc.zero_grad(set_to_none=True)
    return weights.detach(), grads


# ---- pooling ----------------------------------------------------------------------------------------

def test_reference_pooling_by_hand_ignores_padding() -> None:
    out = splade_pool_reference(HAND_LOGITS, HAND_MASK)
    torch.testing.assert_close(out, HAND_EXPECTED)
    inf_padding = HAND_LOGITS.clone()
    inf_padding[0, 2] = float("inf")
    inf_padding[1, 1:] = 1e30
    torch.testing.assert_close(splade_pool_reference(inf_padding, HAND_MASK), HAND_EXPECTED)


@pytest.mark.parametrize("per_document", [True, False])
@pytest.mark.parametrize("chunk", [1, 2, 64])
def test_fused_head_by_hand(chunk: int, per_document: bool) -> None:
    # identity projection: the "logits" are the hidden states themselves
    out = fused_splade_head(HAND_LOGITS, torch.eye(2), torch.zeros(2), HAND_MASK, chunk, per_document)
    torch.testing.assert_close(out, HAND_EXPECTED)


@pytest.mark.parametrize("cpu_tile_elements", [None, 23])
@pytest.mark.parametrize("tile_elements", [None, 40])
@pytest.mark.parametrize("per_document", [True, False])
def test_fused_head_matches_reference_with_holes_in_the_mask(per_document: bool, tile_elements: int | None,
                                                             cpu_tile_elements: int | None,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Left padding, a hole in the middle and a document with no tokens at all: values and gradients.

    ``tile_elements=40`` makes the backward recompute the argmax one term at a time; ``cpu_tile_elements=23``
    cuts the 40 terms into blocks of 2-4 (23 // tokens; the last one short) in the per-document forward.
    """
    if tile_elements is not None:
        monkeypatch.setattr(model_module, "_BACKWARD_TILE_ELEMENTS", tile_elements)
    if cpu_tile_elements is not None:
        monkeypatch.setattr(model_module, "_CPU_TILE_ELEMENTS", cpu_tile_elements)
    torch.manual_seed(1)
    hidden = torch.randn(4, 9, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(40, 6, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(40, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1] * 9, [0, 0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 1, 1, 0, 1, 0], [0] * 9])
    coef = torch.randn(4, 40, dtype=torch.float64)

    ref = splade_pool_reference(hidden @ weight.t() + bias, mask)
    ref_grads = torch.autograd.grad((ref * coef).sum(), (hidden, weight, bias))
    for chunk in (1, 4, 64):
        out = fused_splade_head(hidden, weight, bias, mask, chunk, per_document)
        grads = torch.autograd.grad((out * coef).sum(), (hidden, weight, bias))
        torch.testing.assert_close(out, ref)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r)
    assert torch.all(ref[3] == 0)


def test_batch_wide_training_keeps_the_argmax_and_its_backward_syncs_once(monkeypatch) -> None:
    """The accelerators' pass (``per_document=False``) keeps each maximum's row in the forward: the backward
    recomputes no argmax and its only data-sized operator is one ``nonzero`` of the gradient (one host
    synchronisation a pass on a GPU), for the reference's gradients; ties across chunks and an all-padding row
    included."""
    monkeypatch.setattr(model_module, "_recompute_argmax", lambda *a: pytest.fail("argmax recomputed"))
    torch.manual_seed(2)
    hidden = torch.randn(3, 8, 5, dtype=torch.float64, requires_grad=True)
    hidden.data[0, 5] = hidden.data[0, 1]  # the same token in the first and the third chunk: a tie
    weight = torch.randn(30, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(30, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1] * 8, [1, 1, 1, 0, 0, 0, 0, 0], [0] * 8])
    coef = torch.randn(3, 30, dtype=torch.float64)
    ref = splade_pool_reference(hidden @ weight.t() + bias, mask)
    ref_grads = torch.autograd.grad((ref * coef).sum(), (hidden, weight, bias))

    def tied(grad_h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        others = torch.ones(8, dtype=torch.bool)
        others[[1, 5]] = False
        return grad_h[0, 1] + grad_h[0, 5], torch.cat([grad_h[0, others].flatten(), grad_h[1:].flatten()])

    data_sized: list[str] = []
    nonzero, index = torch.Tensor.nonzero, torch.Tensor.__getitem__
    monkeypatch.setattr(torch.Tensor, "nonzero", lambda t, *a, **k: data_sized.append("nonzero") or nonzero(t, *a, **k))
    monkeypatch.setattr(torch.Tensor, "__getitem__", lambda t, i: data_sized.append("mask") or index(t, i)
                        if isinstance(i, torch.Tensor) and i.dtype == torch.bool else index(t, i))
    for chunk in (1, 2, 3, 64):
        data_sized.clear()
        out = fused_splade_head(hidden, weight, bias, mask, chunk, per_document=False)
        torch.testing.assert_close(out, ref)
        grads = torch.autograd.grad((out * coef).sum(), (hidden, weight, bias))
        # a tie's gradient goes to one of the tied tokens (amax splits it): compare what the two tokens get
        for g, r in zip(tied(grads[0]), tied(ref_grads[0])):
            torch.testing.assert_close(g, r)
        for g, r in zip(grads[1:], ref_grads[1:]):
            torch.testing.assert_close(g, r)
        assert data_sized == ["nonzero"], (chunk, data_sized)
    # under bf16 / fp16 autocast: the maxima of the low-precision logits, as the plain path's (which adds the
    # bias in fp32)
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", dtype=dtype):
            h32, w32, b32 = (t.detach().float().requires_grad_() for t in (hidden, weight, bias))
            out = fused_splade_head(h32, w32, b32, mask, 3, per_document=False)
            plain = splade_pool_reference(h32 @ w32.t() + b32, mask).float()
        torch.testing.assert_close(out, plain, rtol=2 ** -7, atol=2 ** -7)
        got = torch.autograd.grad((out * coef.float()).sum(), (h32, w32, b32))
        want = torch.autograd.grad((plain * coef.float()).sum(), (h32, w32, b32))
        for g, w in zip(got, want):
            assert torch.nn.functional.cosine_similarity(g.flatten(), w.flatten(), dim=0) > 0.99, dtype


def test_batch_wide_training_keeps_a_nan_maximum_and_takes_no_positions() -> None:
    """A NaN token in a later chunk gives NaN weights, as the values-only pass does (the step's finiteness check
    must see it), and an input of no positions gives zero weights and zero gradients."""
    torch.manual_seed(3)
    weight = torch.randn(12, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(12, dtype=torch.float64, requires_grad=True)
    hidden = torch.randn(2, 6, 4, dtype=torch.float64)
    hidden[0, 5] = float("nan")
    mask = torch.ones(2, 6, dtype=torch.long)
    out = fused_splade_head(hidden.requires_grad_(), weight, bias, mask, 2, per_document=False)
    with torch.no_grad():
        values_only = fused_splade_head(hidden, weight, bias, mask, 2, per_document=False)
    assert out[0].isnan().all() and torch.isfinite(out[1]).all()
    assert torch.equal(out.isnan(), values_only.isnan())
    empty = torch.zeros(2, 0, 4, dtype=torch.float64, requires_grad=True)
    out = fused_splade_head(empty, weight, bias, torch.zeros(2, 0, dtype=torch.long), 2, per_document=False)
    assert torch.equal(out, torch.zeros(2, 12, dtype=torch.float64))
    grads = torch.autograd.grad(out.sum(), (weight, bias))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


# ---- the real model ---------------------------------------------------------------------------------

def test_fused_forward_equals_reference_on_real_model(encoder: SpladeEncoder) -> None:
    assert encoder.vocab_size == 30522
    batch = _batch(encoder)
    with torch.no_grad():
        ref = _with_head(encoder, False)(**batch)
        outs = {c: _with_head(encoder, True, c)(**batch) for c in (1, 7, 64)}
    assert ref.shape == (len(TEXTS), 30522) and ref.dtype == torch.float32
    assert (ref > 0).sum() > 0
    for out in outs.values():
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # padding changes nothing: each text alone, unpadded, gives its row of the padded batch
    with torch.no_grad():
        single = encoder(**encoder.tokenize([TEXTS[1]], max_length=24))
    torch.testing.assert_close(single[0], ref[1], rtol=1e-5, atol=1e-5)


def test_fused_gradients_equal_reference_gradients(encoder: SpladeEncoder) -> None:
    batch = _batch(encoder, TEXTS[:3])
    coef = torch.randn(3, encoder.vocab_size, generator=torch.Generator().manual_seed(3))
    ref_w, ref_g = _grads(encoder, batch, fused=False, coef=coef)
    out_w, out_g = _grads(encoder, batch, fused=True, coef=coef)
    torch.testing.assert_close(out_w, ref_w, rtol=1e-5, atol=1e-5)
    assert set(out_g) == set(ref_g)
    assert len(out_g) == len(list(encoder.parameters()))
    for name in ref_g:
        torch.testing.assert_close(out_g[name], ref_g[name], rtol=1e-4, atol=1e-5, msg=name)
    # tied embeddings: the shared word-embedding matrix got the projection's gradient too
    proj = encoder.mlm.get_output_embeddings()
    assert proj.weight is encoder.mlm.get_input_embeddings().weight
    active = (ref_w > 0).any(0)
    unused_rows = ~active
    unused_rows[batch["input_ids"].unique()] = False
    name = next(n for n, p in encoder.named_parameters() if p is proj.weight)
    assert out_g[name][active].abs().sum() > 0
    assert out_g[name][unused_rows].abs().sum() == 0


def test_bf16_autocast_forward_backward_close_to_fp32(encoder: SpladeEncoder) -> None:
    batch = _batch(encoder, TEXTS[:3])
    coef = torch.rand(3, encoder.vocab_size, generator=torch.Generator().manual_seed(4))
    ref_w, ref_g = _grads(encoder, batch, fused=False, coef=coef)
    bf_w, bf_g = _grads(encoder, batch, fused=True, coef=coef, autocast=True)
    plain_bf_w, _ = _grads(encoder, batch, fused=False, coef=coef, autocast=True)
    assert bf_w.dtype == torch.float32
    assert not torch.equal(bf_w, ref_w), "autocast must actually run the projection in bf16"
    # bf16 keeps ~3 significant digits: weights up to ~3 may move by a few hundredths, as the plain path's do
    torch.testing.assert_close(bf_w, ref_w, rtol=0.05, atol=0.1)
    assert (bf_w - ref_w)[ref_w > 0].abs().mean() < 0.02
    torch.testing.assert_close(bf_w, plain_bf_w, rtol=0.02, atol=0.02)
    for name, g in ref_g.items():
        if name.endswith("key.bias"):
            continue  # softmax is invariant to it: its true gradient is 0 and both paths hold rounding noise
        assert bf_g[name].dtype == torch.float32 and torch.isfinite(bf_g[name]).all()
        cos = torch.nn.functional.cosine_similarity(bf_g[name].flatten(), g.flatten(), dim=0)
        assert cos > 0.95, (name, cos.item())


# ---- save, load, encode ----------------------------------------------------------------------------

def test_save_pretrained_loads_with_transformers(encoder: SpladeEncoder, tmp_path: Path) -> None:
    from transformers import AutoModelForMaskedLM

    encoder.save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").exists()
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path / "out")
    expected = encoder.mlm.state_dict()
    for name, tensor in loaded.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0, msg=name)
    again = SpladeEncoder.from_pretrained(str(tmp_path / "out"))
    torch.testing.assert_close(again.encode(TEXTS, max_length=24).toarray(),
                               encoder.encode(TEXTS, max_length=24).toarray())


def test_token_ids_in_chunks_equal_one_tokenizer_call(encoder: SpladeEncoder, monkeypatch) -> None:
    texts = TEXTS + ["another one", "", "a much much longer final text so that it is cut at the maximum length"]
    monkeypatch.setattr(model_module, "TOKENIZE_CHUNK", 2)  # chunks of 2: every boundary crossed
    ids = model_module.token_ids(encoder.tokenizer, texts, 12)
    assert [x.tolist() for x in ids] == encoder.tokenizer(texts, truncation=True, max_length=12)["input_ids"]
    assert all(x.dtype == np.int32 for x in ids) and model_module.token_ids(encoder.tokenizer, [], 12) == []


def test_encode_keeps_input_order_and_top_k(encoder: SpladeEncoder, monkeypatch) -> None:
    _with_head(encoder, True)
    monkeypatch.setattr(model_module, "TOKENIZE_CHUNK", 3)  # the texts tokenized over several chunks
    texts = TEXTS + ["another one", "a much much longer final text so that sorting by length moves it"]
    mat = encoder.encode(texts, max_length=24, batch_size=2)
    assert mat.shape == (len(texts), encoder.vocab_size) and mat.dtype.name == "float32"
    for i, text in enumerate(texts):
        with torch.no_grad():
            alone = encoder(**encoder.tokenize([text], max_length=24))[0]
        torch.testing.assert_close(torch.from_numpy(mat[i].toarray()[0]), alone, rtol=1e-5, atol=1e-5)
    pruned = encoder.encode(texts, max_length=24, batch_size=2, top_k=5)
    full = mat.toarray()
    for i in range(len(texts)):
        row = pruned[i].toarray()[0]
        assert 0 < (row != 0).sum() <= 5
        kept = row[row != 0]
        assert kept.min() >= sorted(full[i], reverse=True)[4] - 1e-6  # the 5 largest survived
    terms = sparse_to_dict(mat[1], encoder.tokenizer)
    assert set(encoder.tokenizer.tokenize(texts[1])) & set(terms), "a text's own tokens carry weight"
    assert terms == pytest.approx({t: float(mat[1, encoder.tokenizer.convert_tokens_to_ids(t)]) for t in terms})
    assert len(terms) == mat[1].nnz
    assert list(terms.values()) == sorted(terms.values(), reverse=True)
    assert encoder.training is False
    assert encoder.encode([], max_length=8).shape == (0, encoder.vocab_size)


def test_top_k_prune() -> None:
    w = torch.tensor([[0.1, 0.5, 0.0, 0.3], [2.0, 1.0, 3.0, 0.0]])
    torch.testing.assert_close(top_k_prune(w, 2), torch.tensor([[0.0, 0.5, 0.0, 0.3], [2.0, 0.0, 3.0, 0.0]]))
    torch.testing.assert_close(top_k_prune(w, 10), w)


def test_from_pretrained_missing_path_raises_model_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelError) as info:
        SpladeEncoder.from_pretrained(str(missing))
    assert str(missing) in str(info.value)


def test_from_pretrained_bad_weights_raises_model_error(tmp_path: Path) -> None:
    src = Path(resolve_model("splade-tiny"))
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in src.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "model.safetensors").write_bytes(b"this is not a safetensors file")
    with pytest.raises(ModelError) as info:
        SpladeEncoder.from_pretrained(str(bad))
    assert info.value.context.get("file_path") == str(bad / "model.safetensors")  # the damaged file itself
    assert str(bad) in info.value.one_line() and "model weights are corrupt" in info.value.one_line()


# ---- other architectures ---------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["distilbert", "roberta"])
def test_head_split_works_for_other_architectures(arch: str) -> None:
    from transformers import AutoConfig, AutoModelForMaskedLM

    kw = dict(vocab_size=97, max_position_embeddings=40)
    if arch == "distilbert":
        cfg = AutoConfig.for_model("distilbert", dim=16, hidden_dim=32, n_layers=1, n_heads=2, **kw)
    else:
        cfg = AutoConfig.for_model("roberta", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, pad_token_id=1, **kw)
    torch.manual_seed(0)
    mlm = AutoModelForMaskedLM.from_config(cfg).eval()
    enc = SpladeEncoder(mlm, tokenizer=None, chunk_size=3)
    assert enc.fused_head
    ids = torch.randint(3, 97, (3, 7))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])
    coef = torch.randn(3, 97)
    out = enc(ids, mask)
    grads = torch.autograd.grad((out * coef).sum(), list(mlm.parameters()), allow_unused=True)
    ref = splade_pool_reference(mlm(input_ids=ids, attention_mask=mask).logits, mask)
    ref_grads = torch.autograd.grad((ref * coef).sum(), list(mlm.parameters()), allow_unused=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        if r is None:
            assert g is None or g.abs().sum() == 0
        else:
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


class _ScaledLogitsMLM(nn.Module):
    """A masked LM that post-processes its logits after the projection, so the head cannot be split."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.decoder = nn.Linear(8, 20)
        self.config = type("Cfg", (), {"vocab_size": 20})()

    def get_output_embeddings(self) -> nn.Module:
        return self.decoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        logits = self.decoder(self.embed(input_ids)) * 2.0 - 1.0
        return type("Out", (), {"logits": logits})()


def test_unsplittable_head_falls_back_to_full_logits() -> None:
    mlm = _ScaledLogitsMLM()
    enc = SpladeEncoder(mlm, tokenizer=None)
    assert enc.fused_head is False
    ids, mask = torch.tensor([[1, 2, 3]]), torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(enc(ids, mask), splade_pool_reference(mlm(ids, mask).logits, mask))


def test_bf16_prefiltered_inference_equals_fp32(monkeypatch):
    """On CPUs with fast bf16 matmuls, no-grad encoding prefilters terms in bf16 and recomputes the
    candidates in fp32: the weights must equal the plain fp32 path's to fp32 rounding, with the same zeros.

    Bit equality is not asked: the recompute multiplies a subset of the vocabulary, and a BLAS may sum
    that shape in another order than the full-vocabulary tiles (MKL on an AVX2 AMD EPYC differs by a few
    ULPs; on the AMX Xeon it was bit-exact). A term whose exact fp32 logit lies within rounding of 0 may
    flip between 0 and a weight of that size; any other difference in the non-zero pattern is a dropped
    term and fails."""
    from splade_obs import cpu
    from splade_obs.model import SpladeEncoder

    enc = SpladeEncoder.from_pretrained("splade-tiny")
    texts = ["Thiqueipaix is a city in the region of Fouthan. The river Petrand flows through it " * 4,
             "which river flows through migu?", "clockwork toys exported for centuries", "a"]
    results = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("SPLADE_OBS_CPU_BF16", flag)
        cpu.bf16_matmul_speedup.cache_clear()
        results[flag] = enc.encode(texts, max_length=128, batch_size=2)
        from splade_obs import model as model_mod
        w = enc._projection().weight
        assert model_mod._prefilter(torch.zeros(1, 1, 128), w) == ("bf16" if flag == "1" else "fp32")
        # training never takes it: a forward with gradients goes through the autograd Function
        calls = []
        real = model_mod._max_per_document_prefiltered
        monkeypatch.setattr(model_mod, "_max_per_document_prefiltered", lambda *a: calls.append(1) or real(*a))
        batch = enc.tokenize(texts[:2], 32)
        enc.train()
        enc(batch["input_ids"], batch["attention_mask"]).sum().backward()
        assert calls == []
        with torch.no_grad():
            enc(batch["input_ids"], batch["attention_mask"])
        assert calls == ([1] if flag == "1" else [])
        monkeypatch.setattr(model_mod, "_max_per_document_prefiltered", real)
    cpu.bf16_matmul_speedup.cache_clear()
    ref, fast = results["0"].toarray(), results["1"].toarray()
    assert np.count_nonzero(ref) > 100
    flipped = (ref > 0) != (fast > 0)  # only terms whose logit is within rounding of 0 (weight ~ logit)
    assert np.all(np.maximum(ref, fast)[flipped] <= 1e-5)
    np.testing.assert_allclose(fast, ref, rtol=1e-5, atol=1e-6)


def test_head_tiles_benchmark_runs_and_checks_its_variants_agree(tmp_path, tiny_model_path) -> None:
    """benchmarks/bench_head_tiles.py on two short lengths: every variant's output was checked against the
    token-chunk baseline (the script fails otherwise) and each length has a time for each variant."""
    import json
    import subprocess
    import sys

    out = tmp_path / "tiles.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_head_tiles.py"
    proc = subprocess.run([sys.executable, str(script), "--lengths", "5,33", "--batch-size", "2", "--repeats", "1",
                           "--output", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [row["length"] for row in report["rows"]] == [5, 33]
    assert report["default_tile_elements"] == model_module._CPU_TILE_ELEMENTS
    for row in report["rows"]:
        assert len(row["ms_per_doc"]) == 5 and all(v > 0 for v in row["ms_per_doc"].values())
        assert row["speedup_vs_baseline"][report["baseline"]] == 1.0
    assert "vocab blocks" in proc.stdout


def _prefiltered_inputs(encoder: SpladeEncoder) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, head input (B, L, H), mask (B, L)): random vectors at lengths 1, 255 and 512 with an all-padding
    row, random vectors scaled like the real ones, and splade-tiny's own head inputs for real text (up to 512)."""
    gen = torch.Generator().manual_seed(7)
    width = encoder._projection().weight.shape[1]
    cases = []
    for length in (1, 255, 512):
        hidden = torch.randn(3, length, width, generator=gen) * torch.tensor([1.0, 0.1, 4.0])[:, None, None]
        mask = torch.ones(3, length, dtype=torch.long)
        mask[1] = 0  # an all-padding row: -inf before relu, 0 after, on every path
        mask[2, length // 2 + 1:] = 0
        cases.append((f"random, length {length}", hidden, mask))
    text = ("Thiqueipaix is a city in the region of Fouthan; the river Petrand flows through it. " * 40).strip()
    batch = encoder.tokenize([text, "a", "which river flows through migu?"], 512)
    with torch.no_grad():
        real = encoder._head_input(batch["input_ids"], batch["attention_mask"])
    cases.append(("splade-tiny on text, lengths 512 / 3 / 10", real, batch["attention_mask"]))
    scaled = torch.randn(real.shape, generator=gen) * real.std()
    cases.append(("random scaled like real", scaled, batch["attention_mask"]))
    return cases


@pytest.mark.parametrize("grouped", [False, True], ids=["one-group", "groups-of-2"])
@pytest.mark.parametrize("kind", ["int8", "bf16"])
def test_low_precision_prefilters_select_every_non_zero_term_and_keep_the_fp32_weights(encoder, kind, grouped,
                                                                                     monkeypatch) -> None:
    """The int8 / bf16 pass only selects candidate terms (its error bound is proven in the docstrings of
    _max_per_document_int8 / _max_per_document_prefiltered); the candidates' weights are then computed in fp32,
    over a subset of the vocabulary, which a BLAS may sum in another order than the full tiles. The stated bound
    (docs/recipes.md): every weight within the rounding of an H-term fp32 dot product of the fp32 path's,
    |dw| <= H * 2^-24 * max_t ||h_t|| * ||w_v|| + 2^-23 * |b_v| (log1p(relu(.)) is 1-Lipschitz), zeros included:
    a term the pass dropped would be off by its whole weight. int8 needs a CPU build with torch._int_mm.
    ``groups-of-2``: the batched steps run two documents at a time (a large encoding batch's groups)."""
    from splade_obs import cpu

    if grouped:
        monkeypatch.setattr(model_module, "_GROUP_DOCS", 2)

    if kind == "int8" and not cpu.int8_matmul_works():
        pytest.skip("torch._int_mm does not run on this CPU build of torch")
    proj = encoder._projection()
    weight, bias = proj.weight.detach(), proj.bias.detach()
    run = {"int8": lambda h, m: model_module._max_per_document_int8(h, weight, bias, m)[0],
           "bf16": lambda h, m: model_module._max_per_document_prefiltered(h, weight, bias, m, 64)}[kind]
    for name, hidden, mask in _prefiltered_inputs(encoder):
        with torch.no_grad():
            ref = torch.log1p(torch.relu(model_module._max_per_document(hidden, weight, bias, mask.bool())))
            got = torch.log1p(torch.relu(run(hidden, mask.bool())))
        h_norm = (hidden.norm(dim=2) * mask).amax(dim=1)  # the longest token vector of each document
        bound = hidden.shape[2] * 2.0 ** -24 * h_norm[:, None] * weight.norm(dim=1) + 2.0 ** -23 * bias.abs()
        assert torch.count_nonzero(ref) > 0 and not torch.any(got[mask.sum(1) == 0]), name
        over = (got - ref).abs() > bound
        assert not torch.any(over), (name, int(over.sum()), float((got - ref).abs().max()))
        assert float(torch.quantile(bound[ref > 0] / ref[ref > 0], 0.5)) < 1e-3, name  # the bound is not vacuous


def test_the_int8_pass_keeps_few_candidates_on_real_text(encoder, monkeypatch) -> None:
    """The bound is tight enough to be worth it: on real text the fp32 recompute covers a few percent of the
    vocabulary, not most of it (a bound an order too loose would still be exact, and slower than fp32)."""
    from splade_obs import cpu

    if not cpu.int8_matmul_works():
        pytest.skip("torch._int_mm does not run on this CPU build of torch")
    proj = encoder._projection()
    weight, bias = proj.weight.detach(), proj.bias.detach()
    name, hidden, mask = _prefiltered_inputs(encoder)[3]
    with torch.no_grad():
        _, (terms, rows) = model_module._max_per_document_int8(hidden, weight, bias, mask.bool())
    picked = torch.bincount(rows // hidden.shape[1], minlength=hidden.shape[0]).tolist()  # candidates per document
    assert len(picked) == 3 and 0 < max(picked) < 0.05 * weight.shape[0], (name, picked)


def test_head_benchmark_times_each_vocabulary_pass_and_checks_it_against_fp32(tmp_path, tiny_model_path) -> None:
    """benchmarks/bench_head.py on a tiny batch: both heads, then the inference forward with each --head-pass,
    every pass's weights compared with fp32's in the results."""
    import json
    import subprocess
    import sys

    from splade_obs import cpu

    out = tmp_path / "head.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_head.py"
    passes = ["fp32", "bf16"] + (["int8"] if cpu.int8_matmul_works() else [])
    proc = subprocess.run([sys.executable, str(script), "--batch-size", "2", "--length", "24", "--iters", "1",
                           "--head-passes", ",".join(passes), "--output", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [r["head_pass"] for r in report["head_passes"]] == passes
    for row in report["head_passes"]:
        assert row["docs_per_s_forward"] > 0 and row["max_abs_diff_vs_first"] < 1e-4, row
    assert "--head-pass" in proc.stdout and "same zeros" in proc.stdout


def test_the_int8_weights_are_shared_only_inside_a_frozen_head_block(monkeypatch) -> None:
    """Inside ``frozen_head(w)`` w is quantized once, at first use, whatever else is quantized meanwhile;
    outside any block every pass quantizes afresh, so a weight changed in place is never read stale (torch's
    fused AdamW changes it without bumping its version)."""
    def fresh(w: torch.Tensor) -> torch.Tensor:
        return torch.round(w / (w.abs().amax(dim=1, keepdim=True) / 127.0)).to(torch.int8)

    calls = []
    quantize = model_module._quantize_rows
    monkeypatch.setattr(model_module, "_quantize_rows", lambda w: calls.append(w) or quantize(w))
    gen = torch.Generator().manual_seed(1)
    first, other = torch.randn(64, 16, generator=gen), torch.randn(64, 16, generator=gen)
    with model_module.frozen_head(first):
        a = model_module._int8_weights(first)
        assert torch.equal(model_module._int8_weights(other)[0], fresh(other))
        assert model_module._int8_weights(first) is a and torch.equal(a[0], fresh(first))
    assert len(calls) == 2
    with model_module.frozen_head(first):  # nested blocks: each its own form, and leaving one keeps the other
        outer = model_module._int8_weights(first)
        with model_module.frozen_head(first), model_module.frozen_head(other):
            assert model_module._int8_weights(first) is not outer
        assert model_module._int8_weights(first) is outer
    assert len(calls) == 4 and not getattr(model_module._frozen, "heads", [])
    with torch.no_grad():
        first.mul_(-1.0)
    assert torch.equal(model_module._int8_weights(first)[0], fresh(first))  # outside: afresh


def test_encoding_after_a_fused_optimizer_step_uses_the_new_weights() -> None:
    """A fused AdamW step (no version bump) between two encode calls: the second call's vectors are those of a
    model loaded with the stepped weights."""
    from splade_obs import cpu

    if not cpu.int8_matmul_works():
        pytest.skip("torch._int_mm does not run on this CPU build: no int8 weights to keep")
    cpu.set_head_pass("int8")
    try:
        _encode_around_a_fused_step()
    finally:
        cpu.set_head_pass("auto")


def _encode_around_a_fused_step() -> None:
    texts = ["sparse retrieval", "learned term weights for a search engine", "x"]
    enc = SpladeEncoder.from_pretrained("splade-tiny")
    enc.encode(texts, max_length=16)
    opt = torch.optim.AdamW(enc.parameters(), lr=0.05, fused=True)
    for p in enc.parameters():
        p.grad = torch.ones_like(p) * 1e-2
    opt.step()
    again = SpladeEncoder.from_pretrained("splade-tiny")
    again.load_state_dict(enc.state_dict())
    got, want = enc.encode(texts, max_length=16), again.encode(texts, max_length=16)
    assert abs(got - want).max() < 1e-5 and got.nnz == want.nnz
