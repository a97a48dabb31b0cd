"""How a failed call to the tracking store is judged and told, and the circuit breaker.

* :func:`is_transient`: worth retrying (connection refused or reset, timeouts, HTTP 5xx / 408 / 429, MLflow
  "try again" codes) or refused for good (another 4xx, a bad value);
* :func:`describe`: a short reason for the log (``HTTP 503``, ``connection refused``, ``timed out``);
* :class:`Health`: one warning when the store stops answering, one when it answers again, a reminder with
  counts at most every ``REMINDER_INTERVAL_S`` in between, each refusal kind once;
* :class:`Breaker`: stop calling a store that just failed, for a cool-down that doubles;
* MLflow's and urllib3's own console output during an outage or at the end of a run is held back.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from ...errors import ApplicationError, classify
from ...redaction import safe_text
from .store import strip_credentials

if TYPE_CHECKING:
    from .transport import Transport

log = logging.getLogger("splade_obs.sinks.mlflow")

REMINDER_INTERVAL_S = 60.0            # between "still not answering" warnings

_TRANSIENT_CODES = {"TEMPORARILY_UNAVAILABLE", "RESOURCE_EXHAUSTED", "REQUEST_LIMIT_EXCEEDED", "INTERNAL_ERROR",
                    "DEADLINE_EXCEEDED", "ABORTED", "SERVICE_UNDER_MAINTENANCE", "WORKSPACE_TEMPORARILY_UNAVAILABLE"}
_TRANSIENT_TYPES = {"RetryError", "MaxRetryError", "ResponseError", "ConnectionError", "ConnectTimeout",
                    "ReadTimeout", "Timeout", "ProtocolError", "RemoteDisconnected", "IncompleteRead",
                    "ChunkedEncodingError", "NewConnectionError", "ReadTimeoutError", "ConnectTimeoutError",
                    "OperationalError"}


def _chain(exc: BaseException) -> Iterable[BaseException]:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def http_status(exc: BaseException) -> int | None:
    """The HTTP status behind a failed client call, when one is known (MLflow or requests exceptions)."""
    for cur in _chain(exc):
        resp = getattr(cur, "response", None)
        code = getattr(resp, "status_code", None)
        if isinstance(code, int):
            return code
        m = re.search(r"too many (\d{3}) error responses|error code (\d{3})", str(cur))
        if m:
            return int(m.group(1) or m.group(2))
    for cur in _chain(exc):  # an error the server sent as JSON (MLflow's own wrappers say INTERNAL_ERROR: no)
        if type(cur).__name__ == "RestException" and getattr(cur, "error_code", None):
            try:
                return int(cur.get_http_status_code())
            except Exception:  # noqa: BLE001 - an unknown error code
                return None
    return None


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: connection trouble or a timeout anywhere in the cause chain, HTTP 5xx / 408 / 429, or
    an MLflow "try again" error code. Anything else (another 4xx, a bad value) is a refusal for good."""
    status = http_status(exc)
    if status is not None:
        return status >= 500 or status in (408, 429)
    for cur in _chain(exc):
        if isinstance(cur, (ConnectionError, TimeoutError, socket.timeout, socket.gaierror)):
            return True
        if type(cur).__name__ in _TRANSIENT_TYPES:
            return True
        if getattr(cur, "error_code", None) in _TRANSIENT_CODES:
            return True
        if not isinstance(cur, ApplicationError) and classify(cur).retryable:
            return True
    return False


def describe(exc: BaseException) -> str:
    """A short reason for the log: ``HTTP 503``, ``connection refused``, ``timed out``, or the first line."""
    text = " ".join(str(c) for c in _chain(exc))
    status = http_status(exc)
    code = next((c.error_code for c in _chain(exc) if isinstance(getattr(c, "error_code", None), str)), None)
    if status is not None:
        return f"HTTP {status}" + (f" {code}" if code and status < 500 and code != "INTERNAL_ERROR" else "")
    lowered = text.lower()
    for needle, reason in (("refused", "connection refused"), ("timed out", "timed out"),
                           ("timeout", "timed out"), ("remotedisconnected", "connection closed by the server"),
                           ("remote end closed", "connection closed by the server"),
                           ("connection aborted", "connection closed by the server"),
                           ("connection reset", "connection reset"), ("name or service", "unknown host")):
        if needle in lowered:
            return reason
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return safe_text(first)[:160]


