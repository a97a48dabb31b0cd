"""Typed errors: one category per kind of failure, each with an exit code and a retry policy.

Code branches on ``error.category`` and ``error.retryable``, never on message text.
``classify(exc)`` turns any foreign exception into an :class:`ApplicationError`.
"""

from __future__ import annotations

import enum
import errno
import json
import os
import re
import shutil
import socket
import traceback
from pathlib import Path
from typing import Any, Iterator, Mapping


class ErrorCategory(str, enum.Enum):
    DATA_ERROR = "DATA_ERROR"
    MODEL_ERROR = "MODEL_ERROR"
    TRAINING_ERROR = "TRAINING_ERROR"
    EVALUATION_ERROR = "EVALUATION_ERROR"
    INFERENCE_ERROR = "INFERENCE_ERROR"
    DEVICE_ERROR = "DEVICE_ERROR"
    FILE_SYSTEM_ERROR = "FILE_SYSTEM_ERROR"
    DEPENDENCY_ERROR = "DEPENDENCY_ERROR"
    CONFIG_ERROR = "CONFIG_ERROR"
    UNKNOWN_ERROR = "UNKNOWN_ERROR"

    def __str__(self) -> str:  # "DATA_ERROR", not "ErrorCategory.DATA_ERROR"
        return self.value


#: CLI exit code per category (documented in docs/errors.md). 2 is click's usage error, 130 is Ctrl-C.
EXIT_CODES: dict[ErrorCategory, int] = {
    ErrorCategory.UNKNOWN_ERROR: 1,
    ErrorCategory.DATA_ERROR: 3,
    ErrorCategory.MODEL_ERROR: 4,
    ErrorCategory.TRAINING_ERROR: 5,
    ErrorCategory.EVALUATION_ERROR: 6,
    ErrorCategory.INFERENCE_ERROR: 7,
    ErrorCategory.DEVICE_ERROR: 8,
    ErrorCategory.FILE_SYSTEM_ERROR: 9,
    ErrorCategory.DEPENDENCY_ERROR: 10,
    ErrorCategory.CONFIG_ERROR: 11,
}
EXIT_INTERRUPTED = 130

#: Categories whose hint is printed under the error line when the error has no hint of its own.
DEFAULT_HINTS: dict[ErrorCategory, str] = {
    ErrorCategory.DEVICE_ERROR: "lower --batch-size or the max lengths, or use --gradient-accumulation-steps",
    ErrorCategory.DEPENDENCY_ERROR: "install the project with its extras: pip install -e '.[test]'",
    ErrorCategory.MODEL_ERROR: "pass a local model folder or 'splade-tiny'; hub ids need network access",
}


class ApplicationError(Exception):
    """Base of every error the project raises on purpose."""

    default_category = ErrorCategory.UNKNOWN_ERROR

    def __init__(
        self,
        message: str,
        category: ErrorCategory | str | None = None,
        original_exception: BaseException | None = None,
        context: Mapping[str, Any] | None = None,
        *,
        retryable: bool | None = None,
        hint: str | None = None,
        **context_kw: Any,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.category = ErrorCategory(category) if category is not None else self.default_category
        self.original_exception = original_exception
        self.context: dict[str, Any] = {**(dict(context) if context else {}), **context_kw}
        self.retryable = bool(retryable) if retryable is not None else False
        self.hint = hint
        if original_exception is not None and self.__cause__ is None:
            self.__cause__ = original_exception

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.category]

    @property
    def location(self) -> str | None:
        """``file:line`` or ``file[index]`` when the context names a place."""
        path = self.context.get("file_path")
        if path is None:
            return None
        if self.context.get("line_number") is not None:
            return f"{path}:{self.context['line_number']}"
        if self.context.get("index") is not None:
            return f"{path}[{self.context['index']}]"
        return str(path)

    def one_line(self) -> str:
        """``error[DATA_ERROR]: train.jsonl:17: field "query" is missing — expected ...``"""
        loc = self.location
        msg = self.message.splitlines()[0] if self.message else ""
        if loc and not msg.startswith(loc):
            msg = f"{loc}: {msg}"
        if self.original_exception is not None and str(self.original_exception) not in msg:
            detail = str(self.original_exception).splitlines()[0] if str(self.original_exception) else ""
            msg = f"{msg} ({type(self.original_exception).__name__}{': ' + detail if detail else ''})"
        return f"error[{self.category.value}]: {msg}"

    def details(self) -> list[str]:
        """Lines of the message after the first (e.g. every bad record of a data file)."""
        return self.message.splitlines()[1:]

    def hint_text(self) -> str | None:
        return self.hint or DEFAULT_HINTS.get(self.category)

    def to_dict(self) -> dict[str, Any]:
        orig = self.original_exception
        return {
            "category": self.category.value,
            "message": self.message,
            "type": type(self).__name__,
            "retryable": self.retryable,
            "context": {k: _jsonable(v) for k, v in self.context.items()},
            "original_exception": (
                {"type": type(orig).__name__, "message": str(orig)} if orig is not None else None
            ),
            "hint": self.hint_text(),
        }

    def __str__(self) -> str:
        return self.one_line()


