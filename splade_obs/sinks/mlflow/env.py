"""MLflow's environment variables, honoured the way MLflow's own clients read them: one resolution.

:func:`resolve_options` turns the ``tracking`` section of the config (plain values, passed by ``run.build_sinks``)
into :class:`~splade_obs.sinks.mlflow.sink.MlflowOptions`. For each setting the first that is given wins:

* tracking URI: ``--tracking-uri``, ``MLFLOW_TRACKING_URI``, ``sqlite:///<cwd>/mlruns/mlflow.db``;
* experiment: ``--experiment-name``, ``MLFLOW_EXPERIMENT_NAME``, then ``MLFLOW_EXPERIMENT_ID`` (it must exist),
  ``splade-obs``;
* run name: ``--run-name``, ``MLFLOW_RUN_NAME``, a generated readable name;
* run to continue: the checkpoint's run (``--resume``), ``MLFLOW_RUN_ID`` (it must exist), a new run;
* extra run tags: ``MLFLOW_TAGS`` (a JSON object), none;
* system metrics: ``--[no-]system-metrics``, ``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING``, on; every
  ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` seconds (10), averaging ``MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING``
  samples a point (1), names prefixed by ``MLFLOW_SYSTEM_METRICS_NODE_ID`` (``node_<N>`` under a multi-node
  torchrun, else none).

As in MLflow's fluent client, ``MLFLOW_EXPERIMENT_NAME`` wins over ``MLFLOW_EXPERIMENT_ID`` and both set must name
the same experiment; an experiment id or run id that the store does not have is an error, not a new experiment
or run. ``MLFLOW_TAGS`` (the convention of the Hugging Face MLflow callback) and ``MLFLOW_RUN_NAME`` are not read
by MLflow itself. A value that cannot be used (bad JSON, a non-number interval, ``maybe`` for a boolean) is a
:class:`~splade_obs.errors.ConfigError` naming the variable, before the run opens.

The names of the variables that decided something are recorded in the run's tag ``splade.mlflow_env`` (names
only); the config params keep the values as configured (a setting left unset is not a param).
"""

from __future__ import annotations

import getpass
import json
import math
import os
import socket
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from ...errors import ApplicationError, ConfigError
from ...redaction import REDACTED, is_secret_key, safe_text
from . import ui

DEFAULT_EXPERIMENT = "splade-obs"
#: MLflow's own default sampling interval (``SystemMetricsMonitor(sampling_interval=10)``)
DEFAULT_SAMPLING_INTERVAL = 10.0
#: shorter intervals are raised to this (a sampler spinning faster would cost the step loop CPU time)
MIN_SAMPLING_INTERVAL = 0.1

TRACKING_URI = "MLFLOW_TRACKING_URI"
EXPERIMENT_NAME = "MLFLOW_EXPERIMENT_NAME"
EXPERIMENT_ID = "MLFLOW_EXPERIMENT_ID"
RUN_ID = "MLFLOW_RUN_ID"
RUN_NAME = "MLFLOW_RUN_NAME"
TAGS = "MLFLOW_TAGS"
ENABLE_SYSTEM_METRICS = "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING"
SAMPLING_INTERVAL = "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"
SAMPLES_BEFORE_LOGGING = "MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING"
NODE_ID = "MLFLOW_SYSTEM_METRICS_NODE_ID"

#: every variable this module reads, in the order of the table above
ENV_VARS: tuple[str, ...] = (TRACKING_URI, EXPERIMENT_NAME, EXPERIMENT_ID, RUN_NAME, RUN_ID, TAGS,
                             ENABLE_SYSTEM_METRICS, SAMPLING_INTERVAL, SAMPLES_BEFORE_LOGGING, NODE_ID)


@dataclass(frozen=True)
class SystemMetricsOptions:
    """How the run's system metrics are sampled (see ``system_metrics.py``)."""

    sampling_interval: float = DEFAULT_SAMPLING_INTERVAL   # seconds between samples
    samples_before_logging: int = 1                        # samples averaged into one logged point
    node_id: str | None = None                             # metric names system/<node_id>/... when set


def _env(name: str, environ: Mapping[str, str]) -> str | None:
    """The variable's value, None when unset or blank (MLflow treats an empty value as unset too)."""
    value = environ.get(name)
    return value if value is not None and value.strip() else None


