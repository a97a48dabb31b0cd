"""Reference full-logits SPLADE head vs the fused chunked head, on the real splade-tiny.

Measures, for a batch of 16 documents x 128 tokens: encoding throughput (docs/s, no grad), training
throughput (forward + backward samples/s) and peak memory. Each variant runs in its own fresh process so
peak memory is not polluted by the other: peak RSS growth over the process's RSS after loading the model
(``ru_maxrss``; torch's CPU allocations are invisible to tracemalloc), or ``torch.cuda.max_memory_allocated``
on CUDA.

    OMP_NUM_THREADS=2 python benchmarks/bench_head.py            # writes benchmarks/results/bench_head.json
    OMP_NUM_THREADS=2 python benchmarks/bench_head.py --batch-size 32 --length 256 --docs-from ../shared/data/scifact

On a CPU the fused head's inference forward is also timed with each vocabulary pass of ``--head-passes``
(``splade-obs evaluate --head-pass``: fp32, and the bf16 / int8 prefilters that compute only the candidate
terms in fp32), and each pass's output is checked against fp32's.
    python benchmarks/bench_head.py --device cuda --amp bf16 --batch-size 32 --length 256
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

# the benchmarks' shared preamble (repository root on sys.path, paths, table printer, results writer)
from _common import RESULTS, table, write_json

VARIANTS = ("reference", "fused")
WORDS = ("sparse lexical retrieval expands each query and document into weighted vocabulary terms learned "
         "by a masked language model whose logits are pooled with a max over tokens").split()


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _documents(n: int, beir: Path | None = None) -> list[str]:
    """n different documents, each long enough to fill the length after truncation; or a BEIR corpus's first n."""
    if beir is not None:
        from splade_obs.beir import CorpusFile

        return list(CorpusFile(beir / "corpus.jsonl").texts()[:n])
    return [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(400)) for i in range(n)]


def _timed(fn, iters: int, sync) -> float:
    fn()  # warm-up (allocator, kernels)
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - start) / iters


def run_variant(args: argparse.Namespace) -> dict:
    import torch

    from splade_obs.cpu import set_head_pass
    from splade_obs.model import SpladeEncoder

    set_head_pass(args.head_pass)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    enc = SpladeEncoder.from_pretrained("splade-tiny", device=device, chunk_size=args.chunk_size,
                                        fused_head=args.variant == "fused")
    assert enc.fused_head == (args.variant == "fused")
    batch = {k: v.to(device) for k, v in enc.tokenize(_documents(args.batch_size, args.docs_from),
                                                      args.length).items()}
    assert batch["input_ids"].shape[0] == args.batch_size
    autocast = lambda: torch.autocast(device.type, dtype=amp, enabled=amp is not None)  # noqa: E731

    base_rss = _rss_mb()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base_gpu = torch.cuda.memory_allocated() / 2**20

    def forward() -> None:
        with torch.no_grad(), autocast():
            forward.out = enc(**batch)

    enc.eval()
    fwd_s = _timed(forward, args.iters, sync)
    checksum = float(forward.out.double().sum())
    fwd_peak = (torch.cuda.max_memory_allocated() / 2**20 - base_gpu) if cuda else _peak_rss_mb() - base_rss
    if args.forward_only:
        return {"variant": args.variant, "head_pass": args.head_pass, "docs_per_s_forward": args.batch_size / fwd_s,
                "tokens": int(batch["attention_mask"].sum()), "output": forward.out.tolist()}

    enc.train()
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def train_step() -> None:
        with autocast():
            weights = enc(**batch)
        loss = weights.sum() / weights.shape[0] + 1e-4 * weights.mean(0).pow(2).sum()
        loss.backward()
        enc.zero_grad(set_to_none=True)

    step_s = _timed(train_step, args.iters, sync)
    train_peak = (torch.cuda.max_memory_allocated() / 2**20 - base_gpu) if cuda else _peak_rss_mb() - base_rss
    return {
        "variant": args.variant,
        "docs_per_s_forward": args.batch_size / fwd_s,
        "samples_per_s_train": args.batch_size / step_s,
        "peak_mb_forward": fwd_peak,
        "peak_mb_train": train_peak,
        "memory_measure": "cuda max_memory_allocated delta" if cuda else "peak RSS delta (ru_maxrss)",
        "output_checksum": checksum,
    }


