"""What the whole telemetry costs the training step: every sink off vs every sink on (issue 36, point 3).

The same real training of splade-tiny on the demo data (same seed, same steps) runs with no sink at all
(``run_training(sinks=[])``: the bus, the run ids, nothing else) and with every sink the project has: console
and ``.log`` at INFO, JSON logs, the metrics file, errors file, progress lines, sqlite MLflow with system
metrics, OpenTelemetry spans to ``traces.jsonl`` *and* over OTLP/HTTP to a real receiver on 127.0.0.1 with
``--trace-batches all``, OTel metrics to ``metrics.jsonl`` and OTLP. Runs alternate (off, on, off, on, ...) to
spread machine noise. Step time comes from the trainer's own ``StepDone`` events (start..end of each optimizer
step; the first ``--warmup`` steps of each run left out), so it is what the training loop feels; the sinks'
background threads compete for the same cores, which is part of the cost.

    OMP_NUM_THREADS=2 python benchmarks/bench_overhead.py --steps 60 --repeats 3

Prints the mean step time of each side, the difference with a 95% interval (Welch), and writes
benchmarks/results/overhead.json. Target: the difference within 1% of the step time.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

from _common import RESULTS, ROOT, machine, table, write_json

RESULTS_FILE = RESULTS / "overhead.json"


def one_run(on: bool, args: argparse.Namespace, receiver: Any) -> list[float]:
    from splade_obs.bus import RecordingSink
    from splade_obs.config import TrainConfig
    from splade_obs.events import StepDone
    from splade_obs.run import run_training

    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
        cfg = TrainConfig.from_mapping({
            "checkpoint": {"output_dir": f"{tmp}/out"},
            "data": {"train_file": str(ROOT / "splade_obs" / "demo" / "train.jsonl"), "val_file": None},
            "eval": {"eval_data": None},
            "optim": {"batch_size": args.batch_size, "max_steps": args.steps, "seed": 7},
            "logging": {"progress": "lines", "json_logs": True, "log_every_steps": 1},
            "tracking": {"enabled": True, "tracking_uri": f"sqlite:///{tmp}/mlflow.db", "system_metrics": True,
                         "experiment_name": "bench-overhead"},
            "tracing": {"exporter": "otlp", "trace_batches": "all", "metrics": True},
        })
        rec = RecordingSink()
        os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = receiver.endpoint
        result = run_training(cfg, extra_sinks=[rec], **({} if on else {"sinks": []}))
        assert result.status == "FINISHED", result.status
    return [(e.end_ns - e.start_ns) / 1e9 for e in rec.of(StepDone)][args.warmup:]


def welch(a: list[float], b: list[float]) -> tuple[float, float]:
    """mean(b) - mean(a) and the half-width of its 95% interval (normal approximation, Welch's variance)."""
    diff = statistics.fmean(b) - statistics.fmean(a)
    se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
    return diff, 1.96 * se


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--output", type=Path, default=RESULTS_FILE)
    args = ap.parse_args(argv)
    from tests._otlp_receiver import OtlpReceiver  # a real OTLP/HTTP receiver on 127.0.0.1 (the tests' own)

    times: dict[bool, list[float]] = {False: [], True: []}
    with OtlpReceiver() as rx:
        for _ in range(args.repeats):
            for on in (False, True):
                steps = one_run(on, args, rx)
                times[on] += steps
                print(f"  sinks {'on ' if on else 'off'}: {len(steps)} steps, mean {statistics.fmean(steps) * 1000:.1f} ms",
                      flush=True)
        spans = len(rx.snapshot())
    off, on = statistics.fmean(times[False]), statistics.fmean(times[True])
    diff, half = welch(times[False], times[True])
    res = {"steps_timed": {"off": len(times[False]), "on": len(times[True])}, "step_mean_s": {"off": off, "on": on},
           "step_median_s": {"off": statistics.median(times[False]), "on": statistics.median(times[True])},
           "difference_s": diff, "difference_95ci_s": [diff - half, diff + half],
           "difference_percent": 100 * diff / off, "difference_95ci_percent": [100 * (diff - half) / off,
                                                                              100 * (diff + half) / off],
           "otlp_spans_received": spans, "target_percent": 1.0}
    print(table((("", "<28"), ("sinks off", ">12"), ("every sink on", ">14")), [
        ("mean step, ms", f"{off * 1000:.1f}", f"{on * 1000:.1f}"),
        ("median step, ms", f"{res['step_median_s']['off'] * 1000:.1f}", f"{res['step_median_s']['on'] * 1000:.1f}"),
    ], rule=True))
    lo, hi = res["difference_95ci_percent"]
    print(f"difference: {res['difference_percent']:+.2f}% of the step (95% interval {lo:+.2f}% .. {hi:+.2f}%), "
          f"target within 1%; {spans} spans reached the OTLP receiver")
    write_json(args.output, {"machine": machine(), "command": "python benchmarks/bench_overhead.py "
                             f"--steps {args.steps} --repeats {args.repeats}", **res})
    print(f"wrote {args.output}")
    return res


if __name__ == "__main__":
    main()
