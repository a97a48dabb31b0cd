"""The training forward: queries, positives and negatives share encoder passes (all three in one on an
accelerator; on a CPU those of one length), with the weights and gradients of separate passes (real
splade-tiny, eval mode so dropout does not differ)."""

from __future__ import annotations

import functools

import pytest
import torch

from splade_obs import model as model_module
from splade_obs import objective
from splade_obs.collate import Batch
from splade_obs.model import SpladeEncoder
from splade_obs.objective import PairForward, encode_batch

QUERIES = ["what lowers blood pressure", "gene expression in yeast", "", "vitamin d and bone density"]
SHORT = ["Salt intake raises blood pressure in adults.", "Yeast genes respond to heat.", "", "Bones need calcium."]
LONG = [t * 6 for t in ("Sodium reduction lowers systolic pressure in trials of hypertensive adults. ",
                        "Transcription of heat shock genes rises within minutes. ", "Padding only. ",
                        "Vitamin D supplements did not change fracture rates in the elderly. ")]


@pytest.fixture(scope="module")
def encoder(tiny_model_path):
    enc = SpladeEncoder.from_pretrained(tiny_model_path)
    return enc.eval()


def _inputs(enc: SpladeEncoder, pos: list[str], neg: list[str]) -> tuple[torch.Tensor, ...]:
    q, p, n = enc.tokenize(QUERIES, 16), enc.tokenize(pos, 48), enc.tokenize(neg, 48)
    return q["input_ids"], q["attention_mask"], p["input_ids"], p["attention_mask"], n["input_ids"], n["attention_mask"]


def _run(enc: SpladeEncoder, inputs: tuple[torch.Tensor, ...]) -> tuple[int, list[torch.Tensor], list[torch.Tensor]]:
    """(encoder passes, the three outputs, the gradients of every parameter) of one PairForward call."""
    calls = []
    handle = enc.register_forward_pre_hook(lambda *_: calls.append(1))
    enc.zero_grad(set_to_none=True)
    try:
        reps = PairForward(enc)(*inputs)
    finally:
        handle.remove()
    weights = torch.arange(1, 4, dtype=torch.float32)
    sum(w * (r * r.detach().roll(1, -1)).sum() for w, r in zip(weights, reps) if r is not None).backward()
    return (len(calls), [None if r is None else r.detach() for r in reps],
            [p.grad.clone() for p in enc.parameters() if p.grad is not None])


def _forced(enc: SpladeEncoder, inputs: tuple[torch.Tensor, ...], monkeypatch, groups: list[list[int]]) -> tuple:
    with monkeypatch.context() as m:
        m.setattr(objective, "pass_groups", lambda *_: groups)
        return _run(enc, inputs)


@pytest.mark.parametrize("case", ["cpu_rule", "one_pass", "one_pass_batch_wide_head", "queries_apart"])
def test_shared_passes_give_the_weights_and_gradients_of_separate_passes(encoder, monkeypatch, case):
    """``cpu_rule``: positives and negatives of one length share a pass; the others force what an accelerator
    does: every group in one pass (the shorter padded), also with the head's tiles a GPU runs (every document's
    positions at once, the maxima's rows kept for the backward), or the queries apart."""
    if case == "one_pass_batch_wide_head":
        monkeypatch.setattr(model_module, "fused_splade_head",
                            functools.partial(model_module.fused_splade_head, per_document=False))
    inputs = _inputs(encoder, SHORT, SHORT[::-1] if case == "cpu_rule" else LONG)
    lengths = [inputs[i].shape[1] for i in (0, 2, 4)]
    assert len(set(lengths)) == (2 if case == "cpu_rule" else 3), lengths  # the queries are shorter
    passes_sep, reps_sep, grads_sep = _forced(encoder, inputs, monkeypatch, [[0], [1], [2]])
    if case == "cpu_rule":
        passes, reps, grads = _run(encoder, inputs)
    else:
        passes, reps, grads = _forced(encoder, inputs, monkeypatch, [[0], [1, 2]] if case == "queries_apart"
                                      else [[0, 1, 2]])
    assert (passes_sep, passes) == (3, 1 if case.startswith("one_pass") else 2)
    for got, want in zip(reps, reps_sep):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert len(grads) == len(grads_sep) > 0
    for got, want in zip(grads, grads_sep):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_the_cpu_rule_shares_equal_lengths_only_and_an_accelerator_pads_up_to_its_bound():
    cpu, gpu = torch.device("cpu"), torch.device("meta")
    assert objective.pass_groups([(2, 8), (2, 16), (2, 16)], cpu) == [[0], [1, 2]]
    assert objective.pass_groups([(2, 8), (2, 16), (2, 9)], cpu) == [[0], [1], [2]]
    assert objective.pass_groups([(2, 16), (2, 16), (4, 16)], cpu) == [[0, 1, 2]]
    # 16 queries of 64 tokens joining 16 + 16 documents of 256 add a third of the step's tokens: one pass
    assert objective.pass_groups([(16, 64), (16, 256), (16, 240)], gpu) == [[0, 1, 2]]
    # without negatives they would add three fifths: the queries keep a pass of their own
    assert objective.pass_groups([(16, 64), (16, 256)], gpu) == [[0], [1]]
    assert objective.MAX_ADDED_PADDING == 0.5
    assert objective.pass_groups([(16, 128), (16, 256)], gpu) == [[0, 1]]  # a third: shared


def test_without_negatives_two_passes(encoder):
    q_ids, q_mask, p_ids, p_mask, *_ = _inputs(encoder, SHORT, SHORT)
    passes, reps, _ = _run(encoder, (q_ids, q_mask, p_ids, p_mask))
    assert passes == 2 and reps[2] is None


def test_several_negatives_per_query_come_back_in_their_rows(encoder):
    """K = 2: the negatives' B*K rows share the positives' pass, and ``encode_batch`` hands back query i's
    negatives at ``d_neg[i]``, as separate passes would."""
    q, p, n = encoder.tokenize(QUERIES, 16), encoder.tokenize(SHORT, 48), encoder.tokenize(SHORT[::-1] * 2, 48)
    assert p["input_ids"].shape[1] == n["input_ids"].shape[1]  # the CPU's rule merges them
    batch = Batch(queries=q, pos_docs=p, neg_docs=n, num_negatives=2, teacher_scores=None, size=4, num_tokens=0)
    calls = []
    handle = encoder.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with torch.no_grad():
            got_q, got_pos, got_neg = encode_batch(PairForward(encoder), batch)
    finally:
        handle.remove()
    with torch.no_grad():
        want_neg = encoder(n["input_ids"], n["attention_mask"]).view(4, 2, -1)
        want_pos = encoder(p["input_ids"], p["attention_mask"])
    assert len(calls) == 2 and got_neg.shape == want_neg.shape == (4, 2, encoder.vocab_size)
    torch.testing.assert_close(got_neg, want_neg, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_pos, want_pos, rtol=1e-5, atol=1e-5)
    assert not torch.equal(got_neg[0, 0], got_neg[0, 1])  # two different documents, in their own rows