def _bad(name: str, value: str, expected: str, hint: str) -> ConfigError:
    shown = safe_text(value)[:200]
    return ConfigError(f"environment variable {name}={shown!r}: expected {expected}", field=name, hint=hint)


def env_bool(name: str, environ: Mapping[str, str]) -> bool | None:
    """true/false/1/0 (any case), as MLflow's boolean variables; None when unset."""
    value = _env(name, environ)
    if value is None:
        return None
    word = value.strip().lower()
    if word not in ("true", "false", "1", "0"):
        raise _bad(name, value, "true, false, 1 or 0", f"unset {name} or set it to true or false")
    return word in ("true", "1")


def env_tags(environ: Mapping[str, str]) -> dict[str, str]:
    """``MLFLOW_TAGS``: a JSON object of extra run tags. Values become text (strings as they are, anything else
    as JSON); a secret-looking key's value is masked; a key MLflow would refuse is an error here already."""
    raw = _env(TAGS, environ)
    if raw is None:
        return {}
    hint = f"""set {TAGS} to a JSON object of strings, e.g. {TAGS}='{{"team": "search", "ticket": "ML-42"}}'"""
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise _bad(TAGS, raw, f"a JSON object ({exc})", hint) from None
    if not isinstance(data, dict):
        raise _bad(TAGS, raw, f"a JSON object, got a JSON {type(data).__name__}", hint)
    from mlflow.utils.validation import _validate_tag_name

    tags: dict[str, str] = {}
    for key, value in data.items():
        try:
            _validate_tag_name(key)
        except Exception as exc:  # noqa: BLE001 - MlflowException: the reason, in MLflow's words
            raise ConfigError(f"environment variable {TAGS}: tag name {key!r} is not valid: "
                              f"{str(exc).splitlines()[0]}", field=TAGS, hint=hint) from None
        text = value if isinstance(value, str) else json.dumps(value)
        tags[key] = REDACTED if is_secret_key(key) else safe_text(text)  # URL credentials, secret env values
    return tags


def env_float(name: str, environ: Mapping[str, str]) -> float | None:
    value = _env(name, environ)
    if value is None:
        return None
    try:
        out = float(value)
    except ValueError:
        out = math.nan
    if not math.isfinite(out) or out <= 0:
        raise _bad(name, value, "a number of seconds > 0", f"e.g. {name}=10, or unset it (default 10)")
    return out


def env_int(name: str, environ: Mapping[str, str]) -> int | None:
    value = _env(name, environ)
    if value is None:
        return None
    try:
        out = int(value)
    except ValueError:
        out = 0
    if out < 1:
        raise _bad(name, value, "an integer >= 1", f"e.g. {name}=1, or unset it (default 1)")
    return out


def default_node_id(environ: Mapping[str, str]) -> str | None:
    """``node_<GROUP_RANK>`` when torchrun runs more than one node (``GROUP_WORLD_SIZE`` > 1), else None."""
    try:
        nodes = int(environ.get("GROUP_WORLD_SIZE", "1") or 1)
    except ValueError:
        return None
    return f"node_{environ.get('GROUP_RANK', '0') or '0'}" if nodes > 1 else None


def resolve_system_metrics(flag: bool | None, environ: Mapping[str, str] | None = None
                           ) -> tuple[SystemMetricsOptions | None, list[str]]:
    """The system-metrics options (None: off) and the variables that decided them.

    On/off: the flag (``--system-metrics`` / ``--no-system-metrics`` / config) when given, else
    ``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING``, else on. The numbers come from MLflow's variables, checked here.
    """
    environ = os.environ if environ is None else environ
    used: list[str] = []
    enabled = flag
    if enabled is None:
        enabled = env_bool(ENABLE_SYSTEM_METRICS, environ)
        used += [ENABLE_SYSTEM_METRICS] if enabled is not None else []
    if enabled is False:
        return None, used
    interval = env_float(SAMPLING_INTERVAL, environ)
    samples = env_int(SAMPLES_BEFORE_LOGGING, environ)
    node = _env(NODE_ID, environ)
    used += [n for n, v in ((SAMPLING_INTERVAL, interval), (SAMPLES_BEFORE_LOGGING, samples), (NODE_ID, node))
             if v is not None]
    return SystemMetricsOptions(
        sampling_interval=max(MIN_SAMPLING_INTERVAL, interval or DEFAULT_SAMPLING_INTERVAL),
        samples_before_logging=samples or 1, node_id=node or default_node_id(environ)), used