class Breaker:
    """Stops calling a store that just failed, for a cool-down that doubles up to ``max_wait``."""

    def __init__(self, first_wait: float = 2.0, max_wait: float = 60.0) -> None:
        self.first_wait, self.max_wait = first_wait, max_wait
        self.wait = 0.0
        self.open_until = 0.0

    def is_open(self) -> bool:
        return time.monotonic() < self.open_until

    def failed(self, cap: float | None = None) -> None:
        self.wait = min(self.max_wait, self.wait * 2 if self.wait else self.first_wait)
        self.open_until = time.monotonic() + (min(self.wait, cap) if cap is not None else self.wait)

    def ok(self) -> None:
        self.wait, self.open_until = 0.0, 0.0

    def close_for_last_try(self) -> None:
        self.open_until = 0.0


class Health:
    """What the console hears about the store: little, and only when it changes (lock held by the caller)."""

    def __init__(self, safe_uri: str) -> None:
        self.safe_uri = safe_uri
        self.down_since: float | None = None
        self.last_note = 0.0
        self.last_reason = ""
        self.refusals: set[str] = set()

    def failed(self, what: str, exc: BaseException, *, waiting: int, sent: int, where: str) -> None:
        """A transient failure: one warning when the store goes away, then a reminder now and then."""
        now = time.monotonic()
        self.last_reason = describe(exc)
        if self.down_since is None:
            self.down_since = self.last_note = now
            log.warning("MLflow tracking at %s is not answering (%s: %s); metric points are kept and retried "
                        "with backoff, and written to %s while they wait", self.safe_uri, what, self.last_reason,
                        where)
        elif now - self.last_note >= REMINDER_INTERVAL_S:
            self.last_note = now
            log.warning("MLflow tracking at %s still not answering after %.0fs (%s): %d points waiting, "
                        "%d sent so far", self.safe_uri, now - self.down_since, self.last_reason, waiting, sent)

    def answered(self, waiting: int) -> None:
        if self.down_since is not None:
            log.warning("MLflow tracking at %s answers again after %.0fs; sending the %d waiting points",
                        self.safe_uri, time.monotonic() - self.down_since, waiting)
            self.down_since = None

    def refused(self, what: str, exc: BaseException, kept: str) -> None:
        """A refusal for good: logged once per kind of call."""
        if what in self.refusals:
            return
        self.refusals.add(what)
        log.warning("MLflow tracking at %s refused %s (%s)%s (further refusals are not logged)",
                    self.safe_uri, what, describe(exc), kept)


class _RetryNoise(logging.Filter):
    """Holds back urllib3's "Retrying (...) after connection broken" warnings: the transport reports an
    outage itself, once."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Retrying")


RETRY_NOISE = _RetryNoise()
_noise_users = 0
_noise_lock = threading.Lock()


def hold_retry_noise(on: bool) -> None:
    global _noise_users
    with _noise_lock:
        _noise_users += 1 if on else -1
        logger = logging.getLogger("urllib3.connectionpool")
        if on and _noise_users == 1:
            logger.addFilter(RETRY_NOISE)
        elif not on and _noise_users == 0:
            logger.removeFilter(RETRY_NOISE)


def quiet_run_url_print(tracking_uri: str) -> None:
    """MLflow prints "View run <name> at: <url>" on stdout when a run on a server ends, with the URL as
    given, credentials included. MLflow's own switch turns it off (the sink logs the credential-free URL)."""
    if strip_credentials(tracking_uri) != tracking_uri:
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    else:
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def report_shutdown(t: Transport, *, log_dir: Path | None, complete: bool, unsent: int, cut: str) -> None:
    """The end-of-run warnings of the MLflow sink: what did not reach the store, where it is kept and the command
    that sends it later (``cut``: why the shutdown stopped waiting, for the message)."""
    from .transport import SYNC_COMMAND, UNSENT_FILE

    lost_end = t.status is not None and not t.terminated
    if log_dir is None:
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
                    log_dir / UNSENT_FILE, SYNC_COMMAND, log_dir)
    elif not complete:
        log.warning("MLflow: gave up on the last uploads to %s after %s (metrics and status are complete)",
                    t.safe_uri, cut)
    if t.dropped_points:
        log.warning("MLflow: %d metric points could not be written anywhere (see the warnings above)",
                    t.dropped_points)
