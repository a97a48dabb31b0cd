"""AMP on CUDA: one prepared check for a GPU machine (fp32 / fp16+GradScaler / bf16 / auto).

Runs the real trainer on the bundled demo data with splade-tiny for each mixed-precision mode and reports
loss trajectory, throughput, GradScaler scale and peak GPU memory; compares the fused max-pooled MLM head
with the reference full-logits head under autocast; checks that a resumed fp16 run restores the GradScaler.
Prints a side-by-side table and writes JSON (``--out``). Needs no MLflow or OpenTelemetry: it drives
``splade_obs.trainer.Trainer`` with an in-memory sink.

    python benchmarks/gpu_amp_check.py --out benchmarks/results/gpu_amp.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

# the benchmarks' shared preamble (repository root on sys.path, paths, table printer, results writer)
from _common import RESULTS, table, write_json
from splade_obs.config import TrainConfig
from splade_obs.device import resolve_amp
from splade_obs.bus import EventBus, RecordingSink
from splade_obs.events import StepDone
from splade_obs.trainer import Trainer


DEVICE = "cuda"


def _cuda(fn: str, *a):  # CUDA bookkeeping that is a no-op in a CPU dry run
    return getattr(torch.cuda, fn)(*a) if DEVICE == "cuda" else 0


def train_once(mode: str, out: Path, steps: int, batch: int, faults: tuple[str, ...] = (), resume: bool = False,
               lengths: tuple[int, int] = (32, 128)) -> dict:
    cfg = TrainConfig.from_mapping({
        "checkpoint": {"output_dir": str(out), "resume": "auto" if resume else None, "save_steps": 10},
        "optim": {"max_steps": steps, "batch_size": batch, "learning_rate": 2e-4, "mixed_precision": mode,
                  "device": DEVICE, "warmup_steps": 5, "seed": 3},
        "model": {"max_query_length": lengths[0], "max_doc_length": lengths[1]},
        "recovery": {"inject_faults": faults},
        "tracking": {"enabled": False}, "tracing": {"exporter": "none"}, "logging": {"progress": "none"},
    })
    rec = RecordingSink()
    bus = EventBus([rec])
    _cuda("reset_peak_memory_stats")
    t0 = time.perf_counter()
    result = Trainer(cfg, bus, run_name=f"gpu-{mode}").run()
    _cuda("synchronize")
    wall = time.perf_counter() - t0
    bus.close()
    steps_ev = rec.of(StepDone)
    losses = [s.loss for s in steps_ev]
    sps = [s.samples_per_second for s in steps_ev[3:]] or [0.0]
    return {
        "mode": mode, "status": result.status, "steps": len(steps_ev), "wall_s": round(wall, 2),
        "amp_dtype": str(resolve_amp(mode, torch.device(DEVICE))).replace("torch.", ""),
        "loss_first5": sum(losses[:5]) / max(1, len(losses[:5])),
        "loss_last5": sum(losses[-5:]) / max(1, len(losses[-5:])),
        "all_finite": all(torch.isfinite(torch.tensor(losses)).tolist()) if losses else False,
        "samples_per_s": sum(sps) / len(sps),
        "grad_scale_last": steps_ev[-1].grad_scale if steps_ev else None,
        # [epoch, batch index in the epoch (0-based), scale after the step] of every step taken (fp16)
        "grad_scale_trace": [[s.epoch, s.batch_index, s.grad_scale] for s in steps_ev if s.grad_scale is not None],
        "peak_mem_mb": _cuda("max_memory_allocated") / 2**20,
        "error": result.error.one_line() if result.error else None,
        "counters": result.counters,
    }


def resume_fp16(tmp: Path, batch: int, steps: int = 10, lengths: tuple[int, int] = (32, 128)) -> dict:
    """fp16 interrupted half-way (step 5 of 10) then resumed, against a straight run: the GradScaler's scale at the
    end of each (restored from the checkpoint when equal) and the final weights' largest difference."""
    straight = train_once("fp16", tmp / "straight", steps, batch, lengths=lengths)
    train_once("fp16", tmp / "resumed", steps, batch, faults=(f"step:{steps // 2}:interrupt",), lengths=lengths)
    resumed = train_once("fp16", tmp / "resumed", steps, batch, resume=True, lengths=lengths)
    from safetensors.torch import load_file
    wa = load_file(str(tmp / "straight" / "final" / "model.safetensors"))
    wb = load_file(str(tmp / "resumed" / "final" / "model.safetensors"))
    resume_diff = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    return {"straight_scale": straight["grad_scale_last"], "resumed_scale": resumed["grad_scale_last"],
            "max_abs_weight_diff": resume_diff, "resumed_status": resumed["status"]}


