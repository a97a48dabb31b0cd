"""CPU training kernels (issue 36, point 2): the int8 vocabulary pass in training (exact maxima, argmax kept for
the backward), fast dropout masks, the fused AdamW step and the prefetched collation; each against the path it
replaces."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from splade_obs import cpu, dropout
from splade_obs import model as M
from splade_obs.bus import RecordingSink
from splade_obs.events import ModelLoaded, RunStarted, StepDone
from splade_obs.run import run_training

needs_int8 = pytest.mark.skipif(not cpu.int8_matmul_works(), reason="torch._int_mm does not run on this CPU build")


@pytest.fixture
def head_pass():
    """Set the process's head pass for one test, and put ``auto`` back after it."""
    yield cpu.set_head_pass
    cpu.set_head_pass("auto")


def _head_and_grads(h, w, b, mask, gen_seed=1):
    out = M.fused_splade_head(h, w, b, mask)
    gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(gen_seed))
    grads = torch.autograd.grad((out * gy).sum(), (h, w, b))
    return out.detach(), grads


@needs_int8
@pytest.mark.parametrize("length,split", [(1, ""), (255, ""), (512, ""), (255, "sliced"), (255, "grouped")])
def test_int8_training_pass_gives_the_fp32_values_and_gradients(head_pass, length, split, monkeypatch):
    """Random inputs with all-padding and one-token rows and holes in the mask: the int8 pass's values and its
    saved-argmax backward equal the fp32 pass and its recomputing backward; the int8 forward ran and nothing was
    recomputed. ``sliced``: the candidates' fp32 recompute runs one document at a time; ``grouped``: the batched
    steps run on groups of two documents (the rows of the second group are offset by its first document)."""
    if split == "sliced":
        monkeypatch.setattr(M, "_EXACT_TILE_ELEMENTS", 1)
    if split == "grouped":
        monkeypatch.setattr(M, "_GROUP_DOCS", 2)
    gen = torch.Generator().manual_seed(length)
    batch, hid, vocab = 4, 16, 3000
    h = torch.randn(batch, length, hid, generator=gen).requires_grad_()
    w = (torch.randn(vocab, hid, generator=gen) * 0.3).requires_grad_()
    b = (torch.randn(vocab, generator=gen) * 0.5 - 1.5).requires_grad_()
    mask = torch.rand(batch, length, generator=gen) > 0.3
    mask[0] = True
    mask[1] = False           # all padding
    mask[2, 1:] = False       # one token
    mask[2, 0] = True
    head_pass("fp32")
    ref_out, ref_grads = _head_and_grads(h, w, b, mask)
    calls = {"int8": 0, "recompute": 0}
    int8_fn, recompute_fn = M._max_per_document_int8, M._recompute_argmax

    def counted_int8(*args, **kwargs):
        calls["int8"] += 1
        return int8_fn(*args, **kwargs)

    def counted_recompute(*args, **kwargs):
        calls["recompute"] += 1
        return recompute_fn(*args, **kwargs)

    monkeypatch.setattr(M, "_max_per_document_int8", counted_int8)
    monkeypatch.setattr(M, "_recompute_argmax", counted_recompute)
    head_pass("int8")
    out, grads = _head_and_grads(h, w, b, mask)
    assert calls == {"int8": 1, "recompute": 0}
    assert (ref_out > 0).sum() > 100  # enough active terms to mean something
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-6)
    # fp32 rounding only (the candidates' logits come from a batched matmul, summed in another order than the fp32
    # pass's tiles; a wrong argmax token would be off by the whole gradient)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert grads[0][1].abs().sum() == 0  # the all-padding row gets no gradient


