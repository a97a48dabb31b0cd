"""splade-obs: a SPLADE trainer with first-class observability.

The Python API (``docs/api.md``)::

    from splade_obs import train, TrainConfig, SpladeEncoder, evaluate, encode, Sink

Importing the package is cheap: the names load on first use, and torch, transformers and MLflow only when
a function needs them.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["RecordingSink", "RunResult", "Sink", "SpladeEncoder", "TrainConfig", "__version__", "encode",
           "evaluate", "train"]

#: public name -> module that defines it (imported on first access, PEP 562)
_LAZY = {"SpladeEncoder": "api", "TrainConfig": "config", "Sink": "bus", "RecordingSink": "bus", "RunResult": "run"}


class _Entry:
    """``splade_obs.train`` / ``.encode`` / ``.evaluate``: calling it calls the API function of that name
    (:mod:`splade_obs.api`); any other attribute is the module of the same name (``splade_obs/train.py``...),
    so ``import splade_obs.encode as m`` and patching ``"splade_obs.encode.X"`` still reach the module."""

    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        object.__setattr__(self, "_name", name)

    @property
    def __dict__(self) -> dict[str, Any]:  # type: ignore[override] # vars() and monkeypatch see the module's
        return vars(self._module())

    @property
    def __wrapped__(self) -> Any:  # inspect.signature() and help() follow it to the function
        return getattr(importlib.import_module(f"{__name__}.api"), self._name)

    @property
    def __doc__(self) -> str | None:  # type: ignore[override]
        return self.__wrapped__.__doc__

    @property
    def __name__(self) -> str:
        return self._name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.__wrapped__(*args, **kwargs)

    def _module(self) -> types.ModuleType:
        return importlib.import_module(f"{__name__}.{self._name}")

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._module(), attr)

    def __setattr__(self, attr: str, value: Any) -> None:
        setattr(self._module(), attr, value)

    def __delattr__(self, attr: str) -> None:
        delattr(self._module(), attr)

    def __repr__(self) -> str:
        return f"<function splade_obs.{self._name} (module attributes: splade_obs/{self._name}.py)>"


class _Package(types.ModuleType):
    """Keeps the API entries when the submodules of the same names are imported (the import system would
    otherwise replace ``splade_obs.train`` with the module ``splade_obs.train`` on its first import)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(self.__dict__.get(name), _Entry) and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


if TYPE_CHECKING:  # pragma: no cover - static typing sees the real names
    from .api import SpladeEncoder, encode, evaluate, train
    from .bus import RecordingSink, Sink
    from .config import TrainConfig
    from .run import RunResult
else:
    train = _Entry("train")
    encode = _Entry("encode")
    evaluate = _Entry("evaluate")
    sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
