"""Run-length scaling: many step events through the real bus and every real sink (issue 34, point 4).

100k ``StepDone`` events (the trainer's own event type, realistic values) go through the real ``EventBus`` and
the sinks a run builds (``run.build_sinks``): console at ``--progress none``, JSON logs, the metrics file, the
errors file, a sqlite MLflow store (system metrics off: they sample the machine, not the run), OpenTelemetry
spans to ``traces.jsonl`` with the default batch sampling and OpenTelemetry metrics to ``metrics.jsonl``. No
model runs: this measures what the telemetry costs and how it grows with the length of a run.

It reports events/s, the process's RSS growth between the first 1k steps and the end (goal: < 50 MB), the
size of every output per 1k steps, and the MLflow store's write latency (median of ``log_batch`` calls on a
probe run in the same store) before and after the run.

    python benchmarks/bench_scale.py                 # 100k steps
    python benchmarks/bench_scale.py --quick         # 2k steps (tests/test_bench_scale.py)

Prints a side-by-side table and writes benchmarks/results/scale_runlength.json (--output to change).
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import RESULTS, machine, table, write_json

RESULTS_FILE = RESULTS / "scale_runlength.json"
#: The growth of the process's RSS over the run that the issue sets as the goal (MB).
RSS_GOAL_MB = 50.0


def _rss_mb() -> float:
    import psutil

    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


def _write_latency_ms(uri: str, run_id: str, calls: int = 15) -> float:
    """Median wall time of one ``log_batch`` of 10 metrics on ``run_id`` (the store's write path)."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client, times = MlflowClient(uri), []
    client.log_batch(run_id, metrics=[Metric("probe/warm", 0.0, int(time.time() * 1000), 0)])  # session, tables
    for i in range(calls):
        metrics = [Metric(f"probe/m{j}", float(i + j), int(time.time() * 1000), i) for j in range(10)]
        t0 = time.perf_counter()
        client.log_batch(run_id, metrics=metrics)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def _step(n: int, total: int, steps_per_epoch: int, t_ns: int) -> Any:
    from splade_obs.events import StepDone

    wobble = 1.0 + 0.1 * math.sin(n / 7.0)
    return StepDone(step=n, epoch=(n - 1) // steps_per_epoch + 1, batch_index=(n - 1) % steps_per_epoch,
                    loss=0.5 / math.sqrt(n) * wobble, parts={"base": 0.4 / math.sqrt(n), "query_reg": 0.01,
                                                            "doc_reg": 0.02},
                    learning_rate=5e-5 * min(1.0, n / 1000), grad_norm=0.8 * wobble, batch_size=16,
                    num_tokens=6000, samples_per_second=24.0 * wobble, tokens_per_second=9000.0 * wobble,
                    query_nnz=20.0, doc_nnz=90.0, retrieval_flops=2.5, lambda_q=5e-4, lambda_d=3e-4,
                    start_ns=t_ns - 40_000_000, end_ns=t_ns, time_ns=t_ns,
                    timings={"forward": 0.02, "backward": 0.015, "optimizer": 0.005}, total_steps=total,
                    epoch_progress=n / steps_per_epoch)


def run_length(steps: int, work: Path, rate: float = 0.0) -> dict[str, Any]:
    """Push ``steps`` step events (10 epochs' worth of epoch events) through the real sinks into ``work``;
    ``rate`` > 0 paces them at that many steps per second (0: as fast as the bus takes them)."""
    from mlflow.tracking import MlflowClient

    from splade_obs.bus import EventBus
    from splade_obs.config import TrainConfig
    from splade_obs.events import EpochDone, EpochStarted, RunFinished, RunStarted, now_ns
    from splade_obs.log_context import LogContextSink
    from splade_obs.logging_setup import setup_logging, teardown_logging
    from splade_obs.run import build_sinks

    uri = f"sqlite:///{work / 'mlflow.db'}"
    cfg = TrainConfig.from_mapping({
        "checkpoint": {"output_dir": str(work / "out")},
        "logging": {"progress": "none", "json_logs": True, "log_level": "WARNING"},
        # events come much faster than a real run's steps: the close may take long, but every point goes in
        "tracking": {"tracking_uri": uri, "experiment_name": "bench-scale", "system_metrics": False,
                     "shutdown_timeout": 3600.0},
        "tracing": {"exporter": "file", "metrics": True}})
    cfg.log_dir.mkdir(parents=True, exist_ok=True)
    probe_client = MlflowClient(uri)
    probe = probe_client.create_run(probe_client.create_experiment("probe")).info.run_id
    latency_before = _write_latency_ms(uri, probe)

    setup_logging(cfg.logging.log_level, cfg.log_dir, cfg.logging.json_logs, capture_root=False)
    bus = EventBus([LogContextSink()])
    for sink in build_sinks(cfg, run_name="bench-scale"):
        bus.add(sink)
    bus.open()
    epochs = 10 if steps >= 10 else 1
    per_epoch = steps // epochs
    total = per_epoch * epochs
    bus.emit(RunStarted(run_name="bench-scale", config=cfg.to_dict(), system_info={}, total_steps=total,
                        num_epochs=epochs, steps_per_epoch=per_epoch, params=cfg.params(),
                        output_dir=str(cfg.output_dir), log_dir=str(cfg.log_dir)))
    rss: dict[int, float] = {}
    t0 = time.perf_counter()
    n = 0
    for epoch in range(1, epochs + 1):
        bus.emit(EpochStarted(epoch=epoch, num_epochs=epochs, steps_in_epoch=per_epoch))
        start = now_ns()
        for _ in range(per_epoch):
            n += 1
            if rate > 0:  # a training loop's pace: the time between steps is spent outside Python
                time.sleep(max(0.0, t0 + n / rate - time.perf_counter()))
            bus.emit(_step(n, total, per_epoch, now_ns()))
            if n == min(1000, total) or n == total:
                rss[n] = _rss_mb()
        bus.emit(EpochDone(epoch=epoch, num_epochs=epochs, step=n, duration_seconds=(now_ns() - start) / 1e9,
                           means={"epoch/loss": 0.1}, steps_completed=per_epoch, start_ns=start))
    emit_s = time.perf_counter() - t0
    bus.emit(RunFinished(status="FINISHED", step=n, duration_seconds=emit_s, final_metrics={"epoch/loss": 0.1},
                         output_dir=str(cfg.output_dir)))
    t1 = time.perf_counter()
    bus.close(timeout=600)
    close_s = time.perf_counter() - t1
    teardown_logging()
    rss_end = _rss_mb()
    latency_after = _write_latency_ms(uri, probe)
    sizes = {p.name: p.stat().st_size for p in sorted(cfg.log_dir.iterdir()) if p.is_file()}
    sizes["mlflow.db"] = (work / "mlflow.db").stat().st_size
    run = [r for r in probe_client.search_runs([probe_client.get_experiment_by_name("bench-scale").experiment_id])]
    losses = probe_client.get_metric_history(run[0].info.run_id, "train/loss") if run else []
    first = min(rss)
    return {"steps": n, "paced_steps_per_second": rate or None, "emit_seconds": emit_s, "close_seconds": close_s, "events_per_second": n / emit_s,
            "rss_mb_at_step": {str(k): v for k, v in sorted(rss.items())}, "rss_mb_after_close": rss_end,
            "rss_growth_mb": max(rss.values()) - rss[first], "rss_growth_goal_mb": RSS_GOAL_MB,
            "bytes_per_1k_steps": {k: v * 1000 / n for k, v in sizes.items()},
            "mlflow_write_latency_ms": {"before": latency_before, "after": latency_after},
            "mlflow_train_loss_points": len(losses), "unsent_file": "mlflow_unsent.jsonl" in sizes,
            "bus": bus.stats()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=100_000)
    ap.add_argument("--quick", action="store_true", help="2k steps: the suite's smoke run")
    ap.add_argument("--steps-per-second", type=float, default=0.0,
                    help="pace the events like a training loop (default: as fast as the bus takes them)")
    ap.add_argument("--output", type=Path, default=RESULTS_FILE)
    args = ap.parse_args(argv)
    steps = 2_000 if args.quick else args.steps
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        res = run_length(steps, Path(tmp), args.steps_per_second)
    pace = f" at {args.steps_per_second:g} steps/s" if args.steps_per_second else ", unpaced"
    print(f"\nrun length: {res['steps']:,} step events through every sink{pace}")
    print(table((("measure", "<52"), ("value", ">16")), [
        ("events/s on the emitting thread", f"{res['events_per_second']:,.0f}"),
        ("close (flush everything) s", f"{res['close_seconds']:.1f}"),
        ("train/loss points in MLflow", f"{res['mlflow_train_loss_points']:,}"),
        (f"RSS growth after step 1k, MB (goal < {RSS_GOAL_MB:.0f})", f"{res['rss_growth_mb']:.1f}"),
        ("MLflow log_batch latency before / after, ms",
         f"{res['mlflow_write_latency_ms']['before']:.1f} / {res['mlflow_write_latency_ms']['after']:.1f}"),
    ], rule=True))
    print(table((("output", "<30"), ("bytes per 1k steps", ">20")),
                [(k, f"{v:,.0f}") for k, v in res["bytes_per_1k_steps"].items()], rule=True))
    command = "python benchmarks/bench_scale.py" + (" --quick" if args.quick else f" --steps {args.steps}") + (
        f" --steps-per-second {args.steps_per_second:g}" if args.steps_per_second else "")
    write_json(args.output, {"machine": machine(), "command": command, **res})
    print(f"wrote {args.output}")
    return res


if __name__ == "__main__":
    main()