def resolve_run_name(configured: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """``--run-name`` / ``tracking.run_name``, else ``MLFLOW_RUN_NAME``, else None (the caller generates one)."""
    return configured or _env(RUN_NAME, os.environ if environ is None else environ)


def resolve_options(tracking: Any, *, run_name: str | None = None, log_dir: str | None = None,
                    environ: Mapping[str, str] | None = None) -> Any:
    """:class:`MlflowOptions` for the config's ``tracking`` section (a ``TrackingConfig``), with MLflow's
    variables filling what the flags and the config file leave unset (the table in this module's docstring).

    ``run_name``: the name the run already has (``run.run_training`` resolves it once, with
    :func:`resolve_run_name`, for every sink). Raises :class:`ConfigError` naming a variable it cannot use.
    """
    from .sink import MlflowOptions

    environ = os.environ if environ is None else environ
    t = tracking
    used: list[str] = []
    tracking_uri = t.tracking_uri or _env(TRACKING_URI, environ)
    if not t.tracking_uri and tracking_uri:
        used.append(TRACKING_URI)
    experiment_name, experiment_id = t.experiment_name, None
    if not experiment_name:
        experiment_name, experiment_id = _env(EXPERIMENT_NAME, environ), _env(EXPERIMENT_ID, environ)
        used += [n for n, v in ((EXPERIMENT_NAME, experiment_name), (EXPERIMENT_ID, experiment_id)) if v]
        if not experiment_name and not experiment_id:
            experiment_name = DEFAULT_EXPERIMENT
    name = run_name or resolve_run_name(t.run_name, environ)
    if not t.run_name and name and name == _env(RUN_NAME, environ):
        used.append(RUN_NAME)
    run_id = _env(RUN_ID, environ)
    tags = env_tags(environ)
    used += [n for n, v in ((RUN_ID, run_id), (TAGS, tags)) if v]
    system, sys_used = resolve_system_metrics(getattr(t, "system_metrics", None), environ)
    return MlflowOptions(
        tracking_uri=tracking_uri, experiment_name=experiment_name, experiment_id=experiment_id, run_name=name,
        run_id=run_id.strip() if run_id else None, tags=tags, system_metrics=system,
        env_sources=tuple(dict.fromkeys(used + sys_used)), require=t.require, register_model=t.register_model,
        log_model=t.log_model, flush_interval=t.flush_interval, log_dir=log_dir, shutdown_timeout=t.shutdown_timeout)


def start_tags(safe_uri: str, options: Any, previous_run_id: str | None = None) -> dict[str, str]:
    """The tags a new run is created with: source, user, host, commit, the store (without credentials), then
    :func:`identity_tags` (``MLFLOW_TAGS`` win over the ones before)."""
    from . import store

    tags = {"mlflow.source.name": "splade-obs train", "mlflow.source.type": "LOCAL",
            "host": socket.gethostname(), "splade.tracking_uri": safe_uri}
    try:
        tags["mlflow.user"] = getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers
        pass
    commit = store.git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    if previous_run_id:
        tags["splade.resumed_from_missing_run"] = previous_run_id
    tags.update(identity_tags(options))
    return tags


def identity_tags(options: Any) -> dict[str, str]:
    """The run's tags from these settings: ``MLFLOW_TAGS``' tags, ``splade.mlflow_env`` (the names of the MLflow
    variables used, never their values) and ``splade.system_metrics`` (how they are sampled, or ``off``)."""
    tags = dict(options.tags or {})
    if options.env_sources:
        tags["splade.mlflow_env"] = ",".join(options.env_sources)
    sm = options.system_metrics
    if sm is None:
        tags["splade.system_metrics"] = "off"
    else:
        per = f", {sm.samples_before_logging} samples a point" if sm.samples_before_logging > 1 else ""
        node = f", node {sm.node_id}" if sm.node_id else ""
        tags["splade.system_metrics"] = f"every {sm.sampling_interval:g}s{per}{node}"
    return tags


def latest_step(run: Any, prefix: str, history: Callable[[], Any] | None = None) -> int | None:
    """The latest step of ``run``'s metrics whose key starts with ``prefix`` (None: no such point), from the run
    object the caller holds (the store keeps each key's latest point), else from ``history()``: a resumed run's
    ``train/loss`` (points at or before it are in already), or its ``system/`` points (where MLflow's
    ``resume_logging`` continues)."""
    latest = getattr(getattr(run, "data", None), "_metric_objs", None)
    if latest is None and history is not None:
        latest = history()
    steps = [m.step for m in latest or () if m.key.startswith(prefix)]
    return max(steps) if steps else None


# ------------------------------------------------------------------------------------ store lookups
def _not_found(exc: ApplicationError) -> bool:
    """The store answered that the id does not exist (or is not an id it could have)."""
    code = getattr(exc.original_exception, "error_code", None)
    return code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")


def find_run(transport: Any, run_id: str) -> Any | None:
    """The run ``run_id`` of the store, None when the store does not have it; other failures raise."""
    t = transport
    try:
        return t.call("get_run", t.client.get_run, run_id, attempts=2)
    except ApplicationError as exc:
        if _not_found(exc):
            return None
        raise


def run_to_continue(transport: Any, run_id: str) -> Any:
    """``MLFLOW_RUN_ID``'s run, active; a :class:`ConfigError` when the store does not have it (or deleted it)."""
    run = find_run(transport, run_id)
    if run is None or run.info.lifecycle_stage != "active":
        state = "was deleted" if run is not None else "does not exist"
        raise ConfigError(f"environment variable {RUN_ID}={run_id!r}: that run {state} at {transport.safe_uri}",
                          field=RUN_ID, hint=f"unset {RUN_ID} to start a new run, or give the id of a run "
                                             f"of this tracking server")
    return run


def experiment_id_for(transport: Any, options: Any) -> str:
    """The id of the experiment the new run goes to, created (by name) when missing, restored when deleted.

    ``options.experiment_id`` alone (from ``MLFLOW_EXPERIMENT_ID``) must exist; with a name too (both variables
    set) the name's experiment must have that id, as MLflow's fluent client requires.
    """
    from . import store

    t, name, want = transport, options.experiment_name, options.experiment_id
    name = name or (None if want else DEFAULT_EXPERIMENT)
    if not name:
        try:
            exp = t.call("get_experiment", t.client.get_experiment, want, attempts=2)
        except ApplicationError as exc:
            if not _not_found(exc):
                raise
            exp = None
        if exp is None:
            raise ConfigError(f"environment variable {EXPERIMENT_ID}={want!r}: no such experiment at {t.safe_uri}",
                              field=EXPERIMENT_ID, hint=f"unset {EXPERIMENT_ID}, or name the experiment with "
                                                        f"--experiment-name or {EXPERIMENT_NAME}")
        return _active(t, exp)
    exp = t.call("get_experiment_by_name", t.client.get_experiment_by_name, name)
    if exp is not None:
        if want and want != exp.experiment_id:
            raise ConfigError(f"environment variables {EXPERIMENT_NAME}={name!r} and {EXPERIMENT_ID}={want!r} name "
                              f"different experiments (that name has id {exp.experiment_id})", field=EXPERIMENT_ID,
                              hint=f"unset one of {EXPERIMENT_NAME} and {EXPERIMENT_ID}")
        return _active(t, exp)
    location = store.artifact_location_for(t.tracking_uri, name)
    try:
        return t.call("create_experiment", t.client.create_experiment, name, artifact_location=location,
                      tags=ui.experiment_tags(), attempts=1)
    except ApplicationError:
        exp = t.client.get_experiment_by_name(name)  # created meanwhile by another process
        if exp is None:
            raise
        return exp.experiment_id


def _active(transport: Any, exp: Any) -> str:
    """``exp`` restored when deleted, and marked as a model-training experiment (``ui.experiment_tags``) when
    it is not yet (queued: opening the run does not wait on it)."""
    if exp.lifecycle_stage != "active":
        transport.call("restore_experiment", transport.client.restore_experiment, exp.experiment_id)
    for key, value in ui.experiment_tags().items():
        if (getattr(exp, "tags", None) or {}).get(key) != value:
            transport.submit("set_experiment_tag", transport.client.set_experiment_tag, exp.experiment_id, key, value)
    return exp.experiment_id
