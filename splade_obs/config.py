"""The run's configuration: frozen dataclasses, built once (CLI flags over a YAML/TOML file), validated once.

``TrainConfig.to_dict()`` gives the nested form, ``flatten()`` the dotted form used for MLflow params.
Secrets never live here: tracking credentials and OTLP headers are read by MLflow / the OTel SDK from
their standard environment variables.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError

DISTILLATION_MODES = ("auto", "margin_mse", "kl", "kl_margin_mse", "none")
CONTRASTIVE_NEGATIVES = ("all", "in_batch")

AMP_MODES = ("auto", "no", "fp16", "bf16")
SECRET_KEY_RE = re.compile(r"(token|password|passwd|secret|_key$|^key$|api[_-]?key|authorization|headers?$|"
                           r"credential)", re.IGNORECASE)


@dataclass(frozen=True)
class ModelConfig:
    name: str = "splade-tiny"          # "splade-tiny", a local folder, or a hub id
    max_query_length: int = 32
    max_doc_length: int = 128
    head_chunk_size: int = 64           # positions per tile of the memory-saving MLM head on accelerators
    top_k: int | None = None            # keep only the k largest terms at encode time
    dropout: float | None = None        # override the backbone's dropout probabilities (None: keep)


@dataclass(frozen=True)
class DataConfig:
    train_file: str | None = None       # JSON/JSONL file or BEIR folder; None = bundled demo set
    train_split: str = "train"          # qrels split when train_file is a BEIR folder
    val_file: str | None = None
    on_bad_record: str = "error"        # "error" | "skip"
    max_reported_problems: int = 20
    num_negatives: int = 1              # hard negatives used per query (when the data has them)


@dataclass(frozen=True)
class OptimConfig:
    epochs: int = 1
    max_steps: int | None = None        # optimizer steps; overrides epochs when set
    batch_size: int = 16
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    warmup_steps: int | None = None
    max_grad_norm: float = 1.0
    mixed_precision: str = "auto"       # auto | no | fp16 | bf16
    seed: int = 42
    device: str = "auto"                # auto | cpu | cuda | cuda:N


@dataclass(frozen=True)
class LossConfig:
    lambda_q: float = 5e-4
    lambda_d: float = 3e-4
    reg_warmup_steps: int | None = None  # quadratic ramp length; None = a third of the run
    temperature: float = 1.0
    distillation: str = "auto"          # auto (MarginMSE when data has scores) | none | margin_mse | kl | kl_margin_mse
    distillation_weight: float = 1.0
    distillation_temperature: float = 1.0  # tau of the listwise KL term
    contrastive_weight: float = 1.0     # 0 = pure distillation
    contrastive_negatives: str = "all"  # all (in-batch + own hard negatives) | in_batch (hard negatives: distillation only)


@dataclass(frozen=True)
class CheckpointConfig:
    output_dir: str = "outputs/splade-obs"
    save_steps: int | None = None
    keep_last: int = 2
    resume: str | None = None           # None | "auto" | path


@dataclass(frozen=True)
class RecoveryConfig:
    max_skipped_batches: int = 50
    max_skipped_fraction: float = 0.1
    max_consecutive_failures: int = 5
    inject_faults: tuple[str, ...] = ()  # "batch:3:oom", "batch:5:nan", "batch:5:overflow", "batch:7:exception", "step:4:interrupt"


@dataclass(frozen=True)
class LoggingConfig:
    log_dir: str | None = None          # default <output_dir>/logs
    log_level: str = "INFO"
    json_logs: bool = False
    progress: str = "auto"              # auto | bar | lines | none
    progress_interval: float = 10.0     # seconds between non-TTY progress lines


@dataclass(frozen=True)
class TrackingConfig:
    enabled: bool = True
    tracking_uri: str | None = None     # None = $MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlruns/mlflow.db
    experiment_name: str = "splade-obs"
    run_name: str | None = None
    require: bool = False
    register_model: str | None = None
    log_model: bool = True
    flush_interval: float = 2.0


@dataclass(frozen=True)
class TracingConfig:
    exporter: str = "file"              # file | otlp | console | none
    trace_batches: str = "every:50"     # all | none | every:N (failed and slow batches always kept)
    slow_batch_factor: float = 3.0
    to_mlflow: bool = False
    shutdown_timeout: float = 5.0
    service_name: str | None = None


@dataclass(frozen=True)
class EvalConfig:
    eval_data: str | None = None        # BEIR folder evaluated during training
    eval_split: str = "test"
    eval_steps: int | None = None
    eval_max_queries: int | None = None
    eval_idf_power: float = 0.0         # index-time idf^power weighting of the document vectors (0: off)
    save_best_metric: str | None = None  # e.g. "ndcg@10"


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
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

    # ------------------------------------------------------------------------------------ build
    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str = "config") -> "TrainConfig":
        """Build from a nested mapping ({"optim": {"batch_size": 8}}) or dotted keys ({"optim.batch_size": 8})."""
        nested: dict[str, dict[str, Any]] = {}
        for key, value in values.items():
            if isinstance(value, Mapping):
                for k2, v2 in value.items():
                    nested.setdefault(key, {})[k2] = v2
            elif "." in key:
                sect, _, name = key.partition(".")
                nested.setdefault(sect, {})[name] = value
            else:
                raise ConfigError(f"unknown top-level key {key!r}", file_path=source, field=key,
                                  hint="keys are sections (model, data, optim, loss, checkpoint, recovery, "
                                       "logging, tracking, tracing, eval) or dotted names like optim.batch_size")
        kwargs: dict[str, Any] = {}
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for sect, vals in nested.items():
            if sect not in fields:
                raise ConfigError(f"unknown section {sect!r}", file_path=source, field=sect,
                                  hint=f"known sections: {', '.join(fields)}")
            sect_cls = fields[sect].default_factory  # type: ignore[misc]
            names = {f.name for f in dataclasses.fields(sect_cls)}  # type: ignore[arg-type]
            for name in vals:
                if name not in names:
                    raise ConfigError(f"unknown key {sect}.{name}", file_path=source, field=f"{sect}.{name}",
                                      hint=f"known keys in {sect}: {', '.join(sorted(names))}")
            if "inject_faults" in vals and vals["inject_faults"] is not None:
                vals = {**vals, "inject_faults": tuple(vals["inject_faults"])}
            kwargs[sect] = sect_cls(**vals)  # type: ignore[operator]
        cfg = cls(**kwargs)
        cfg.validate(source)
        return cfg

    def replace(self, **sections: Mapping[str, Any]) -> "TrainConfig":
        """Copy with some keys of some sections changed: ``cfg.replace(optim={"batch_size": 4})``."""
        new = {name: dataclasses.replace(getattr(self, name), **vals) for name, vals in sections.items()}
        cfg = dataclasses.replace(self, **new)
        cfg.validate()
        return cfg

    def validate(self, source: str = "config") -> None:
        def bad(fld: str, msg: str, hint: str | None = None) -> ConfigError:
            return ConfigError(f"{fld}: {msg}", file_path=source if source != "config" else None,
                               field=fld, hint=hint)

        o, m, d, l, r = self.optim, self.model, self.data, self.loss, self.recovery
        if o.mixed_precision not in AMP_MODES:
            raise bad("optim.mixed_precision", f"must be one of {', '.join(AMP_MODES)}, got {o.mixed_precision!r}")
        for fld, val in (("optim.batch_size", o.batch_size), ("optim.epochs", o.epochs),
                         ("optim.gradient_accumulation_steps", o.gradient_accumulation_steps),
                         ("model.max_query_length", m.max_query_length), ("model.max_doc_length", m.max_doc_length),
                         ("model.head_chunk_size", m.head_chunk_size)):
            if not isinstance(val, int) or val < 1:
                raise bad(fld, f"must be a positive integer, got {val!r}")
        if o.batch_size < 2 and d.num_negatives == 0:
            raise bad("optim.batch_size", "in-batch negatives need a batch of at least 2")
        if o.max_steps is not None and o.max_steps < 1:
            raise bad("optim.max_steps", f"must be >= 1, got {o.max_steps}")
        if not o.learning_rate > 0:
            raise bad("optim.learning_rate", f"must be > 0, got {o.learning_rate}")
        if l.lambda_q < 0 or l.lambda_d < 0:
            raise bad("loss.lambda_q", "regularizer weights must be >= 0")
        if l.contrastive_negatives not in CONTRASTIVE_NEGATIVES:
            raise bad("loss.contrastive_negatives", f"must be all or in_batch, got {l.contrastive_negatives!r}")
        if l.contrastive_weight < 0 or l.distillation_weight < 0:
            raise bad("loss.contrastive_weight" if l.contrastive_weight < 0 else "loss.distillation_weight",
                      "must be >= 0")
        if l.distillation not in DISTILLATION_MODES:
            raise bad("loss.distillation", f"must be one of {', '.join(DISTILLATION_MODES)}, got {l.distillation!r}")
        if not l.distillation_temperature > 0:
            raise bad("loss.distillation_temperature", f"must be > 0, got {l.distillation_temperature}")
        if l.contrastive_weight == 0 and (l.distillation == "none" or l.distillation_weight == 0):
            raise bad("loss.contrastive_weight", "is 0 and distillation is off: nothing would train the model",
                      hint="set loss.distillation to auto, margin_mse, kl or kl_margin_mse (weight > 0) with "
                           "teacher scores in the data")
        if d.on_bad_record not in ("error", "skip"):
            raise bad("data.on_bad_record", f"must be 'error' or 'skip', got {d.on_bad_record!r}")
        if not 0 <= r.max_skipped_fraction <= 1:
            raise bad("recovery.max_skipped_fraction", "must be within [0, 1]")
        if self.tracing.exporter not in ("file", "otlp", "console", "none"):
            raise bad("tracing.exporter", f"must be file, otlp, console or none, got {self.tracing.exporter!r}")
        tb = self.tracing.trace_batches
        if not (tb in ("all", "none") or re.fullmatch(r"every:[1-9]\d*", tb)):
            raise bad("tracing.trace_batches", f"must be all, none or every:N, got {tb!r}")
        if self.logging.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise bad("logging.log_level", f"unknown level {self.logging.log_level!r}")
        if self.eval.eval_steps is not None and self.eval.eval_steps < 1:
            raise bad("eval.eval_steps", "must be >= 1")
        if not (isinstance(self.eval.eval_idf_power, (int, float)) and 0 <= self.eval.eval_idf_power < float("inf")):
            raise bad("eval.eval_idf_power", f"must be a number >= 0, got {self.eval.eval_idf_power!r}")


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def is_secret_key(key: str) -> bool:
    last = key.rsplit(".", 1)[-1]
    return bool(SECRET_KEY_RE.search(last))


#: ``scheme://userinfo@`` inside any text; greedy up to the last ``@`` of the authority (passwords may hold ``@``).
URL_CREDENTIALS_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://)[^/\s?#]*@")


def redact_url_credentials(text: str) -> str:
    """``text`` with the ``user:password@`` part of every URL in it replaced by ``***@``.

    A tracking URI such as ``https://user:pw@host/`` is a config *value* under a harmless key, so the key
    rule alone would let the password through to params, ``config.yaml`` and traces.
    """
    if "://" not in text or "@" not in text:
        return text
    return URL_CREDENTIALS_RE.sub(r"\1***@", text)


def _redact_value(v: Any) -> Any:
    if isinstance(v, Mapping):
        return redact(v)
    if isinstance(v, str):
        return redact_url_credentials(v)
    if isinstance(v, (list, tuple)):
        return type(v)(_redact_value(x) for x in v)
    return v


def redact(d: Mapping[str, Any]) -> dict[str, Any]:
    """Copy of a (nested) mapping with secret-looking keys replaced by ``"***"`` and URL credentials in
    any string value (nested mappings and lists included) replaced by ``***``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        out[k] = "***" if is_secret_key(str(k)) else _redact_value(v)
    return out


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (.yaml/.yml) or TOML (.toml) file into a mapping; errors name the file."""
    p = Path(path)
    if not p.exists():
        raise ConfigError("config file not found", file_path=str(p), hint="check the --config path")
    text = p.read_text(encoding="utf-8")
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
        raise ConfigError("config must be a mapping at the top level", file_path=str(p))
    return data
