"""MlflowSink: every run fully tracked in MLflow, from events only, without the step loop waiting on the network.

The bus runs this sink on its own worker thread with a bounded queue. Hooks never wait on the network: the
:class:`Transport` buffers metric points and queues every other call, and its sender thread delivers them
with retries and a circuit breaker; points that cannot be sent go to ``<log_dir>/mlflow_unsent.jsonl``
(see ``transport.py``). The end of the run is bounded by ``MlflowOptions.shutdown_timeout``.

What a run gets (see ``docs/observability.md``):

* params: ``RunStarted.params`` (the flattened config; <= 100 per call, long values truncated and kept
  whole in ``config.yaml``), plus dataset digests and sizes and the model's parameter count;
* metrics: for every event, each ``(name, value)`` of ``event.metrics()`` under ``name`` as is, at the
  event's step (``ErrorCaught`` without a step: the last step seen). A partial epoch (``EpochDone`` with
  ``complete=False``) is left to the local metrics file. The last point of a metric is its final value;
* tags (``splade.health``, ``splade.errors.total``, ``splade.error.*`` among them), dataset inputs (training,
  validation, evaluation), artifacts (config, system info, metrics file, logs, plot, model in HF format), the
  final and best models as MLflow 3 LoggedModels (``splade_model``, ``best_model``; ``logged_model.py``),
  optionally registered, system metrics (``system_metrics.py``), a markdown note that puts errors first
  (``note.py``), the final status; the console's last line is the run page's address (``ui.py``).

The sink never reads the training config object: delivery options come in :class:`MlflowOptions`, all the
rest from events. ``open(bus)`` announces the run with :class:`TrackingRunOpened`; the trace id arrives as
:class:`TraceOpened` (tag ``otel.trace_id``, the note's trace line), before or after ``RunStarted``.

Resume: ``create(resume_run_id=...)`` continues that run (status back to RUNNING); only steps after both the
checkpoint step and the last step already in the run are logged, so no point is duplicated.
"""

from __future__ import annotations

import collections
import json
import logging
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ...errors import ConfigError
from ...finite import json_safe
from ...redaction import safe_text
from ...bus import EventBus, Sink
from ...events import (AlertRaised, CheckpointSaved, DataLoaded, EpochDone, ErrorCaught, Event, EvaluationDone,
                       ModelLoaded, RunFinished, RunStarted, SinkDegraded, StepDone, TraceOpened, TrackingRunOpened)
from . import env, store, unsent
from .artifacts import CONTEXTS, Artifacts, History
from . import ui
from .failures import report_shutdown
from .note import note
from .store import TrackingUnavailableError
from .transport import DEFAULT_SHUTDOWN_TIMEOUT, Transport

log = logging.getLogger("splade_obs.sinks.mlflow")


@dataclass(frozen=True)
class MlflowOptions:
    """How to deliver: where the store is and what to log. Everything about the run comes from events."""

    tracking_uri: str | None = None     # None: store.default_tracking_uri()
    experiment_name: str | None = "splade-obs"  # None: the experiment of experiment_id
    experiment_id: str | None = None    # an existing experiment (MLFLOW_EXPERIMENT_ID); with a name, they must agree
    run_name: str | None = None         # None: a generated name (RunStarted.run_name renames a new run)
    run_id: str | None = None           # continue this existing run (MLFLOW_RUN_ID); a checkpoint's run wins
    tags: Mapping[str, str] | None = None  # extra tags of the run (MLFLOW_TAGS)
    system_metrics: env.SystemMetricsOptions | None = None  # None: no system metrics (`train` turns them on)
    env_sources: tuple[str, ...] = ()   # the MLflow variables that set any of these (tag splade.mlflow_env)
    require: bool = False               # an unreachable store raises TrackingUnavailableError
    register_model: str | None = None   # registered-model name (the best model, else the final one)
    log_model: bool = True              # log the final (and best) model as LoggedModels (HF folder: either way)
    flush_interval: float = 2.0         # seconds between metric batches (and between unsent-file writes)
    #: seconds the end of the run may spend on the store (final points, status, artifacts), counted from
    #: RunFinished; what is left then stays in <log_dir>/mlflow_unsent.jsonl
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT
    #: the run's log folder: a resume replays the unsent file the interrupted process left there
    log_dir: str | None = None


