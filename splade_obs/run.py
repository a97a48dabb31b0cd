"""Open a run: logging, sinks, the bus, the trainer. The one place that knows every sink.

``run_training(cfg)`` is what ``splade-obs train`` calls; tests call it directly with extra sinks.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Iterator

from .checkpoint import find_resume_checkpoint, read_trainer_state
from .config import TrainConfig
from .errors import ConfigError, RunInterrupted
from .distributed import dist_from_env
from .bus import EventBus, RunIds, Sink
from .recovery import validate_file_exists
from .device import Runtime, resolve_runtime
from .plan import TrainResult
from .trainer import Trainer

log = logging.getLogger("splade_obs.run")


@dataclass(frozen=True)
class RunParent:
    """What a run hangs under when a larger job (``splade-obs fit``) starts it: its MLflow run becomes a nested
    run of ``mlflow_run_id`` (the ``mlflow.parentRunId`` tag the MLflow UI nests by) and its run span a child
    of the span ``traceparent`` names (one trace for the whole job)."""

    mlflow_run_id: str | None = None
    traceparent: str | None = None


@dataclass
class RunResult:
    result: TrainResult
    bus_stats: dict[str, Any]
    #: the MLflow run id / trace id the sinks announced (None when that sink was off)
    ids: RunIds

    @property
    def status(self) -> str:
        """FINISHED, FAILED or KILLED."""
        return self.result.status

    @property
    def model_path(self) -> str | None:
        """The saved model folder (``<output_dir>/final``); None when the run did not get that far."""
        return self.result.model_path

    @property
    def metrics(self) -> dict[str, float]:
        """The run's final metrics: ``epoch/loss``, ``val/loss`` and the ``eval/*`` scores when they were measured."""
        return self.result.final_metrics

    @property
    def run_id(self) -> str | None:
        """The MLflow run id (None with ``tracking.enabled`` off)."""
        return self.ids.mlflow_run_id

    @property
    def trace_id(self) -> str | None:
        """The OpenTelemetry trace id of the run (None with ``tracing.exporter`` none)."""
        return self.ids.trace_id


def check_inputs(cfg: TrainConfig) -> Runtime | None:
    """Fail fast on bad inputs, before logging files, sinks or the model are set up.

    Returns the run's :class:`Runtime` (device and AMP, resolved here once), or None under torchrun, where
    each rank resolves its own device once it knows it.
    """
    from .checkpoint import list_checkpoints
    from .faults import parse_faults

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
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun each rank picks its own device
        return None
    return resolve_runtime(cfg.optim.device, cfg.optim.mixed_precision)


def build_sinks(cfg: TrainConfig, *, rank: int = 0, world_size: int = 1, run_name: str | None = None,
                resume_run_id: str | None = None, parent: RunParent | None = None) -> list[Sink]:
    """The sinks ``cfg`` asks for. The only place that reads sink settings out of the config: each sink
    gets plain options here and learns everything else from events.

    Local sinks always; OpenTelemetry unless ``tracing.exporter`` is ``none``; MLflow on rank 0 unless
    ``--no-mlflow`` (its run is opened here, so an unreachable store the user required fails fast), with its
    options resolved from the flags, then MLflow's environment variables (``sinks/mlflow/env.py``). Under a
    multi-node torchrun the first process of every other node samples its machine's system metrics into
    rank 0's run (:func:`_node_system_metrics`).
    """
    from .sinks.console import LogSink
    from .sinks.errors_file import ErrorsFileSink
    from .sinks.metrics_file import MetricsFileSink
    from .sinks.progress import ProgressSink

    log_dir = cfg.log_dir
    sinks: list[Sink] = [LogSink(), ErrorsFileSink(log_dir), MetricsFileSink(log_dir),
                         ProgressSink(cfg.logging.progress, cfg.logging.progress_interval)]
    metrics = _metrics_sink(cfg, rank) if rank == 0 and cfg.tracing.metrics else None  # a busy port fails here
    otel = None
    if cfg.tracing.exporter != "none":  # optional pieces are imported only when used
        from .sinks.otel import OtelOptions, OtelSink
        tr = cfg.tracing
        otel = OtelSink.create(OtelOptions(exporter=tr.exporter, trace_batches=tr.trace_batches,
                                           slow_batch_factor=tr.slow_batch_factor, to_mlflow=tr.to_mlflow,
                                           shutdown_timeout=tr.shutdown_timeout, service_name=tr.service_name),
                               log_dir=log_dir, rank=rank, world_size=world_size)
        if otel is not None:
            sinks.append(otel)
    if metrics is not None:  # before MLflow: its close writes the final export that MLflow uploads with the logs
        sinks.append(metrics)
    mlflow_sink, failure = None, None
    if rank == 0 and cfg.tracking.enabled:
        from .sinks.mlflow import MlflowSink
        from .sinks.mlflow.env import resolve_options
        try:
            options = resolve_options(cfg.tracking, run_name=run_name, log_dir=str(cfg.log_dir))
            if parent is not None and parent.mlflow_run_id:  # a nested run in the MLflow UI
                options = replace(options, tags={**(options.tags or {}), "mlflow.parentRunId": parent.mlflow_run_id})
            mlflow_sink = MlflowSink.create(options, resume_run_id=resume_run_id)
        except Exception as exc:  # raised after the other nodes heard there is no run (they must not wait)
            failure = exc
        if mlflow_sink is not None:
            sinks.append(mlflow_sink)
            if otel is not None:  # the trace goes into the same store, opened with the same credentials
                otel.store_uri = mlflow_sink.transport.tracking_uri
    node_sink = _node_system_metrics(cfg, rank, world_size, mlflow_sink)
    if failure is not None:
        if metrics is not None:
            metrics.close(0.0)  # frees the Prometheus port
        raise failure
    if node_sink is not None:
        sinks.append(node_sink)
    return sinks


