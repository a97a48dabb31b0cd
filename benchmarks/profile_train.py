"""Where a training step's time goes (issue 36, point 2): ``torch.profiler`` over steps of the configuration
``bench_speed.py --part train`` measures (batch 16, query + positive + 1 hard negative, lengths 64/256, auto
precision), printed as the operators' table sorted by their own CPU time.

The profiler skips the first ``--wait`` steps (start-up), warms up one, then records ``--active`` steps; a
global optimizer step hook advances it after every optimizer step (``StepDone`` events cannot: the trainer
hands them to the bus in groups, not at each step's end). The table and the profiled steps' mean wall
time go to stdout and, with ``--output``, to a text file::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/profile_train.py --output /tmp/profile.txt
    .venv/bin/python benchmarks/profile_train.py --quick     # 2 recorded steps at lengths 16/32: checks the script
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from _common import CONFIGS, DEFAULT_DATA, require_beir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--config", type=Path, default=CONFIGS / "scifact_finetune.toml")
    ap.add_argument("--triples", type=Path, default=Path("/tmp/splade-obs-bench/scifact_train_triples.jsonl"))
    ap.add_argument("--wait", type=int, default=4, help="steps left out before profiling (start-up)")
    ap.add_argument("--active", type=int, default=8, help="steps recorded")
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--output", type=Path)
    args = ap.parse_args()
    require_beir(args.data)

    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    from torch.optim.optimizer import register_optimizer_step_post_hook

    import bench_quality as bq
    from splade_obs.run import run_training

    overrides = {"model.max_query_length": 16, "model.max_doc_length": 32} if args.quick else {}
    if args.quick:
        args.wait, args.active = 1, 2
    bq.ensure_triples(args.triples, args.data, 256, bq.is_distill(args.config))
    ends: list[float] = []

    steps = args.wait + 1 + args.active
    with tempfile.TemporaryDirectory(prefix="profile-train-") as tmp:
        cfg = bq.train_config(args.config, args.triples, Path(tmp), max_steps=steps + 1, overrides=overrides)
        with profile(activities=[ProfilerActivity.CPU],
                     schedule=schedule(wait=args.wait, warmup=1, active=args.active, repeat=1)) as prof:
            def stepped(*_: object) -> None:
                ends.append(time.perf_counter())
                prof.step()

            handle = register_optimizer_step_post_hook(stepped)
            try:
                result = run_training(cfg)
            finally:
                handle.remove()
    if result.status != "FINISHED":
        sys.exit(f"training ended {result.status}")
    recorded = ends[args.wait + 1:args.wait + 1 + args.active]
    step_s = (recorded[-1] - ends[args.wait]) / len(recorded)
    header = (f"{len(recorded)} profiled steps of batch {cfg.optim.batch_size} at lengths "
              f"{cfg.model.max_query_length}/{cfg.model.max_doc_length}, {cfg.optim.mixed_precision} precision, "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads: {step_s * 1000:.0f} ms a step "
              f"({cfg.optim.batch_size / step_s:.1f} samples/s, profiler on)")
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows)
    print(header)
    print(table)
    if args.output:
        args.output.write_text(header + "\n" + table + "\n", encoding="utf-8")
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
