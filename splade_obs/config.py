"""The run's configuration: frozen dataclasses, the one place where every setting, its type, its default,
its help text and its command-line flag are written.

Everything else is generated from the field metadata here: the ``train`` / ``config show`` options
(``cli/options.py``), the reference page ``docs/config.md`` (``config_schema.render_config_docs``) and the MLflow
params (:meth:`TrainConfig.params`).

One path builds a config: each source (a YAML/TOML/JSON file, the command-line flags, a mapping in code)
becomes a nested mapping, later sources override earlier ones key by key, and every given value goes through
one typed validation (pydantic, lax: the YAML string ``"5e-5"`` is a float, ``"x"`` is not) and the range,
choice and cross-field checks. A problem is a :class:`~splade_obs.errors.ConfigError` naming the dotted key,
the source (file or ``command line``) and the expected type.

``TrainConfig.to_dict()`` gives the nested form, ``flatten()`` the dotted form. Secrets never live here:
tracking credentials and OTLP headers are read by MLflow / the OTel SDK from their standard environment
variables (and :mod:`splade_obs.redaction` masks anything that slips in).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from .config_schema import (COMMAND_LINE, IN_CODE, _config_error, _describe, _section_class, check_value,
                            config_fields, field_spec, section_names)
from .beir_negatives import BEIR_NEGATIVES, BEIR_NEGATIVES_DEPTH, MAX_BEIR_EPOCHS, MIN_BEIR_STEPS
from .errors import ConfigError
from .events import ALERT_CATEGORIES

DISTILLATION_MODES = ("auto", "margin_mse", "kl", "kl_margin_mse", "none")
CONTRASTIVE_NEGATIVES = ("all", "in_batch")
AMP_MODES = ("auto", "no", "fp16", "bf16")
HEAD_PASS_CHOICES = ("auto", "fp32", "bf16", "int8")
CPU_DROPOUT_MODES = ("fast", "torch")
ON_BAD_RECORD = ("error", "skip")
PROGRESS_MODES = ("auto", "bar", "lines", "none")
EXPORTERS = ("file", "otlp", "console", "none")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
ALERT_CHOICES = ("any", *ALERT_CATEGORIES)
#: The ``--device`` forms accepted (``cuda:N``: the GPU of index N), here and by the one-shot commands.
DEVICE_FORMS = ("auto", "cpu", "cuda", "cuda:N", "mps")
DEVICE_RE = re.compile(r"auto|cpu|cuda(?::\d+)?|mps")


#: mlflow.utils.validation.MAX_PARAM_VAL_LENGTH; longer param values are cut (whole in ``config.yaml``).
MAX_PARAM_VAL_LENGTH = 6000
PARAM_TRUNCATION_MARKER = "... [truncated, whole value in config.yaml]"


def setting(default: Any = MISSING, help: str = "", *, flag: str | None = None, file_only: bool = False,
            choices: Iterable[str] | None = None, case_insensitive: bool = False, bare: str | None = None,
            ge: float | None = None, gt: float | None = None, le: float | None = None,
            lt: float | None = None, metavar: str | None = None) -> Any:
    """A config field with the metadata the CLI, the docs and the validation are generated from.

    ``flag``: the option name without ``--`` when it is not the field name with dashes; ``file_only``: no
    command-line option; ``choices``: the allowed values (``case_insensitive`` normalizes to them);
    ``bare``: the value of the flag given without a value; ``ge``/``gt``/``le``/``lt``: numeric bounds (every
    float is also finite: inf and nan are refused).
    """
    meta = {"help": help, "flag": flag, "file_only": file_only, "choices": tuple(choices) if choices else None,
            "case_insensitive": case_insensitive, "bare": bare, "ge": ge, "gt": gt, "le": le, "lt": lt,
            "metavar": metavar}
    return field(default=default, metadata=meta)


# ------------------------------------------------------------------------------------------------ sections
@dataclass(frozen=True)
class ModelConfig:
    """The model trained and how its inputs are cut."""

    name: str = setting("splade-tiny", "'splade-tiny' (embedded), a local HF folder, or a hub id of a masked-LM.",
                        flag="model", metavar="NAME")
    max_query_length: int = setting(32, "Query tokens kept (longer queries are cut).", ge=1)
    max_doc_length: int = setting(128, "Document tokens kept (longer documents are cut).", ge=1)
    head_chunk_size: int = setting(64, "Positions per tile of the memory-saving MLM head on accelerators.",
                                   file_only=True, ge=1)
    top_k: int | None = setting(None, "Keep only the K largest terms per vector when the logged MLflow model "
                                      "encodes (default: all terms).", ge=1)
    dropout: float | None = setting(None, "Override the backbone's dropout probability (e.g. 0 for deterministic "
                                          "comparisons; default: keep the model's).", ge=0, lt=1)
    head_pass: str = setting("auto", "CPU training's vocabulary pass: int8 = the exact fp32 token maxima at int8 "
                                     "speed (a proven bound picks the terms; their argmax feeds the backward); "
                                     "fp32 / bf16 = the plain pass in the autocast dtype; auto = int8 where this "
                                     "machine's measurement picks it (docs/recipes.md).", choices=HEAD_PASS_CHOICES)
    cpu_dropout: str = setting("fast", "CPU dropout masks: fast = numpy SFC64 draws seeded from torch's generator "
                                       "(resumable, ~7x cheaper than torch's on CPUs without MKL's generator); "
                                       "torch = torch's own.", choices=CPU_DROPOUT_MODES)


@dataclass(frozen=True)
class DataConfig:
    """Training and validation data."""

    train_file: str | None = setting(None, "Training data: JSON array, JSONL, or a BEIR folder. Default: the bundled "
                                           "demo set.", metavar="PATH")
    train_split: str = setting("train", "qrels split when --train-file is a BEIR folder.")
    val_file: str | None = setting(None, "Validation data (same formats); per-epoch validation loss. Default: the "
                                         "bundled demo validation set when training on the demo set, else none; "
                                         "'none': no validation.", metavar="PATH")
    on_bad_record: str = setting("error", "error: stop before training listing the bad records; skip: drop them "
                                          "into <log-dir>/bad_records.jsonl.", choices=ON_BAD_RECORD)
    max_reported_problems: int = setting(20, "Bad records listed in the error before the list is cut.",
                                         file_only=True, ge=1)
    num_negatives: int = setting(1, "Hard negatives per query when the data has them (drawn afresh each epoch "
                                    "from the example's negatives).", ge=0)
    length_buckets: int = setting(0, "Sort each window of this many batches by text length before cutting it "
                                     "into batches (less padding, same epoch, batches shuffled in the window; "
                                     "the order follows the seed, so resume replays it). 0: off.", ge=0)
    prefetch: bool = setting(True, "Collate and tokenize the next batch on a worker thread while the current "
                                   "one computes (--no-prefetch: on the step path).")
    beir_negatives: str = setting("bm25", "Hard negatives of a BEIR --train-file (it has none): bm25 = each "
                                          "pair's from its query's BM25 top --beir-negatives-depth, judged "
                                          "positives removed (needs bm25s); none = in-batch negatives only.",
                                  choices=BEIR_NEGATIVES)
    beir_negatives_depth: int = setting(BEIR_NEGATIVES_DEPTH, "BM25 documents per query the BEIR negatives are "
                                                              "drawn from.", ge=1)


@dataclass(frozen=True)
class OptimConfig:
    """Steps, batches, optimizer and precision."""

    epochs: int | None = setting(None, "Passes over the training data (default: 3 on the bundled demo set; on "
                                       f"a BEIR folder enough for {MIN_BEIR_STEPS} optimizer steps, at most "
                                       f"{MAX_BEIR_EPOCHS}; else 1; 1 with --max-steps).", ge=1)
    max_steps: int | None = setting(None, "Optimizer steps; overrides --epochs.", ge=1)
    batch_size: int = setting(16, "Queries per micro-batch (per process).", ge=1)
    gradient_accumulation_steps: int = setting(1, "Micro-batches per optimizer step.", ge=1)
    learning_rate: float = setting(5e-5, "Peak AdamW learning rate.", gt=0)
    weight_decay: float = setting(0.01, "AdamW weight decay.", ge=0)
    warmup_ratio: float = setting(0.1, "Linear LR warm-up share of the steps.", ge=0, le=1)
    warmup_steps: int | None = setting(None, "Linear LR warm-up steps (overrides --warmup-ratio).", ge=0)
    max_grad_norm: float = setting(1.0, "Gradients are clipped to this norm.", gt=0)
    mixed_precision: str = setting("auto", "AMP mode; bare --mixed-precision means auto (bf16 where native, "
                                           "fp16+GradScaler on older GPUs, fp32 otherwise).",
                                   choices=AMP_MODES, bare="auto")
    seed: int = setting(42, "Seed of data order, initialisation and dropout.", ge=0, le=2**32 - 1)
    device: str = setting("auto", "auto, cpu, cuda, cuda:N or mps.")


@dataclass(frozen=True)
class LossConfig:
    """The SPLADE loss: contrastive term, FLOPS regularizer, teacher distillation."""

    lambda_q: float = setting(5e-4, "FLOPS weight for queries.", ge=0)
    lambda_d: float = setting(3e-4, "FLOPS weight for documents.", ge=0)
    reg_warmup_steps: int | None = setting(None, "Quadratic FLOPS warm-up steps (default: a third of the run).", ge=0)
    temperature: float = setting(1.0, "Temperature dividing the scores of the contrastive cross-entropy.", gt=0)
    distillation: str = setting("auto", "Teacher-score distillation: auto (MarginMSE when the data has teacher "
                                        "scores), margin_mse, kl (listwise KL), kl_margin_mse (both) or none.",
                                choices=DISTILLATION_MODES)
    distillation_weight: float = setting(1.0, "Weight of the distillation term.", ge=0)
    distillation_temperature: float = setting(1.0, "Temperature tau of the listwise KL term.", gt=0)
    contrastive_weight: float = setting(1.0, "Weight of the contrastive cross-entropy (0: pure distillation).", ge=0)
    contrastive_negatives: str = setting("all", "Negatives of the cross-entropy: all (in-batch and the query's own "
                                                "hard negatives) or in_batch (hard negatives feed distillation only).",
                                         choices=CONTRASTIVE_NEGATIVES)


@dataclass(frozen=True)
class CheckpointConfig:
    """Where the run writes and how it resumes."""

    output_dir: str = setting("outputs/splade-obs", "Checkpoints (checkpoints/), final model (final/), logs (logs/).",
                              metavar="DIR")
    save_steps: int | None = setting(None, "Checkpoint every N optimizer steps (always at each epoch end).", ge=1)
    keep_last: int = setting(2, "Checkpoints kept (the newest at least: a resume needs it).", ge=1)
    resume: str | None = setting(None, "'auto' (latest checkpoint in --output-dir) or a checkpoint folder.")


@dataclass(frozen=True)
class RecoveryConfig:
    """The error budget, and faults injected on purpose."""

    max_skipped_batches: int = setting(50, "Error budget: failed batches skipped before the run stops.", ge=0)
    max_skipped_fraction: float = setting(0.1, "Error budget: share of failed batches.", ge=0, le=1)
    max_consecutive_failures: int = setting(5, "Failed batches in a row that stop the run.", ge=1)
    inject_faults: tuple[str, ...] = setting((), "Fault injection for demos/tests: batch:N:{oom,nan,overflow,"
                                                 "exception,data}, step:N:{interrupt,sigterm,exception,spike,"
                                                 "explode,slow,leak}; N or a range N-M; prefix rankR: for one "
                                                 "rank. Repeatable.", flag="inject-fault", metavar="SPEC")


@dataclass(frozen=True)
class HealthConfig:
    """Training-health alerts (splade_obs/health.py): what counts as a loss spike, an exploding gradient, ..."""

    alerts: bool = setting(True, "Watch the run's own steps and raise a training-health alert (console warning, "
                                 "log, MLflow tag and metric, span event, OTel counter) once per episode.",
                           flag="health-alerts")
    fail_on_alert: tuple[str, ...] = setting((), "Stop the run (with a checkpoint, exit code of a training error) "
                                                 "when an alert of this category is raised: any, "
                                                 + ", ".join(ALERT_CATEGORIES) + ". Repeatable.",
                                             choices=ALERT_CHOICES, metavar="CATEGORY")
    window: int = setting(50, "Recent steps the running medians are taken over.", file_only=True, ge=3)
    min_history: int = setting(20, "Steps seen before the median-based alerts may fire.", file_only=True, ge=2)
    cooldown_steps: int = setting(20, "Healthy steps that end an episode (the alert may fire again after).",
                                  file_only=True, ge=1)
    spike_mads: float = setting(6.0, "Loss spike and grad-norm explosion: log of the value above the log of its "
                                     "recent median by this many robust deviations (1.4826 x MAD of the logs) ...",
                                file_only=True, gt=0)
    loss_spike_ratio: float = setting(3.0, "... and the loss at least this many times its recent median ...",
                                      file_only=True, ge=1)
    grad_explosion_factor: float = setting(10.0, "... or the grad norm this many times its recent median (a "
                                                 "non-finite grad norm always counts).", file_only=True, gt=1)
    nonfinite_loss_run: int = setting(3, "Non-finite losses in a row (skipped steps) that raise an alert.",
                                      file_only=True, ge=1)
    throughput_fraction: float = setting(0.2, "Throughput drop: samples/s below this share of its running "
                                               "median ...", file_only=True, gt=0, lt=1)
    throughput_patience: int = setting(3, "... for this many steps in a row.", file_only=True, ge=1)
    dense_fraction: float = setting(0.5, "Sparsity densifies: mean non-zero terms per vector above this share of "
                                         "the vocabulary (collapse: zero terms).", file_only=True, gt=0, le=1)
    memory_window: int = setting(50, "Steps over which steady memory growth is measured.", file_only=True, ge=5)
    memory_growth_mb: float = setting(1024.0, "Memory growth: process RSS (and accelerator memory) grew by this "
                                              "many MB over the window, steadily (most steps grew).",
                                      file_only=True, gt=0)


@dataclass(frozen=True)
class LoggingConfig:
    """Log files, log level and the progress display."""

    log_dir: str | None = setting(None, "Default: <output-dir>/logs.", metavar="DIR")
    log_level: str = setting("INFO", "Level of the console and log files.", choices=LOG_LEVELS, case_insensitive=True)
    json_logs: bool = setting(False, "Also write <log-dir>/train_splade.jsonl (one JSON object per record).")
    progress: str = setting("auto", "auto: a bar on a terminal, lines otherwise.", choices=PROGRESS_MODES)
    progress_interval: float = setting(10.0, "Seconds between progress lines when not on a terminal.",
                                       file_only=True, gt=0)
    log_every_steps: int = setting(10, "Optimizer steps between logging points: per-step values stay on the "
                                       "device and reach every sink (each step its own point) at these points, "
                                       "and at epoch ends, evaluations, checkpoints and stops.", ge=1)
    metrics_file_interval: float = setting(30.0, "Most seconds between rewrites of <log-dir>/training_metrics.json "
                                                 "while training (also rewritten at each checkpoint, epoch end and "
                                                 "evaluation).", file_only=True, gt=0)


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow tracking."""

    enabled: bool = setting(True, "Track the run in MLflow (--no-mlflow: do not).", flag="mlflow")
    tracking_uri: str | None = setting(None, "MLflow tracking URI (default $MLFLOW_TRACKING_URI or "
                                             "sqlite:///<cwd>/mlruns/mlflow.db).", metavar="URI")
    experiment_name: str | None = setting(None, "MLflow experiment (default $MLFLOW_EXPERIMENT_NAME, else the "
                                                "experiment of id $MLFLOW_EXPERIMENT_ID, else splade-obs).")
    run_name: str | None = setting(None, "MLflow run name (default $MLFLOW_RUN_NAME or a generated readable name).")
    require: bool = setting(False, "Fail at start if the tracking server is unreachable.", flag="require-tracking")
    register_model: str | None = setting(None, "Register the best logged model (else the final one) under this "
                                               "name in the MLflow registry.", metavar="NAME")
    log_model: bool = setting(True, "Log the final model (and, with --save-best-metric, the best one) as MLflow "
                                    "LoggedModels (the HF files are logged either way).")
    system_metrics: bool | None = setting(None, "CPU, memory, disk, network and GPU use in the run's System metrics "
                                                "tab (default $MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING, else on).")
    flush_interval: float = setting(2.0, "Seconds between batched metric uploads.", file_only=True, ge=0)
    shutdown_timeout: float = setting(10.0, "Seconds the end of the run may spend on the tracking store (last "
                                            "points, status, artifacts), whatever the store does; what is left "
                                            "stays in <log-dir>/mlflow_unsent.jsonl for `splade-obs runs sync`.",
                                      file_only=True, ge=0)


