"""MlflowSink: every run fully tracked in MLflow, without the step loop ever waiting on the network.

How it stays off the hot path: the bus runs this sink on its own worker thread with a bounded queue.
Step metrics are buffered and sent with ``log_batch`` (<= 1000 points per call) every
``tracking.flush_interval`` seconds or 1000 points. Every client call goes through
:func:`splade_obs.recovery.retry` (bounded attempts, backoff with jitter). When the store stops answering,
a circuit breaker stops calling it for a growing cool-down (2 s .. 60 s), points wait in a bounded deque
(oldest dropped and counted once it is full) and are retried at the next flush. ``close(timeout)`` returns
within ``timeout`` even with the server gone; what could not be sent is written to
``<log_dir>/mlflow_unsent.jsonl`` and named in one warning (the local metrics file has it all anyway).

What a run gets (see the README section "MLflow"):
params (the flattened config, <= 100 per call, long values truncated and kept whole in ``config.yaml``),
stepped metrics (``train/*``, ``epoch/*``, ``eval/*``, ``errors/<CATEGORY>``, ``train/skipped_batches``),
tags, dataset inputs, artifacts (config, system info, metrics file, logs, plot, model in HF format and as
an MLflow pyfunc model ``splade_model``, optionally registered), a markdown note and the final status.

Resume: ``create(resume_run_id=...)`` continues that run (status back to RUNNING); only steps after both the
checkpoint step and the last step already in the run are logged, so no point is duplicated.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import re
import socket
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

from ..config import TrainConfig, flatten, is_secret_key, redact, redact_url_credentials
from ..errors import ApplicationError, classify
from ..logging_setup import redact_text, secret_values
from ..events import (CheckpointSaved, DataLoaded, EpochDone, ErrorCaught, EvaluationDone, ModelLoaded,
                      RunFinished, RunStarted, Sink, SinkDegraded, StepDone)
from ..recovery import retry
from .. import tracking

log = logging.getLogger("splade_obs.sinks.mlflow")

MAX_METRICS_PER_BATCH = 1000          # mlflow.utils.validation.MAX_METRICS_PER_BATCH
MAX_PARAMS_TAGS_PER_BATCH = 100       # mlflow.utils.validation.MAX_PARAMS_TAGS_PER_BATCH
MAX_PARAM_VAL_LENGTH = 6000           # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MAX_TAG_VAL_LENGTH = 8000
MAX_DATASET_DIGEST_SIZE = 36
PENDING_LIMIT = 200_000               # metric points kept while the store is down (~40 MB worst case)
HISTORY_LIMIT = 5_000                 # points kept for the plot; halved (every other point) when full
UNSENT_FILE = "mlflow_unsent.jsonl"
LOG_FILE_SUFFIXES = (".log", ".jsonl")
STEP_METRICS = {                      # StepDone attribute -> metric name
    "loss": "train/loss", "learning_rate": "train/lr", "grad_norm": "train/grad_norm",
    "samples_per_second": "train/samples_per_second", "tokens_per_second": "train/tokens_per_second",
    "query_nnz": "train/query_nnz", "doc_nnz": "train/doc_nnz", "flops": "train/flops",
}
CONTEXTS = {"train": "training", "validation": "validation", "eval": "evaluation", "test": "evaluation"}
_BAD_NAME_CHARS = re.compile(r"[^\w\-. :/]")
#: What ``MlflowSink._try`` returns when the call failed or was skipped (many client calls return None).
FAILED = object()


def metric_name(name: str) -> str:
    """An MLflow-valid metric/param name: ``ndcg@10`` -> ``ndcg_at_10``; other odd characters -> ``_``."""
    clean = _BAD_NAME_CHARS.sub("_", name.replace("@", "_at_")).strip("/")
    return re.sub(r"/{2,}", "/", clean) or "_"


def _param_value(value: Any) -> str:
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, default=str)
    return str(value)


def _safe(text: str, secrets: list[str] | None = None) -> str:
    """Text as it may be stored in MLflow: secret env values and URL credentials masked.

    Tags, params, the note and text artifacts are built partly from event text (error messages, paths,
    config values), which can carry a token or a ``user:password@`` URL.
    """
    return redact_url_credentials(redact_text(text, secret_values() if secrets is None else secrets))


def _truncate(text: str, limit: int) -> str:
    marker = "... [truncated, whole value in config.yaml]"
    return text if len(text) <= limit else text[: limit - len(marker)] + marker


def _is_transient(exc: BaseException) -> bool:
    """Connection trouble anywhere in the cause chain, or an MLflow 'try again' error code."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if classify(cur).retryable:
            return True
        if getattr(cur, "error_code", None) in ("TEMPORARILY_UNAVAILABLE", "RESOURCE_EXHAUSTED",
                                                 "REQUEST_LIMIT_EXCEEDED"):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