@needs_int8
def test_int8_training_pass_on_the_real_model_under_bf16_autocast(head_pass):
    """splade-tiny's own hidden states: under bf16 autocast the int8 pass gives the fp32 maxima (the plain pass
    gave bf16 ones) and the fp32 gradients."""
    enc = M.SpladeEncoder.from_pretrained("splade-tiny")
    texts = ["sparse retrieval with learned term weights", "a", "mixed precision training of masked language "
             "models on CPUs that have native bf16 units " * 6]
    batch = enc.tokenize(texts, 128)
    with torch.no_grad():
        hidden = enc._head_input(batch["input_ids"], batch["attention_mask"])
    proj = enc._projection()
    w = proj.weight.detach().clone().requires_grad_()
    b = proj.bias.detach().clone().requires_grad_()
    mask = batch["attention_mask"]
    head_pass("fp32")
    h = hidden.clone().requires_grad_()
    ref_out, ref_grads = _head_and_grads(h, w, b, mask)
    head_pass("int8")
    h2 = hidden.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = _head_and_grads(h2, w, b, mask)
    # fp32 rounding only: the candidates' products are summed in another order than the full tiles' (a bf16
    # pass would be ~1e-2 off)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# ---- dropout masks -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_mask_has_the_rate_and_follows_torch_seed(p):
    torch.manual_seed(3)
    first = dropout.keep_mask((1000, 1000), p)
    second = dropout.keep_mask((1000, 1000), p)
    torch.manual_seed(3)
    again = dropout.keep_mask((1000, 1000), p)
    assert first.dtype == torch.bool and first.shape == (1000, 1000)
    assert abs(first.float().mean().item() - (1 - p)) < 2e-3  # 1M draws: sd 3e-4 / 5e-4
    assert torch.equal(first, again) and not torch.equal(first, second)
    # neighbouring elements are not correlated (one 64-bit word gives four draws)
    flat = first.flatten().float()
    corr = torch.corrcoef(torch.stack([flat[:-1], flat[1:]]))[0, 1]
    assert abs(corr.item()) < 5e-3


def test_cpu_dropout_module_scales_masks_and_backpropagates():
    layer = dropout.CpuDropout(0.25)
    x = torch.randn(64, 300).requires_grad_()
    layer.eval()
    assert layer(x) is x or torch.equal(layer(x), x)
    layer.train()
    torch.manual_seed(0)
    y = layer(x)
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / 0.75)
    assert 0.70 < kept.float().mean().item() < 0.80
    (y * 2).sum().backward()
    torch.testing.assert_close(x.grad, kept.float() * 2 / 0.75)
    # bf16 input stays bf16, and the scale is applied once (not a rounded bf16 multiplier)
    xb = torch.full((8, 1000), 3.0, dtype=torch.bfloat16)
    yb = layer(xb)
    assert yb.dtype == torch.bfloat16 and set(yb.unique().tolist()) <= {0.0, 4.0}


def test_attention_math_equals_sdpa_when_nothing_is_dropped():
    """Probabilities of 1e-9 drop nothing (the 16-bit threshold is 0): the math path equals SDPA with the same
    padding mask (keys 4-6 of one sequence masked)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 7, 8, generator=gen) for _ in range(3))
    mask = torch.ones(3, 1, 7, 7, dtype=torch.bool)
    mask[1, :, :, 4:] = False
    module = torch.nn.Module()
    module.train()
    out, _ = dropout.attention(module, q, k, v, mask, dropout=1e-9, scaling=0.3)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3).transpose(1, 2)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    module.eval()  # eval: SDPA itself
    out_eval, _ = dropout.attention(module, q, k, v, mask, dropout=0.0, scaling=0.3)
    torch.testing.assert_close(out_eval, want, rtol=0, atol=0)


def test_install_keeps_outputs_config_and_padding(tmp_path):
    """After install: eval outputs and training outputs without dropout are the plain model's (padding still
    masked: an implementation without a mask function would attend to it), the saved config names no custom
    attention, and dropout on gives seeded, reproducible vectors."""
    plain = M.SpladeEncoder.from_pretrained("splade-tiny")
    fast = M.SpladeEncoder.from_pretrained("splade-tiny")
    assert dropout.install(fast.mlm) == {"dropouts": 7, "attention": True}
    assert dropout.install(fast.mlm) == {"dropouts": 0, "attention": True}  # idempotent
    batch = plain.tokenize(["a short one", "a much longer text that makes the first one padded " * 3], 64)
    args = (batch["input_ids"], batch["attention_mask"])
    for enc in (plain, fast):
        enc.eval()
    with torch.no_grad():
        torch.testing.assert_close(fast(*args), plain(*args), rtol=0, atol=0)
    for enc in (plain, fast):
        enc.train()
        for m in enc.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    with torch.no_grad():
        torch.testing.assert_close(fast(*args), plain(*args), rtol=1e-5, atol=1e-5)
        for m in fast.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.1
        torch.manual_seed(4)
        a = fast(*args)
        torch.manual_seed(4)
        b = fast(*args)
    assert torch.equal(a, b) and not torch.allclose(a, plain(*args))
    fast.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert dropout.ATTENTION not in json.dumps(config)


def test_the_padding_mask_of_a_device_tensor_is_built_without_reading_it():
    """On an accelerator the attention mask is built whatever the padding (transformers' SDPA mask reads
    ``mask.all()`` back to skip it, a host synchronisation each pass): a meta tensor, which has no values to
    read, gets its mask where SDPA's own function fails; on a CPU both skip the mask of an unpadded batch and
    agree on a padded one. Off a CPU the trainer's set-up installs it (and no CPU pass or dropout)."""
    from transformers.masking_utils import bidirectional_mask_function, sdpa_mask

    args = dict(batch_size=2, q_length=5, kv_length=5, mask_function=bidirectional_mask_function,
                allow_is_bidirectional_skip=True, allow_is_causal_skip=False)
    meta = torch.ones(2, 5, dtype=torch.bool, device="meta")
    built = dropout.padding_mask(**args, attention_mask=meta, device="meta")
    assert built.shape == (2, 1, 5, 5) and built.dtype == torch.bool
    with pytest.raises(RuntimeError, match="meta"):
        sdpa_mask(**args, attention_mask=meta, device="meta")
    full, padded = torch.ones(2, 5, dtype=torch.bool), torch.tensor([[1] * 5, [1, 1, 1, 0, 0]], dtype=torch.bool)
    assert dropout.padding_mask(**args, attention_mask=full) is None is sdpa_mask(**args, attention_mask=full)
    assert torch.equal(dropout.padding_mask(**args, attention_mask=padded), sdpa_mask(**args, attention_mask=padded))

    enc = M.SpladeEncoder.from_pretrained("splade-tiny")
    assert cpu.training_kernels(enc, torch.device("meta"), "auto", "fast", torch.bfloat16) == ("", "")
    assert enc.mlm.config._attn_implementation == dropout.ATTENTION
    assert not any(isinstance(m, dropout.CpuDropout) for m in enc.modules())
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    assert ALL_MASK_ATTENTION_FUNCTIONS[dropout.ATTENTION] is dropout.padding_mask