def _section(config: Mapping[str, Any] | None, name: str) -> Mapping[str, Any]:
    value = (config or {}).get(name)
    return value if isinstance(value, Mapping) else {}


class MlflowSink(Sink):
    """Sends the run to MLflow through ``MlflowClient`` with an explicit run id (no fluent globals)."""

    name = "mlflow"
    scope = "run"
    threaded = True

    # ------------------------------------------------------------------------------------ creation
    @classmethod
    def create(cls, options: MlflowOptions = MlflowOptions(), *,
               resume_run_id: str | None = None) -> "MlflowSink | None":
        """Check the store and open (or continue) the run; None, with one warning, when it is unreachable.

        With ``options.require`` an unreachable store raises :class:`TrackingUnavailableError`
        (category DEPENDENCY_ERROR, exit code 10) instead.
        """
        uri = options.tracking_uri or store.default_tracking_uri()
        safe_uri = store.strip_credentials(uri)
        try:
            store.lower_http_retries_for(uri)
            store.check_store(uri)
            sink = cls(options, uri)
            if resume_run_id and options.run_id and options.run_id != resume_run_id:
                log.info("MLflow: continuing the checkpoint's run %s, not %s's %s", resume_run_id, env.RUN_ID,
                         options.run_id)
            sink._open_run(resume_run_id or options.run_id, explicit=not resume_run_id and bool(options.run_id))
        except ConfigError:
            raise  # a variable or setting names something the store does not have: the user must fix it
        except Exception as exc:  # noqa: BLE001 - any failure to open the run means "no MLflow for this run"
            first = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
            err = exc if isinstance(exc, TrackingUnavailableError) else TrackingUnavailableError(
                f"cannot open an MLflow run at {safe_uri}: {first}", original_exception=exc, tracking_uri=safe_uri)
            if options.require:
                raise err from exc
            log.warning("MLflow tracking disabled for this run: %s (local log and metrics files keep everything)",
                        err.message)
            return None
        return sink

    def __init__(self, options: MlflowOptions, tracking_uri: str) -> None:
        self.options = options
        self.transport = Transport(tracking_uri, flush_interval=options.flush_interval,
                                   shutdown_timeout=options.shutdown_timeout)
        self.artifacts = Artifacts(self.transport)
        self.experiment_id = ""
        self.resumed = False
        self._min_step = 0
        self._last_step = 0
        self._history = History()
        self._error_counts: collections.Counter[str] = collections.Counter()
        self._skipped_batches = 0
        self._checkpoint_time: tuple[int, float, CheckpointSaved] | None = None  # (step, seconds summed, last)
        self._datasets: list[dict[str, Any]] = []
        self._logged_datasets: set[tuple[str, str, str]] = set()
        self._changed_params: dict[str, str] = {}
        self._run_started: RunStarted | None = None
        self._model: ModelLoaded | None = None
        self._trace_id: str | None = None
        self._log_dir: Path | None = None
        self._degraded_sinks: list[str] = []
        self._run_finished: RunFinished | None = None
        self._finish_deadline: float | None = None
        self._hurry = threading.Event()
        self._closed = False
        self._system: Any = None            # the system-metrics monitor (system_metrics.py), from open()
        self._system_step: int | None = None  # a continued run: its next system/ step

    @property
    def run_id(self) -> str:
        return self.transport.run_id

    def _open_run(self, resume_run_id: str | None, *, explicit: bool = False) -> None:
        """Continue ``resume_run_id`` (``explicit``: given by MLFLOW_RUN_ID, so it must exist) or create a run."""
        t = self.transport
        run = (env.run_to_continue(t, resume_run_id) if explicit else
               env.find_run(t, resume_run_id) if resume_run_id else None)
        if run is not None and run.info.lifecycle_stage == "active":
            t.run_id, self.experiment_id, self.resumed = run.info.run_id, run.info.experiment_id, True
            if unsent.replay_before_resume(self.options.log_dir, t.tracking_uri, t.run_id):
                run = t.call("get_run", t.client.get_run, t.run_id, attempts=2)  # the replayed points count too
            t.call("update_run", t.client.update_run, t.run_id, status="RUNNING")
            t.existing_params = dict(run.data.params)
            history = lambda: t.call("get_metric_history", t.client.get_metric_history, t.run_id, "train/loss")
            self._min_step = env.latest_step(run, "train/loss", history) or 0
            resumes = int(run.data.tags.get("splade.resume_count", "0") or 0) + 1
            t.set_tags({"splade.resume_count": str(resumes), **env.identity_tags(self.options)})
            last_system = env.latest_step(run, "system/")
            self._system_step = 0 if last_system is None else last_system + 1
        else:
            if resume_run_id:
                log.warning("MLflow run %s to resume was not found at %s; starting a new run",
                            resume_run_id, t.safe_uri)
            self.experiment_id = self._experiment_id()
            name = safe_text(self.options.run_name) if self.options.run_name else store.generate_run_name()
            run = t.call("create_run", t.client.create_run, self.experiment_id, tags=self._start_tags(resume_run_id),
                         run_name=name)
            t.run_id = run.info.run_id
        log.info("MLflow run %s (experiment %s) at %s%s", t.run_id, self.experiment_id, t.safe_uri,
                 " (resumed)" if self.resumed else "")

    def _experiment_id(self) -> str:
        """The new run's experiment: ``options.experiment_name`` (created when missing) or ``experiment_id``."""
        return env.experiment_id_for(self.transport, self.options)

    def _start_tags(self, previous_run_id: str | None) -> dict[str, str]:
        return env.start_tags(self.transport.safe_uri, self.options, previous_run_id)

    def open(self, bus: EventBus) -> None:
        """Announce the run to the other sinks (span attributes, the OTLP exporter, ``RunIds``)."""
        bus.emit(TrackingRunOpened(run_id=self.run_id, experiment_id=self.experiment_id,
                                   tracking_uri=self.transport.safe_uri, resumed=self.resumed))
        if self.options.system_metrics is not None and self._system is None:  # the System metrics tab
            from .system_metrics import start_monitor
            self._system = start_monitor(self.run_id, self.transport, self.options.system_metrics,
                                         resume_logging=self.resumed, first_step=self._system_step)

    # --------------------------------------------------------------------------------------- metrics
    def _log_metrics(self, e: Event, step: int, *, always: bool = False) -> bool:
        """Queue every ``e.metrics()`` point at ``step``; False when skipped by the resume rule (a point at
        or before the resumed step is already in the run)."""
        if not always and self._min_step and step <= self._min_step:
            return False
        for name, value in e.metrics().items():
            self.transport.add(name, value, step, e.time_ns)
        return True

    # ----------------------------------------------------------------------------------------- hooks
    def on_run_started(self, e: RunStarted) -> None:
        t = self.transport
        self._run_started = e
        self._min_step = max(self._min_step, e.start_step)
        self._last_step = e.start_step
        if e.log_dir:
            self._log_dir = Path(e.log_dir)
            t.set_log_dir(self._log_dir)
        if e.run_name and not self.resumed:
            run_id, name = t.run_id, safe_text(e.run_name)  # the mlflow.runName tag: no secret value in it

            def rename() -> None:
                if t.client.get_run(run_id).info.run_name != name:
                    t.client.update_run(run_id, name=name)

            t.submit("update_run", rename)
        # as `splade-obs config show --format params` prints them; a resume that sets what the run left unset
        # (unset settings are not params) records it as changed too
        self._log_params(dict(e.params), new_are_changes=self.resumed)
        if e.config:
            self.artifacts.config(e.config)
        self.artifacts.json(e.system_info, "system_info.json")
        t.set_tags(self._run_tags(e))

    def _run_tags(self, e: RunStarted) -> dict[str, Any]:
        info = e.system_info or {}
        tags: dict[str, Any] = {
            "host": info.get("hostname") or socket.gethostname(),
            "splade.world_size": e.world_size, "splade.total_steps": e.total_steps,
            "splade.amp_mode": _section(e.config, "optim").get("mixed_precision"),
            "splade.model": e.model_name or _section(e.config, "model").get("name"),
            "splade.output_dir": e.output_dir, "splade.status": "RUNNING",
        }
        if info.get("mixed_precision"):
            tags["splade.amp_dtype"] = info["mixed_precision"]  # ModelLoaded confirms it (same tag)
        if info.get("git_commit"):
            tags["mlflow.source.git.commit"] = info["git_commit"]
            tags["splade.git_dirty"] = info.get("git_dirty")
        if e.resumed:
            tags["splade.resumed_from_step"] = e.start_step
        if self._trace_id:
            tags["otel.trace_id"] = self._trace_id
        return tags

    def _log_params(self, params: dict[str, Any], *, new_are_changes: bool = False) -> None:
        """Params not in the run yet; on resume, changed values are recorded as a tag (params are immutable)."""
        before = set(self.transport.existing_params)
        changed = self.transport.log_params({k: str(v) for k, v in params.items()})
        if new_are_changes and before:
            changed.update({k: self.transport.existing_params[k] for k in params if k not in before})
        if changed:
            self._changed_params.update(changed)
            self.transport.set_tags({"splade.resume.changed_params": json.dumps(self._changed_params)})

    def on_trace_opened(self, e: TraceOpened) -> None:
        self._trace_id = e.trace_id
        self.transport.set_tags({"otel.trace_id": e.trace_id})

    def on_data_loaded(self, e: DataLoaded) -> None:
        name = Path(e.source).name or "data"
        record = {"split": e.split, "name": name, "source": e.source, "digest": e.digest,
                  "num_examples": e.num_examples, "num_skipped": e.num_skipped, "format": e.fmt}
        self._datasets.append(record)
        key = (name, e.digest, CONTEXTS.get(e.split, e.split))
        if key in self._logged_datasets:
            return
        self._logged_datasets.add(key)
        self.artifacts.dataset(record)
        self._log_params({f"data.{e.split}_digest": e.digest, f"data.{e.split}_num_examples": e.num_examples})
        self.transport.set_tags({f"splade.data.{e.split}.digest": e.digest, f"splade.data.{e.split}.source": e.source})

    def on_model_loaded(self, e: ModelLoaded) -> None:
        self._model = e
        tags = {"splade.device": e.device, "splade.amp_dtype": e.amp_dtype, "splade.model_path": e.path}
        tags.update(e.kernels())
        self.transport.set_tags(tags)
        self._log_params({"model.num_parameters": e.num_parameters})

    def on_step_done(self, e: StepDone) -> None:
        self._last_step = max(self._last_step, e.step)
        if self._checkpoint_time is not None and e.step > self._checkpoint_time[0]:
            self._log_checkpoint_time()
        if self._log_metrics(e, e.step):
            self._history.add(e.step, loss=e.loss, query_nnz=e.query_nnz, doc_nnz=e.doc_nnz)

    def on_epoch_done(self, e: EpochDone) -> None:
        if not e.complete:
            return  # the part of an epoch a stopped run got through: in the local metrics file only
        if self._log_metrics(e, e.step):
            self.transport.request_flush()

    def on_evaluation_done(self, e: EvaluationDone) -> None:
        """Log the scores; keep the last (and last best) evaluation with its points for the LoggedModels."""
        from .logged_model import eval_points
        logged = self._log_metrics(e, e.step)
        if logged:
            self.transport.request_flush()
        self._last_eval = (e, eval_points(e) if logged else [])  # []: a resumed step, already in the run
        self._best_eval = self._last_eval if e.is_best else getattr(self, "_best_eval", None)

    def on_error_caught(self, e: ErrorCaught) -> None:
        self._error_counts[e.category] = max(self._error_counts[e.category] + 1, e.counts.get(e.category, 0))
        if e.skipped_batch:
            if not self._skipped_batches:
                self.transport.set_tags({"splade.health": "degraded"})  # visible in the runs table while it runs
            self._skipped_batches = max(self._skipped_batches + 1, e.skipped_batches)
        self._log_metrics(e, e.step if e.step is not None else self._last_step)
        if e.fatal:
            self.transport.request_flush()

    def on_alert_raised(self, e: AlertRaised) -> None:
        """alerts/* at its step; tags: the categories raised so far, each one's latest words."""
        self._log_metrics(e, e.step)
        self.transport.set_tags({"splade.alerts": ",".join(sorted(e.counts)),
                                 f"splade.alert.{e.category}": f"step {e.step}: {e.message}"})

    def on_checkpoint_saved(self, e: CheckpointSaved) -> None:
        self.transport.set_tags({"splade.last_checkpoint_step": e.step, "splade.last_checkpoint_path": e.path,
                                 "splade.last_checkpoint_reason": e.reason})
        # one checkpoint/* point per step: the checkpoints and models written at one step are summed
        if self._checkpoint_time is not None and self._checkpoint_time[0] != e.step:
            self._log_checkpoint_time()
        step, seconds, _ = self._checkpoint_time or (e.step, 0.0, e)
        self._checkpoint_time = (step, seconds + e.duration_seconds, e)
        if e.reason == "best":
            self._on_best_checkpoint(e)

    def _log_checkpoint_time(self) -> None:
        if self._checkpoint_time is None:
            return
        step, seconds, e = self._checkpoint_time
        self._checkpoint_time = None
        if not (self._min_step and step <= self._min_step):
            self.transport.add("checkpoint/duration_seconds", seconds, step, e.time_ns)

    def _on_best_checkpoint(self, e: CheckpointSaved) -> None:
        self._best_checkpoint = e  # nothing sent now: the last best is logged once at the end (logged_model.py)

    def on_sink_degraded(self, e: SinkDegraded) -> None:
        self._degraded_sinks.append(e.sink)

    def on_run_finished(self, e: RunFinished) -> None:
        """Queue the end of the run: the final points, tags and status, then the artifacts; write the unsent
        file first (a kill during the network calls leaves it complete). Returns at once."""
        if self._run_finished is not None or self._closed:
            return
        self._run_finished = e
        self._finish_deadline = time.monotonic() + self.options.shutdown_timeout
        t = self.transport
        self._log_checkpoint_time()
        self._log_metrics(e, max(e.step, self._last_step), always=True)  # the run's final counts always land
        t.request_flush()
        started = self._run_started
        tags = {"splade.status": e.status, "splade.final_step": e.step, "otel.trace_id": self._trace_id,
                "splade.errors.total": e.errors_total, "splade.health": e.health(self._skipped_batches, len(self._degraded_sinks)),
                "mlflow.note.content": note(e, datasets=self._datasets, model=self._model,
                                            total_steps=started.total_steps if started else 0,
                                            trace_id=self._trace_id, skipped_batches=self._skipped_batches,
                                            trace_link=ui.trace_link(self.experiment_id, self._trace_id)
                                            if self._trace_id else None)}
        if e.error:
            tags["splade.error.category"] = e.error.get("category")
            tags["splade.error.message"] = safe_text(str(e.error.get("message") or ""))[:500]
        if self._degraded_sinks:
            tags["splade.degraded_sinks"] = ",".join(self._degraded_sinks)
        t.set_tags(json_safe(tags))  # tag values are text: a non-finite number reads "nan" / "inf" / "-inf"
        status = e.status if e.status in ("FINISHED", "FAILED", "KILLED") else "FAILED"
        t.terminate(status, e.time_ns // 1_000_000)
        self._log_finish_artifacts(e)
        t.write_ahead()

    def _log_finish_artifacts(self, e: RunFinished) -> None:
        a, log_dir = self.artifacts, self._log_dir
        own_record = {"history": self._history.points, "errors_by_category": dict(self._error_counts),
                      "skipped_batches": self._skipped_batches}
        steps: list[tuple[str, Any]] = []
        if log_dir is not None:
            steps += [("training metrics", lambda: a.metrics_file(log_dir, own_record)),
                      ("log files", lambda: a.log_files(log_dir))]
        steps.append(("plot", lambda: a.plot(self._history)))
        model_path = e.model_path
        if model_path and Path(model_path).is_dir():
            steps.append(("HF model", lambda: a.hf_model(model_path)))
        if self.options.log_model:  # LoggedModels: the final model, the best one (--save-best-metric), registration
            from .logged_model import run_model_specs
            specs = {"final_path": model_path, "final_step": e.step, "params": dict(self.transport.existing_params),
                     "config": self._run_started.config if self._run_started else None, **{
                         k: getattr(self, f"_{k}", None) for k in ("last_eval", "best_eval", "best_checkpoint")}}
            steps.append(("logged models", lambda: a.logged_models(run_model_specs(**specs),
                                                                   register_as=self.options.register_model)))
        for what, fn in steps:
            try:
                fn()  # queues the upload
            except Exception as exc:  # noqa: BLE001 - one missing artifact must not block the rest
                log.warning("MLflow: could not log %s: %s: %s", what, type(exc).__name__, exc)

    # -------------------------------------------------------------------------------------- shutdown
    def interrupt(self) -> None:
        """Stop waiting on the store now (a stop signal during shutdown): :meth:`close` writes the unsent
        file and returns without further network waits. Safe to call from a signal handler."""
        self._hurry.set()

    def persist(self) -> None:
        """Before a checkpoint: every point not in the store yet goes to the unsent file, which a resume from
        that checkpoint replays (the resumed run does not produce those steps again)."""
        self.transport.journal_all()

    def close(self, timeout: float = 5.0) -> None:
        """Deliver what is queued within ``options.shutdown_timeout`` seconds of ``RunFinished`` (and within
        ``timeout``), whatever the store does, then write the unsent file and stop.

        A call hung in the network is abandoned (the sender is a daemon thread). Points not sent are in
        ``<log_dir>/mlflow_unsent.jsonl``; one warning names them and the command that sends them later.
        """
        if self._closed:
            return
        self._closed = True
        if self._system is not None:  # its last sample is queued before the drain below
            self._system.stop(min(2.0, max(0.0, timeout)))
        t, now = self.transport, time.monotonic()
        if self._run_finished is None:
            # the run ended without RunFinished (crash, hard interrupt): do not leave it RUNNING
            self._finish_deadline = now + self.options.shutdown_timeout
            t.terminate("KILLED", int(time.time() * 1000))
            t.write_ahead()
        if self._log_dir is not None:
            self.artifacts.log_files(self._log_dir)  # logs and traces written after RunFinished (other sinks' close)
        deadline = min(self._finish_deadline or now, now + max(0.0, timeout))
        complete = t.drain(deadline, self._hurry)
        unsent = t.shutdown()
        cut = ("the stop signal" if self._hurry.is_set() else
               f"{self.options.shutdown_timeout:g}s (tracking.shutdown_timeout)")
        report_shutdown(t, log_dir=self._log_dir, complete=complete, unsent=unsent, cut=cut)
        if t.run_id and self.experiment_id:  # where to look: the run page (and, for a local store, how to serve it)
            log.info("%s", ui.ui_hint(t.safe_uri, self.experiment_id, t.run_id))