@dataclass(frozen=True)
class TracingConfig:
    """OpenTelemetry tracing."""

    exporter: str = setting("file", "Span exporter: file = <log-dir>/traces.jsonl; otlp uses OTEL_EXPORTER_OTLP_* "
                                    "env vars.", flag="otel-exporter", choices=EXPORTERS)
    trace_batches: str = setting("every:50", "Batch spans kept: all, none or every:N (the first batch, then steps "
                                             "N, 2N, ...; failed and slow batches always kept).")
    slow_batch_factor: float = setting(3.0, "A batch this many times slower than the typical one is kept as slow.",
                                       file_only=True, ge=1)
    to_mlflow: bool = setting(True, "Also put the run's trace in MLflow when the run is tracked there (its "
                                    "Traces tab): an MLflow server gets the spans on /v1/traces, a database store "
                                    "(the default sqlite one) through MLflow's store API "
                                    "(--no-otel-to-mlflow: not).", flag="otel-to-mlflow")
    shutdown_timeout: float = setting(5.0, "Seconds allowed to flush spans at the end of the run.",
                                      file_only=True, ge=0)
    service_name: str | None = setting(None, "OpenTelemetry service.name (default $OTEL_SERVICE_NAME or "
                                             "splade-obs).", flag="otel-service-name", metavar="NAME")
    metrics: bool = setting(True, "OpenTelemetry metrics: <log-dir>/metrics.jsonl, OTLP as for spans, Prometheus with "
                                  "--prometheus-port (--no-otel-metrics: none).", flag="otel-metrics")
    prometheus_port: int | None = setting(None, "Serve the run's metrics to Prometheus on this port.", ge=1, le=65535)
    prometheus_host: str = setting("127.0.0.1", "Address of the Prometheus endpoint (0.0.0.0: all interfaces).")
    prometheus_linger: float = setting(0.0, "Seconds the Prometheus endpoint serves the final values after the run.",
                                       ge=0)
    otel_logs: bool = setting(False, "Also send log records over OTLP (OTEL_EXPORTER_OTLP_*), with trace/span/run ids.")


