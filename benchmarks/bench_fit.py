"""``splade-obs fit`` with its defaults on SciFact, against zero-shot, BM25 and plain ``train`` (issue 35).

Runs, as a user would, in a fresh process each, measuring wall time, CPU time and peak RSS (the process tree):

1. ``splade-obs fit --data SCIFACT`` (one seed unless ``--seeds``): dev split held out of train, hybrid teacher,
   distillation, best checkpoint on dev, report;
2. ``splade-obs train --train-file SCIFACT`` with the defaults for a BEIR folder (plain training);

then scores on SciFact test: zero-shot splade-tiny, BM25 with and without stemming, the plain model and the fit
model, each pair compared query by query (paired randomisation test and bootstrap CI on nDCG@10,
``splade_obs.significance``). Targets (issue 35): fit >= zero-shot + 0.03 nDCG@10 and above stemmed BM25; plain
train above zero-shot; the whole fit under 45 minutes on 2 CPU cores.

    OMP_NUM_THREADS=2 python benchmarks/bench_fit.py                 # ~35 min on 2 idle cores (fit: 28)
    python benchmarks/bench_fit.py --work /tmp/fit --reuse           # score runs already in --work
    python benchmarks/bench_fit.py --data DIR --fit-args "--dense-model none" --train-args "--max-steps 20"

Prints a side-by-side table and writes benchmarks/results/bench_fit.json (--output to change).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import CLI_MODULE, DEFAULT_DATA, KEYS, RESULTS, machine, require_beir, run_measured, table, write_json

RESULTS_FILE = RESULTS / "bench_fit.json"
FIT_GAIN_GOAL = 0.03
FIT_MINUTES_GOAL = 45


def _cli(args: list[str], work: Path, name: str) -> dict[str, float]:
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", PYTHONUNBUFFERED="1")
    wall, cpu, peak = run_measured([sys.executable, "-m", CLI_MODULE, *args], env, work / f"{name}.log")
    print(f"  {name}: {wall / 60:.1f} min wall, {cpu / 60:.1f} min CPU, peak RSS {peak:.0f} MB", flush=True)
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_mb": peak}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--work", type=Path, default=None, help="where the runs go (default: a temporary folder)")
    ap.add_argument("--reuse", action="store_true", help="score the runs already in --work, train nothing")
    ap.add_argument("--runs", default="fit,plain", help="which runs to make (the others must be in --work)")
    ap.add_argument("--no-score", action="store_true", help="make the runs only (score later with --reuse)")
    ap.add_argument("--fit-args", default="", help="more options for the fit command (one string)")
    ap.add_argument("--train-args", default="", help="more options for the plain train command (one string)")
    ap.add_argument("--output", type=Path, default=RESULTS_FILE)
    args = ap.parse_args(argv)
    require_beir(args.data)
    with tempfile.TemporaryDirectory(prefix="bench-fit-") as tmp:
        work = (args.work or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        res = run(args, work)
    command = ["python", "benchmarks/bench_fit.py", *(["--seeds", str(args.seeds)] if args.seeds != 1 else []),
               *(["--fit-args", args.fit_args] if args.fit_args else []),
               *(["--train-args", args.train_args] if args.train_args else [])]
    write_json(args.output, {"machine": machine(), "command": shlex.join(command), **res})
    print(f"wrote {args.output}")
    return res


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from splade_obs.fit_stages import score_systems
    from splade_obs.significance import paired_comparison

    uri = f"sqlite:///{work / 'mlruns' / 'mlflow.db'}"
    costs_file = work / "costs.json"
    costs: dict[str, Any] = json.loads(costs_file.read_text()) if costs_file.is_file() else {}
    runs = [] if args.reuse else args.runs.split(",")
    if "fit" in runs:
        print(f"fit on {args.data} (work: {work})", flush=True)
        costs["fit"] = _cli(["fit", "--data", str(args.data), "--output-dir", str(work / "fit"), "--seeds",
                             str(args.seeds), "--tracking-uri", uri, "--progress", "lines",
                             *shlex.split(args.fit_args)], work, "fit")
        costs_file.write_text(json.dumps(costs))
    if "plain" in runs:
        print(f"plain train on {args.data} (work: {work})", flush=True)
        costs["plain"] = _cli(["train", "--train-file", str(args.data), "--output-dir", str(work / "plain"),
                               "--tracking-uri", uri, "--progress", "lines", *shlex.split(args.train_args)],
                              work, "plain")
        costs_file.write_text(json.dumps(costs))
    if args.no_score:
        return {"costs": costs}
    fit_report = json.loads((work / "fit" / "fit_report.json").read_text())
    scores = score_systems(work / "fit" / "data", ["test"], {
        "zero-shot": "splade-tiny", "plain train": str(work / "plain" / "final"),
        "fit": str(work / "fit" / "model")}, device="cpu")["test"]
    rows = {name: {k: v["metrics"][k] for k in KEYS} for name, v in scores.items()}
    pairs = [("fit", "zero-shot"), ("fit", "bm25-stemmed"), ("fit", "bm25"), ("fit", "plain train"),
             ("plain train", "zero-shot")]
    compare = {f"{a} vs {b}": paired_comparison(scores[a]["per_query"], scores[b]["per_query"]) for a, b in pairs}
    ndcg = {name: row["ndcg@10"] for name, row in rows.items()}
    targets = {
        f"fit >= zero-shot + {FIT_GAIN_GOAL}": ndcg["fit"] >= ndcg["zero-shot"] + FIT_GAIN_GOAL,
        "fit > stemmed BM25": ndcg["fit"] > ndcg["bm25-stemmed"],
        "plain train > zero-shot": ndcg["plain train"] > ndcg["zero-shot"],
    }
    if "fit" in costs:
        targets[f"fit under {FIT_MINUTES_GOAL} min"] = costs["fit"]["wall_s"] < FIT_MINUTES_GOAL * 60

    print(f"\n{args.data.name} test ({len(scores['fit']['per_query'])} queries)")
    print(table((("system", "<14"), *((k, ">11", ".4f") for k in KEYS)),
                [(name, *(row[k] for k in KEYS)) for name, row in rows.items()], rule=True))
    print(table((("nDCG@10", "<26"), ("diff", ">8", "+.4f"), ("95% CI", ">18"), ("p", ">7", ".4f")),
                [(name, c["mean_diff"], f"{c['ci95_low']:+.4f}..{c['ci95_high']:+.4f}", c["p_value"])
                 for name, c in compare.items()], rule=True))
    if costs:
        print(table((("run", "<12"), ("wall min", ">9", ".1f"), ("CPU min", ">8", ".1f"), ("peak RSS MB", ">12", ".0f")),
                    [(n, c["wall_s"] / 60, c["cpu_s"] / 60, c["peak_rss_mb"]) for n, c in costs.items()], rule=True))
    for name, ok in targets.items():
        print(f"  {'met' if ok else 'NOT met'}: {name}")
    dev = fit_report["splits"]["dev"]["metrics"]
    return {"test": rows, "paired": compare, "targets": targets, "costs": costs, "seeds": args.seeds,
            "fit_dev": dev, "fit_chosen": fit_report["chosen"], "teacher": fit_report["teacher"]}


if __name__ == "__main__":
    main()
