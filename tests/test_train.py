"""The trainer end to end on the real splade-tiny: CLI, loadable model, exact resume, learning, faults, budget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from splade_obs_cli.main import cli
from splade_obs.errors import EXIT_CODES, ErrorCategory
from splade_obs.device import cpu_has_native_bf16, resolve_amp
from splade_obs.bus import RecordingSink
from splade_obs.events import CheckpointSaved, EpochDone, ErrorCaught, RunFinished, RunStarted, StepDone
from splade_obs.faults import parse_faults
from splade_obs.optim import linear_schedule
from splade_obs.run import run_training

from .conftest import TINY_ARGS


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_cli_train_produces_loadable_model(tmp_path):
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["train", "--output-dir", str(out), "--max-steps", "2", *TINY_ARGS,
                                   "--no-mlflow", "--otel-exporter", "none", "--progress", "lines"])
    assert res.exit_code == 0, res.output + res.stderr
    from transformers import AutoModelForMaskedLM, AutoTokenizer
    model = AutoModelForMaskedLM.from_pretrained(out / "final")
    tok = AutoTokenizer.from_pretrained(out / "final")
    logits = model(**tok(["which river flows through the city"], return_tensors="pt")).logits
    assert logits.shape[-1] == 30522
    assert (out / "checkpoints" / "checkpoint-2" / "trainer_state.json").exists()
    assert (out / "logs" / "training_metrics.json").exists()
    assert "Completed training: 2/2 (100.0%)" in res.stderr


def test_config_file_with_flag_override(tmp_path):
    conf = tmp_path / "run.toml"
    conf.write_text('[optim]\nmax_steps = 1\nbatch_size = 4\nlearning_rate = 1e-4\n'
                    '[model]\nmax_query_length = 16\nmax_doc_length = 32\n[tracking]\nenabled = false\n')
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["train", "--config", str(conf), "--output-dir", str(out),
                                   "--learning-rate", "2e-4", "--otel-exporter", "none"])
    assert res.exit_code == 0, res.stderr
    state = json.loads((out / "checkpoints" / "checkpoint-1" / "trainer_state.json").read_text())
    assert state["global_step"] == 1
    # The flag wins over the file: the scheduler's base LR is 2e-4.
    sched = torch.load(out / "checkpoints" / "checkpoint-1" / "scheduler.pt", weights_only=True)
    assert sched["base_lrs"][0] == pytest.approx(2e-4)


def test_unknown_config_key_is_a_config_error(tmp_path):
    conf = tmp_path / "bad.yaml"
    conf.write_text("optim:\n  batch_sz: 4\n")
    res = CliRunner().invoke(cli, ["train", "--config", str(conf), "--output-dir", str(tmp_path / "o")])
    assert res.exit_code == EXIT_CODES[ErrorCategory.CONFIG_ERROR]
    assert res.stderr.startswith("error[CONFIG_ERROR]:")
    assert "optim.batch_sz" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("loss_toml, field", [
    ('contrastive_negatives = "hardest"', "loss.contrastive_negatives"),
    ("contrastive_weight = -0.5", "loss.contrastive_weight"),
    ('contrastive_weight = 0.0\ndistillation = "none"', "loss.contrastive_weight"),
    ("contrastive_weight = 0.0\ndistillation_weight = 0.0", "loss.contrastive_weight"),
    ('distillation = "listnet"', "loss.distillation"),
    ('distillation = "kl"\ndistillation_temperature = 0.0', "loss.distillation_temperature"),
])
def test_bad_loss_options_are_config_errors_before_training(tmp_path, loss_toml, field):
    conf = tmp_path / "bad.toml"
    conf.write_text(f"[loss]\n{loss_toml}\n")
    out = tmp_path / "o"
    res = CliRunner().invoke(cli, ["train", "--config", str(conf), "--output-dir", str(out), "--no-mlflow"])
    assert res.exit_code == EXIT_CODES[ErrorCategory.CONFIG_ERROR], res.stderr
    assert res.stderr.startswith("error[CONFIG_ERROR]:") and field in res.stderr and "Traceback" not in res.stderr
    assert not (out / "checkpoints").exists()


def test_pure_distillation_without_teacher_scores_is_a_data_error_before_training(tmp_path):
    conf = tmp_path / "distill.toml"
    conf.write_text('[loss]\ncontrastive_weight = 0.0\ndistillation = "margin_mse"\n')
    out = tmp_path / "o"
    res = CliRunner().invoke(cli, ["train", "--config", str(conf), "--output-dir", str(out), "--no-mlflow",
                                   "--otel-exporter", "none", *TINY_ARGS])
    assert res.exit_code == EXIT_CODES[ErrorCategory.DATA_ERROR], res.stderr
    assert "pure distillation" in res.stderr and "--teacher-scores" in res.stderr and "Traceback" not in res.stderr
    assert not (out / "checkpoints").exists()


def test_resume_gives_identical_weights(tiny_cfg, tmp_path):
    """A run killed after step 3 and resumed ends with the same weights as an uninterrupted run."""
    common = {"optim": {"max_steps": 6, "learning_rate": 3e-4}}
    straight = tiny_cfg(checkpoint={"output_dir": str(tmp_path / "a")}, **common)
    rec1 = RecordingSink()
    r1 = run_training(straight, extra_sinks=[rec1])
    assert r1.status == "FINISHED"

    broken = tiny_cfg(checkpoint={"output_dir": str(tmp_path / "b")}, recovery={"inject_faults": ("step:3:interrupt",)},
                      **common)
    rec2 = RecordingSink()
    r2 = run_training(broken, extra_sinks=[rec2])
    assert r2.status == "KILLED" and r2.result.global_step == 3
    # the stopped run still reports each of its steps, then its partial epoch, aggregated by the trainer
    losses = [e.loss for e in rec2.of(StepDone)]
    assert [e.step for e in rec2.of(StepDone)] == [1, 2, 3]
    (partial,) = rec2.of(EpochDone)
    assert not partial.complete and partial.steps_completed == 3 and partial.step == 3
    assert partial.means["epoch/loss"] == pytest.approx(sum(losses) / 3, rel=1e-12)
    kinds = [type(e).__name__ for e in rec2.events]
    assert kinds.index("EpochDone") < kinds.index("RunFinished")
    resumed = tiny_cfg(checkpoint={"output_dir": str(tmp_path / "b"), "resume": "auto"}, **common)
    rec = RecordingSink()
    r3 = run_training(resumed, extra_sinks=[rec])
    assert r3.status == "FINISHED"
    started = rec.of(RunStarted)[0]
    assert started.resumed and started.start_step == 3
    assert started.run_name == rec2.of(RunStarted)[0].run_name  # the resumed run keeps its name
    assert [e.step for e in rec.of(StepDone)] == [4, 5, 6]
    # the epoch's means cover all six steps, bit for bit as in the uninterrupted run (sums restored exactly)
    (done,), (done1,) = rec.of(EpochDone), rec1.of(EpochDone)
    timing = ("seconds", "per_second")
    assert done.complete and done.steps_completed == 6 == done1.steps_completed
    assert {k: v for k, v in done.means.items() if not k.endswith(timing)} == \
        {k: v for k, v in done1.means.items() if not k.endswith(timing)}
    assert [e.loss for e in rec.of(StepDone)] == [e.loss for e in rec1.of(StepDone)][3:]

    wa, wb = _weights(tmp_path / "a" / "final"), _weights(tmp_path / "b" / "final")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    # And the weights did move: this is not a comparison of two untouched models.
    from splade_obs.hub import resolve_model
    w0 = _weights(Path(resolve_model("splade-tiny")))
    assert any(not torch.equal(w0[k], wa[k]) for k in wa if k in w0)


def test_fp16_resume_restores_the_grad_scaler(tiny_cfg, tmp_path):
    """fp16 with a GradScaler: an injected overflow halves the loss scale before the interrupt; the resumed run
    must carry the halved scale on (not start again at 65536) and end with the straight run's weights."""
    common = {"optim": {"max_steps": 6, "learning_rate": 3e-4, "mixed_precision": "fp16", "device": "cpu"}}
    rec_a = RecordingSink()
    r1 = run_training(tiny_cfg(checkpoint={"output_dir": str(tmp_path / "a")},
                               recovery={"inject_faults": ("batch:2:overflow",)}, **common), extra_sinks=[rec_a])
    assert r1.status == "FINISHED"
    scales = [e.grad_scale for e in rec_a.of(StepDone)]
    assert scales[0] == 65536.0 and scales[1:] == [32768.0] * 5  # step 2 overflowed: skipped, scale halved

    r2 = run_training(tiny_cfg(checkpoint={"output_dir": str(tmp_path / "b")},
                               recovery={"inject_faults": ("batch:2:overflow", "step:4:interrupt")}, **common))
    assert r2.status == "KILLED" and r2.result.global_step == 4
    rec_b = RecordingSink()
    r3 = run_training(tiny_cfg(checkpoint={"output_dir": str(tmp_path / "b"), "resume": "auto"}, **common),
                      extra_sinks=[rec_b])
    assert r3.status == "FINISHED"
    resumed = rec_b.of(StepDone)
    assert [e.step for e in resumed] == [5, 6]
    assert [e.grad_scale for e in resumed] == [32768.0, 32768.0]
    wa, wb = _weights(tmp_path / "a" / "final"), _weights(tmp_path / "b" / "final")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_stop_at_the_last_step_then_resume_ends_the_epoch(tiny_cfg, tmp_path):
    """A stop after the last step, before its own checkpoint: the resumed run has no step left to take but
    still makes that checkpoint and ends the epoch, with the uninterrupted run's means."""
    optim = {"max_steps": 3, "learning_rate": 3e-4}
    rec1 = RecordingSink()
    assert run_training(tiny_cfg(checkpoint={"output_dir": str(tmp_path / "a"), "save_steps": 3}, optim=optim),
                        extra_sinks=[rec1]).status == "FINISHED"
    r2 = run_training(tiny_cfg(checkpoint={"output_dir": str(tmp_path / "b"), "save_steps": 3},
                               recovery={"inject_faults": ("step:3:interrupt",)}, optim=optim))
    assert r2.status == "KILLED" and r2.result.global_step == 3
    rec = RecordingSink()
    r3 = run_training(tiny_cfg(checkpoint={"output_dir": str(tmp_path / "b"), "save_steps": 3, "resume": "auto"},
                               optim=optim), extra_sinks=[rec])
    assert r3.status == "FINISHED" and not rec.of(StepDone)
    assert [(e.step, e.reason) for e in rec.of(CheckpointSaved)] == [(3, "save_steps"), (3, "epoch_end"),
                                                                      (3, "final")]
    (done,), (done1,) = rec.of(EpochDone), rec1.of(EpochDone)
    assert done.complete and done.steps_completed == 3
    assert done.means["epoch/loss"] == done1.means["epoch/loss"]
    wa, wb = _weights(tmp_path / "a" / "final"), _weights(tmp_path / "b" / "final")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_with_gradient_accumulation_mid_epoch(tiny_cfg, tmp_path):
    common = {"optim": {"max_steps": 4, "gradient_accumulation_steps": 2, "batch_size": 2, "learning_rate": 3e-4}}
    r1 = run_training(tiny_cfg(checkpoint={"output_dir": str(tmp_path / "a")}, **common))
    assert r1.status == "FINISHED"
    r2 = run_training(tiny_cfg(checkpoint={"output_dir": str(tmp_path / "b"), "save_steps": 2},
                               recovery={"inject_faults": ("step:2:interrupt",)}, **common))
    assert r2.status == "KILLED"
    r3 = run_training(tiny_cfg(checkpoint={"output_dir": str(tmp_path / "b"), "resume": "auto"}, **common))
    assert r3.status == "FINISHED"
    wa, wb = _weights(tmp_path / "a" / "final"), _weights(tmp_path / "b" / "final")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_loss_goes_down_on_demo_data(tiny_cfg, tmp_path):
    """After a short run the validation loss of the demo set is lower than before training."""
    cfg = tiny_cfg(optim={"max_steps": 16, "batch_size": 8, "learning_rate": 3e-4, "warmup_steps": 2},
                   data={"val_file": str(Path(__file__).resolve().parents[1] / "splade_obs" / "demo" / "val.jsonl")},
                   loss={"lambda_q": 0.0, "lambda_d": 0.0})
    rec = RecordingSink()
    res = run_training(cfg, extra_sinks=[rec])
    assert res.status == "FINISHED"
    from splade_obs.collate import PairCollator
    from splade_obs.data import load_training_data
    from splade_obs.losses import SpladeLoss
    from splade_obs.model import SpladeEncoder

    val = load_training_data(cfg.data.val_file).examples
    loss_fn = SpladeLoss(0.0, 0.0)

    def val_loss(model_path: str) -> float:
        enc = SpladeEncoder.from_pretrained(model_path)
        enc.eval()
        col = PairCollator(enc.tokenizer, 16, 32, num_negatives=1, seed=0)
        total = 0.0
        with torch.no_grad():
            for i in range(0, 56, 8):
                b = col(val[i:i + 8])
                q = enc(b.queries["input_ids"], b.queries["attention_mask"])
                p = enc(b.pos_docs["input_ids"], b.pos_docs["attention_mask"])
                n = enc(b.neg_docs["input_ids"], b.neg_docs["attention_mask"]).view(b.size, b.num_negatives, -1)
                total += loss_fn(q, p, n, step=0).values()["base"]
        return total / 7

    before, after = val_loss("splade-tiny"), val_loss(res.result.model_path)
    assert after < before * 0.9, (before, after)