def head_agreement(dtype: torch.dtype) -> dict:
    from splade_obs.model import SpladeEncoder
    enc = SpladeEncoder.from_pretrained("splade-tiny", device=DEVICE)
    enc.eval()  # no dropout: both paths see the same network
    texts = ["a short query", "a much longer document about rivers, cities and harbours " * 6]
    batch = enc.tokenize(texts, 128)
    ids, mask = batch["input_ids"].to(DEVICE), batch["attention_mask"].to(DEVICE)
    out, grads = {}, {}
    for fused in (True, False):
        enc.fused_head = fused
        enc.zero_grad(set_to_none=True)
        with torch.autocast(DEVICE, dtype=dtype):
            w = enc(ids, mask)
        (w.float() ** 2).sum().backward()
        out[fused] = w.float().detach()
        grads[fused] = {n: p.grad.detach().float().clone() for n, p in enc.named_parameters() if p.grad is not None}
    rel = (out[True] - out[False]).abs().max().item() / max(1e-6, out[False].abs().max().item())
    names = sorted(grads[False])
    ga = torch.cat([grads[True][n].flatten() for n in names])
    gb = torch.cat([grads[False][n].flatten() for n in names])
    cos = torch.nn.functional.cosine_similarity(ga, gb, dim=0).item()
    return {"dtype": str(dtype).replace("torch.", ""), "forward_max_rel_diff": rel,
            "grad_cosine": cos, "grad_rel_norm_diff": ((ga - gb).norm() / gb.norm()).item()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(RESULTS / "gpu_amp.json"))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--cpu-dry-run", action="store_true", help="exercise the script on CPU (no CUDA claims)")
    args = ap.parse_args()
    global DEVICE
    if args.cpu_dry_run:
        DEVICE = "cpu"
    elif not torch.cuda.is_available():
        sys.exit("no CUDA device: this check runs on a GPU machine only (or pass --cpu-dry-run)")
    info = {"torch": torch.__version__, "device": DEVICE,
            "gpu": torch.cuda.get_device_name(0) if DEVICE == "cuda" else None,
            "bf16_supported": torch.cuda.is_bf16_supported() if DEVICE == "cuda" else None,
            "auto_resolves_to": str(resolve_amp("auto", torch.device(DEVICE))).replace("torch.", "")}
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("no", "fp16", "bf16", "auto"):
            runs.append(train_once(mode, Path(tmp) / mode, args.steps, args.batch_size))
        # fp16 with an injected NaN batch and an OOM: skipped safely, GradScaler intact
        faulty = train_once("fp16", Path(tmp) / "faulty", 12, args.batch_size,
                            faults=("batch:4:nan", "batch:6:oom"))
        resume = resume_fp16(Path(tmp), args.batch_size)
    heads = [head_agreement(torch.float16), head_agreement(torch.bfloat16)]
    report = {"device": info, "runs": runs, "faulty_fp16": faulty, "resume_fp16": resume, "heads": heads}
    print(json.dumps(info))
    print(table([("mode", "6"), ("dtype", "9"), ("status", "9"), ("loss@1-5", ">9", ".4f"), ("loss@-5", ">9", ".4f"),
                 ("samples/s", ">10", ".1f"), ("scale", ">9"), ("peak MB", ">8", ".0f")],
                [(r["mode"], r["amp_dtype"], r["status"], r["loss_first5"], r["loss_last5"], r["samples_per_s"],
                  str(r["grad_scale_last"]), r["peak_mem_mb"]) for r in runs + [dict(faulty, mode="fp16*")]], sep=" "))
    print("fp16* = with batch:4:nan and batch:6:oom injected:", faulty["counters"])
    print("resume fp16:", report["resume_fp16"])
    for h in heads:
        print("fused vs reference head:", h)
    write_json(Path(args.out), report)


if __name__ == "__main__":
    main()
