"""Secrets never leave the process: the one module that decides what is a secret and masks it.

Two rules, used by every sink, the log handlers and the config views:

* **by key**: a config key or environment variable whose last part looks secret (``*_TOKEN``,
  ``*_PASSWORD``, ``*_KEY``, ``*_SECRET``, ``*_HEADERS``, ``credential``...) has its value replaced by
  ``***`` (:func:`is_secret_key`, :func:`redact`);
* **by value**: the values of secret-looking environment variables, and the ``user:password@`` part of
  any URL, are masked wherever they appear in free text: messages, paths, error contexts, tracebacks
  (:func:`safe_text`, :func:`redact_obj`).

The environment is read at call time, so a secret set after start-up is still caught.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

REDACTED = "***"
#: Values shorter than this are never treated as secrets (flags like "true"/"1" under a *_TOKEN* name).
MIN_SECRET_LENGTH = 6
SECRET_KEY_RE = re.compile(r"(token|password|passwd|secret|_key$|^key$|api[_-]?key|authorization|headers?$|"
                           r"credential)", re.IGNORECASE)
#: ``scheme://userinfo@`` inside any text; greedy up to the last ``@`` of the authority (passwords may hold ``@``).
URL_CREDENTIALS_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://)[^/\s?#]*@")


def is_secret_key(key: str) -> bool:
    """True for a (dotted) key whose last part names a secret."""
    last = key.rsplit(".", 1)[-1]
    return bool(SECRET_KEY_RE.search(last))


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
    return {k: REDACTED if is_secret_key(str(k)) else _redact_value(v) for k, v in d.items()}


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of secret-looking environment variables, longest first (so substrings mask last).

    ``*_HEADERS`` values (``key=value,key2=value2``, as in ``OTEL_EXPORTER_OTLP_HEADERS``) also contribute
    each header value on its own, since a library may print one header.
    """
    env = os.environ if environ is None else environ
    found: set[str] = set()
    for name, value in env.items():
        if not value or not is_secret_key(name):
            continue
        candidates = [value]
        if name.upper().endswith(("HEADERS", "HEADER")):
            for part in value.split(","):
                _, _, v = part.partition("=")
                candidates.append(v.strip())
                candidates.extend(v.strip().split())  # "Bearer abc" -> "abc"
        found.update(c for c in candidates if len(c) >= MIN_SECRET_LENGTH)
    return sorted(found, key=len, reverse=True)


def redact_text(text: str, secrets: list[str] | None = None) -> str:
    """``text`` with every secret value replaced by ``***``."""
    for s in secret_values() if secrets is None else secrets:
        if s in text:
            text = text.replace(s, REDACTED)
    return text


def safe_text(text: str, secrets: list[str] | None = None) -> str:
    """Text as it may leave the process (MLflow tags/params/artifacts, span attributes, files): secret
    environment values and URL credentials masked. ``secrets`` None reads the environment now."""
    return redact_url_credentials(redact_text(text, secrets))


def redact_obj(obj: Any, secrets: list[str] | None = None) -> Any:
    """Deep copy of dicts/lists/tuples with secret values masked in every string (keys included)."""
    secrets = secret_values() if secrets is None else secrets
    if not secrets:
        return obj
    if isinstance(obj, str):
        return redact_text(obj, secrets)
    if isinstance(obj, dict):
        return {redact_obj(k, secrets): redact_obj(v, secrets) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_obj(v, secrets) for v in obj)
    return obj