def test_injected_faults_are_skipped_and_counted(tiny_cfg):
    cfg = tiny_cfg(optim={"max_steps": 5}, recovery={"inject_faults": ("batch:2:oom", "batch:4:nan", "batch:5:exception")})
    rec = RecordingSink()
    res = run_training(cfg, extra_sinks=[rec])
    assert res.status == "FINISHED"
    errors = rec.of(ErrorCaught)
    assert [(e.category, e.context["batch"]) for e in errors] == [
        ("DEVICE_ERROR", 2), ("TRAINING_ERROR", 4), ("TRAINING_ERROR", 5)]
    assert all(e.skipped_batch and not e.fatal for e in errors)
    assert errors[0].exception_type == "OutOfMemoryError"
    # 5 optimizer steps still happened, on 8 batches (3 skipped).
    steps = rec.of(StepDone)
    assert [s.step for s in steps] == [1, 2, 3, 4, 5]
    fin = rec.of(RunFinished)[0]
    assert fin.counters == {"errors/DEVICE_ERROR": 1, "errors/TRAINING_ERROR": 2, "train/skipped_batches": 3}
    lines = [json.loads(x) for x in (Path(cfg.log_dir) / "errors.jsonl").read_text().splitlines()]
    assert [x["category"] for x in lines] == ["DEVICE_ERROR", "TRAINING_ERROR", "TRAINING_ERROR"]