@dataclass(frozen=True)
class EvalConfig:
    """Retrieval evaluation during and after training."""

    eval_data: str | None = setting(None, "BEIR folder for retrieval evaluation during and after training. "
                                          "Default: the bundled demo retrieval set when training on the demo set, "
                                          "else none; 'none': no evaluation.", metavar="PATH")
    eval_split: str = setting("test", "qrels split evaluated.")
    eval_steps: int | None = setting(None, "Evaluate every N optimizer steps (and at the end).", ge=1)
    eval_max_queries: int | None = setting(None, "Evaluate on a seeded subset of queries.", ge=1)
    eval_idf_power: float = setting(0.0, "Weight the evaluation index by idf^POWER (as `evaluate --idf-power`; "
                                         "0: off).", ge=0)
    save_best_metric: str | None = setting(None, "Keep the best model by this eval metric (e.g. ndcg@10) in "
                                                 "<output-dir>/best.", metavar="METRIC")


#: The evaluation metrics a best model can be kept by (``evaluation.METRIC_KEYS``: higher is better).
BEST_METRICS = ("ndcg@10", "mrr@10", "recall@100", "map@100")


# ------------------------------------------------------------------------------------------------ the config
@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    # ------------------------------------------------------------------------------------ derived
    @property
    def output_dir(self) -> Path:
        return Path(self.checkpoint.output_dir)

    @property
    def log_dir(self) -> Path:
        return Path(self.logging.log_dir) if self.logging.log_dir else self.output_dir / "logs"

    # ------------------------------------------------------------------------------------ views
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flatten(self) -> dict[str, Any]:
        return flatten(self.to_dict())

    def params(self) -> dict[str, str]:
        """The MLflow params of this config, exactly as a run logs them: dotted keys, secret-looking keys and
        URL credentials redacted, secret environment values masked, values as text (lists as JSON), cut at
        MLflow's length limit. Settings left unset (``None``) are left out: the run page lists what was set.
        ``splade-obs config show --format params`` prints this."""
        from .redaction import redact, secret_values

        secrets = secret_values()
        return {key: param_value(key, value, secrets) for key, value in flatten(redact(self.to_dict())).items()
                if value is not None}

    # ------------------------------------------------------------------------------------ build
    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str = IN_CODE) -> "TrainConfig":
        """Build from a nested mapping ({"optim": {"batch_size": 8}}) or dotted keys ({"optim.batch_size": 8})."""
        return cls.from_sources((values, source))

    @classmethod
    def load(cls, config_file: str | Path | None = None, overrides: Mapping[str, Any] | None = None,
             overrides_source: str = COMMAND_LINE) -> "TrainConfig":
        """Defaults < ``config_file`` (YAML/TOML/JSON) < ``overrides`` (nested or dotted; the CLI's flags)."""
        layers: list[tuple[Mapping[str, Any], str]] = []
        if config_file is not None:
            layers.append((load_config_file(config_file), str(config_file)))
        layers.append((overrides or {}, overrides_source))
        return cls.from_sources(*layers)

    @classmethod
    def from_sources(cls, *layers: tuple[Mapping[str, Any], str]) -> "TrainConfig":
        """Merge ``(mapping, source)`` layers (later ones win, key by key), type-check every given value
        and validate the result; errors name the key, the source it came from and the expected type."""
        merged: dict[str, dict[str, Any]] = {}
        origins: dict[str, str] = {}
        from .redaction import remember_url_credentials

        for values, source in layers:
            remember_url_credentials(values)  # masked wherever they show up from now on (a library's error)
            for sect, vals in _nested(values, source).items():
                merged.setdefault(sect, {}).update(vals)
                origins.update({f"{sect}.{name}": source for name in vals})
        kwargs = {}
        for sect, vals in merged.items():
            typed = {name: check_value(field_spec(f"{sect}.{name}"), v, origins[f"{sect}.{name}"])
                     for name, v in vals.items()}
            kwargs[sect] = _section_class(sect)(**typed)
        cfg = cls(**kwargs)
        default_source = next((s for _, s in layers if s != IN_CODE), IN_CODE) if layers else IN_CODE
        cfg._validate(origins, default_source)
        return cfg

    def replace(self, **sections: Mapping[str, Any]) -> "TrainConfig":
        """Copy with some keys of some sections changed: ``cfg.replace(optim={"batch_size": 4})``."""
        return TrainConfig.from_sources((self.to_dict(), IN_CODE), (sections, IN_CODE))

    def validate(self, source: str = IN_CODE) -> None:
        """Type, choice, bound and cross-field checks of every key; errors name ``source``."""
        self._validate({}, source)

    def _validate(self, origins: Mapping[str, str], default_source: str) -> None:
        def src(key: str) -> str:
            return origins.get(key, default_source)

        for spec in config_fields():
            check_value(spec, getattr(getattr(self, spec.section), spec.name), src(spec.key))

        def bad(key: str, msg: str, hint: str | None = None) -> ConfigError:
            return _config_error(key, msg, src(key), hint)

        o, d, l = self.optim, self.data, self.loss
        if o.batch_size < 2 and d.num_negatives == 0:
            raise bad("optim.batch_size", "in-batch negatives need a batch of at least 2",
                      "raise optim.batch_size or give the data hard negatives (data.num_negatives >= 1)")
        if l.contrastive_weight == 0 and (l.distillation == "none" or l.distillation_weight == 0):
            raise bad("loss.contrastive_weight", "is 0 and distillation is off: nothing would train the model",
                      hint="set loss.distillation to auto, margin_mse, kl or kl_margin_mse (weight > 0) with "
                           "teacher scores in the data")
        if not DEVICE_RE.fullmatch(o.device):
            flag = " (--device)" if src("optim.device") == COMMAND_LINE else ""
            raise bad("optim.device", f"must be one of {', '.join(DEVICE_FORMS)}, got {o.device!r}{flag}",
                      "e.g. auto (the default: the first GPU when there is one, else the CPU), cpu or cuda:0")
        best = self.eval.save_best_metric
        if best is not None and best not in BEST_METRICS:
            close = difflib.get_close_matches(best.lower(), BEST_METRICS, n=1)
            raise bad("eval.save_best_metric", f"must be one of {', '.join(BEST_METRICS)}, got {best!r}",
                      (f"did you mean {close[0]}? " if close else "") + "the model is kept when the metric rises")
        if self.tracking.register_model and not self.tracking.enabled:
            raise bad("tracking.register_model", "needs tracking, which is off (--no-mlflow)",
                      "drop --no-mlflow, or --register-model")
        tb = self.tracing.trace_batches
        if not (tb in ("all", "none") or re.fullmatch(r"every:[1-9]\d*", tb)):
            raise bad("tracing.trace_batches", f"must be all, none or every:N, got {tb!r}",
                      "e.g. every:50 (the default), all or none")


