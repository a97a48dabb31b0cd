"""Open a run: logging, sinks, the bus, the trainer. The one place that knows every sink.

``run_training(cfg)`` is what ``splade-obs train`` calls; tests call it directly with extra sinks.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from .checkpoint import find_resume_checkpoint, read_trainer_state
from .config import TrainConfig
from .errors import ConfigError
from .distributed import dist_from_env
from .events import EventBus, Sink
from .recovery import validate_file_exists
from .train import Trainer, TrainResult, resolve_amp, resolve_device, dtype_name

log = logging.getLogger("splade_obs.run")


@dataclass
class RunResult:
    result: TrainResult
    bus_stats: dict[str, Any]
    shared: dict[str, Any]

    @property
    def status(self) -> str:
        return self.result.status


def check_inputs(cfg: TrainConfig) -> None:
    """Fail fast on bad inputs, before logging files, sinks or the model are set up."""
    from .checkpoint import list_checkpoints
    from .train import parse_faults, resolve_amp, resolve_device

    if cfg.data.train_file:
        p = Path(cfg.data.train_file)
        validate_file_exists(p, kind="dir" if p.is_dir() else "file", what="training data")
    if cfg.eval.eval_data:
        validate_file_exists(cfg.eval.eval_data, kind="dir", what="--eval-data BEIR folder")
    find_resume_checkpoint(cfg.output_dir, cfg.checkpoint.resume)
    existing = list_checkpoints(cfg.output_dir)
    if existing and not cfg.checkpoint.resume:
        raise ConfigError(f"output dir already holds checkpoints of another run (latest: {existing[-1].name})",
                          file_path=str(cfg.output_dir), field="checkpoint.output_dir",
                          hint="continue it with --resume auto, or choose a new --output-dir")
    parse_faults(cfg.recovery.inject_faults)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:  # under torchrun each rank picks its own device
        resolve_amp(cfg.optim.mixed_precision, resolve_device(cfg.optim.device))


def build_sinks(cfg: TrainConfig, bus: EventBus, *, rank: int, world_size: int,
                resume_run_id: str | None) -> list[Sink]:
    """Local sinks always; OpenTelemetry before MLflow so the trace id is known when MLflow tags the run."""
    from .sinks.console import LogSink
    from .sinks.errors_file import ErrorsFileSink
    from .sinks.metrics_file import MetricsFileSink
    from .sinks.progress import ProgressSink

    log_dir = cfg.log_dir
    sinks: list[Sink] = [LogSink(), ErrorsFileSink(log_dir), MetricsFileSink(log_dir),
                         ProgressSink(cfg.logging.progress, cfg.logging.progress_interval)]
    if rank == 0 and cfg.tracking.enabled:
        from .sinks.mlflow_sink import MlflowSink
        mlflow_sink = MlflowSink.create(cfg, bus_shared=bus.shared, resume_run_id=resume_run_id)
    else:
        mlflow_sink = None
    if cfg.tracing.exporter != "none":  # optional pieces are imported only when used
        from .sinks.otel_sink import OtelSink
        otel = OtelSink.create(cfg, bus_shared=bus.shared, log_dir=log_dir, rank=rank, world_size=world_size)
        if otel is not None:
            sinks.append(otel)
    if mlflow_sink is not None:
        sinks.append(mlflow_sink)
    return sinks


def run_training(cfg: TrainConfig, extra_sinks: Iterable[Sink] = (), *, run_name: str | None = None,
                 close_timeout: float = 120.0) -> RunResult:
    from .logging_setup import setup_logging, teardown_logging
    from .sysinfo import collect_system_info
    from .tracking import generate_run_name

    check_inputs(cfg)
    dist = dist_from_env(cfg)
    rank, world_size = (dist.rank, dist.world_size) if dist else (0, 1)
    cfg.log_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(cfg.logging.log_level, cfg.log_dir, cfg.logging.json_logs, rank=rank, world_size=world_size)
    bus = EventBus(rank=rank)
    try:
        resume = find_resume_checkpoint(cfg.output_dir, cfg.checkpoint.resume)
        resume_run_id = read_trainer_state(resume).get("mlflow_run_id") if resume else None
        name = run_name or cfg.tracking.run_name or generate_run_name()
        if dist is not None:
            name = dist.broadcast_object(name)
        evaluator = _build_evaluator(cfg) if rank == 0 else None  # a broken --eval-data fails before any sink
        for s in build_sinks(cfg, bus, rank=rank, world_size=world_size, resume_run_id=resume_run_id):
            bus.add(s)
        for s in extra_sinks:
            bus.add(s)
        device = resolve_device(cfg.optim.device if dist is None else dist.device_name)
        info = collect_system_info(dtype_name(resolve_amp(cfg.optim.mixed_precision, device)))
        trainer = Trainer(cfg, bus, system_info=info, evaluator=evaluator, run_name=name, rank=rank,
                          world_size=world_size, dist_ctx=dist)
        result = trainer.run()
        if dist is not None:
            dist.finish(result)
    finally:
        bus.close(timeout=close_timeout)
        teardown_logging()
        if dist is not None:
            dist.shutdown()
    return RunResult(result=result, bus_stats=bus.stats(), shared=dict(bus.shared))


def _build_evaluator(cfg: TrainConfig) -> Any:
    if not cfg.eval.eval_data:
        return None
    from .data import load_beir
    from .evaluate import RetrievalEvaluator
    beir = load_beir(cfg.eval.eval_data, cfg.eval.eval_split)
    return RetrievalEvaluator(beir, max_query_length=cfg.model.max_query_length,
                              max_doc_length=cfg.model.max_doc_length, max_queries=cfg.eval.eval_max_queries,
                              seed=cfg.optim.seed, idf_power=cfg.eval.eval_idf_power)
