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
#: ``scheme://userinfo@`` inside any text, in two forms (every repeat bounded: linear time on any input):
#:
#: * the authority's: up to its last ``@`` before a ``/ ? #`` or whitespace (a password may hold ``@`` or
#:   quotes); ``https://token@host`` too;
#: * a ``user:password`` whose password holds ``/``, ``?`` or ``#`` the user did not percent-encode
#:   (``http://u:pa/ss@host``), ended by an ``@`` before a host; a port (``host:5000/...``) is not a password.
URL_CREDENTIALS_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]{0,30}://)("
                                r"[^\s/?#:'\"\[\]]{1,128}:(?!\d{1,5}[/?#])[^\s@'\"]{0,256}?[/?#][^\s@'\"]{0,256}?"
                                r"(?=@[\w\[])|[^\s/?#]{1,512})@")
#: ``user:password@host:port`` with no scheme: a gRPC target, as the OTLP gRPC exporter prints its endpoint (the
#: port is required: ``12:30@office`` or ``mailto:bob@example.com`` are not credentials).
BARE_CREDENTIALS_RE = re.compile(r"(?<![\w.%+\-:/@*])(?!mailto:)([\w.%+\-]{1,128}:[^\s/@'\"]{1,256})"
                                 r"@(?=(?:\[[0-9A-Fa-f:.]{2,45}\]|[\w.\-]{1,253}):\d{1,5}\b)")
#: Where a URL parser may cut a password it misreads (``http://u:pass/word@h``: urllib takes ``pass`` for a port
#: and says so, ``nonnumeric port: 'pass'``): each piece is masked on its own too.
_PASSWORD_CUTS_RE = re.compile(r"[:/?#@]")
#: Passwords (and their pieces) of URLs given to this process (config values, command-line flags), which
#: :func:`secret_values` adds to the environment's: an error quoting a piece of one finds it masked.
_remembered: set[str] = set()
#: Environment variables holding ``key=value,...`` lists whose secret-keyed entries are secrets too.
KEY_VALUE_LISTS = ("OTEL_RESOURCE_ATTRIBUTES",)


def is_secret_key(key: str) -> bool:
    """True for a (dotted) key whose last part names a secret."""
    last = key.rsplit(".", 1)[-1]
    return bool(SECRET_KEY_RE.search(last))


def redact_url_credentials(text: str) -> str:
    """``text`` with the ``user:password@`` part of every URL in it replaced by ``***@`` (also without a
    scheme: ``user:pw@host:port``).

    A tracking URI such as ``https://user:pw@host/`` is a config *value* under a harmless key, so the key
    rule alone would let the password through to params, ``config.yaml`` and traces.
    """
    if "@" not in text:
        return text
    if "://" in text:
        text = URL_CREDENTIALS_RE.sub(r"\1***@", text)
    return BARE_CREDENTIALS_RE.sub("***@", text) if ":" in text else text


def url_passwords(text: str) -> set[str]:
    """The passwords (``user:password@``; a token when there is no ``user:``) of the URLs in ``text``, whole
    and cut at ``: / ? # @`` (:data:`_PASSWORD_CUTS_RE`), the ones of at least :data:`MIN_SECRET_LENGTH`."""
    if "@" not in text:
        return set()
    found: set[str] = set()
    for match in (*URL_CREDENTIALS_RE.finditer(text), *BARE_CREDENTIALS_RE.finditer(text)):
        info = match.group(match.lastindex or 0)
        if ":" in info:
            secret = info.partition(":")[2]
        elif match.re is URL_CREDENTIALS_RE and match.group(1).lower() in ("http://", "https://"):
            secret = info  # https://token@host; elsewhere (ssh://ubuntu@host) a bare user name is no secret
        else:
            continue
        found.update(p for p in (secret, *_PASSWORD_CUTS_RE.split(secret)) if len(p) >= MIN_SECRET_LENGTH)
    return found


def remember_url_credentials(value: Any) -> None:
    """Remember the URL passwords in ``value`` (a string, or mappings and lists of them) for
    :func:`secret_values`: called on config values and command-line arguments as they come in."""
    if isinstance(value, str):
        _remembered.update(url_passwords(value))
    elif isinstance(value, Mapping):
        for v in value.values():
            remember_url_credentials(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            remember_url_credentials(v)


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
    each header value on its own, since a library may print one header; ``OTEL_RESOURCE_ATTRIBUTES`` its
    secret-keyed entries' values. The passwords of URLs in any variable (``MLFLOW_TRACKING_URI``,
    ``OTEL_EXPORTER_OTLP_ENDPOINT``) and of URLs given to this process (:func:`remember_url_credentials`)
    count too, with their pieces (:func:`url_passwords`).
    """
    env = os.environ if environ is None else environ
    found: set[str] = set(_remembered)
    for name, value in env.items():
        if "@" in value:
            found.update(url_passwords(value))
        if value and name.upper() in KEY_VALUE_LISTS:  # "env=prod,api_key=abc": the secret-keyed values
            found.update(v.strip() for k, _, v in (p.partition("=") for p in value.split(","))
                         if is_secret_key(k.strip()) and len(v.strip()) >= MIN_SECRET_LENGTH)
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
    """``text`` with every secret value replaced by ``***`` and the credentials of every URL by ``***@``."""
    for s in secret_values() if secrets is None else secrets:
        if s in text:
            text = text.replace(s, REDACTED)
    return redact_url_credentials(text)


#: Text as it may leave the process (MLflow tags/params/artifacts, span attributes, files, the console): the
#: name the sinks use for :func:`redact_text`.
safe_text = redact_text


def redact_obj(obj: Any, secrets: list[str] | None = None) -> Any:
    """Deep copy of dicts/lists/tuples with secret values and URL credentials masked in every string (keys
    included)."""
    secrets = secret_values() if secrets is None else secrets
    if isinstance(obj, str):
        return redact_text(obj, secrets)
    if isinstance(obj, dict):
        return {redact_obj(k, secrets): redact_obj(v, secrets) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [redact_obj(v, secrets) for v in obj]
        if type(obj) in (list, tuple):
            return type(obj)(items)
        try:  # a namedtuple takes its fields as arguments; a structseq or an odd subclass becomes a tuple
            return obj._make(items) if hasattr(obj, "_make") else type(obj)(items)
        except (TypeError, ValueError):
            return tuple(items)
    return obj