@contextlib.contextmanager
def _quiet_pyfunc_save() -> Iterator[None]:
    """Silence two advisory notes MLflow prints on every pyfunc save (type hints, cloudpickle): they are
    about choices made on purpose here (inputs of several shapes, a class importable from splade_obs)."""
    pyfunc_log = logging.getLogger("mlflow.pyfunc")
    level = pyfunc_log.level
    pyfunc_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*type hints.*", category=UserWarning)
            yield
    finally:
        pyfunc_log.setLevel(level)


class _Breaker:
    """Stops calling a store that just failed, for a cool-down that doubles up to ``max_wait``."""

    def __init__(self, first_wait: float = 2.0, max_wait: float = 60.0) -> None:
        self.first_wait, self.max_wait = first_wait, max_wait
        self.wait = 0.0
        self.open_until = 0.0

    def is_open(self) -> bool:
        return time.monotonic() < self.open_until

    def failed(self) -> None:
        self.wait = min(self.max_wait, self.wait * 2 if self.wait else self.first_wait)
        self.open_until = time.monotonic() + self.wait

    def ok(self) -> None:
        self.wait, self.open_until = 0.0, 0.0


class MlflowSink(Sink):
    """Sends the run to MLflow through ``MlflowClient`` with an explicit run id (no fluent globals)."""

    name = "mlflow"
    scope = "run"
    threaded = True

    # ------------------------------------------------------------------------------------ creation
    @classmethod
    def create(cls, cfg: TrainConfig, *, bus_shared: dict, resume_run_id: str | None = None,
               data_inputs: list[dict] | None = None) -> "MlflowSink | None":
        """Open (or continue) the MLflow run; None when tracking is off or the store is unreachable.

        With ``cfg.tracking.require`` an unreachable store raises :class:`tracking.TrackingUnavailableError`
        (category DEPENDENCY_ERROR, exit code 10) instead of a warning.
        """
        t = cfg.tracking
        if not t.enabled:
            return None
        uri = t.tracking_uri or tracking.default_tracking_uri()
        safe_uri = tracking.strip_credentials(uri)
        try:
            tracking.lower_http_retries_for(uri)
            tracking.check_store(uri)
            sink = cls(cfg, uri, bus_shared)
            sink._open_run(resume_run_id)
        except Exception as exc:  # noqa: BLE001 - any failure to open the run means "no MLflow for this run"
            err = exc if isinstance(exc, tracking.TrackingUnavailableError) else tracking.TrackingUnavailableError(
                f"cannot open an MLflow run at {safe_uri}: {str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__}",
                original_exception=exc, tracking_uri=safe_uri)
            if t.require:
                raise err from exc
            log.warning("MLflow tracking disabled for this run: %s (local log and metrics files keep everything)",
                        err.message)
            return None
        for item in data_inputs or ():
            sink._log_dataset(item.get("split") or item.get("context") or "train", item.get("source", ""),
                              item.get("digest", ""), item.get("num_examples"), item.get("name"))
        return sink

    def __init__(self, cfg: TrainConfig, tracking_uri: str, bus_shared: dict) -> None:
        from mlflow import MlflowClient

        self.cfg = cfg
        self.tracking_uri = tracking_uri
        self.safe_uri = tracking.strip_credentials(tracking_uri)
        self.shared = bus_shared
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self.run_id = ""
        self.experiment_id = ""
        self.resumed = False
        self.flush_interval = max(0.0, float(cfg.tracking.flush_interval))
        self.flush_every = MAX_METRICS_PER_BATCH
        self._pending: collections.deque[Any] = collections.deque()
        self._pending_lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._breaker = _Breaker()
        self._last_flush = time.monotonic()
        self.dropped_points = 0
        self.sent_points = 0
        self._min_step = 0
        self._last_step = 0
        self._history: list[dict[str, float]] = []
        self._history_stride = 1
        self._error_counts: collections.Counter[str] = collections.Counter()
        self._skipped_batches = 0
        self._datasets: list[dict[str, Any]] = []
        self._logged_datasets: set[tuple[str, str, str]] = set()
        self._existing_params: dict[str, str] = {}
        self._run_started: RunStarted | None = None
        self._model: ModelLoaded | None = None
        self._evals: list[EvaluationDone] = []
        self._finished = threading.Event()
        self._finishing = False
        self._status: str | None = None
        self._uploaded_logs: dict[str, int] = {}
        self._log_dir = cfg.log_dir
        self._degraded_sinks: list[str] = []

    def _open_run(self, resume_run_id: str | None) -> None:
        run = self._call("get_run", self.client.get_run, resume_run_id, attempts=2) if resume_run_id else None
        if run is not None and run.info.lifecycle_stage == "active":
            self.run_id, self.experiment_id, self.resumed = run.info.run_id, run.info.experiment_id, True
            self._call("update_run", self.client.update_run, self.run_id, status="RUNNING")
            self._existing_params = dict(run.data.params)
            self._min_step = self._last_logged_step(run)
            resumes = int(run.data.tags.get("splade.resume_count", "0") or 0) + 1
            self._set_tags({"splade.resume_count": str(resumes)})
        else:
            if resume_run_id:
                log.warning("MLflow run %s to resume was not found at %s; starting a new run",
                            resume_run_id, self.safe_uri)
            self.experiment_id = self._experiment_id()
            run_name = self.cfg.tracking.run_name or tracking.generate_run_name()
            tags = self._start_tags(resume_run_id)
            run = self._call("create_run", self.client.create_run, self.experiment_id, tags=tags,
                             run_name=run_name)
            self.run_id = run.info.run_id
        self.shared["mlflow.run_id"] = self.run_id
        self.shared["mlflow.experiment_id"] = self.experiment_id
        self.shared["mlflow.tracking_uri"] = self.safe_uri
        log.info("MLflow run %s (experiment %s) at %s%s", self.run_id, self.experiment_id, self.safe_uri,
                 " (resumed)" if self.resumed else "")

    def _last_logged_step(self, run: Any) -> int:
        """The latest ``train/loss`` step already in the run (the store keeps each key's latest point)."""
        latest = getattr(run.data, "_metric_objs", None)
        if latest is None:
            latest = self._call("get_metric_history", self.client.get_metric_history, self.run_id, "train/loss")
        return max((m.step for m in latest if m.key == "train/loss"), default=0)

    def _experiment_id(self) -> str:
        name = self.cfg.tracking.experiment_name
        exp = self._call("get_experiment_by_name", self.client.get_experiment_by_name, name)
        if exp is not None:
            if exp.lifecycle_stage != "active":
                self._call("restore_experiment", self.client.restore_experiment, exp.experiment_id)
            return exp.experiment_id
        location = tracking.artifact_location_for(self.tracking_uri, name)
        try:
            return self._call("create_experiment", self.client.create_experiment, name,
                              artifact_location=location, attempts=1)
        except ApplicationError:
            exp = self.client.get_experiment_by_name(name)  # created meanwhile by another process
            if exp is None:
                raise
            return exp.experiment_id

    def _start_tags(self, previous_run_id: str | None) -> dict[str, str]:
        import getpass

        tags = {"mlflow.source.name": "splade-obs train", "mlflow.source.type": "LOCAL",
                "host": socket.gethostname(), "splade.tracking_uri": self.safe_uri}
        try:
            tags["mlflow.user"] = getpass.getuser()
        except Exception:  # noqa: BLE001 - no user name in some containers
            pass
        commit = tracking.git_commit()
        if commit:
            tags["mlflow.source.git.commit"] = commit
        if previous_run_id:
            tags["splade.resumed_from_missing_run"] = previous_run_id
        return tags

    # ----------------------------------------------------------------------------------- client calls
    def _call(self, op: str, fn: Callable[..., Any], *args: Any, attempts: int = 3, **kw: Any) -> Any:
        """One client call with bounded retries on transient faults; feeds the circuit breaker."""

        def once() -> Any:
            try:
                return fn(*args, **kw)
            except Exception as exc:  # noqa: BLE001 - re-raised typed, retryable only when transient
                raise ApplicationError(f"MLflow {op} failed: {str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__}",
                                       original_exception=exc, retryable=_is_transient(exc),
                                       operation=f"mlflow.{op}") from exc

        try:
            result = retry(max_attempts=attempts, delay=0.5, backoff_factor=2.0, max_delay=2.0,
                           operation=f"mlflow.{op}")(once)()
        except ApplicationError as err:
            if err.retryable:
                self._breaker.failed()
            raise
        self._breaker.ok()
        return result

    def _try(self, op: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        """``_call`` that logs and returns :data:`FAILED` instead of raising: a hook never fails the bus
        over one tracking call (five in a row would degrade the sink and lose the rest of the run)."""
        if self._breaker.is_open():
            log.warning("MLflow %s skipped: the tracking store is not answering", op)
            return FAILED
        try:
            return self._call(op, fn, *args, **kw)
        except ApplicationError as err:
            log.warning("%s", err.message)
            return FAILED

    def _set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        secrets = secret_values()
        items = [RunTag(k, _truncate(_safe(str(v), secrets), MAX_TAG_VAL_LENGTH))
                 for k, v in tags.items() if v is not None]
        for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            self._try("set_tags", self.client.log_batch, self.run_id, tags=items[i:i + MAX_PARAMS_TAGS_PER_BATCH])

    # --------------------------------------------------------------------------------------- metrics
    def _add(self, key: str, value: Any, step: int, time_ns: int) -> None:
        from mlflow.entities import Metric

        try:
            v = float(value)
        except (TypeError, ValueError):
            return
        with self._pending_lock:
            if len(self._pending) >= PENDING_LIMIT:
                self._pending.popleft()
                self.dropped_points += 1
            self._pending.append(Metric(key, v, time_ns // 1_000_000, int(step)))

    def _maybe_flush(self) -> None:
        due = time.monotonic() - self._last_flush >= self.flush_interval or len(self._pending) >= self.flush_every
        if due and not self._breaker.is_open():
            self.flush()

    def flush(self, deadline: float | None = None, attempts: int = 3) -> bool:
        """Send pending points in batches of <= 1000; True when nothing is left. Failed points stay queued."""
        if not self._send_lock.acquire(timeout=max(0.0, (deadline or time.monotonic() + 60) - time.monotonic())):
            return False
        try:
            self._last_flush = time.monotonic()
            while self._pending:
                if deadline is not None and time.monotonic() >= deadline:
                    return False
                with self._pending_lock:
                    batch = [self._pending[i] for i in range(min(MAX_METRICS_PER_BATCH, len(self._pending)))]
                try:
                    self._call("log_batch", self.client.log_batch, self.run_id, metrics=batch, attempts=attempts)
                except ApplicationError as err:
                    if not err.retryable:
                        log.warning("%s; dropping %d points of this batch", err.message, len(batch))
                        self._pop(len(batch), dropped=True)
                        continue
                    log.warning("MLflow unreachable, %d metric points kept for the next flush (%s)",
                                len(self._pending), err.message)
                    return False
                self._pop(len(batch))
            return True
        finally:
            self._send_lock.release()

    def _pop(self, n: int, dropped: bool = False) -> None:
        with self._pending_lock:
            for _ in range(min(n, len(self._pending))):
                self._pending.popleft()
        if dropped:
            self.dropped_points += n
        else:
            self.sent_points += n

    def _remember(self, step: int, **values: float) -> None:
        """Keep a bounded, evenly thinned history for the plot (every ``stride``-th step)."""
        if step % self._history_stride:
            return
        self._history.append({"step": step, **values})
        if len(self._history) >= HISTORY_LIMIT:
            self._history_stride *= 2
            self._history = [h for h in self._history if int(h["step"]) % self._history_stride == 0]

    # ----------------------------------------------------------------------------------------- hooks
    def on_run_started(self, e: RunStarted) -> None:
        self._run_started = e
        self._min_step = max(self._min_step, e.start_step)
        self._last_step = e.start_step
        if e.log_dir:
            self._log_dir = Path(e.log_dir)
        current = self._try("get_run", self.client.get_run, self.run_id, attempts=2)
        if e.run_name and current is not FAILED and current.info.run_name != e.run_name and not self.resumed:
            self._try("update_run", self.client.update_run, self.run_id, name=e.run_name)
        self._log_params(flatten(e.config) if e.config else self.cfg.flatten())
        self._log_config_artifact(e.config or self.cfg.to_dict())
        self._log_json_artifact(e.system_info, "system_info.json")
        self._set_tags(self._run_tags(e))

    def _run_tags(self, e: RunStarted) -> dict[str, Any]:
        info = e.system_info or {}
        tags: dict[str, Any] = {
            "host": info.get("hostname") or socket.gethostname(),
            "splade.world_size": e.world_size, "splade.total_steps": e.total_steps,
            "splade.amp_mode": self.cfg.optim.mixed_precision, "splade.model": self.cfg.model.name,
            "splade.output_dir": e.output_dir, "splade.status": "RUNNING",
        }
        if info.get("mixed_precision"):
            tags["splade.amp_dtype"] = info["mixed_precision"]
        if info.get("git_commit"):
            tags["mlflow.source.git.commit"] = info["git_commit"]
            tags["splade.git_dirty"] = info.get("git_dirty")
        if e.resumed:
            tags["splade.resumed_from_step"] = e.start_step
        if self.shared.get("otel.trace_id"):
            tags["otel.trace_id"] = self.shared["otel.trace_id"]
        return tags

    def _log_params(self, flat: dict[str, Any]) -> None:
        """Log params not in the run yet; on resume, changed values are recorded as a tag (params are immutable)."""
        from mlflow.entities import Param

        fresh, changed = [], {}
        secrets = secret_values()
        for key, value in flat.items():
            text = "***" if is_secret_key(key) else _safe(_param_value(value), secrets)
            text = _truncate(text, MAX_PARAM_VAL_LENGTH)
            old = self._existing_params.get(key)
            if old is None:
                fresh.append(Param(key, text))
            elif old != text:
                changed[key] = text
        for i in range(0, len(fresh), MAX_PARAMS_TAGS_PER_BATCH):
            chunk = fresh[i:i + MAX_PARAMS_TAGS_PER_BATCH]
            if self._try("log_params", self.client.log_batch, self.run_id, params=chunk) is not FAILED:
                self._existing_params.update({p.key: p.value for p in chunk})
        if changed:
            self._set_tags({"splade.resume.changed_params": json.dumps(changed)})

    def on_data_loaded(self, e: DataLoaded) -> None:
        self._log_dataset(e.split, e.source, e.digest, e.num_examples, None, e.fmt, e.num_skipped)

    def _log_dataset(self, split: str, source: str, digest: str, num_examples: int | None,
                     name: str | None = None, fmt: str = "", num_skipped: int = 0) -> None:
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        context = CONTEXTS.get(split, split)
        name = name or f"{Path(source).name or 'data'}"
        key = (name, digest, context)
        record = {"split": split, "name": name, "source": source, "digest": digest,
                  "num_examples": num_examples, "num_skipped": num_skipped, "format": fmt}
        self._datasets.append(record)
        if key in self._logged_datasets:
            return
        self._logged_datasets.add(key)
        profile = json.dumps({"num_examples": num_examples, "num_skipped": num_skipped, "format": fmt})
        short = (digest or "unknown").split(":", 1)[-1][:MAX_DATASET_DIGEST_SIZE]  # "sha256:ab.." -> "ab.."
        ds = Dataset(name=name, digest=short, source_type="local",
                     source=json.dumps({"uri": _safe(str(source))}), profile=profile)
        self._try("log_inputs", self.client.log_inputs, self.run_id,
                  datasets=[DatasetInput(ds, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])])
        self._log_params({f"data.{split}_digest": digest, f"data.{split}_num_examples": num_examples})
        self._set_tags({f"splade.data.{split}.digest": digest, f"splade.data.{split}.source": source})

    def on_model_loaded(self, e: ModelLoaded) -> None:
        self._model = e
        self._set_tags({"device": e.device, "amp_dtype": e.amp_dtype, "splade.model_path": e.path})
        self._log_params({"model.num_parameters": e.num_parameters})

    def on_step_done(self, e: StepDone) -> None:
        self._last_step = max(self._last_step, e.step)
        if e.step <= self._min_step:
            return
        for attr, key in STEP_METRICS.items():
            self._add(key, getattr(e, attr), e.step, e.time_ns)
        for part, value in e.parts.items():
            self._add(metric_name(f"train/{part}"), value, e.step, e.time_ns)
        if e.grad_scale is not None:
            self._add("train/grad_scale", e.grad_scale, e.step, e.time_ns)
        self._remember(e.step, loss=e.loss, query_nnz=e.query_nnz, doc_nnz=e.doc_nnz)
        self._maybe_flush()

    def on_epoch_done(self, e: EpochDone) -> None:
        if e.step <= self._min_step:
            return
        self._add("epoch/train_loss", e.train_loss, e.step, e.time_ns)
        self._add("epoch/duration_seconds", e.duration_seconds, e.step, e.time_ns)
        self._add("epoch/epoch", e.epoch, e.step, e.time_ns)
        if e.val_loss is not None:
            self._add("epoch/val_loss", e.val_loss, e.step, e.time_ns)
        for k, v in e.extra.items():
            self._add(metric_name(f"epoch/{k}"), v, e.step, e.time_ns)
        self.flush()

    def on_evaluation_done(self, e: EvaluationDone) -> None:
        self._evals.append(e)
        if e.step <= self._min_step and e.step != 0:
            return
        for k, v in e.metrics.items():
            self._add(metric_name(f"eval/{k}"), v, e.step, e.time_ns)
        self._add("eval/duration_seconds", e.duration_seconds, e.step, e.time_ns)
        self.flush()

    def on_error_caught(self, e: ErrorCaught) -> None:
        self._error_counts[e.category] += 1
        step = e.step if e.step is not None else self._last_step
        if e.skipped_batch:
            self._skipped_batches += 1
        if step <= self._min_step and step != 0:
            return
        count = e.counts.get(e.category, self._error_counts[e.category])
        self._add(metric_name(f"errors/{e.category}"), count, step, e.time_ns)
        if e.skipped_batch:
            self._add("train/skipped_batches", max(self._skipped_batches, sum(e.counts.values())), step, e.time_ns)
        if e.fatal:
            self.flush()

    def on_checkpoint_saved(self, e: CheckpointSaved) -> None:
        self._set_tags({"splade.last_checkpoint_step": e.step, "splade.last_checkpoint_path": e.path,
                        "splade.last_checkpoint_reason": e.reason})
        if e.step > self._min_step:
            self._add("checkpoint/duration_seconds", e.duration_seconds, e.step, e.time_ns)

    def on_sink_degraded(self, e: SinkDegraded) -> None:
        self._degraded_sinks.append(e.sink)

    def on_run_finished(self, e: RunFinished) -> None:
        """Flush, then the finishing touches (each may fail alone), then the final status."""
        self._finishing = True
        try:
            self._finish(e)
        finally:
            self._finished.set()

    # ------------------------------------------------------------------------------------- finishing
    def _finish(self, e: RunFinished) -> None:
        step = max(e.step, self._last_step)
        for k, v in e.final_metrics.items():
            self._add(metric_name(f"final/{k}"), v, step, e.time_ns)
        for k, v in e.counters.items():
            key = k if k.startswith("errors/") else f"train/{k}"
            self._add(metric_name(key), v, step, e.time_ns)
        self.flush(attempts=2)
        reachable = not self._breaker.is_open()
        if reachable:
            tags = {"splade.status": e.status, "splade.final_step": e.step,
                    "mlflow.note.content": self._note(e)}
            if self.shared.get("otel.trace_id"):
                tags["otel.trace_id"] = self.shared["otel.trace_id"]
            if self._degraded_sinks:
                tags["splade.degraded_sinks"] = ",".join(self._degraded_sinks)
            self._set_tags(tags)
            self._log_finish_artifacts(e)
        status = e.status if e.status in ("FINISHED", "FAILED", "KILLED") else "FAILED"
        if self._try("set_terminated", self.client.set_terminated, self.run_id, status=status, attempts=2) is FAILED:
            log.warning("MLflow run %s could not be marked %s (store unreachable)", self.run_id, status)
            return
        self._status = status

    def _log_finish_artifacts(self, e: RunFinished) -> None:
        steps: list[tuple[str, Callable[[], None]]] = [
            ("training metrics", self._log_metrics_file),
            ("log files", self._log_log_files),
            ("plot", self._log_plot),
        ]
        if e.model_path and Path(e.model_path).is_dir():
            steps.append(("HF model", lambda: self._try("log_model_hf", self.client.log_artifacts, self.run_id,
                                                        e.model_path, "model/hf")))
            if self.cfg.tracking.log_model:
                steps.append(("pyfunc model", lambda: self._log_pyfunc(e.model_path or "")))
        for what, fn in steps:
            if self._breaker.is_open():
                log.warning("MLflow: skipping %s (tracking store not answering)", what)
                continue
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - one missing artifact must not block the final status
                log.warning("MLflow: could not log %s: %s: %s", what, type(exc).__name__, exc)

    def _note(self, e: RunFinished) -> str:
        """The markdown summary shown on the run page: data, model, result."""
        lines = [f"### splade-obs run — {e.status}", ""]
        for d in self._datasets:
            n = f"{d['num_examples']} examples" if d.get("num_examples") is not None else "examples: ?"
            lines.append(f"- **Data ({d['split']})**: `{d['source']}` — {n}, digest `{str(d['digest'])[:12]}`")
        m = self._model
        if m is not None:
            lines.append(f"- **Model**: `{m.name}` — {m.num_parameters / 1e6:.1f}M parameters on {m.device}, "
                         f"AMP {m.amp_dtype}")
        total = self._run_started.total_steps if self._run_started else 0
        lines.append(f"- **Result**: step {e.step}/{total or '?'} in {e.duration_seconds:.1f}s")
        for k, v in sorted(e.final_metrics.items()):
            lines.append(f"  - {k}: {v:.4g}")
        errors = {k: v for k, v in e.counters.items() if v}
        if errors:
            lines.append("- **Errors**: " + ", ".join(f"{k}: {v}" for k, v in sorted(errors.items())))
        if e.error:
            lines.append(f"- **Failure**: `{e.error.get('category')}` — {str(e.error.get('message'))[:500]}")
        if self.shared.get("otel.trace_id"):
            lines.append(f"- **Trace**: `{self.shared['otel.trace_id']}`")
        return "\n".join(lines)

    def _log_config_artifact(self, config: dict[str, Any]) -> None:
        import yaml

        text = _safe(yaml.safe_dump(redact(config), sort_keys=False, default_flow_style=False))
        self._try("log_config", self.client.log_text, self.run_id, text, "config.yaml")

    def _log_json_artifact(self, obj: Any, name: str) -> None:
        if obj:
            self._try(f"log_{name}", self.client.log_text, self.run_id,
                      _safe(json.dumps(obj, indent=2, default=str)), name)

    def _log_metrics_file(self) -> None:
        path = self._log_dir / "training_metrics.json"
        if path.is_file():
            self._try("log_metrics_file", self.client.log_artifact, self.run_id, str(path))
        else:  # no metrics-file sink in this bus: write the sink's own record
            self._log_json_artifact({"history": self._history, "errors_by_category": dict(self._error_counts),
                                     "skipped_batches": self._skipped_batches}, "training_metrics.json")

    def _log_log_files(self) -> None:
        """Non-empty ``*.log`` / ``*.jsonl`` files of the log folder (errors, bad records, traces, logs)."""
        for path in self._log_files():
            size = path.stat().st_size
            if self._uploaded_logs.get(str(path)) == size:
                continue
            if self._try("log_file", self.client.log_artifact, self.run_id, str(path), "logs") is not FAILED:
                self._uploaded_logs[str(path)] = size

    def _log_files(self) -> list[Path]:
        if not self._log_dir.is_dir():
            return []
        return sorted(p for p in self._log_dir.iterdir()
                      if p.is_file() and p.suffix in LOG_FILE_SUFFIXES and p.stat().st_size > 0
                      and p.name != UNSENT_FILE)

    def _log_plot(self) -> None:
        if not self._history:
            return
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        steps = [h["step"] for h in self._history]
        fig = Figure(figsize=(9, 6))
        FigureCanvasAgg(fig)
        ax1, ax2 = fig.subplots(2, 1, sharex=True)
        ax1.plot(steps, [h["loss"] for h in self._history], label="train/loss")
        ax1.set_ylabel("loss")
        ax1.legend()
        ax2.plot(steps, [h["query_nnz"] for h in self._history], label="query nnz")
        ax2.plot(steps, [h["doc_nnz"] for h in self._history], label="doc nnz")
        ax2.set_xlabel("step")
        ax2.set_ylabel("non-zero terms")
        ax2.legend()
        fig.suptitle("loss and sparsity")
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "loss_sparsity.png"
            fig.savefig(out, dpi=90)
            self._try("log_plot", self.client.log_artifact, self.run_id, str(out), "plots")

    def _log_pyfunc(self, model_path: str) -> None:
        import mlflow.pyfunc

        with tempfile.TemporaryDirectory() as tmp, _quiet_pyfunc_save():
            cls = tracking.SpladePyfuncModel  # built on first access: MLflow checks its hints then
            local = Path(tmp) / "splade_model"
            mlflow.pyfunc.save_model(
                path=str(local), python_model=cls(max_length=self.cfg.model.max_doc_length,
                                                  top_k=self.cfg.model.top_k),
                artifacts={"hf": model_path}, pip_requirements=tracking.pip_requirements(),
                metadata={"splade_obs.run_id": self.run_id, "task": "sparse-encoding"})
            self._call("log_pyfunc", self.client.log_artifacts, self.run_id, str(local), "splade_model")
        name = self.cfg.tracking.register_model
        if name:
            self._register(name)

    def _register(self, name: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        run = self._call("get_run", self.client.get_run, self.run_id)
        version = self._call("create_model_version", self.client.create_model_version, name,
                             f"{run.info.artifact_uri}/splade_model", run_id=self.run_id)
        self._set_tags({"splade.registered_model": f"{name}/{version.version}"})
        log.info("MLflow: registered model %s version %s", name, version.version)

    # -------------------------------------------------------------------------------------- shutdown
    def close(self, timeout: float = 5.0) -> None:
        """Flush and settle the run within ``timeout`` seconds, whatever the store does.

        The work runs on a daemon thread joined with the timeout, so a hung HTTP call cannot hold the
        process. Points still unsent at the end go to ``<log_dir>/mlflow_unsent.jsonl``.
        """
        deadline = time.monotonic() + max(0.1, timeout)
        worker = threading.Thread(target=self._close_work, args=(deadline,), name="mlflow-close", daemon=True)
        worker.start()
        worker.join(max(0.0, deadline - time.monotonic()))
        if worker.is_alive():
            log.warning("MLflow sink: close did not finish within %.1fs", timeout)
        self._write_unsent()

    def _close_work(self, deadline: float) -> None:
        if self._finishing and not self._finished.wait(max(0.0, deadline - time.monotonic())):
            return  # on_run_finished is still working (on the bus thread)
        if self._breaker.is_open():
            self._breaker.open_until = 0.0  # one last try at the end
        if not self.flush(deadline=deadline, attempts=1):
            return
        if not self._finished.is_set():
            # the run ended without RunFinished (crash, hard interrupt): do not leave it RUNNING
            self._try("set_terminated", self.client.set_terminated, self.run_id, status="KILLED", attempts=1)
        elif self._status is not None and time.monotonic() < deadline:
            self._log_log_files()  # logs and traces written after RunFinished (other sinks' close)

    def _write_unsent(self) -> None:
        """Everything still pending goes to a local JSONL file; one warning names the counts."""
        with self._pending_lock:
            pending = list(self._pending)
        if not pending and not self.dropped_points:
            return
        path = self._log_dir / UNSENT_FILE
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"run_id": self.run_id, "tracking_uri": self.safe_uri, "unsent": len(pending),
                                     "dropped": self.dropped_points, "sent": self.sent_points}) + "\n")
                for m in pending:
                    fh.write(json.dumps({"key": m.key, "value": m.value if math.isfinite(m.value) else str(m.value),
                                         "step": m.step, "timestamp": m.timestamp}) + "\n")
        except OSError as exc:
            log.warning("MLflow sink: could not write %s: %s", path, exc)
            return
        log.warning("MLflow sink: %d metric points not sent to %s (kept in %s), %d dropped from the full buffer",
                    len(pending), self.safe_uri, path, self.dropped_points)

    def unsent(self) -> list[Any]:
        with self._pending_lock:
            return list(self._pending)
