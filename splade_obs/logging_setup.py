"""Logging for a run: console lines, a plain log file, a JSON-lines log, redaction.

Everything goes through the standard :mod:`logging` module, so warnings from transformers, mlflow,
OpenTelemetry, urllib3 and ``warnings.warn`` land in the same files as our own lines. Where the handlers go:

* ``capture_root=True`` (``splade-obs`` commands: the process is ours): on the root logger, so every
  library's records reach the run's files;
* ``capture_root=False`` (:func:`splade_obs.train` inside someone's program): on the ``splade_obs`` logger
  and the library loggers of :data:`CAPTURED_LOGGERS` only; the caller's root handlers and level are left
  alone, and the caller's own root handlers still receive our records through propagation.

* console (rank 0 only under torchrun): ``[INFO] 2025-04-11 10:15:30 - Epoch 1/3`` on ``sys.stderr``,
  looked up at emit time (so click's ``CliRunner`` captures it); the ``[LEVEL]`` tag is coloured only
  when stderr is a TTY and ``NO_COLOR`` is unset, unless colour is forced.
* ``<log_dir>/train_splade.log``: the same lines plus the logger name.
* ``<log_dir>/train_splade.jsonl`` (``json_logs=True``): one JSON object per record with
  ``timestamp`` (UTC, milliseconds, ``Z``), ``level``, ``name``, ``message``, ``module``, ``function``,
  ``line``, ``rank``, every structured field passed with ``extra=`` (step, epoch, category, context...) and,
  once the run has them, ``trace_id``, ``span_id`` (the enclosing run / epoch / failed-batch span) and the
  MLflow ``run_id`` (:mod:`splade_obs.log_context`).
* ``otel_logs=True``: every record also goes over OTLP with the same ids
  (:class:`splade_obs.sinks.otel.logs.OtlpLogHandler`; flushed within ``otel_logs_timeout`` at teardown).
* ranks > 0 write ``train_splade.rank{r}.log`` / ``.jsonl`` and nothing to the console.
* a redaction filter on every handler replaces the values of secret-looking environment variables
  (``config.is_secret_key``: ``*_TOKEN``, ``*_PASSWORD``, ``*_KEY``, ``*_SECRET``, ``*_HEADERS``...) with
  ``***`` wherever they appear in a message, a structured field or a traceback.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import sys
from pathlib import Path
from typing import Any

from . import finite
from .log_context import CONTEXT
from .redaction import redact_obj, redact_text, secret_values

CONSOLE_FORMAT = "[%(levelname)s] %(asctime)s - %(message)s"
FILE_FORMAT = "[%(levelname)s] %(asctime)s - %(name)s - %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
#: Loggers of libraries whose records we want in our files (they may install their own handlers).
LIBRARY_LOGGERS = ("transformers", "mlflow", "opentelemetry", "urllib3", "py.warnings")
#: The logger trees a run's handlers are attached to (and whose level is set when it is unset): ours, the
#: libraries above, and the other libraries a run uses that log warnings worth keeping.
CAPTURED_LOGGERS = ("splade_obs", *LIBRARY_LOGGERS, "huggingface_hub", "torch", "safetensors", "sentence_transformers",
                    "datasets", "alembic", "sqlalchemy", "filelock", "httpx", "pydantic")

_COLORS = {
    "DEBUG": "\x1b[36m", "INFO": "\x1b[32m", "WARNING": "\x1b[33m", "ERROR": "\x1b[31m", "CRITICAL": "\x1b[1;31m",
}
_RESET = "\x1b[0m"
#: Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


# ------------------------------------------------------------------------------------------ redaction
class RedactingFilter(logging.Filter):
    """Masks secret environment values and URL credentials in a record before any handler formats it (the
    libraries' records too: an exporter or MLflow error that prints the URL it failed on).

    The environment is read on every record (cheap: logging is not on the per-step path), so secrets
    set after ``setup_logging`` are still caught.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        secrets = secret_values()
        msg = record.getMessage()
        clean = redact_text(msg, secrets)
        if clean != msg:
            record.msg, record.args = clean, ()
        for key, value in list(vars(record).items()):
            if key not in _STD_ATTRS:
                setattr(record, key, redact_obj(value, secrets))
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text, secrets)
        if record.stack_info:
            record.stack_info = redact_text(record.stack_info, secrets)
        return True


