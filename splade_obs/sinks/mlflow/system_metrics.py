"""System metrics (CPU, memory, disk, network and, where there is one, GPU) in the MLflow run's "System metrics" tab.

The sampling and the names are MLflow's own: :class:`SystemMetricsMonitor` is MLflow's
``mlflow.system_metrics.system_metrics_monitor.SystemMetricsMonitor`` (psutil for CPU, memory, disk and network;
``pynvml`` from the ``nvidia-ml-py`` package for NVIDIA GPUs, ``pyrsmi`` for AMD ones), logging
``system/cpu_utilization_percentage``, ``system/system_memory_usage_megabytes``, ``system/disk_usage_percentage``,
``system/network_receive_megabytes``, ``system/gpu_0_utilization_percentage``, ... (``system/<node_id>/...`` with a
node id), each point at its own step 0, 1, 2, ... What this subclass changes, and why:

* **Delivery through the sink's transport.** MLflow's monitor sends with a client of its own, checks the run's
  status with a ``get_run`` after every sample and stops for good, with a warning, at the first failure of
  either. Here the points are queued on the MLflow sink's :class:`Transport` like every other metric: batched,
  retried while the store is away (one warning from the transport, not one per sample), kept in the unsent file
  for ``splade-obs runs sync``, and never waited on. The sampler itself makes no network call.
* **Short runs get points.** A first sample about a second after the start (not after a whole interval), and a
  last one when the monitor stops, which also logs the samples not averaged yet: a run of a few seconds has
  points, the 10 s default interval costs nothing measurable.
* **Bounded stop.** :meth:`SystemMetricsMonitor.stop` waits at most ``timeout`` seconds for the sampler thread
  (MLflow's ``finish`` joins without a limit and then flushes over the network); the thread is a daemon.
* **Quiet.** A sampler that fails (an NVML query a GPU does not support) is reported once, not every sample.
* **Resume.** ``resume_logging``: the steps continue after the run's last ``system/`` step; the sink passes
  that step from the run it has already fetched (``first_step``), which saves MLflow's extra ``get_run``.

:class:`NodeSystemMetricsSink` samples the other nodes of a multi-node torchrun into the same run.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import psutil
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor as MlflowSystemMetricsMonitor

from ...bus import EventBus, Sink
from ...sysinfo import loaded_cuda
from .env import SystemMetricsOptions

log = logging.getLogger("splade_obs.sinks.mlflow")

#: seconds from start to the first sample (or the interval, when shorter)
FIRST_SAMPLE_S = 1.0
#: seconds ``stop`` waits for the sampler thread
STOP_TIMEOUT_S = 2.0
#: the logger of MLflow's samplers (its GPU sampler warns at every sample a query fails)
MLFLOW_LOGGER = "mlflow.system_metrics"


class _OncePerMessage(logging.Filter):
    """Lets each distinct warning (or worse) through once: a failing sampler is reported, not every sample."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, record.getMessage())
        with self._lock:
            if key in self._seen:
                return False
            self._seen.add(key)
            return True


