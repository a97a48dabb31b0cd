"""Cost curves (issue 34, point 4): how time and memory grow with the length of a run and with the corpus.

**Run length**: 100k ``StepDone`` events (the trainer's own event type, realistic values) go through the real
``EventBus`` and the sinks a run builds (``run.build_sinks``): console at ``--progress none``, JSON logs, the
metrics file, the errors file, a sqlite MLflow store (system metrics off: they sample the machine, not the run),
OpenTelemetry spans to ``traces.jsonl`` with the default batch sampling and OpenTelemetry metrics to
``metrics.jsonl``. No model runs: this measures what the telemetry costs and how it grows with the length of a
run. It reports events/s, the process's RSS growth between the first 1k steps and the end (goal: < 50 MB), the
size of every output per 1k steps, and the MLflow store's write latency (median of ``log_batch`` calls on a
probe run in the same store) before and after the run.

**Corpus** (``_scale_corpus.py``): ``splade-obs evaluate --index-dir`` on SciFact cycled to 5k, 50k and 500k
documents, in 1 and 2 processes, then the Seismic engine built from the same vectors: encode + index +
retrieve time per document (goal: flat within 1.3x), peak RSS against the index size, the engine's
queries/s, index size and recall@10 against exact.

    python benchmarks/bench_scale.py                       # both parts (the corpus part: ~60 min here)
    python benchmarks/bench_scale.py --part runlength       # 100k steps
    python benchmarks/bench_scale.py --part corpus --sizes 5000,50000 --procs 1
    python benchmarks/bench_scale.py --quick                # 2k steps, 500 and 2,000 documents (the suite's)

Prints side-by-side tables and writes benchmarks/results/scale_corpus.json or scale_runlength.json for one part,
scale.json for both (--output to change).
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

from _common import DEFAULT_DATA, RESULTS, machine, require_beir, table, write_json
from _scale_corpus import corpus_scaling, engine_worker

#: Where each ``--part`` writes by default.
RESULTS_FILES = {"all": RESULTS / "scale.json", "runlength": RESULTS / "scale_runlength.json",
                 "corpus": RESULTS / "scale_corpus.json"}
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
    ap.add_argument("--part", choices=("all", "runlength", "corpus"), default="all")
    ap.add_argument("--steps", type=int, default=100_000)
    ap.add_argument("--quick", action="store_true",
                    help="2k steps and corpora of 500 and 2,000 documents in one process: the suite's smoke run")
    ap.add_argument("--steps-per-second", type=float, default=0.0,
                    help="pace the events like a training loop (default: as fast as the bus takes them)")
    ap.add_argument("--sizes", default="5000,50000,500000", help="corpus sizes, comma-separated")
    ap.add_argument("--procs", default="1,2", help="process counts for the corpus part (2: under torchrun)")
    ap.add_argument("--engine", default="seismic", help="the engine measured beside exact ('none': skip)")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="SciFact (BEIR folder) to cycle")
    ap.add_argument("--output", type=Path, help="default: benchmarks/results/scale_<part>.json (scale.json: all)")
    ap.add_argument("--engine-worker", nargs=4, metavar=("ENGINE", "DATA", "INDEX", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.engine_worker:
        engine, data, index, out = args.engine_worker
        return engine_worker(engine, Path(data), Path(index), Path(out)) or {}
    res: dict[str, Any] = {}
    if args.part in ("all", "runlength"):
        res.update(_run_length_part(args))
    if args.part in ("all", "corpus"):
        res["corpus"] = _corpus_part(args)
    command = "python benchmarks/bench_scale.py" + ("" if args.part == "all" else f" --part {args.part}") + (
        " --quick" if args.quick else "") + (f" --steps {args.steps}" if args.steps != 100_000 else "") + (
        f" --steps-per-second {args.steps_per_second:g}" if args.steps_per_second else "") + (
        f" --sizes {args.sizes}" if not args.quick and args.sizes != "5000,50000,500000" else "") + (
        f" --procs {args.procs}" if args.procs != "1,2" else "")
    write_json(args.output or RESULTS_FILES[args.part], {"machine": machine(), "command": command, **res})
    print(f"wrote {args.output or RESULTS_FILES[args.part]}")
    return res


def _corpus_part(args: argparse.Namespace) -> dict[str, Any]:
    require_beir(args.data)
    sizes = [500, 2000] if args.quick else [int(s) for s in args.sizes.split(",")]
    procs = [1] if args.quick else [int(p) for p in args.procs.split(",")]
    engine = None if args.engine == "none" else args.engine
    if engine:
        from splade_obs.engines import require_engine
        from splade_obs.errors import ApplicationError

        try:
            require_engine(engine)
        except ApplicationError as exc:
            print(f"engine {engine!r}: {exc} — exact only")
            engine = None
    print(f"\ncorpus scaling: {', '.join(f'{n:,}' for n in sizes)} documents, {procs} process(es)", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-scale-corpus-") as tmp:
        res = corpus_scaling(args.data, sizes, procs, engine, Path(tmp))
    print(table((("docs", ">9"), ("procs", ">6"), ("encode s", ">10", ".1f"), ("index+retr s", ">13", ".2f"),
                 ("ms/doc", ">8", ".3f"), ("CPU ms/doc", ">11", ".3f"), ("peak RSS MB", ">12", ".0f"), ("index MB", ">9", ".1f"),
                 ("nDCG@10", ">8", ".4f")),
                [(f"{r['docs']:,}", str(r["processes"]), r["encode_docs_s"], r["index_and_retrieve_s"],
                  r["ms_per_doc"], r["cpu_ms_per_doc"], r["peak_rss_mb"], r["index_mb"], r["ndcg@10"]) for r in res["configs"]], rule=True))
    spread = ", ".join(f"{p} proc: {v:.2f}x" for p, v in res["time_per_doc_spread"].items())
    cpu_spread = ", ".join(f"{p} proc: {v:.2f}x" for p, v in res["cpu_per_doc_spread"].items() if v)
    print(f"time per document, largest / smallest (goal <= {res['time_per_doc_goal']}x): wall {spread}; "
          f"CPU per document added from one size to the next {cpu_spread}")
    print(f"peak RSS grew {res['rss_growth_mb']:.0f} MB while the index grew {res['index_growth_mb']:.0f} MB")
    if res["engine"]:
        print(table((("engine", "<9"), ("docs", ">9"), ("build s", ">8", ".2f"), ("queries/s", ">10", ".0f"),
                     ("exact q/s", ">10", ".0f"), ("index MB", ">9", ".1f"), ("recall@10 vs exact", ">19", ".4f"),
                     ("peak RSS MB", ">12", ".0f")),
                    [(e["engine"], f"{e['docs']:,}", e["build_s"], e["queries_per_s"], e["exact_queries_per_s"],
                      e["index_mb"], e["recall@10_vs_exact"], e["peak_rss_mb"]) for e in res["engine"]], rule=True))
    return res


def _run_length_part(args: argparse.Namespace) -> dict[str, Any]:
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
    return res


if __name__ == "__main__":
    main()
