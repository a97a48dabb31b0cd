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
* tags, dataset inputs, artifacts (config, system info, metrics file, logs, plot, model in HF format and
  as an MLflow pyfunc model ``splade_model``, optionally registered), a markdown note, the final status.

The sink never reads the training config object: delivery options come in :class:`MlflowOptions`, all the
rest from events. ``open(bus)`` announces the run with :class:`TrackingRunOpened`; the trace id arrives as
:class:`TraceOpened` (tag ``otel.trace_id``, the note's trace line), before or after ``RunStarted``.

Resume: ``create(resume_run_id=...)`` continues that run (status back to RUNNING); only steps after both the
checkpoint step and the last step already in the run are logged, so no point is duplicated.
"""

from __future__ import annotations

import collections
import getpass
import json
import logging
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ...errors import ApplicationError
from ...bus import EventBus, Sink
from ...events import (CheckpointSaved, DataLoaded, EpochDone, ErrorCaught, Event, EvaluationDone, ModelLoaded,
                       RunFinished, RunStarted, SinkDegraded, StepDone, TraceOpened, TrackingRunOpened)
from . import store, unsent
from .artifacts import CONTEXTS, Artifacts, History, note
from .store import TrackingUnavailableError
from .transport import DEFAULT_SHUTDOWN_TIMEOUT, SYNC_COMMAND, UNSENT_FILE, Transport

log = logging.getLogger("splade_obs.sinks.mlflow")


@dataclass(frozen=True)
class MlflowOptions:
    """How to deliver: where the store is and what to log. Everything about the run comes from events."""

    tracking_uri: str | None = None     # None: store.default_tracking_uri()
    experiment_name: str = "splade-obs"
    run_name: str | None = None         # None: a generated name (RunStarted.run_name renames a new run)
    require: bool = False               # an unreachable store raises TrackingUnavailableError
    register_model: str | None = None   # registered-model name for the pyfunc model
    log_model: bool = True              # log the pyfunc model (the HF folder is logged either way)
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
            sink._open_run(resume_run_id)
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

    @property
    def run_id(self) -> str:
        return self.transport.run_id

    def _open_run(self, resume_run_id: str | None) -> None:
        t = self.transport
        run = t.call("get_run", t.client.get_run, resume_run_id, attempts=2) if resume_run_id else None
        if run is not None and run.info.lifecycle_stage == "active":
            t.run_id, self.experiment_id, self.resumed = run.info.run_id, run.info.experiment_id, True
            if unsent.replay_before_resume(self.options.log_dir, t.tracking_uri, t.run_id):
                run = t.call("get_run", t.client.get_run, t.run_id, attempts=2)  # the replayed points count too
            t.call("update_run", t.client.update_run, t.run_id, status="RUNNING")
            t.existing_params = dict(run.data.params)
            self._min_step = self._last_logged_step(run)
            resumes = int(run.data.tags.get("splade.resume_count", "0") or 0) + 1
            t.set_tags({"splade.resume_count": str(resumes)})
        else:
            if resume_run_id:
                log.warning("MLflow run %s to resume was not found at %s; starting a new run",
                            resume_run_id, t.safe_uri)
            self.experiment_id = self._experiment_id()
            run = t.call("create_run", t.client.create_run, self.experiment_id, tags=self._start_tags(resume_run_id),
                         run_name=self.options.run_name or store.generate_run_name())
            t.run_id = run.info.run_id
        log.info("MLflow run %s (experiment %s) at %s%s", t.run_id, self.experiment_id, t.safe_uri,
                 " (resumed)" if self.resumed else "")

    def _last_logged_step(self, run: Any) -> int:
        """The latest ``train/loss`` step already in the run (the store keeps each key's latest point)."""
        latest = getattr(run.data, "_metric_objs", None)
        if latest is None:
            t = self.transport
            latest = t.call("get_metric_history", t.client.get_metric_history, t.run_id, "train/loss")
        return max((m.step for m in latest if m.key == "train/loss"), default=0)

    def _experiment_id(self) -> str:
        t, name = self.transport, self.options.experiment_name
        exp = t.call("get_experiment_by_name", t.client.get_experiment_by_name, name)
        if exp is not None:
            if exp.lifecycle_stage != "active":
                t.call("restore_experiment", t.client.restore_experiment, exp.experiment_id)
            return exp.experiment_id
        location = store.artifact_location_for(t.tracking_uri, name)
        try:
            return t.call("create_experiment", t.client.create_experiment, name, artifact_location=location,
                          attempts=1)
        except ApplicationError:
            exp = t.client.get_experiment_by_name(name)  # created meanwhile by another process
            if exp is None:
                raise
            return exp.experiment_id

    def _start_tags(self, previous_run_id: str | None) -> dict[str, str]:
        tags = {"mlflow.source.name": "splade-obs train", "mlflow.source.type": "LOCAL",
                "host": socket.gethostname(), "splade.tracking_uri": self.transport.safe_uri}
        try:
            tags["mlflow.user"] = getpass.getuser()
        except Exception:  # noqa: BLE001 - no user name in some containers
            pass
        commit = store.git_commit()
        if commit:
            tags["mlflow.source.git.commit"] = commit
        if previous_run_id:
            tags["splade.resumed_from_missing_run"] = previous_run_id
        return tags

    def open(self, bus: EventBus) -> None:
        """Announce the run to the other sinks (span attributes, the OTLP exporter, ``RunIds``)."""
        bus.emit(TrackingRunOpened(run_id=self.run_id, experiment_id=self.experiment_id,
                                   tracking_uri=self.transport.safe_uri, resumed=self.resumed))

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
            run_id, name = t.run_id, e.run_name

            def rename() -> None:
                if t.client.get_run(run_id).info.run_name != name:
                    t.client.update_run(run_id, name=name)

            t.submit("update_run", rename)
        self._log_params(dict(e.params))  # as `splade-obs config show --format params` prints them
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
            tags["splade.amp_dtype"] = info["mixed_precision"]
        if info.get("git_commit"):
            tags["mlflow.source.git.commit"] = info["git_commit"]
            tags["splade.git_dirty"] = info.get("git_dirty")
        if e.resumed:
            tags["splade.resumed_from_step"] = e.start_step
        if self._trace_id:
            tags["otel.trace_id"] = self._trace_id
        return tags

    def _log_params(self, params: dict[str, Any]) -> None:
        """Params not in the run yet; on resume, changed values are recorded as a tag (params are immutable)."""
        changed = self.transport.log_params({k: str(v) for k, v in params.items()})
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
        self.transport.set_tags({"device": e.device, "amp_dtype": e.amp_dtype, "splade.model_path": e.path})
        self._log_params({"model.num_parameters": e.num_parameters})

    def on_step_done(self, e: StepDone) -> None:
        self._last_step = max(self._last_step, e.step)
        if self._log_metrics(e, e.step):
            self._history.add(e.step, loss=e.loss, query_nnz=e.query_nnz, doc_nnz=e.doc_nnz)

    def on_epoch_done(self, e: EpochDone) -> None:
        if not e.complete:
            return  # the part of an epoch a stopped run got through: in the local metrics file only
        if self._log_metrics(e, e.step):
            self.transport.request_flush()

    def on_evaluation_done(self, e: EvaluationDone) -> None:
        if self._log_metrics(e, e.step):
            self.transport.request_flush()

    def on_error_caught(self, e: ErrorCaught) -> None:
        self._error_counts[e.category] = max(self._error_counts[e.category] + 1, e.counts.get(e.category, 0))
        if e.skipped_batch:
            self._skipped_batches = max(self._skipped_batches + 1, e.skipped_batches)
        self._log_metrics(e, e.step if e.step is not None else self._last_step)
        if e.fatal:
            self.transport.request_flush()

    def on_checkpoint_saved(self, e: CheckpointSaved) -> None:
        self.transport.set_tags({"splade.last_checkpoint_step": e.step, "splade.last_checkpoint_path": e.path,
                                 "splade.last_checkpoint_reason": e.reason})
        self._log_metrics(e, e.step)

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
        self._log_metrics(e, max(e.step, self._last_step), always=True)  # the run's final counts always land
        t.request_flush()
        started = self._run_started
        tags = {"splade.status": e.status, "splade.final_step": e.step, "otel.trace_id": self._trace_id,
                "mlflow.note.content": note(e, datasets=self._datasets, model=self._model,
                                            total_steps=started.total_steps if started else 0,
                                            trace_id=self._trace_id)}
        if self._degraded_sinks:
            tags["splade.degraded_sinks"] = ",".join(self._degraded_sinks)
        t.set_tags(tags)
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
            if self.options.log_model:
                model_cfg = _section(self._run_started.config if self._run_started else None, "model")
                steps.append(("pyfunc model", lambda: a.pyfunc_model(
                    model_path, max_length=int(model_cfg.get("max_doc_length") or 128), top_k=model_cfg.get("top_k"),
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
        self._report(complete, unsent)

    def _report(self, complete: bool, unsent: int) -> None:
        t = self.transport
        cut = ("the stop signal" if self._hurry.is_set() else
               f"{self.options.shutdown_timeout:g}s (tracking.shutdown_timeout)")
        lost_end = t.status is not None and not t.terminated
        if self._log_dir is None:
            if t.dropped_points or lost_end:
                log.warning("MLflow: %d metric points did not reach %s and there is no log folder to keep them",
                            t.dropped_points, t.safe_uri)
            return
        if unsent or lost_end:
            what = [f"{unsent} metric points"] if unsent else []
            if lost_end:
                what.append(f"the final status {t.status}")
            log.warning("MLflow: %s did not reach %s%s; kept in %s: send them with `%s %s`",
                        " and ".join(what), t.safe_uri, "" if complete else f" (gave up after {cut})",
                        self._log_dir / UNSENT_FILE, SYNC_COMMAND, self._log_dir)
        elif not complete:
            log.warning("MLflow: gave up on the last uploads to %s after %s (metrics and status are complete)",
                        t.safe_uri, cut)
        if t.dropped_points:
            log.warning("MLflow: %d metric points could not be written anywhere (see the warnings above)",
                        t.dropped_points)
        if t.terminated and t.safe_uri.startswith(("http://", "https://")) and self.experiment_id:
            log.info("MLflow run: %s/#/experiments/%s/runs/%s", t.safe_uri.rstrip("/"), self.experiment_id,
                     t.run_id)