def _metrics_sink(cfg: TrainConfig, rank: int) -> Sink | None:
    """OpenTelemetry metrics (rank 0): ``metrics.jsonl``, OTLP as for spans, Prometheus with ``--prometheus-port``."""
    from .sinks.otel.metrics import MetricsOptions, OtelMetricsSink
    tr = cfg.tracing
    return OtelMetricsSink.create(MetricsOptions(
        exporter=tr.exporter, prometheus_port=tr.prometheus_port, prometheus_host=tr.prometheus_host,
        prometheus_linger=tr.prometheus_linger, shutdown_timeout=tr.shutdown_timeout, service_name=tr.service_name),
        log_dir=cfg.log_dir, rank=rank)


def _node_system_metrics(cfg: TrainConfig, rank: int, world_size: int, mlflow_sink: Any) -> Sink | None:
    """Under a multi-node torchrun (``GROUP_WORLD_SIZE`` > 1), rank 0 sends its MLflow run to every rank (a
    collective: every rank calls this at the same point), and the first process (``LOCAL_RANK`` 0) of each other
    node returns a sink sampling its machine into that run as ``system/node_<GROUP_RANK>/...``. None elsewhere."""
    if world_size <= 1 or int(os.environ.get("GROUP_WORLD_SIZE", "1") or 1) <= 1 or not cfg.tracking.enabled:
        return None
    import torch.distributed as tdist

    if not tdist.is_initialized():
        return None
    box = [(mlflow_sink.run_id, mlflow_sink.transport.tracking_uri) if mlflow_sink is not None else None]
    tdist.broadcast_object_list(box, src=0)
    if rank == 0 or box[0] is None or os.environ.get("LOCAL_RANK", "0") != "0":
        return None
    from .sinks.mlflow.env import resolve_system_metrics
    from .sinks.mlflow.system_metrics import NodeSystemMetricsSink

    options, _ = resolve_system_metrics(cfg.tracking.system_metrics)
    if options is None:
        return None
    run_id, uri = box[0]
    return NodeSystemMetricsSink(run_id, uri, options, shutdown_timeout=cfg.tracking.shutdown_timeout,
                                 flush_interval=cfg.tracking.flush_interval)


