"""Per-batch cost of the OpenTelemetry sink on the training thread.

Feeds realistic StepDone events through a real EventBus into OtelSink (default file exporter, in a temp
dir) for each ``--trace-batches`` mode and reports the time per batch on the emitting thread, next to a
bus with no sink. ``--real`` also times a short real run of splade-tiny with tracing all/none.

    .venv/bin/python benchmarks/bench_tracing_overhead.py [--steps 20000] [--real]

Writes benchmarks/results/tracing_overhead.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

# the benchmarks' shared preamble (repository root on sys.path, paths, table printer, results writer)
from _common import RESULTS, table, write_json
from splade_obs.config import TrainConfig
from splade_obs.bus import EventBus
from splade_obs.events import EpochDone, EpochStarted, RunFinished, RunStarted, StepDone
from splade_obs.sinks.otel import OtelOptions, OtelSink

MODES = ("none", "every:50", "every:10", "all")


def make_steps(n: int) -> list[StepDone]:
    t = time.time_ns()
    out = []
    for i in range(1, n + 1):
        start = t + i * 20_000_000
        out.append(StepDone(step=i, epoch=1, batch_index=i - 1, loss=1.0, parts={"base": 0.9, "query_reg": 0.05,
                                                                                 "doc_reg": 0.05},
                            learning_rate=5e-5, grad_norm=0.7, batch_size=16, num_tokens=2500, samples_per_second=4.2,
                            tokens_per_second=650.0, query_nnz=25.0, doc_nnz=90.0, retrieval_flops=3.1, start_ns=start,
                            end_ns=start + 19_000_000, timings={"forward": 0.008, "backward": 0.009,
                                                                "optimizer": 0.002},
                            lambda_q=5e-4, lambda_d=3e-4, total_steps=n, time_ns=start + 19_000_000))
    return out


def time_mode(mode: str | None, steps: list[StepDone], log_dir: Path) -> dict[str, float]:
    """Seconds per emit on the training thread; mode None = a bus with no sink (the floor)."""
    bus = EventBus()
    sink = None
    if mode is not None:
        sink = OtelSink.create(OtelOptions(exporter="file", trace_batches=mode),
                               log_dir=log_dir / mode.replace(":", "_"))
        bus.add(sink)
    bus.open()
    bus.emit(RunStarted(run_name="bench", config={}, system_info={}, total_steps=len(steps), num_epochs=1,
                        steps_per_epoch=len(steps)))
    bus.emit(EpochStarted(epoch=1, num_epochs=1, steps_in_epoch=len(steps)))
    t0 = time.perf_counter()
    for ev in steps:
        bus.emit(ev)
    elapsed = time.perf_counter() - t0
    bus.emit(EpochDone(epoch=1, num_epochs=1, step=len(steps), duration_seconds=1.0, means={"epoch/loss": 1.0}))
    bus.emit(RunFinished(status="FINISHED", step=len(steps), duration_seconds=1.0))
    c0 = time.perf_counter()
    bus.close()
    close_s = time.perf_counter() - c0
    kept = sink.stats.get("batches_kept", 0) if sink else 0
    return {"us_per_batch": elapsed / len(steps) * 1e6, "close_s": close_s, "batch_spans": kept}


def real_runs(steps: int) -> dict[str, float]:
    """Seconds per optimizer step of a real splade-tiny run, tracing all vs none (noisy on shared CPUs)."""
    from splade_obs.run import run_training

    out = {}
    for mode in ("warm-up", "none", "all"):      # the first run pays one-time import/model costs
        with tempfile.TemporaryDirectory() as d:
            cfg = TrainConfig.from_mapping({
                "checkpoint": {"output_dir": d}, "optim": {"batch_size": 4, "max_steps": steps, "seed": 1},
                "model": {"max_query_length": 16, "max_doc_length": 32}, "tracking": {"enabled": False},
                "tracing": {"exporter": "file", "trace_batches": "none" if mode == "warm-up" else mode},
                "logging": {"progress": "none"}})
            t0 = time.perf_counter()
            run_training(cfg)
            out[mode] = (time.perf_counter() - t0) / steps
    out.pop("warm-up")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--real", action="store_true", help="also time a real splade-tiny run (all vs none)")
    ap.add_argument("--real-steps", type=int, default=8)
    args = ap.parse_args()
    steps = make_steps(args.steps)
    rows: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as d:
        for mode in (None, *MODES):
            runs = [time_mode(mode, steps, Path(d) / f"r{i}") for i in range(args.repeats)]
            rows[mode or "no sink"] = {"us_per_batch": statistics.median(r["us_per_batch"] for r in runs),
                                       "close_s": statistics.median(r["close_s"] for r in runs),
                                       "batch_spans": runs[0]["batch_spans"]}
    floor = rows["no sink"]["us_per_batch"]
    print(table([("trace-batches", "<14"), ("us/batch", ">10", ".2f"), ("over bus", ">10", ".2f"),
                 ("batch spans", ">13", "d"), ("close s", ">9", ".3f")],
                [(name, r["us_per_batch"], r["us_per_batch"] - floor, int(r["batch_spans"]), r["close_s"])
                 for name, r in rows.items()]))
    result = {"steps": args.steps, "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "modes": rows}
    if args.real:
        real = real_runs(args.real_steps)
        result["real_seconds_per_step"] = real
        print(f"real splade-tiny run, s/step: none {real['none']:.3f}  all {real['all']:.3f}")
    out = write_json(RESULTS / "tracing_overhead.json", result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