def test_an_attention_swap_that_changes_outputs_is_undone(monkeypatch, caplog):
    """Fault injected: a mask function that drops the padding mask (what a transformers that ignored the
    registered one would do). The probe sees the padded sequence's outputs change, the model goes back to
    SDPA with a warning, and its outputs are the plain model's."""
    from transformers.masking_utils import AttentionMaskInterface

    plain = M.SpladeEncoder.from_pretrained("splade-tiny").eval()
    enc = M.SpladeEncoder.from_pretrained("splade-tiny")
    try:
        monkeypatch.setattr(dropout, "padding_mask", lambda *a, **k: None)
        with caplog.at_level("WARNING", logger="splade_obs.dropout"):
            assert dropout.install_attention(enc.mlm) is False
        assert enc.mlm.config._attn_implementation == "sdpa"
        assert "changed a padded batch's outputs" in caplog.text
    finally:  # the registry is process-wide: the real mask function back for every other model
        monkeypatch.undo()
        AttentionMaskInterface.register(dropout.ATTENTION, dropout.padding_mask)
    batch = plain.tokenize(["a short one", "a much longer text that pads the first one"], 32)
    with torch.no_grad():
        torch.testing.assert_close(enc.eval()(**batch), plain(**batch), rtol=0, atol=0)
    # a check that fails outright after the swap (an older transformers raising inside the swapped forward)
    probe = dropout._probe

    def failing(model):
        if model.config._attn_implementation == dropout.ATTENTION:
            raise RuntimeError("unsupported attention implementation")
        return probe(model)

    monkeypatch.setattr(dropout, "_probe", failing)
    assert dropout.install_attention(enc.mlm) is False and enc.mlm.config._attn_implementation == "sdpa"
    monkeypatch.undo()
    assert dropout.install_attention(enc.mlm) is True  # the real mask function passes the probe


# ---- the trainer -------------------------------------------------------------------------------------------
def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