def qualified_type(exc: BaseException | type) -> str:
    """The exception's fully qualified class name (OTel ``exception.type``): ``torch.OutOfMemoryError``,
    ``json.decoder.JSONDecodeError``, ``splade_obs.errors.TrainingError``; builtins stay bare (``ValueError``)."""
    cls = exc if isinstance(exc, type) else type(exc)
    module = getattr(cls, "__module__", None) or ""
    name = getattr(cls, "__qualname__", None) or cls.__name__
    return name if module in ("builtins", "__main__", "") else f"{module}.{name}"


#: Longest stack trace kept (characters, its end: the innermost frames and the error line).
MAX_STACKTRACE = 8000


def stack_trace(err: BaseException, limit: int = MAX_STACKTRACE) -> str | None:
    """The Python traceback of ``err`` and what it was raised from (``__cause__`` / ``__context__``), as
    ``traceback.format_exception`` prints it, or None when no exception in the chain was ever raised (an
    error built and reported without a ``raise``, such as a non-finite loss, has no frames to show).

    Not redacted here: the sinks pass it through :func:`splade_obs.redaction.safe_text` like every text.
    """
    if not any(e.__traceback__ is not None for e in _chain(err)):
        return None
    text = "".join(traceback.format_exception(type(err), err, err.__traceback__)).rstrip("\n")
    return text if len(text) <= limit else "...[cut]...\n" + text[-limit:]


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)


class RunInterrupted(BaseException):
    """A stop request (Ctrl-C, SIGTERM) acted on at a safe point of the loop; never caught as an error."""

    def __init__(self, signum: int = 2) -> None:
        import signal as _signal
        super().__init__(_signal.Signals(signum).name)
        self.signum = signum


class DataError(ApplicationError):
    default_category = ErrorCategory.DATA_ERROR


class ModelError(ApplicationError):
    default_category = ErrorCategory.MODEL_ERROR


class TrainingError(ApplicationError):
    default_category = ErrorCategory.TRAINING_ERROR


class EvaluationError(ApplicationError):
    default_category = ErrorCategory.EVALUATION_ERROR


class InferenceError(ApplicationError):
    default_category = ErrorCategory.INFERENCE_ERROR


class DeviceError(ApplicationError):
    default_category = ErrorCategory.DEVICE_ERROR


class FileSystemError(ApplicationError):
    default_category = ErrorCategory.FILE_SYSTEM_ERROR


class DependencyError(ApplicationError):
    default_category = ErrorCategory.DEPENDENCY_ERROR


class ConfigError(ApplicationError):
    default_category = ErrorCategory.CONFIG_ERROR