def _nested(values: Mapping[str, Any], source: str) -> dict[str, dict[str, Any]]:
    """``{"optim": {...}}`` and ``{"optim.batch_size": 8}`` alike as ``{section: {key: value}}``; unknown
    sections and keys are errors naming ``source``."""
    sections = section_names()
    out: dict[str, dict[str, Any]] = {}
    for raw_key, value in values.items():
        key = str(raw_key)
        if key in sections:
            if not isinstance(value, Mapping):
                raise _config_error(key, f"expected a mapping of keys (a [{key}] table), got {_describe(value)}",
                                    source, f"write the keys of {key} under it, e.g. {key}.{_first_key(key)}")
            items = [(str(k), v) for k, v in value.items()]
            sect = key
        elif "." in key:
            sect, _, name = key.partition(".")
            items = [(name, value)]
        elif isinstance(value, Mapping):
            sect, items = key, []
        else:
            raise _config_error(key, "unknown top-level key", source,
                                f"keys are sections ({', '.join(sections)}) or dotted names like optim.batch_size")
        if sect not in sections:
            close = difflib.get_close_matches(sect, sections, n=1)
            raise _config_error(sect, f"unknown section {sect!r}", source,
                                (f"did you mean {close[0]}? " if close else "") + f"known sections: {', '.join(sections)}")
        names = [f.name for f in dataclasses.fields(_section_class(sect))]
        for name, v in items:
            if name not in names:
                close = difflib.get_close_matches(name, names, n=1)
                raise ConfigError(f"unknown key {sect}.{name}", file_path=None if source == IN_CODE else source,
                                  field=f"{sect}.{name}",
                                  hint=(f"did you mean {sect}.{close[0]}? " if close else "")
                                  + f"known keys in {sect}: {', '.join(names)}")
            out.setdefault(sect, {})[name] = v
    return out


