"""Step-time overhead of the MLflow sink: the real trainer on the real splade-tiny, MLflow on vs off.

Each configuration trains the same few steps (same seed, same data) into its own temp folder; the MLflow
run goes to a sqlite store in that folder (or to --tracking-uri, e.g. a server). Step time comes from the
trainer's own StepDone events (start_ns..end_ns, the first --warmup steps left out), so it measures what
the step loop feels, not the sink's background work. Runs alternate (off, on, off, on...) to spread
machine noise evenly.

    python benchmarks/bench_mlflow_overhead.py --steps 12 --repeats 2

Prints a side-by-side table and writes benchmarks/results/mlflow_overhead.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Any

# the benchmarks' shared preamble (repository root on sys.path, paths, table printer, results writer)
from _common import RESULTS, table, write_json

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # this script's own: tokenizers without their thread pool
RESULTS_FILE = RESULTS / "mlflow_overhead.json"


def one_run(mlflow_on: bool, args: argparse.Namespace) -> dict[str, Any]:
    from splade_obs.config import TrainConfig
    from splade_obs.bus import RecordingSink
    from splade_obs.events import StepDone
    from splade_obs.run import run_training

    with tempfile.TemporaryDirectory(prefix="bench-mlflow-") as tmp:
        cfg = TrainConfig.from_mapping({
            "checkpoint": {"output_dir": f"{tmp}/out"},
            "optim": {"batch_size": args.batch_size, "max_steps": args.steps, "seed": 7},
            "model": {"max_query_length": 16, "max_doc_length": args.doc_length},
            "tracking": {"enabled": mlflow_on, "tracking_uri": args.tracking_uri or f"sqlite:///{tmp}/m.db",
                         "experiment_name": "bench-mlflow-overhead", "log_model": args.log_model},
            "tracing": {"exporter": "none"},
            "logging": {"progress": "none", "log_level": "WARNING"},
        })
        rec = RecordingSink()
        t0 = time.perf_counter()
        out = run_training(cfg, extra_sinks=[rec])
        wall = time.perf_counter() - t0
    steps = [e for e in rec.of(StepDone)][args.warmup:]
    step_s = [(e.end_ns - e.start_ns) / 1e9 for e in steps]
    return {"mlflow": mlflow_on, "status": out.status, "wall_seconds": wall, "steps_timed": len(step_s),
            "step_mean_s": statistics.fmean(step_s), "step_median_s": statistics.median(step_s),
            "step_max_s": max(step_s), "samples_per_second": statistics.fmean(e.samples_per_second for e in steps),
            "mlflow_sink_stats": out.bus_stats.get("mlflow")}


def summarize(runs: list[dict[str, Any]], on: bool) -> dict[str, float]:
    sel = [r for r in runs if r["mlflow"] is on]
    return {k: statistics.fmean(r[k] for r in sel)
            for k in ("step_mean_s", "step_median_s", "step_max_s", "samples_per_second", "wall_seconds")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--doc-length", type=int, default=32)
    ap.add_argument("--tracking-uri", default=None, help="default: a sqlite store in a temp folder")
    ap.add_argument("--log-model", action="store_true", help="also log the pyfunc model (end-of-run cost only)")
    args = ap.parse_args()

    runs = []
    for _ in range(args.repeats):
        for on in (False, True):
            runs.append(one_run(on, args))
            print(f"  mlflow={'on ' if on else 'off'} step mean {runs[-1]['step_mean_s'] * 1000:8.1f} ms "
                  f"wall {runs[-1]['wall_seconds']:6.1f} s  ({runs[-1]['status']})", flush=True)
    off, on = summarize(runs, False), summarize(runs, True)
    rows = [("step mean (ms)", "step_mean_s", 1000), ("step median (ms)", "step_median_s", 1000),
            ("step max (ms)", "step_max_s", 1000), ("samples/s", "samples_per_second", 1),
            ("run wall time (s)", "wall_seconds", 1)]
    print("\n" + table([("metric", "<20"), ("MLflow off", ">14", ".2f"), ("MLflow on", ">14", ".2f"), ("overhead", ">12")],
                       [(label, off[key] * scale, on[key] * scale,
                         f"{(on[key] / off[key] - 1) * 100 if off[key] else float('nan'):+.1f}%")
                        for label, key, scale in rows]))
    write_json(RESULTS_FILE, {"settings": vars(args), "off": off, "on": on, "runs": runs})
    print(f"\nwrote {RESULTS_FILE}")


if __name__ == "__main__":
    main()