ERROR_CLASSES: dict[ErrorCategory, type[ApplicationError]] = {
    ErrorCategory.DATA_ERROR: DataError,
    ErrorCategory.MODEL_ERROR: ModelError,
    ErrorCategory.TRAINING_ERROR: TrainingError,
    ErrorCategory.EVALUATION_ERROR: EvaluationError,
    ErrorCategory.INFERENCE_ERROR: InferenceError,
    ErrorCategory.DEVICE_ERROR: DeviceError,
    ErrorCategory.FILE_SYSTEM_ERROR: FileSystemError,
    ErrorCategory.DEPENDENCY_ERROR: DependencyError,
    ErrorCategory.CONFIG_ERROR: ConfigError,
    ErrorCategory.UNKNOWN_ERROR: ApplicationError,
}

_CONNECTION_TYPES: tuple[type[BaseException], ...] = (
    ConnectionError,
    TimeoutError,
    socket.timeout,
)
_TRANSIENT_ERRNOS = {errno.ECONNREFUSED, errno.ECONNRESET, errno.ETIMEDOUT, errno.EHOSTUNREACH,
                     errno.ENETUNREACH, errno.EPIPE, errno.ECONNABORTED}


def _is_connection_error(exc: BaseException) -> bool:
    if isinstance(exc, _CONNECTION_TYPES):
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    name = type(exc).__name__
    module = type(exc).__module__ or ""
    # requests / urllib3 / grpc / mlflow REST failures, without importing them here.
    if module.startswith(("requests", "urllib3", "http.client")) and (
        "Connection" in name or "Timeout" in name or "RemoteDisconnected" in name or "ProtocolError" in name
    ):
        return True
    if module.startswith("urllib") and name == "URLError":
        return True
    return False


def _is_device_error(exc: BaseException) -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return False
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    accel = getattr(torch, "AcceleratorError", None)
    if accel is not None and isinstance(exc, accel):
        return True
    text = str(exc)
    if isinstance(exc, RuntimeError) and (
        "CUDA out of memory" in text or "CUDA error" in text or "CUBLAS_STATUS" in text
        or "cuDNN error" in text or "out of memory" in text.lower()[:200] and "CUDA" in text
    ):
        return True
    return False


def is_out_of_memory(exc: BaseException) -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return False
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom is not None and isinstance(exc, oom)) or "out of memory" in str(exc).lower()


def classify(exc: BaseException, default: ErrorCategory = ErrorCategory.UNKNOWN_ERROR,
             **context: Any) -> ApplicationError:
    """Map any exception to a typed :class:`ApplicationError` (returned, not raised).

    An ApplicationError is returned as it is (with extra context merged in).
    """
    if isinstance(exc, ApplicationError):
        for k, v in context.items():
            exc.context.setdefault(k, v)
        return exc
    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if _is_device_error(exc):
        return DeviceError(message, original_exception=exc, context=context)
    if isinstance(exc, (json.JSONDecodeError, UnicodeDecodeError)):
        return DataError(message, original_exception=exc, context=context)
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)):
        # a two-path call (os.replace of a written temp file onto the output) names the output second
        in_the_way = isinstance(exc, (IsADirectoryError, NotADirectoryError, FileExistsError))
        fname = (in_the_way and getattr(exc, "filename2", None)) or getattr(exc, "filename", None)
        ctx = dict(context)
        if fname is not None:
            ctx.setdefault("file_path", str(fname))
        text = exc.strerror or message
        if isinstance(exc, FileExistsError) and fname is not None and os.path.isfile(fname):
            text = "a file is in the way at this path"  # e.g. a folder to make under a regular file
        return FileSystemError(text, original_exception=exc, context=ctx)
    if is_storage_failure(exc):
        return storage_error(exc, context.pop("file_path", None) or _os_filename(exc), **context)
    if isinstance(exc, ImportError):
        return DependencyError(message, original_exception=exc, context=context)
    if _is_connection_error(exc):
        return ApplicationError(message, default, original_exception=exc, context=context, retryable=True)
    if isinstance(exc, OSError) and type(exc) is OSError and _looks_like_hf_missing(message):
        return ModelError(message, original_exception=exc, context=context)
    return ERROR_CLASSES[default](message, default, original_exception=exc, context=context)