def _first_key(section: str) -> str:
    return dataclasses.fields(_section_class(section))[0].name


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def param_value(key: str, value: Any, secrets: list[str] | None = None) -> str:
    """One MLflow param value as a run logs it: ``***`` for a secret-looking key, lists/dicts as JSON, other
    values as ``str()``, secret environment values and URL credentials masked, cut at MLflow's limit.
    ``secrets`` None reads the environment now."""
    from .redaction import is_secret_key, safe_text

    if is_secret_key(key):
        text = "***"
    else:
        text = json.dumps(value, default=str) if isinstance(value, (list, tuple, dict)) else str(value)
        text = safe_text(text, secrets)
    return truncate_param(text)


def truncate_param(text: str, limit: int = MAX_PARAM_VAL_LENGTH) -> str:
    return text if len(text) <= limit else text[: limit - len(PARAM_TRUNCATION_MARKER)] + PARAM_TRUNCATION_MARKER


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (.yaml/.yml), TOML (.toml) or JSON (.json) file into a mapping; errors name the file."""
    p = Path(path)
    if not p.exists():
        raise ConfigError("config file not found", file_path=str(p), hint="check the --config path")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:  # the line of the first bad byte, as an editor counts lines
        line = p.read_bytes()[:exc.start].count(b"\n") + 1
        raise ConfigError(f"not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})",
                          file_path=str(p), line_number=line, original_exception=exc,
                          hint="save the config file as UTF-8") from exc
    except IsADirectoryError as exc:
        raise ConfigError("is a folder, not a config file", file_path=str(p), original_exception=exc,
                          hint="check the --config path") from exc
    try:
        if p.suffix == ".toml":
            import tomllib
            data = tomllib.loads(text)
        elif p.suffix in (".yaml", ".yml"):
            import yaml
            data = yaml.safe_load(text) or {}
        elif p.suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError("unsupported config format (use .yaml, .yml, .toml or .json)", file_path=str(p))
    except ConfigError:
        raise
    except Exception as exc:  # parse errors of three libraries
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        raise ConfigError(f"cannot parse config: {str(exc).splitlines()[0]}", file_path=str(p),
                          line_number=(line + 1) if line is not None else getattr(exc, "lineno", None),
                          original_exception=exc) from exc
    if not isinstance(data, dict):
        raise ConfigError("config must be a mapping at the top level", file_path=str(p),
                          hint="sections as keys, e.g. optim: {batch_size: 8}")
    return data