class RankFilter(logging.Filter):
    """Stamps ``record.rank`` so every line says which process wrote it."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "rank"):
            record.rank = self.rank
        return True


# ------------------------------------------------------------------------------------------ formatters
def iso_utc(created: float) -> str:
    """``2025-04-11T10:15:30.123Z`` for a ``time.time()`` value."""
    ts = _dt.datetime.fromtimestamp(created, tz=_dt.timezone.utc)
    return ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z"


class ConsoleFormatter(logging.Formatter):
    """The seed's console format; ``color`` None means decide per record (TTY and no ``NO_COLOR``)."""

    def __init__(self, color: bool | None = None) -> None:
        super().__init__(CONSOLE_FORMAT, DATE_FORMAT)
        self.color = color

    def _use_color(self) -> bool:
        if self.color is not None:
            return self.color
        if os.environ.get("NO_COLOR"):
            return False
        stream = sys.stderr
        return bool(stream is not None and getattr(stream, "isatty", lambda: False)())

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        if self._use_color():
            tag = f"[{record.levelname}]"
            code = _COLORS.get(record.levelname, "")
            if code and line.startswith(tag):
                line = f"{code}{tag}{_RESET}{line[len(tag):]}"
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per record; structured ``extra=`` fields are copied as they are (``str`` fallback).

    Strict JSON: a non-finite number (a NaN loss in ``metrics``) is written as ``"nan"`` / ``"inf"`` /
    ``"-inf"`` (:func:`splade_obs.finite.dumps`), never as a bare ``NaN``.
    """

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "timestamp": iso_utc(record.created),
            "level": record.levelname,
            "name": record.name,
            "message": record.getMessage(),
            "module": record.module,
            "function": record.funcName,
            "line": record.lineno,
        }
        for key, value in vars(record).items():
            if key not in _STD_ATTRS and key not in doc:
                doc[key] = value
        for key, value in CONTEXT.ids(getattr(record, "batch", None)).items():
            doc.setdefault(key, value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            doc["exception"] = record.exc_text
        if record.stack_info:
            doc["stack"] = record.stack_info
        return finite.dumps(doc, ensure_ascii=False)


class StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at emit time (CliRunner swaps it); cooperates with tqdm bars."""

    terminator = "\n"

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record)
            stream = sys.stderr
            if stream is None:
                return
            tqdm_mod = sys.modules.get("tqdm")
            if tqdm_mod is not None and getattr(tqdm_mod.tqdm, "_instances", None):
                tqdm_mod.tqdm.write(msg, file=stream)  # keeps an active progress bar intact
                return
            stream.write(msg + self.terminator)
            stream.flush()
        except RecursionError:
            raise
        except Exception:  # noqa: BLE001 - logging's own contract
            self.handleError(record)


# ------------------------------------------------------------------------------------------ setup
class _State:
    handlers: list[logging.Handler] = []
    otel_handler: logging.Handler | None = None
    otel_timeout: float = 5.0
    #: the loggers the handlers were added to ("" is the root logger)
    targets: list[str] = []
    #: logger name -> its level before the run (restored at teardown): the targets, the chatty libraries
    levels: dict[str, int] = {}
    library_state: dict[str, tuple[bool, list[logging.Handler]]] = {}
    set_mlflow_env: bool = False
    captured_warnings: bool = False
    disabled_hf_progress_bar: bool = False


def log_file_paths(log_dir: Path, rank: int = 0, world_size: int = 1) -> tuple[Path, Path]:
    """(plain log, JSON log) paths for this process: rank-suffixed for ranks > 0 under torchrun."""
    suffix = f".rank{rank}" if world_size > 1 and rank > 0 else ""
    return log_dir / f"train_splade{suffix}.log", log_dir / f"train_splade{suffix}.jsonl"


def setup_logging(level: str | int = "INFO", log_dir: Path | str | None = None, json_logs: bool = False,
                  rank: int = 0, world_size: int = 1, color: bool | None = None, *, otel_logs: bool = False,
                  service_name: str | None = None, otel_logs_timeout: float = 5.0, capture_root: bool = True) -> None:
    """Configure logging for one run; call :func:`teardown_logging` to undo it.

    ``capture_root``: the handlers go on the root logger, which gets ``level``; otherwise on each logger of
    :data:`CAPTURED_LOGGERS`, and those without a level of their own (and ``splade_obs``) get ``level``.
    Calling it again first tears down the previous configuration (tests configure many times).
    """
    teardown_logging()
    CONTEXT.clear()
    run_level = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    if not isinstance(run_level, int):
        raise ValueError(f"unknown log level {level!r}")
    _State.targets = [""] if capture_root else list(CAPTURED_LOGGERS)

    handlers: list[logging.Handler] = []
    if world_size <= 1 or rank == 0:
        console = StderrHandler()
        console.setFormatter(ConsoleFormatter(color))
        handlers.append(console)
    if log_dir is not None:
        log_dir = Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        plain_path, json_path = log_file_paths(log_dir, rank, world_size)
        plain = logging.FileHandler(plain_path, encoding="utf-8")
        plain.setFormatter(logging.Formatter(FILE_FORMAT, DATE_FORMAT))
        handlers.append(plain)
        if json_logs:
            jh = logging.FileHandler(json_path, encoding="utf-8")
            jh.setFormatter(JsonFormatter())
            handlers.append(jh)
    if otel_logs and os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() != "true":
        from .sinks.otel.logs import OtlpLogHandler

        _State.otel_handler, _State.otel_timeout = OtlpLogHandler(service_name), otel_logs_timeout
        handlers.append(_State.otel_handler)
    for h in handlers:
        h.addFilter(RankFilter(rank))
        h.addFilter(RedactingFilter())
        for name in _State.targets:
            logging.getLogger(name).addHandler(h)
    _State.handlers = handlers

    logging.captureWarnings(True)
    _State.captured_warnings = True
    adopt_library_loggers()
    for name in _State.targets:  # after the libraries set their own levels (transformers: WARNING, on first use)
        lg = logging.getLogger(name)
        _State.levels.setdefault(name, lg.level)
        if capture_root or lg.level == logging.NOTSET or name == "splade_obs":
            lg.setLevel(run_level)