def run_training(cfg: TrainConfig, extra_sinks: Iterable[Sink] = (), *, run_name: str | None = None,
                 sinks: list[Sink] | None = None, close_timeout: float = 120.0,
                 capture_root_logger: bool = True, parent: RunParent | None = None) -> RunResult:
    """Train ``cfg``. ``sinks`` replaces the sinks :func:`build_sinks` would make (``extra_sinks`` are added
    to either); the bus delivers to them in the given order. ``capture_root_logger`` False leaves the root
    logger alone (:func:`splade_obs.train`; see :func:`~splade_obs.logging_setup.setup_logging`). ``parent``:
    the MLflow run and span this run nests under (:class:`RunParent`)."""
    from .logging_setup import setup_logging, teardown_logging
    from .sysinfo import collect_system_info
    from .sinks.mlflow.env import resolve_run_name
    from .sinks.mlflow.store import generate_run_name
    from .data import with_demo_defaults

    cfg = with_demo_defaults(cfg)  # demo set: 3 epochs, its validation and retrieval sets (unless given)
    runtime = check_inputs(cfg)
    dist = dist_from_env(cfg)
    if dist is not None:  # this rank's own device, resolved once
        runtime = resolve_runtime(dist.device_name, cfg.optim.mixed_precision)
    rank, world_size = (dist.rank, dist.world_size) if dist else (0, 1)
    cfg.log_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(cfg.logging.log_level, cfg.log_dir, cfg.logging.json_logs, rank=rank, world_size=world_size,
                  otel_logs=cfg.tracing.otel_logs, service_name=cfg.tracing.service_name,
                  otel_logs_timeout=cfg.tracing.shutdown_timeout, capture_root=capture_root_logger)
    from .log_context import LogContextSink
    bus = EventBus([LogContextSink()], rank=rank)  # first: log lines get each event's ids before any sink logs
    ids = RunIds()
    bus.add(ids)
    try:
        resume = find_resume_checkpoint(cfg.output_dir, cfg.checkpoint.resume)
        resume_state = read_trainer_state(resume) if resume else {}
        resume_run_id = resume_state.get("mlflow_run_id")
        name = (resume_state.get("run_name") or run_name or resolve_run_name(cfg.tracking.run_name)  # resume: same
                or generate_run_name())  # --run-name, else $MLFLOW_RUN_NAME, else generated
        if dist is not None:
            name = dist.broadcast_object(name)
            if cfg.checkpoint.resume:
                dist.check_same_resume(resume, cfg.output_dir)
        # every rank encodes its shard of the evaluation corpus (rank 0 retrieves); a broken --eval-data fails
        # here, before any sink
        evaluator = _build_evaluator(cfg, quiet=rank != 0)
        if sinks is None:
            sinks = build_sinks(cfg, rank=rank, world_size=world_size, run_name=name, resume_run_id=resume_run_id,
                                parent=parent)
        for s in [*sinks, *extra_sinks]:
            bus.add(s)
        bus.open()
        info = collect_system_info(runtime=runtime)
        trainer = Trainer(cfg, bus, system_info=info, evaluator=evaluator, run_name=name, rank=rank,
                          world_size=world_size, dist_ctx=dist, ids=ids, runtime=runtime,
                          parent_traceparent=parent.traceparent if parent is not None else None)
        result = trainer.run()
        if dist is not None:
            dist.finish(result)
    finally:
        try:
            with shutdown_signals(bus.sinks):
                bus.close(timeout=close_timeout)
        finally:
            teardown_logging()
            if dist is not None:
                dist.shutdown()
    return RunResult(result=result, bus_stats=bus.stats(), ids=ids)


@contextlib.contextmanager
def shutdown_signals(sinks: Iterable[Sink]) -> Iterator[None]:
    """While the sinks close: the first SIGTERM / Ctrl-C tells each sink that can (``interrupt()``) to stop
    waiting on the network (the MLflow sink then writes its unsent file at once and returns), and the close
    goes on with the local files; a second one stops at once (``RunInterrupted``). The run's status stands.

    The trainer's own stop signals end with the training loop; without this, a signal during the close
    would kill the process before the sinks wrote what they hold."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    targets = [s for s in sinks if callable(getattr(s, "interrupt", None))]
    received: list[int] = []

    def on_signal(signum: int, frame: Any) -> None:
        if received:
            raise RunInterrupted(signum)
        received.append(signum)
        for s in targets:
            s.interrupt()  # type: ignore[attr-defined]

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _build_evaluator(cfg: TrainConfig, quiet: bool = False) -> Any:
    if not cfg.eval.eval_data:
        return None
    from .beir import load_beir
    from .evaluation import RetrievalEvaluator
    beir = load_beir(cfg.eval.eval_data, cfg.eval.eval_split, lazy_corpus=True)  # the text stays on disk
    return RetrievalEvaluator(beir, max_query_length=cfg.model.max_query_length,
                              max_doc_length=cfg.model.max_doc_length, max_queries=cfg.eval.eval_max_queries,
                              seed=cfg.optim.seed, idf_power=cfg.eval.eval_idf_power,
                              progress="none" if quiet else cfg.logging.progress,
                              progress_interval=cfg.logging.progress_interval)