def _child_cmd(args: argparse.Namespace, variant: str) -> list[str]:
    return [sys.executable, __file__, "--variant", variant, "--device", args.device, "--amp", args.amp,
            "--batch-size", str(args.batch_size), "--length", str(args.length), "--iters", str(args.iters),
            "--chunk-size", str(args.chunk_size)] + (["--docs-from", str(args.docs_from)] if args.docs_from else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=VARIANTS, help="run one variant in this process (internal)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--output", type=Path, default=RESULTS / "bench_head.json")
    parser.add_argument("--docs-from", type=Path, help="a BEIR folder: encode its first documents, not synthetic text")
    parser.add_argument("--head-passes", default="fp32,bf16,int8",
                        help="CPU: also time the inference forward with each of these passes ('' for none)")
    parser.add_argument("--head-pass", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--forward-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return

    rows = []
    for variant in VARIANTS:
        proc = subprocess.run(_child_cmd(args, variant), capture_output=True, text=True, env=os.environ.copy())
        if proc.returncode != 0:
            sys.exit(f"{variant} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    ref, fused = rows
    print(f"SPLADE head on splade-tiny, batch {args.batch_size} x {args.length} tokens, device {args.device}, "
          f"amp {args.amp}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, {args.iters} timed iters")
    lines = [(label, ref[key], fused[key], f"{fused[key] / ref[key] if ref[key] else float('nan'):.2f}x")
             for key, label in (("docs_per_s_forward", "forward docs/s"), ("samples_per_s_train", "fwd+bwd samples/s"),
                                ("peak_mb_forward", "peak MB forward"), ("peak_mb_train", "peak MB fwd+bwd"))]
    print(table([("metric", "<30"), ("reference", ">14", ".2f"), ("fused", ">14", ".2f"), ("fused/ref", ">11")], lines))
    print(f"memory: {ref['memory_measure']}; output checksums {ref['output_checksum']:.4f} vs "
          f"{fused['output_checksum']:.4f}")
    passes = _head_passes(args) if args.device == "cpu" else []
    write_json(args.output, {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "variant"},
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "machine": platform.processor() or platform.machine(),
        "results": rows, "head_passes": passes})
    print(f"wrote {args.output}")


def _head_passes(args: argparse.Namespace) -> list[dict]:
    """The fused head's inference forward with each vocabulary pass, each in a fresh process; every pass's
    weights checked against fp32's (the bound of docs/recipes.md: fp32 rounding, zeros included)."""
    import numpy as np

    from splade_obs.cpu import int8_matmul_works

    out = []
    for name in filter(None, args.head_passes.split(",")):
        if name == "int8" and not int8_matmul_works():
            print("int8: torch._int_mm does not run on this CPU build of torch; skipped")
            continue
        cmd = _child_cmd(args, "fused") + ["--head-pass", name, "--forward-only"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        if proc.returncode != 0:
            sys.exit(f"--head-pass {name} failed:\n{proc.stderr[-3000:]}")
        out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    if not out:
        return []
    ref = np.asarray(out[0]["output"])
    lines = []
    for r in out:
        got = np.asarray(r.pop("output"))
        r["max_abs_diff_vs_first"] = float(np.abs(got - ref).max())
        r["zero_pattern_equal"] = bool(((got > 0) == (ref > 0)).all())
        speedup = r["docs_per_s_forward"] / out[0]["docs_per_s_forward"]
        lines.append((r["head_pass"], r["docs_per_s_forward"], f"{speedup:.2f}x", f"{r['max_abs_diff_vs_first']:.1e}",
                      "yes" if r["zero_pattern_equal"] else "no"))
    print(f"inference forward by vocabulary pass ({out[0]['tokens']} real tokens in the batch):")
    print(table([("--head-pass", "<12"), ("docs/s", ">10", ".1f"), (f"vs {out[0]['head_pass']}", ">9"),
                 ("max |dw|", ">10"), ("same zeros", ">11")], lines))
    return out


if __name__ == "__main__":
    main()