def adopt_library_loggers() -> None:
    """Make library loggers propagate into our handlers instead of printing on their own.

    transformers and mlflow install a stderr handler and turn propagation off; we take those handlers
    off (remembering them for teardown) and turn propagation back on. mlflow re-does its setup when it is
    first imported, so unless the user chose otherwise we set ``MLFLOW_CONFIGURE_LOGGING=false`` before
    that happens; call this again after importing a library late if needed.
    """
    if "mlflow" not in sys.modules and "MLFLOW_CONFIGURE_LOGGING" not in os.environ:
        os.environ["MLFLOW_CONFIGURE_LOGGING"] = "false"
        _State.set_mlflow_env = True
    for name in LIBRARY_LOGGERS:
        if name not in _State.library_state:
            lib = logging.getLogger(name)
            _State.library_state[name] = (lib.propagate, [h for h in lib.handlers if h not in _State.handlers])
    try:  # configure transformers' library root logger now, so it cannot take over later
        from transformers.utils import logging as hf_logging

        hf_logging.disable_default_handler()
        hf_logging.enable_propagation()
    except Exception:  # noqa: BLE001 - transformers missing or changed: plain propagation below still works
        pass
    for name in LIBRARY_LOGGERS:
        lib = logging.getLogger(name)
        for h in list(lib.handlers):
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                lib.removeHandler(h)
        lib.propagate = True
    quiet_library_chatter()


#: Loggers whose INFO records are plumbing (database migrations, connection pools), not facts of the run.
CHATTY_LOGGERS = ("alembic", "sqlalchemy", "mlflow.store.db.utils", "mlflow.tracking._tracking_service.utils",
                  "urllib3.connectionpool", "filelock", "httpx")


def quiet_library_chatter() -> None:
    """Keep library INFO chatter and progress bars out of the run's console and logs; warnings still pass.

    MLflow's store migrations log ~80 INFO lines on a new sqlite store, and transformers and MLflow draw
    their own tqdm bars for loading/saving weights and artifacts, which garble the non-TTY progress lines.
    Users who want them back set the level of those loggers themselves after setup.
    """
    for name in CHATTY_LOGGERS:
        lg = logging.getLogger(name)
        if lg.level == logging.NOTSET or lg.level < logging.WARNING:
            _State.levels.setdefault(name, lg.level)
            lg.setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:  # transformers' (and the hub's) bars for loading weights; teardown turns them back on
        from transformers.utils import logging as hf_logging

        if hf_logging.is_progress_bar_enabled():
            hf_logging.disable_progress_bar()
            _State.disabled_hf_progress_bar = True
    except Exception:  # noqa: BLE001 - transformers missing or changed
        pass
    # MLflow's advice to type-hint pyfunc.predict (our model takes several input shapes on purpose) is
    # raised under MLflow's own catch_warnings("once"), so a warnings filter cannot stop it: drop the record.
    pyw = logging.getLogger("py.warnings")
    if not any(isinstance(f, _DropMessages) for f in pyw.filters):
        pyw.addFilter(_DropMessages(("Add type hints to the `predict` method",
                                     "torch.distributed.nn.functional.all_gather is deprecated")))


class _DropMessages(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(f in msg for f in self.fragments)


def teardown_logging() -> None:
    """Remove and close the handlers :func:`setup_logging` added and restore what it changed."""
    captured = [logging.getLogger(name) for name in _State.targets]
    if _State.otel_handler is not None:  # first, so a warning about lost records still reaches the files
        for lg in captured:
            lg.removeHandler(_State.otel_handler)
        _State.otel_handler.close(_State.otel_timeout)  # type: ignore[call-arg]
        _State.otel_handler = None
    CONTEXT.clear()
    for h in _State.handlers:
        for lg in captured:
            lg.removeHandler(h)
        try:
            h.close()
        except Exception:  # noqa: BLE001
            pass
    _State.handlers = []
    for name, old_level in _State.levels.items():
        logging.getLogger(name).setLevel(old_level)
    _State.levels, _State.targets = {}, []
    if _State.captured_warnings:
        logging.captureWarnings(False)
        _State.captured_warnings = False
    for name, (propagate, old_handlers) in _State.library_state.items():
        lib = logging.getLogger(name)
        lib.propagate = propagate
        for h in old_handlers:
            if h not in lib.handlers:
                lib.addHandler(h)
    _State.library_state = {}
    if _State.set_mlflow_env:
        os.environ.pop("MLFLOW_CONFIGURE_LOGGING", None)
        _State.set_mlflow_env = False
    if _State.disabled_hf_progress_bar:
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.enable_progress_bar()
        except Exception:  # noqa: BLE001
            pass
        _State.disabled_hf_progress_bar = False