def test_error_budget_stops_run_with_checkpoint(tiny_cfg, tmp_path):
    cfg = tiny_cfg(optim={"max_steps": 6}, recovery={"inject_faults": ("batch:3:oom", "batch:4:oom"),
                                                   "max_skipped_batches": 1})
    rec = RecordingSink()
    res = run_training(cfg, extra_sinks=[rec])
    assert res.status == "FAILED"
    err = res.result.error
    assert err.category is ErrorCategory.TRAINING_ERROR
    assert "DEVICE_ERROR" in err.message and err.context["dominant_category"] == "DEVICE_ERROR"
    saved = [e for e in rec.of(CheckpointSaved) if e.reason == "error_budget"]
    assert len(saved) == 1 and Path(saved[0].path, "trainer_state.json").exists()
    assert json.loads(Path(saved[0].path, "trainer_state.json").read_text())["global_step"] == 2
    assert rec.of(ErrorCaught)[-1].fatal


def test_cli_budget_failure_exit_code(tmp_path):
    res = CliRunner().invoke(cli, ["train", "--output-dir", str(tmp_path / "o"), "--max-steps", "3", *TINY_ARGS,
                                   "--no-mlflow", "--otel-exporter", "none", "--inject-fault", "batch:1:exception",
                                   "--max-consecutive-failures", "1"])
    assert res.exit_code == EXIT_CODES[ErrorCategory.TRAINING_ERROR]
    first = res.stderr.strip().splitlines()
    assert any(line.startswith("error[TRAINING_ERROR]: error budget spent") for line in first)
    assert "Traceback" not in res.stderr


