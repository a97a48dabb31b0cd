"""Recovery helpers: retry with exponential backoff and full jitter, typed exception logging, file checks,
and the error budget of the batch-level policy.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

from .errors import ErrorCategory, FileSystemError, TrainingError, classify

log = logging.getLogger("splade_obs.recovery")
F = TypeVar("F", bound=Callable[..., Any])

# Listeners told about each retry attempt (the trainer turns them into RetryAttempt events).
_listeners: list[Callable[[dict[str, Any]], None]] = []
_listeners_lock = threading.Lock()


@contextlib.contextmanager
def retry_listener(callback: Callable[[dict[str, Any]], None]) -> Iterator[None]:
    with _listeners_lock:
        _listeners.append(callback)
    try:
        yield
    finally:
        with _listeners_lock:
            _listeners.remove(callback)


def _notify(info: dict[str, Any]) -> None:
    for cb in list(_listeners):
        try:
            cb(info)
        except Exception:  # noqa: BLE001 - a listener never breaks a retry
            log.debug("retry listener failed", exc_info=True)


def retry(max_attempts: int = 3, delay: float = 1.0, backoff_factor: float = 2.0, max_delay: float = 30.0,
          jitter: bool = True, retry_on: Sequence[type[BaseException]] | None = None,
          operation: str | None = None, sleep: Callable[[float], None] | None = None,
          rng: random.Random | None = None, category: ErrorCategory = ErrorCategory.UNKNOWN_ERROR,
          ) -> Callable[[F], F]:
    """Retry a call on transient faults.

    An exception is retried when it is an instance of ``retry_on`` or, with ``retry_on=None``, when
    ``classify(exc).retryable`` is true (connection errors, timeouts, errors raised with retryable=True).
    Each attempt is logged; the last error is re-raised typed (an :class:`ApplicationError`).
    ``sleep`` and ``rng`` can be injected (tests use a fake clock).
    """
    if max_attempts < 1:
        raise ValueError("max_attempts must be >= 1")

    def decorate(fn: F) -> F:
        op = operation or getattr(fn, "__qualname__", "call")

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            do_sleep = sleep or time.sleep
            rand = rng or random.Random()
            for attempt in range(1, max_attempts + 1):
                try:
                    return fn(*args, **kwargs)
                except (KeyboardInterrupt, SystemExit):
                    raise
                except Exception as exc:  # noqa: BLE001 - decide below, re-raise typed
                    typed = classify(exc, category, operation=op)
                    transient = (isinstance(exc, tuple(retry_on)) or (isinstance(typed, tuple(retry_on))))\
                        if retry_on is not None else typed.retryable
                    if not transient or attempt == max_attempts:
                        typed.context.setdefault("attempts", attempt)
                        if typed is exc:
                            raise
                        raise typed from exc
                    cap = min(max_delay, delay * (backoff_factor ** (attempt - 1)))
                    wait = rand.uniform(0.0, cap) if jitter else cap
                    log.warning("%s failed (attempt %d/%d, %s): %s; retrying in %.2fs", op, attempt,
                                max_attempts, typed.category.value, exc, wait)
                    _notify({"operation": op, "attempt": attempt, "max_attempts": max_attempts,
                             "delay_seconds": wait, "category": typed.category.value, "message": str(exc)[:300]})
                    do_sleep(wait)
            raise AssertionError("unreachable")  # pragma: no cover

        return wrapper  # type: ignore[return-value]

    return decorate


def catch_and_log_exceptions(category: ErrorCategory = ErrorCategory.UNKNOWN_ERROR,
                             logger: logging.Logger | None = None, reraise: bool = True,
                             **context: Any) -> Callable[[F], F]:
    """Log any exception escaping the function with its category and context, then re-raise it typed."""

    def decorate(fn: F) -> F:
        lg = logger or logging.getLogger(fn.__module__)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as exc:  # noqa: BLE001
                typed = classify(exc, category, function=fn.__qualname__, **context)
                lg.error("%s", typed.one_line(), extra={"category": typed.category.value,
                                                         "context": typed.to_dict()["context"]})
                if not reraise:
                    return None
                if typed is exc:
                    raise
                raise typed from exc

        return wrapper  # type: ignore[return-value]

    return decorate


def validate_file_exists(path: str | Path, kind: str = "file", what: str = "input") -> Path:
    """Return ``Path(path)`` or raise :class:`FileSystemError` naming it."""
    p = Path(path)
    if not p.exists():
        raise FileSystemError(f"{what} not found", file_path=str(p), hint="check the path and the working directory")
    if kind == "file" and p.is_dir():
        raise FileSystemError(f"{what} is a directory, expected a file", file_path=str(p))
    if kind == "dir" and not p.is_dir():
        raise FileSystemError(f"{what} is not a directory", file_path=str(p))
    return p


@dataclass
class ErrorBudget:
    """Counts skipped batches and says when the run must stop."""

    max_skipped: int = 50
    max_fraction: float = 0.1
    max_consecutive: int = 5
    min_batches_for_fraction: int = 20
    skipped: int = 0
    consecutive: int = 0
    seen: int = 0
    by_category: Counter = field(default_factory=Counter)

    def record_ok(self) -> None:
        self.seen += 1
        self.consecutive = 0

    def record_failure(self, category: ErrorCategory | str) -> None:
        self.seen += 1
        self.skipped += 1
        self.consecutive += 1
        self.by_category[str(category)] += 1

    def exceeded(self) -> str | None:
        """A reason string when the budget is spent, else None."""
        if self.skipped > self.max_skipped:
            return f"{self.skipped} skipped batches exceed --max-skipped-batches {self.max_skipped}"
        if self.consecutive >= self.max_consecutive:
            return f"{self.consecutive} consecutive failed batches (limit {self.max_consecutive})"
        if self.seen >= self.min_batches_for_fraction and self.skipped / self.seen > self.max_fraction:
            return (f"{self.skipped}/{self.seen} batches skipped ({self.skipped / self.seen:.0%}) exceed "
                    f"--max-skipped-fraction {self.max_fraction:g}")
        return None

    def dominant_category(self) -> str:
        return self.by_category.most_common(1)[0][0] if self.by_category else ErrorCategory.UNKNOWN_ERROR.value

    def to_error(self, reason: str) -> TrainingError:
        dom = self.dominant_category()
        return TrainingError(f"error budget spent: {reason}; dominant category {dom}",
                             dominant_category=dom, skipped_batches=self.skipped,
                             counts=dict(self.by_category),
                             hint="see <log-dir>/errors.jsonl for each failed batch")

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "consecutive": self.consecutive, "seen": self.seen,
                "by_category": dict(self.by_category)}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.skipped, self.consecutive, self.seen = d["skipped"], d["consecutive"], d["seen"]
        self.by_category = Counter(d.get("by_category", {}))