@needs_int8
def test_run_records_its_kernels_and_resumes_exactly_with_them(tiny_cfg, tmp_path):
    """Default dropout (0.1) with fast masks and the int8 pass: the run says which it used (ModelLoaded, the
    MLflow tags), uses a fused AdamW, and a run killed after step 3 resumes to the uninterrupted run's losses
    and weights (the masks follow torch's saved generator)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = {"optim": {"max_steps": 6, "learning_rate": 3e-4}, "model": {"head_pass": "int8", "cpu_dropout": "fast"}}
    straight = RecordingSink()
    cfg = tiny_cfg(checkpoint={"output_dir": str(tmp_path / "a")}, tracking={"enabled": True, "tracking_uri": uri},
                   tracing={"exporter": "file"}, **common)
    assert run_training(cfg, extra_sinks=[straight]).status == "FINISHED"
    (loaded,) = straight.of(ModelLoaded)
    assert (loaded.head_pass, loaded.dropout_masks, loaded.attention) == ("int8", "fast", dropout.ATTENTION)
    spans = [json.loads(line) for line in (cfg.log_dir / "traces.jsonl").read_text().splitlines() if line.strip()]
    (load,) = [sp for sp in spans if sp["name"] == "model.load"]
    assert load["attributes"]["splade.head_pass"] == "int8" and load["attributes"]["splade.dropout_masks"] == "fast"
    assert load["attributes"]["splade.attention"] == dropout.ATTENTION
    run = MlflowClient(uri).search_runs([e.experiment_id for e in MlflowClient(uri).search_experiments()])[0]
    assert run.data.tags["splade.head_pass"] == "int8" and run.data.tags["splade.dropout_masks"] == "fast"
    assert run.data.tags["splade.attention"] == dropout.ATTENTION
    log_line = (cfg.log_dir / "train_splade.log").read_text()
    assert "head pass int8, dropout masks fast, attention splade_obs_cpu)" in log_line

    broken = tiny_cfg(checkpoint={"output_dir": str(tmp_path / "b")}, recovery={"inject_faults": ("step:3:interrupt",)},
                      **common)
    assert run_training(broken).status == "KILLED"
    rec = RecordingSink()
    assert run_training(tiny_cfg(checkpoint={"output_dir": str(tmp_path / "b"), "resume": "auto"}, **common),
                        extra_sinks=[rec]).status == "FINISHED"
    assert cpu.forced_head_pass() is None  # the run's pass does not outlive it
    assert rec.of(RunStarted)[0].start_step == 3
    assert [e.loss for e in rec.of(StepDone)] == [e.loss for e in straight.of(StepDone)][3:]
    wa, wb = _weights(tmp_path / "a" / "final"), _weights(tmp_path / "b" / "final")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_torch_kernels_are_the_former_path(tiny_cfg, tmp_path, monkeypatch):
    """``--head-pass fp32 --cpu-dropout torch``: nothing is installed (torch's dropout modules and SDPA stay),
    the run says so (the plain pass in fp32 without autocast), its losses differ from the fast masks' (another
    random stream), and the process's forced head pass is put back after each run."""
    installed = []
    real_install = dropout.install
    monkeypatch.setattr(dropout, "install", lambda m: installed.append(type(m).__name__) or real_install(m))
    cpu.set_head_pass("bf16")
    try:
        runs = {}
        for masks in ("torch", "fast"):
            rec = RecordingSink()
            cfg = tiny_cfg(checkpoint={"output_dir": str(tmp_path / masks)},
                           optim={"max_steps": 3, "mixed_precision": "no"},
                           model={"head_pass": "fp32", "cpu_dropout": masks})
            assert run_training(cfg, extra_sinks=[rec]).status == "FINISHED"
            (loaded,) = rec.of(ModelLoaded)
            assert (loaded.head_pass, loaded.dropout_masks) == ("fp32", masks)
            assert loaded.attention == ("sdpa" if masks == "torch" else dropout.ATTENTION)  # torch's: SDPA stays
            assert installed == ([] if masks == "torch" else ["BertForMaskedLM"])
            assert cpu.forced_head_pass() == "bf16"
            runs[masks] = [e.loss for e in rec.of(StepDone)]
    finally:
        cpu.set_head_pass("auto")
    assert runs["torch"] != runs["fast"]


def test_the_optimizer_is_fused_where_torch_has_the_kernel():
    from splade_obs.optim import build_optimizer, fused_supported

    enc = M.SpladeEncoder.from_pretrained("splade-tiny")
    opt = build_optimizer(enc, 1e-4, 0.01)
    assert all(g["fused"] for g in opt.param_groups)
    assert not fused_supported([torch.zeros(3, dtype=torch.int64)]) and not fused_supported([])


