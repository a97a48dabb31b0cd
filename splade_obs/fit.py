"""``splade-obs fit``: from a BEIR folder to a better model in one command, every choice made on a dev split.

Stages (each an OpenTelemetry span under one ``fit`` span, each recorded in ``<output>/fit_state.json``; the
pieces are in :mod:`splade_obs.fit_stages`):

1. **split**: :func:`~splade_obs.fit_stages.dev_size` of the train split's judged queries (a quarter, at most
   200, seeded by ``--split-seed``) are held out as ``dev``; ``<output>/data`` is a BEIR folder of the same
   corpus and queries with the splits ``train`` (the rest), ``dev`` and, when the folder has one, ``test``. Dev
   queries never reach the teacher or the trainer.
2. **teacher**: the hybrid teacher file (BM25 + SPLADE + a dense bi-encoder when sentence-transformers is
   installed, MarginMSE-scale scores, negatives sampled from its top 30, the corpus's titles as pseudo-queries
   when most documents have one), cached under ``<output>/cache`` by a digest of its inputs (corpus, queries,
   train qrels, model weights, settings): a rerun reuses it.
3. **train**: the distillation recipe (:data:`~splade_obs.fit_stages.RECIPE`, overridable by ``--config``) per
   seed, evaluated on dev at every epoch end, the best checkpoint kept; each seed is a nested MLflow run of the
   fit's run, and its run span a child of the stage span. A failed stage resumes from its last checkpoint on
   the next ``fit`` with the same ``--output-dir``; the stages before it are not redone.
4. **average** (``--seeds`` > 1): the seeds' best models averaged weight by weight; kept when it beats the
   best single seed on dev.
5. **report**: the chosen model, zero-shot, and BM25 (stemmed and not) on dev and (when the folder has one)
   test, side by side, the models encoding as training evaluated (lengths and autocast dtype, so the chosen
   model's dev score is the one it was chosen by); ``<output>/fit_report.json``, the fit run's metrics
   (``dev/<system>/ndcg_at_10``, ``test/...``) and the chosen model copied to ``<output>/model``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from .atomic import atomic_write_text
from .fit_stages import (SEEDS, FitOptions, FitResult, FitState, FitTrace, build_teacher, chosen_model, copy_model,
                         dev_ndcg, score_systems, span_traceparent, split_train_queries, timed, train_config)

log = logging.getLogger("splade_obs.fit")
QUALITY = ("ndcg@10", "mrr@10", "recall@100", "map@100")


class FitTracking:
    """The fit's own MLflow run (the parent of every seed's run); a store problem degrades to a warning; the
    report file keeps every number either way."""

    def __init__(self, cfg: Any, state: FitState, run_name: str) -> None:
        self.client, self.run_id, self.uri, self.experiment_id = None, None, None, None
        if not cfg.tracking.enabled:
            return
        try:
            from mlflow.tracking import MlflowClient

            from .sinks.mlflow.env import resolve_options
            from .sinks.mlflow.store import default_tracking_uri, prepare_sqlite_store, scheme

            options = resolve_options(cfg.tracking, run_name=run_name)
            uri = options.tracking_uri or default_tracking_uri()
            if scheme(uri) == "sqlite":
                prepare_sqlite_store(uri)
            self.client = MlflowClient(uri)
            previous = state.data.get("mlflow_run_id")
            if previous:
                self.client.update_run(previous, status="RUNNING")
                self.run_id = previous
            else:
                name = options.experiment_name or "splade-obs"
                exp = self.client.get_experiment_by_name(name)
                exp_id = exp.experiment_id if exp else self.client.create_experiment(name)
                run = self.client.create_run(exp_id, run_name=run_name,
                                             tags={"splade.kind": "fit", **dict(options.tags or {})})
                self.run_id = run.info.run_id
                state.put("mlflow_run_id", self.run_id)
            self.uri, self.experiment_id = uri, self.client.get_run(self.run_id).info.experiment_id
        except Exception as exc:  # noqa: BLE001 - tracking is optional; the report file has everything
            log.warning("MLflow: the fit run could not be opened (%s: %s); results go to fit_report.json only",
                        type(exc).__name__, str(exc).splitlines()[0][:200])
            self.client = None

    def call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        if self.client is None or self.run_id is None:
            return
        try:
            fn(self.run_id, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            log.warning("MLflow: %s failed for the fit run (%s)", what, type(exc).__name__)

    def log_params(self, params: dict[str, Any]) -> None:
        if self.client is not None:
            from mlflow.entities import Param

            self.call("log_batch", self.client.log_batch, params=[Param(k, str(v)) for k, v in params.items()])

    def stage(self, name: str, status: str, **values: Any) -> None:
        if self.client is not None:
            self.call("set_tag", self.client.set_tag, f"splade.fit.stage.{name}", status)
            for k, v in values.items():
                self.call("log_metric", self.client.log_metric, f"fit/{name}/{k}", float(v))


def fit(opts: FitOptions) -> FitResult:
    """Run (or resume) every stage of ``fit`` into ``opts.output_dir``; raises the failing stage's typed error."""
    from .config import TrainConfig
    from .shard import rank_device

    out = Path(opts.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = FitState(out / "fit_state.json")
    from .config import load_config_file

    layers = [({"checkpoint.output_dir": str(out)}, "splade-obs fit")]
    if opts.config_file is not None:  # its tracking/tracing settings are the fit run's too
        layers.append((load_config_file(opts.config_file), str(opts.config_file)))
    base = TrainConfig.from_sources(*layers, (opts.overrides, "command line"))
    run_name = base.tracking.run_name or f"fit-{Path(opts.data).resolve().name}"
    tracking = FitTracking(base, state, run_name)
    to_mlflow = (tracking.uri, tracking.experiment_id, tracking.run_id) if (
        tracking.client is not None and base.tracing.to_mlflow) else None
    tracer = FitTrace(base.tracing.exporter, out / "logs", base.tracing.service_name, base.tracing.shutdown_timeout,
                      mlflow=to_mlflow, run_name=run_name)
    device = rank_device(opts.device, None)  # "auto": the GPU when there is one
    if state.data.get("mlflow_run_id") == tracking.run_id and not state.done("split"):  # a new run: its params
        tracking.log_params({"fit.data": str(opts.data), "fit.model": opts.model, "fit.seeds": opts.seeds,
                             "fit.dev_queries": opts.dev_queries or "rule",
                             "fit.dense_model": opts.dense_model or "none"})
    error: BaseException | None = None
    try:
        result = _stages(opts, out, state, tracking, tracer, device, run_name)
        return result
    except BaseException as exc:
        error = exc
        raise
    finally:
        status = "FINISHED" if error is None else "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
        if tracking.client is not None:
            tracking.call("set_terminated", tracking.client.set_terminated, status=status)
        tracer.close(status, error)


def _stages(opts: FitOptions, out: Path, state: FitState, tracking: FitTracking, tracer: FitTrace,
            device: str, run_name: str) -> FitResult:
    from .device import resolve_runtime
    from .run import RunParent, run_training

    data = out / "data"
    with tracer.stage("split", **{"splade.fit.source": str(opts.data)}) as span:
        split = split_train_queries(Path(opts.data), data, opts.dev_queries, opts.split_seed)
        state.save("split", split)
        if span is not None:
            span.set_attributes({"splade.fit.dev_queries": len(split["dev_queries"]),
                                 "splade.fit.train_queries": split["train_queries"]})
    tracking.stage("split", "done", dev_queries=len(split["dev_queries"]), train_queries=split["train_queries"])
    log.info("fit: %d train queries, %d held out as dev%s", split["train_queries"], len(split["dev_queries"]),
             ", test split present" if split["has_test"] else "")

    with tracer.stage("teacher") as span:
        teacher = build_teacher(data, opts.model, opts.dense_model, out / "cache", device=device,
                                progress=opts.progress)
        state.save("teacher", teacher)
        if span is not None:
            span.set_attributes({"splade.fit.teacher.reused": teacher["reused"],
                                 "splade.fit.teacher.records": teacher["records"],
                                 "splade.fit.teacher.digest": teacher["digest"]})
    tracking.stage("teacher", "reused" if teacher["reused"] else "built", records=teacher["records"])

    seeds = list(SEEDS[:opts.seeds])
    probe = train_config(opts, data, teacher["file"], seeds[0], out / f"seed-{seeds[0]}")
    # the soup and the report score as training evaluated: the same lengths, under the same autocast
    scoring = {"lengths": (probe.model.max_query_length, probe.model.max_doc_length),
               "amp_dtype": resolve_runtime(device, probe.optim.mixed_precision).eval_amp_dtype}
    trained: dict[str, dict[str, Any]] = dict((state.done("train") or {}).get("seeds", {}))
    for seed in seeds:
        key = f"seed-{seed}"
        if key in trained:
            log.info("fit: %s already trained (%s)", key, trained[key]["model"])
            continue
        seed_dir = out / key
        cfg = train_config(opts, data, teacher["file"], seed, seed_dir)
        cfg = cfg.replace(tracking={"run_name": f"{run_name}-{key}"})
        with tracer.stage("train", **{"splade.fit.seed": seed}) as span:
            outcome = run_training(cfg, parent=RunParent(tracking.run_id, span_traceparent(span)),
                                   capture_root_logger=False)
            if outcome.status != "FINISHED":
                err = outcome.result.error
                raise err if err is not None else RuntimeError(f"training {key} ended {outcome.status}")
            model = chosen_model(seed_dir)
            best = json.loads((model / "metrics.json").read_text()) if (model / "metrics.json").is_file() else {}
            trained[key] = {"model": str(model), "dev_ndcg@10": best.get("ndcg@10"), "mlflow_run_id": outcome.run_id,
                            "trace_id": outcome.trace_id}
            state.save("train", {"seeds": trained})
    tracking.stage("train", "done", seeds=len(trained))

    candidates = {k: v["model"] for k, v in trained.items() if k in {f"seed-{s}" for s in seeds}}
    dev_scores = {k: v["dev_ndcg@10"] for k, v in trained.items() if k in candidates}
    chosen = max(candidates, key=lambda k: dev_scores[k] if dev_scores[k] is not None else float("-inf"))
    if len(candidates) > 1:
        with tracer.stage("average", **{"splade.fit.ingredients": len(candidates)}) as span:
            chosen, dev_scores = _average(out, candidates, dev_scores, chosen, data, device, state, scoring)
            if span is not None:
                span.set_attribute("splade.fit.chosen", chosen)
    chosen_path = candidates.get(chosen, str(out / "soup"))

    with tracer.stage("report", **{"splade.fit.chosen": chosen}):
        splits = ["dev", "test"] if state.done("split")["has_test"] else ["dev"]
        scores, seconds = timed(lambda: score_systems(data, splits, {"fit": chosen_path, "zero-shot": opts.model},
                                                      device=device, progress=opts.progress, **scoring))
        report = _report(scores, chosen, dev_scores, state, seconds)
        atomic_write_text(out / "fit_report.json", json.dumps(report, indent=2) + "\n")
        copy_model(Path(chosen_path), out / "model")
    _track_report(tracking, report, out)
    state.save("report", {"file": str(out / "fit_report.json"), "model": str(out / "model")})
    return FitResult(model_path=str(out / "model"), chosen=chosen, report=report, mlflow_run_id=tracking.run_id,
                     trace_id=tracer.trace_id)


def _average(out: Path, candidates: dict[str, str], dev_scores: dict[str, Any], chosen: str, data: Path,
             device: str, state: FitState, scoring: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    from .average import average_models

    done = state.done("average")
    if done is None:
        average_models(list(candidates.values()), out / "soup")
        done = {"model": str(out / "soup"), "dev_ndcg@10": dev_ndcg(str(out / "soup"), data, device=device,
                                                                        **scoring)}
        state.save("average", done)
    scores = {**dev_scores, "soup": done["dev_ndcg@10"]}
    best_single = dev_scores[chosen] if dev_scores[chosen] is not None else float("-inf")
    log.info("fit: the soup of %d seeds scores %.4f on dev, the best seed (%s) %.4f", len(candidates),
             done["dev_ndcg@10"], chosen, best_single)
    return ("soup" if done["dev_ndcg@10"] > best_single else chosen), scores


def _report(scores: dict[str, dict[str, Any]], chosen: str, dev_scores: dict[str, Any], state: FitState,
            seconds: float) -> dict[str, Any]:
    from .significance import paired_comparison

    report: dict[str, Any] = {"chosen": chosen, "dev_ndcg@10_by_candidate": dev_scores,
                              "dev_queries": len(state.done("split")["dev_queries"]),
                              "teacher": state.done("teacher"), "report_seconds": seconds, "splits": {}}
    for split, systems in scores.items():
        rows = {name: {k: v["metrics"][k] for k in QUALITY} for name, v in systems.items()}
        compare = {}
        for other in ("zero-shot", "bm25-stemmed", "bm25"):
            try:
                compare[other] = paired_comparison(systems["fit"]["per_query"], systems[other]["per_query"])
            except Exception as exc:  # noqa: BLE001 - too few queries for a test: said, not hidden
                compare[other] = {"error": str(exc)}
        report["splits"][split] = {"metrics": rows, "fit_vs": compare}
    return report


def _track_report(tracking: FitTracking, report: dict[str, Any], out: Path) -> None:
    if tracking.client is None:
        return
    from mlflow.entities import Metric
    import time

    now = int(time.time() * 1000)
    metrics = [Metric(f"{split}/{system}/{k.replace('@', '_at_')}", float(v), now, 0)
               for split, body in report["splits"].items() for system, row in body["metrics"].items()
               for k, v in row.items()]
    tracking.call("log_batch", tracking.client.log_batch, metrics=metrics)
    tracking.call("set_tag", tracking.client.set_tag, "splade.fit.chosen", report["chosen"])
    tracking.call("log_artifact", tracking.client.log_artifact, str(out / "fit_report.json"))
    tracking.call("log_artifact", tracking.client.log_artifact, str(out / "fit_state.json"))
    tracking.stage("report", "done")


def format_report(report: dict[str, Any]) -> str:
    """The side-by-side table the CLI prints: each split, each system, the quality metrics."""
    lines = []
    for split, body in report["splits"].items():
        lines.append(f"{split} ({'held out of train' if split == 'dev' else 'the folder’s test split'})")
        lines.append(f"  {'system':<14}" + "".join(f"{k:>12}" for k in QUALITY))
        for name, row in body["metrics"].items():
            lines.append(f"  {name:<14}" + "".join(f"{row[k]:>12.4f}" for k in QUALITY))
        for other, c in body["fit_vs"].items():
            if "error" not in c:
                lines.append(f"  fit vs {other:<12} nDCG@10 {c['mean_diff']:+.4f} (95% CI {c['ci95_low']:+.4f}.."
                             f"{c['ci95_high']:+.4f}, p={c['p_value']:.3f})")
    lines.append(f"chosen: {report['chosen']} (dev nDCG@10 of each candidate: "
                 + ", ".join(f"{k} {v:.4f}" for k, v in report["dev_ndcg@10_by_candidate"].items() if v is not None)
                 + ")")
    return "\n".join(lines)
