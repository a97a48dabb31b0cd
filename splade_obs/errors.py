"""Typed errors: one category per kind of failure, each with an exit code and a retry policy.

Code branches on ``error.category`` and ``error.retryable``, never on message text.
``classify(exc)`` turns any foreign exception into an :class:`ApplicationError`.
"""

from __future__ import annotations

import enum
import errno
import json
import socket
from typing import Any, Mapping


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
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        fname = getattr(exc, "filename", None)
        ctx = dict(context)
        if fname is not None:
            ctx.setdefault("file_path", str(fname))
        return FileSystemError(exc.strerror or message, original_exception=exc, context=ctx)
    if isinstance(exc, ImportError):
        return DependencyError(message, original_exception=exc, context=context)
    if _is_connection_error(exc):
        return ApplicationError(message, default, original_exception=exc, context=context, retryable=True)
    if isinstance(exc, OSError) and type(exc) is OSError and _looks_like_hf_missing(message):
        return ModelError(message, original_exception=exc, context=context)
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EROFS, errno.EIO):
        return FileSystemError(message, original_exception=exc, context=context)
    return ERROR_CLASSES[default](message, default, original_exception=exc, context=context)


def _looks_like_hf_missing(message: str) -> bool:
    # transformers raises a bare OSError when it cannot find or read a model checkpoint.
    markers = ("does not appear to have a file named", "Can't load", "is not a local folder",
               "not a valid model identifier", "Incorrect path_or_model_id", "We couldn't connect",
               "no file named", "Unrecognized model")
    return any(m in message for m in markers)