def test_train_cli_takes_the_kernel_flags(tmp_path):
    from click.testing import CliRunner

    from splade_obs_cli.main import cli

    res = CliRunner().invoke(cli, ["train", "--output-dir", str(tmp_path / "o"), "--max-steps", "1", "--no-mlflow",
                                   "--otel-exporter", "none", "--progress", "none", "--head-pass", "fp32",
                                   "--cpu-dropout", "torch", "--max-query-length", "16", "--max-doc-length", "32",
                                   "--mixed-precision", "no"])
    assert res.exit_code == 0, res.output
    assert "head pass fp32, dropout masks torch" in res.output
    bad = CliRunner().invoke(cli, ["train", "--output-dir", str(tmp_path / "o"), "--cpu-dropout", "numpy"])
    assert bad.exit_code != 0 and "--cpu-dropout" in bad.output


# ---- tokenization off the step path ------------------------------------------------------------------------
def test_prefetch_collates_on_the_worker_and_changes_nothing(tiny_cfg, tmp_path, monkeypatch):
    """The next batch is tokenized on the worker thread; with --no-prefetch the run is the same, loss for loss
    and weight for weight; a collation error of a prefetched batch still reaches the batch policy (skipped)."""
    import threading

    from splade_obs.collate import PairCollator
    from splade_obs.errors import DataError

    from transformers import PreTrainedTokenizerBase

    from tests._eval_utils import write_beir

    threads: list[str] = []
    busy, overlaps = [], []
    original, tokenize = PairCollator.__call__, PreTrainedTokenizerBase.__call__

    def recording(self, examples, **kwargs):
        threads.append(threading.current_thread().name)
        if kwargs.get("batch_index") == 3:
            raise DataError("bad record in batch 3", hint="injected by the test")
        return original(self, examples, **kwargs)

    def exclusive(self, *args, **kwargs):  # any tokenizer use (collation, evaluation) while another runs
        if busy:
            overlaps.append(threading.current_thread().name)
        busy.append(1)
        try:
            return tokenize(self, *args, **kwargs)
        finally:
            busy.pop()

    monkeypatch.setattr(PairCollator, "__call__", recording)
    monkeypatch.setattr(PreTrainedTokenizerBase, "__call__", exclusive)
    beir = write_beir(tmp_path / "beir", split="dev")
    losses, counters = {}, {}
    for prefetch in (True, False):
        threads.clear()
        rec = RecordingSink()
        cfg = tiny_cfg(checkpoint={"output_dir": str(tmp_path / str(prefetch)), "save_steps": 2},
                       optim={"max_steps": 6}, data={"prefetch": prefetch},
                       eval={"eval_data": str(beir), "eval_split": "dev", "eval_steps": 2})
        result = run_training(cfg, extra_sinks=[rec])
        assert result.status == "FINISHED"
        losses[prefetch] = [e.loss for e in rec.of(StepDone)]
        counters[prefetch] = result.result.counters["train/skipped_batches"]
        on_worker = sum(name.startswith("splade-obs-collate") for name in threads)
        if prefetch:
            assert on_worker >= len(threads) - 1, threads  # all but the first batch
        else:
            assert on_worker == 0
    assert losses[True] == losses[False] and len(losses[True]) == 6
    assert counters == {True: 1, False: 1}
    assert overlaps == []  # evaluations and checkpoints every 2 steps never ran beside a prefetch
    wa, wb = _weights(tmp_path / "True" / "final"), _weights(tmp_path / "False" / "final")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_cuda_attention_leaves_out_cudnn_and_cpu_is_untouched():
    """The training forward's context: on CUDA, SDPA's flash / memory-efficient / math backends only (cuDNN's
    spent 4-5 ms of host time a call on an H100), restored after; on CPU nothing changes but autocast."""
    from splade_obs.device import Runtime, attention_kernels

    backends = torch.backends.cuda
    before = (backends.cudnn_sdp_enabled(), backends.flash_sdp_enabled(), backends.mem_efficient_sdp_enabled())
    with attention_kernels(torch.device("cuda")):
        assert not backends.cudnn_sdp_enabled()
        assert backends.flash_sdp_enabled() and backends.mem_efficient_sdp_enabled() and backends.math_sdp_enabled()
    assert (backends.cudnn_sdp_enabled(), backends.flash_sdp_enabled(), backends.mem_efficient_sdp_enabled()) == before
    with Runtime(torch.device("cpu"), torch.bfloat16).autocast():
        assert torch.is_autocast_enabled("cpu") and backends.cudnn_sdp_enabled() == before[0]
    assert not torch.is_autocast_enabled("cpu")