class _TransportLogger:
    """Stands in for MLflow's ``BatchMetricsLogger``: ``record_metrics`` queues the points on the transport."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.data: list[Any] = []          # read by MLflow's debug messages only
        self.total_training_time = 0.0
        self.total_log_batch_time = 0.0

    def record_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        now = time.time_ns()
        for key, value in metrics.items():
            self.transport.add(key, value, step or 0, now)

    def flush(self) -> None:
        self.transport.request_flush()


class SystemMetricsMonitor(MlflowSystemMetricsMonitor):
    """MLflow's monitor, sending through ``transport`` (see the module docstring for what differs).

    ``options`` are resolved already (``env.resolve_system_metrics``: MLflow's variables, checked); they replace
    the values MLflow's constructor reads from the environment again.
    """

    def __init__(self, run_id: str, transport: Any, options: SystemMetricsOptions = SystemMetricsOptions(), *,
                 resume_logging: bool = False, first_step: int | None = None) -> None:
        self._first_step = first_step
        mlflow_log = logging.getLogger(MLFLOW_LOGGER)
        level = mlflow_log.level
        mlflow_log.setLevel(logging.WARNING)  # its "Skip logging GPU metrics" note: start() says it in one line
        try:
            super().__init__(run_id, sampling_interval=options.sampling_interval,
                             samples_before_logging=options.samples_before_logging, resume_logging=resume_logging,
                             node_id=options.node_id, tracking_uri=transport.tracking_uri)
        finally:
            mlflow_log.setLevel(level)
        self.sampling_interval = options.sampling_interval
        self.samples_before_logging = options.samples_before_logging
        self.node_id = options.node_id
        self.mlflow_logger = _TransportLogger(transport)
        self.samples = 0                    # taken since the start
        self.points = 0                     # logged points (one per metric name each)
        self._unlogged = 0                  # samples not averaged into a point yet
        self._stopped = False
        self._quiet = _OncePerMessage()
        self._failed: set[tuple[str, str]] = set()

    # MLflow calls this from its constructor when resume_logging is set
    def _get_next_logging_step(self, run_id: str) -> int:
        if self._first_step is not None:
            return self._first_step
        return super()._get_next_logging_step(run_id)

    @property
    def has_gpu(self) -> bool:
        return any(type(m).__name__ in ("GPUMonitor", "ROCMMonitor") for m in self.monitors)

    def _loggers(self) -> list[logging.Logger]:
        """The loggers of MLflow's monitor and samplers (a logger's filter does not see its children's records)."""
        names = {MLFLOW_LOGGER, MlflowSystemMetricsMonitor.__module__, *(type(m).__module__ for m in self.monitors)}
        return [logging.getLogger(n) for n in sorted(names)]

    def start(self) -> None:
        """Start the sampler: a daemon thread running :meth:`monitor` (as MLflow's ``start``, without its log line)."""
        for logger in self._loggers():
            logger.addFilter(self._quiet)
        if not self.has_gpu and loaded_cuda() is not None:
            log.warning("System metrics: no GPU metrics (GPU utilisation and memory need the nvidia-ml-py "
                        "package: pip install nvidia-ml-py)")
        self._process = threading.Thread(target=self.monitor, daemon=True, name="SystemMetricsMonitor")
        self._process.start()

    def monitor(self) -> None:
        """The sampler loop: a sample soon after the start, then one every ``sampling_interval`` seconds; every
        ``samples_before_logging`` samples, their average is queued as one point per metric. No network call."""
        psutil.cpu_percent()  # CPU use is measured between two calls of the same thread: this is the first
        if self._shutdown_event.wait(min(FIRST_SAMPLE_S, self.sampling_interval)):
            return
        while True:
            self._sample_and_log(final=False)
            if self._shutdown_event.wait(self.sampling_interval):
                return

    def collect_metrics(self) -> dict[str, Any]:
        """One sample of every sampler; one that fails is reported once (per kind of failure) and skipped, the
        others go on (MLflow's loop would end at the first failure)."""
        for monitor in self.monitors:
            try:
                monitor.collect_metrics()
            except Exception as exc:  # noqa: BLE001 - a sensor or driver query failing
                what = (type(monitor).__name__, type(exc).__name__)
                if what not in self._failed:
                    self._failed.add(what)
                    log.warning("System metrics: the %s sampler failed (%s: %s); its metrics are left out while "
                                "it fails", what[0].replace("Monitor", ""), what[1], exc)
        return {}

    def _sample_and_log(self, final: bool) -> None:
        try:
            self.collect_metrics()
            self.samples += 1
            self._unlogged += 1
            if self._unlogged >= self.samples_before_logging or final:
                metrics = self.aggregate_metrics()
                self._unlogged = 0
                if metrics and not self._stopped:
                    self.publish_metrics(metrics)
                    self.points += 1
                else:
                    for m in self.monitors:
                        m.clear_metrics()
        except Exception as exc:  # noqa: BLE001 - a sampler failing must not end the thread nor the run
            logging.getLogger(MLFLOW_LOGGER).warning("System metrics: a sample failed: %s: %s",
                                                     type(exc).__name__, exc)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> bool:
        """Stop sampling: wait at most ``timeout`` s for the thread, then take and queue a last sample (with the
        samples not averaged yet). False when the thread did not end in time (no last sample then)."""
        self._shutdown_event.set()
        thread, self._process = self._process, None
        if thread is None:
            return True
        thread.join(max(0.0, timeout))
        done = not thread.is_alive()
        if done:
            self._sample_and_log(final=True)
        else:
            log.warning("System metrics: the sampler did not stop within %.1fs; left behind", timeout)
        self._stopped = True
        for logger in self._loggers():
            logger.removeFilter(self._quiet)
        return done

    def finish(self) -> None:
        """MLflow's name for :meth:`stop` (bounded here)."""
        self.stop()


def start_monitor(run_id: str, transport: Any, options: SystemMetricsOptions, *, resume_logging: bool = False,
                  first_step: int | None = None) -> SystemMetricsMonitor | None:
    """A started monitor for ``run_id``; None, with one warning, when it cannot start (the run goes on)."""
    try:
        monitor = SystemMetricsMonitor(run_id, transport, options, resume_logging=resume_logging,
                                       first_step=first_step)
        monitor.start()
    except Exception as exc:  # noqa: BLE001 - system metrics are optional
        log.warning("System metrics off for this run: %s: %s", type(exc).__name__, exc)
        return None
    log.info("System metrics: CPU, memory, disk, network%s sampled every %gs%s into the run's System metrics tab",
             ", GPU" if monitor.has_gpu else " (no GPU found)", monitor.sampling_interval,
             f" as node {monitor.node_id}" if monitor.node_id else "")
    return monitor


class NodeSystemMetricsSink(Sink):
    """System metrics of one more node of a multi-node torchrun, into rank 0's MLflow run.

    The first process of each node after the first (``LOCAL_RANK`` 0, ``RANK`` > 0) gets the run id from rank 0
    (``run.build_sinks``) and samples its machine under ``system/<node_id>/...``. Its own transport has no unsent
    file (the log folder may be shared with rank 0's): points the store does not take by the end are dropped.
    """

    name = "system_metrics"
    scope = "rank"

    def __init__(self, run_id: str, tracking_uri: str, options: SystemMetricsOptions, *,
                 shutdown_timeout: float = 5.0, flush_interval: float = 2.0) -> None:
        from .transport import Transport

        self.options = options
        self.shutdown_timeout = shutdown_timeout
        self.transport = Transport(tracking_uri, flush_interval=flush_interval, shutdown_timeout=shutdown_timeout)
        self.transport.run_id = run_id
        self.monitor: SystemMetricsMonitor | None = None

    def open(self, bus: EventBus) -> None:
        self.monitor = start_monitor(self.transport.run_id, self.transport, self.options, resume_logging=True)

    def close(self, timeout: float = 5.0) -> None:
        if self.monitor is not None:
            self.monitor.stop(min(STOP_TIMEOUT_S, timeout))
        t = self.transport
        t.drain(time.monotonic() + max(0.0, min(timeout, self.shutdown_timeout)))
        t.shutdown()
        if t.dropped_points:
            log.warning("System metrics: %d points of node %s did not reach %s", t.dropped_points,
                        self.options.node_id, t.safe_uri)