def test_debug_flag_shows_traceback(tmp_path):
    res = CliRunner().invoke(cli, ["--debug", "train", "--output-dir", str(tmp_path / "o"),
                                   "--train-file", str(tmp_path / "missing.jsonl")])
    assert res.exit_code == EXIT_CODES[ErrorCategory.FILE_SYSTEM_ERROR]
    assert "Traceback" in res.stderr


def test_interrupt_is_killed_with_checkpoint(tmp_path):
    res = CliRunner().invoke(cli, ["train", "--output-dir", str(tmp_path / "o"), "--max-steps", "4", *TINY_ARGS,
                                   "--no-mlflow", "--otel-exporter", "none", "--inject-fault", "step:2:interrupt"])
    assert res.exit_code == 130
    assert "--resume auto" in res.stderr
    state = json.loads((tmp_path / "o" / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2


def test_sigterm_stops_cleanly(tiny_cfg):
    res = run_training(tiny_cfg(optim={"max_steps": 4}, recovery={"inject_faults": ("step:1:sigterm",)}))
    assert res.status == "KILLED" and res.result.global_step == 1
    assert res.result.checkpoint and Path(res.result.checkpoint, "trainer_state.json").exists()


def test_missing_validation_degrades_gracefully(tiny_cfg, tmp_path):
    rec = RecordingSink()
    res = run_training(tiny_cfg(data={"val_file": str(tmp_path / "nope.jsonl")}), extra_sinks=[rec])
    assert res.status == "FINISHED"
    assert rec.of(ErrorCaught)[0].category == "FILE_SYSTEM_ERROR"


def test_bf16_autocast_runs_on_cpu(tiny_cfg):
    rec = RecordingSink()
    res = run_training(tiny_cfg(optim={"max_steps": 2, "mixed_precision": "bf16"}), extra_sinks=[rec])
    assert res.status == "FINISHED"
    assert all(torch.isfinite(torch.tensor(s.loss)) for s in rec.of(StepDone))


def test_amp_resolution():
    cpu = torch.device("cpu")
    assert resolve_amp("no", cpu) is torch.float32
    assert resolve_amp("bf16", cpu) is torch.bfloat16
    assert resolve_amp("fp16", cpu) is torch.float16
    assert resolve_amp("auto", cpu) is (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)


def test_runtime_is_one_value_with_autocast_and_scaler():
    from splade_obs.device import device_name, resolve_runtime
    from splade_obs.errors import DeviceError

    fp16 = resolve_runtime("cpu", "fp16")
    assert (fp16.device, fp16.amp_dtype, fp16.amp_name) == (torch.device("cpu"), torch.float16, "float16")
    assert fp16.uses_grad_scaler and fp16.grad_scaler().is_enabled() and fp16.eval_amp_dtype is torch.float16
    with fp16.autocast():
        assert torch.is_autocast_enabled("cpu")
    fp32 = resolve_runtime("cpu", "no")
    assert not fp32.uses_grad_scaler and not fp32.grad_scaler().is_enabled() and fp32.eval_amp_dtype is None
    with fp32.autocast():
        assert not torch.is_autocast_enabled("cpu")
    assert device_name("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA is not available"):
            device_name("cuda:1")
    with pytest.raises(DeviceError, match="unknown device"):
        resolve_runtime("tpu-ish", "no")


def test_device_and_amp_are_resolved_once_per_run(tiny_cfg, monkeypatch):
    """check_inputs resolves the run's Runtime; system info and the trainer get that same value."""
    import splade_obs.device as device

    calls = []
    real = device.resolve_device
    monkeypatch.setattr(device, "resolve_device", lambda name: calls.append(name) or real(name))
    rec = RecordingSink()
    res = run_training(tiny_cfg(optim={"max_steps": 1, "mixed_precision": "no", "device": "cpu"}), extra_sinks=[rec])
    assert res.status == "FINISHED" and calls == ["cpu"]
    started = rec.of(RunStarted)[0]
    assert started.system_info["mixed_precision"] == "float32" and started.system_info["device"] == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_evaluate_command_refuses_a_cuda_device_it_does_not_have(tmp_path):
    from tests._eval_utils import write_beir

    data = write_beir(tmp_path / "beir")
    res = CliRunner().invoke(cli, ["evaluate", "--model", "splade-tiny", "--data", str(data), "--device", "cuda"])
    assert res.exit_code == EXIT_CODES[ErrorCategory.DEVICE_ERROR], res.output
    assert "error[DEVICE_ERROR]" in res.stderr and "CUDA is not available" in res.stderr


def test_bare_mixed_precision_flag_means_auto():
    from splade_obs_cli.train_cmd import train
    ctx = train.make_context("train", ["--mixed-precision", "--no-mlflow"])
    assert ctx.params["mixed_precision"] == "auto"
    ctx = train.make_context("train", ["--mixed-precision", "bf16"])
    assert ctx.params["mixed_precision"] == "bf16"


def test_linear_schedule():
    f = linear_schedule(warmup=2, total=6)
    assert [round(f(s), 3) for s in range(7)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0]


def test_fault_spec_parsing():
    faults = parse_faults(("batch:3:oom", "rank1:step:2:exception"))
    assert faults[0].unit == "batch" and faults[0].index == 3 and faults[0].rank is None
    assert faults[1].rank == 1 and faults[1].kind == "exception"
    from splade_obs.errors import ConfigError
    with pytest.raises(ConfigError):
        parse_faults(("batch:x:oom",))
    with pytest.raises(ConfigError):
        parse_faults(("rankx:batch:1:oom",))
    with pytest.raises(ConfigError):
        parse_faults(("step:5-3:spike",))
    assert [f.index for f in parse_faults(("batch:4-6:nan",))] == [4, 5, 6]


def test_fault_plan_fires_by_batch_and_step_for_its_rank():
    import math

    from splade_obs.faults import FaultPlan

    plan = FaultPlan.from_specs(("batch:2:nan", "batch:3:overflow", "rank1:batch:4:oom", "batch:5:data",
                                 "step:2:interrupt", "step:3:exception", "batch:2:exception", "step:6-7:spike"),
                                rank=0)
    from splade_obs.losses import LossOutput
    one = torch.tensor(2.0, requires_grad=True)
    out = lambda: LossOutput(total=one * 1.0)
    assert plan.before_batch(1) is None and plan.loss(out(), 1, 1).item() == 2.0
    assert plan.before_batch(2) is None and math.isnan(plan.loss(out(), 2, 1).item())  # the first spec wins
    assert plan.loss(out(), 3, 1).item() == pytest.approx(2e30)
    assert plan.before_batch(4) is None                # rank 1's fault
    spiked = out()
    plan.loss(spiked, 9, 7).backward()                 # a range: steps 6 and 7
    assert spiked.total.item() == pytest.approx(2e9) and one.grad.item() == 1.0, "a spike changes the value, not the gradient"
    assert plan.loss(out(), 9, 8).item() == 2.0
    from splade_obs.errors import DataError, TrainingError
    with pytest.raises(DataError):
        plan.before_batch(5)
    plan.after_step(1)
    with pytest.raises(KeyboardInterrupt):
        plan.after_step(2)
    with pytest.raises(TrainingError, match="injected fault after step 3"):
        plan.after_step(3)
    with pytest.raises(torch.OutOfMemoryError):
        FaultPlan.from_specs(("rank1:batch:4:oom",), rank=1).before_batch(4)
    assert not FaultPlan.from_specs((), rank=0) and FaultPlan.from_specs(("step:1:sigterm",))


def test_signal_in_the_middle_of_a_step_still_resumes_exactly(tiny_cfg, tmp_path):
    """A real SIGTERM arriving while step 3 is being reported (before the step's bookkeeping is done) is
    acted on at the next safe point: the checkpoint and the resumed run match an uninterrupted run."""
    import os
    import signal

    from splade_obs.bus import Sink

    class SignalAtStep(Sink):  # fault injection: the signal lands inside the optimizer-step path
        name, scope = "signal", "rank"

        def on_step_done(self, e):
            if e.step == 3:
                os.kill(os.getpid(), signal.SIGTERM)

    common = {"optim": {"max_steps": 5, "learning_rate": 3e-4}}
    assert run_training(tiny_cfg(checkpoint={"output_dir": str(tmp_path / "a")}, **common)).status == "FINISHED"
    # every step reported as it ends (log_every_steps 1), so the signal lands right after step 3
    r2 = run_training(tiny_cfg(checkpoint={"output_dir": str(tmp_path / "b")}, logging={"log_every_steps": 1}, **common),
                      extra_sinks=[SignalAtStep()])
    assert r2.status == "KILLED" and r2.result.global_step == 3
    state = json.loads(Path(r2.result.checkpoint, "trainer_state.json").read_text())
    assert (state["global_step"], state["batch_in_epoch"]) == (3, 3)
    r3 = run_training(tiny_cfg(checkpoint={"output_dir": str(tmp_path / "b"), "resume": "auto"}, **common))
    assert r3.status == "FINISHED"
    wa, wb = _weights(tmp_path / "a" / "final"), _weights(tmp_path / "b" / "final")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_reused_output_dir_needs_resume(tiny_cfg, tmp_path):
    out = {"output_dir": str(tmp_path / "o")}
    assert run_training(tiny_cfg(checkpoint=out, optim={"max_steps": 1})).status == "FINISHED"
    from splade_obs.errors import ConfigError
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        run_training(tiny_cfg(checkpoint=out, optim={"max_steps": 1}))