def _looks_like_hf_missing(message: str) -> bool:
    # transformers raises a bare OSError when it cannot find or read a model checkpoint.
    markers = ("does not appear to have a file named", "Can't load", "is not a local folder",
               "not a valid model identifier", "Incorrect path_or_model_id", "We couldn't connect",
               "no file named", "Unrecognized model")
    return any(m in message for m in markers)


# ------------------------------------------------------------------------------------------------ failed writes
#: errno of a write the storage refused, and how the error line says it.
STORAGE_ERRNOS: dict[int, str] = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for the file system",
    errno.EROFS: "read-only file system",
    errno.EIO: "input/output error",
}
#: Rust's ``std::io::Error`` as safetensors prints it: ``Error while serializing: I/O error: No space left on
#: device (os error 28)``; the number is the platform's errno.
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    """``exc``, then what it was raised from or while handling, outwards in."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def storage_errno(exc: BaseException) -> int | None:
    """The errno of a write the storage refused (:data:`STORAGE_ERRNOS`) wherever the libraries put it: an
    ``OSError`` in the exception chain (Python writes; torch.save to a file object chains the OSError), or
    the ``(os error N)`` that safetensors' ``SafetensorError`` message carries (it has no errno attribute)."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in STORAGE_ERRNOS:
            return e.errno
        if type(e).__name__ == "SafetensorError":
            m = _RUST_OS_ERROR.search(str(e))
            if m and int(m.group(1)) in STORAGE_ERRNOS:
                return int(m.group(1))
    return None


def is_torch_write_failure(exc: BaseException) -> bool:
    """torch.save to a path writes through its C++ zip writer (``inline_container.cc``), which reports a failed
    write only as a ``RuntimeError`` message, without errno: ``[enforce fail at inline_container.cc:672] .
    unexpected pos 576 vs 534`` (the file is shorter than what was written: the disk filled up) or
    ``PytorchStreamWriter failed writing file data/0: file write failed``."""
    for e in _chain(exc):
        if isinstance(e, RuntimeError):
            text = str(e)
            if "PytorchStreamWriter failed writing" in text or ("inline_container.cc" in text
                                                                and "unexpected pos" in text):
                return True
    return False


def is_storage_failure(exc: BaseException) -> bool:
    """A write the storage refused (full disk, quota, read-only, I/O error), however torch or safetensors
    wrapped it."""
    return storage_errno(exc) is not None or is_torch_write_failure(exc)


def free_space(path: str | os.PathLike[str]) -> int | None:
    """Bytes free to an unprivileged writer on the file system of ``path`` (its nearest existing folder)."""
    p = Path(path)
    for candidate in (p, *p.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


def format_bytes(n: int) -> str:
    """``512 B``, ``1.5 KiB``, ``18.0 MiB``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def storage_error(exc: BaseException, path: str | os.PathLike[str] | None = None,
                  **context: Any) -> FileSystemError:
    """A failed write as a :class:`FileSystemError` naming the path being written and the space left on its
    file system (``context``: ``file_path``, ``free_bytes``, ``errno``)."""
    code = storage_errno(exc)
    ctx = dict(context)
    free = free_space(path) if path is not None else None
    if code is not None:
        words = STORAGE_ERRNOS[code]
        ctx["errno"] = errno.errorcode.get(code, code)
    else:  # torch's writer says only that fewer bytes landed than it wrote
        words = "the disk is full" if free is not None and free < 2**20 else \
            "write failed, the disk may be full"
    if path is not None:
        ctx["file_path"] = str(path)
    if free is not None:
        ctx["free_bytes"] = free
        words += f" ({format_bytes(free)} free on that file system)"
    hint = None
    if code in (None, errno.ENOSPC, errno.EDQUOT):
        hint = "free space on that disk (or raise the quota), or write somewhere else"
    return FileSystemError(f"cannot write: {words}", original_exception=exc, context=ctx, hint=hint)


def _os_filename(exc: BaseException) -> str | None:
    for e in _chain(exc):
        if isinstance(e, OSError) and getattr(e, "filename", None) is not None:
            return str(e.filename)
    return None
