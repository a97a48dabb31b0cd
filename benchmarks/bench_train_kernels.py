"""CPU training kernels, current vs former: the loss curve stays within seed noise, and the speed (issue 36, point 2).

The configuration of ``bench_speed.py --part train`` (SciFact triples, batch 16 of query + positive + 1 hard
negative, lengths 64/256, auto precision) trains ``--steps`` steps for each seed of ``--seeds`` twice: with
the current CPU kernels (the int8 vocabulary pass with its argmax kept for the backward, fast dropout masks)
and with the former ones (the plain pass in the autocast dtype, torch's dropout masks; ``bench_speed.py``'s
``FORMER_KERNELS``). The fused AdamW step is the same in both. Each run is its own process, run one after
another; the seed fixes the data order and the initial random state, so a pair of runs with one seed differs
only in the kernels (and, through the masks, in which elements dropout drops: a seed-like change by itself).

It prints the mean loss of each window of ``--window`` steps for both kernels (mean and sd over seeds), the
difference, and a verdict on the run's mean loss after the first window: the kernels are "within seed noise"
when the difference of the two means is at most twice its standard error from the seeds' spread::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_train_kernels.py          # ~10 min here
    .venv/bin/python benchmarks/bench_train_kernels.py --quick                    # checks the script
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import CONFIGS, DEFAULT_DATA, RESULTS, machine, require_beir, table, write_json

KERNELS = ("current", "former")


def train_once(args: argparse.Namespace) -> dict:
    """One run in this process: its per-step losses, samples/s and the kernels it used."""
    import bench_quality as bq
    from bench_speed import FORMER_KERNELS
    from splade_obs.bus import RecordingSink
    from splade_obs.events import ModelLoaded, StepDone
    from splade_obs.run import run_training

    bq.ensure_triples(args.triples, args.data, 256, bq.is_distill(args.config))
    overrides = {"optim.seed": args.seed, "logging.progress": "none"}
    if args.kernels == "former":
        overrides.update(FORMER_KERNELS)
    if args.quick:
        overrides.update({"model.max_query_length": 16, "model.max_doc_length": 32, "optim.batch_size": 4})
    with tempfile.TemporaryDirectory(prefix="bench-kernels-") as tmp:
        cfg = bq.train_config(args.config, args.triples, Path(tmp), max_steps=args.steps, overrides=overrides)
        rec = RecordingSink()
        result = run_training(cfg, extra_sinks=(rec,))
    steps = rec.of(StepDone)
    loaded = rec.of(ModelLoaded)[0]
    ends = [s.end_ns / 1e9 for s in steps]
    return {"status": result.status, "seed": args.seed, "kernels": args.kernels, "head_pass": loaded.head_pass,
            "dropout_masks": loaded.dropout_masks, "losses": [s.loss for s in steps],
            "samples_per_s": bq.throughput(ends, cfg.optim.batch_size, min(args.skip, len(ends) - 2))}


def child(args: argparse.Namespace, kernels: str, seed: int) -> dict:
    cmd = [sys.executable, __file__, "--side", kernels, "--seed", str(seed), "--steps", str(args.steps),
           "--data", str(args.data), "--triples", str(args.triples), "--config", str(args.config),
           "--skip", str(args.skip)] + (["--quick"] if args.quick else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{kernels} seed {seed} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def compare(runs: dict[str, list[dict]], window: int) -> dict:
    """Window means per kernels (mean, sd over seeds) and the verdict on the mean loss after the first window."""
    steps = min(len(r["losses"]) for rs in runs.values() for r in rs)
    windows = []
    for start in range(0, steps, window):
        row = {"steps": [start + 1, min(start + window, steps)]}
        for k, rs in runs.items():
            row[k] = _mean_sd([statistics.fmean(r["losses"][start:start + window]) for r in rs])
        row["difference"] = row["current"][0] - row["former"][0]
        windows.append(row)
    after = {k: [statistics.fmean(r["losses"][min(window, steps - 1):steps]) for r in rs] for k, rs in runs.items()}
    (mc, sc), (mf, sf) = _mean_sd(after["current"]), _mean_sd(after["former"])
    se = math.sqrt(sc ** 2 / len(after["current"]) + sf ** 2 / len(after["former"]))
    diff = mc - mf
    return {"windows": windows, "after_first_window": {"current": after["current"], "former": after["former"],
                                                       "difference": diff, "standard_error": se},
            "within_seed_noise": abs(diff) <= 2 * se}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--config", type=Path, default=CONFIGS / "scifact_finetune.toml")
    ap.add_argument("--triples", type=Path, default=Path("/tmp/splade-obs-bench/scifact_train_triples.jsonl"))
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--window", type=int, default=25, help="steps per row of the loss table")
    ap.add_argument("--skip", type=int, default=5, help="first steps left out of samples/s")
    ap.add_argument("--quick", action="store_true", help="2 seeds x 6 steps at lengths 16/32, batch 4")
    ap.add_argument("--output", type=Path, help="default: benchmarks/results/train_kernels[_quick].json")
    ap.add_argument("--side", choices=KERNELS, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        args.kernels = args.side
        print(json.dumps(train_once(args)))
        return
    require_beir(args.data)
    if args.quick:
        args.steps, args.seeds, args.window, args.skip = 6, "1,2", 3, 2
    seeds = [int(s) for s in args.seeds.split(",")]
    runs: dict[str, list[dict]] = {k: [] for k in KERNELS}
    for seed in seeds:
        for k in KERNELS:
            runs[k].append(child(args, k, seed))
    result = compare(runs, args.window)
    speed = {k: statistics.fmean(r["samples_per_s"] for r in rs) for k, rs in runs.items()}
    print(f"{args.steps} steps x seeds {seeds}; current: head pass {runs['current'][0]['head_pass']}, masks "
          f"{runs['current'][0]['dropout_masks']}; former: head pass {runs['former'][0]['head_pass']}, masks "
          f"{runs['former'][0]['dropout_masks']}")
    rows = [[f"{w['steps'][0]}-{w['steps'][1]}", f"{w['current'][0]:.4f} ± {w['current'][1]:.4f}",
             f"{w['former'][0]:.4f} ± {w['former'][1]:.4f}", f"{w['difference']:+.4f}"] for w in result["windows"]]
    print(table([("steps", "<9"), ("current (mean ± sd)", ">20"), ("former (mean ± sd)", ">20"),
                 ("difference", ">11")], rows, rule=True))
    a = result["after_first_window"]
    print(f"mean loss after the first window: difference {a['difference']:+.4f}, standard error from the seeds "
          f"{a['standard_error']:.4f}: {'within' if result['within_seed_noise'] else 'NOT within'} seed noise")
    print(f"samples/s (mean over seeds): current {speed['current']:.2f}, former {speed['former']:.2f} "
          f"({speed['current'] / speed['former']:.2f}x)")
    out = args.output or RESULTS / ("train_kernels_quick.json" if args.quick else "train_kernels.json")
    write_json(out, {"benchmark": "train_kernels", "date": dt.datetime.now().isoformat(timespec="seconds"),
                     "machine": machine(), "steps": args.steps, "seeds": seeds, "window": args.window,
                     "config": str(args.config), "samples_per_s": speed, **result, "runs": runs})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
