"""splade-obs: a SPLADE trainer with first-class observability.

The Python API (``docs/api.md``)::

    from splade_obs import train, TrainConfig, SpladeEncoder, evaluate, encode, Sink

Importing the package is cheap: the names load on first use, and torch, transformers and MLflow only when
a function needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["RecordingSink", "RunResult", "Sink", "SpladeEncoder", "TrainConfig", "__version__", "encode",
           "evaluate", "train"]

#: public name -> module that defines it (imported on first access, PEP 562). The modules behind ``train``,
#: ``encode`` and ``evaluate`` are ``trainer``, ``encoding`` and ``evaluation``: no submodule shadows a function.
_LAZY = {"train": "api", "encode": "api", "evaluate": "api", "SpladeEncoder": "api", "TrainConfig": "config",
         "Sink": "bus", "RecordingSink": "bus", "RunResult": "run"}

if TYPE_CHECKING:  # pragma: no cover - static typing sees the real names
    from .api import SpladeEncoder, encode, evaluate, train
    from .bus import RecordingSink, Sink
    from .config import TrainConfig
    from .run import RunResult


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
