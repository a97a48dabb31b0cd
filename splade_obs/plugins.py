"""Sinks from other packages: the ``splade_obs.sinks`` entry point group, enabled by name.

A package registers a sink in its ``pyproject.toml``::

    [project.entry-points."splade_obs.sinks"]
    my-sink = "my_package.sinks:MySink"

The object named is a :class:`~splade_obs.bus.Sink` subclass (or any callable returning a ``Sink``), called
with no arguments; it reads its own settings (environment variables, its own config file). ``splade-obs train
--sink my-sink`` (repeatable) and ``splade_obs.train(..., sinks=["my-sink"])`` add it next to the built-in
sinks, with the same isolation: a sink that raises is degraded by the bus, never the run.
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points
from typing import Iterable

from .bus import Sink
from .errors import ConfigError

GROUP = "splade_obs.sinks"


def available_sinks() -> dict[str, EntryPoint]:
    """Installed sink entry points by name (the first one wins when two packages use the same name)."""
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=GROUP):
        found.setdefault(ep.name, ep)
    return found


def _unknown(name: str, installed: Iterable[str], flag: str) -> ConfigError:
    names = sorted(installed)
    listed = ", ".join(names) if names else f"none installed (no package declares the {GROUP!r} entry point group)"
    return ConfigError(f"{flag} {name!r} is not an installed sink; available: {listed}", field=flag,
                       hint=f"install the package that provides it, or pick one of the available names; "
                            f"packages register sinks under [project.entry-points.\"{GROUP}\"]")


def load_sink(name: str, *, flag: str = "--sink") -> Sink:
    """The sink registered as ``name``: loaded and instantiated; a ConfigError naming ``flag`` when unknown."""
    found = available_sinks()
    ep = found.get(name)
    if ep is None:
        raise _unknown(name, found, flag)
    try:
        target = ep.load()
        sink = target()
    except Exception as exc:  # noqa: BLE001 - a broken plugin is a config problem of this run, named
        raise ConfigError(f"{flag} {name!r}: loading {ep.value} failed: {type(exc).__name__}: {exc}",
                          field=flag, original_exception=exc,
                          hint="check that the package providing it is installed with its dependencies") from exc
    if not isinstance(sink, Sink):
        raise ConfigError(f"{flag} {name!r}: {ep.value} gave {type(sink).__name__}, not a splade_obs Sink",
                          field=flag, hint="the entry point must name a splade_obs.Sink subclass or a factory "
                                           "returning one")
    return sink


def resolve_sinks(sinks: Iterable[Sink | str], *, flag: str = "--sink") -> list[Sink]:
    """Sink instances as given, names loaded from the entry point group (all names checked before any loads)."""
    items = list(sinks)
    names = [s for s in items if isinstance(s, str)]
    if names:
        found = available_sinks()
        for name in names:
            if name not in found:
                raise _unknown(name, found, flag)
    out: list[Sink] = []
    for s in items:
        if isinstance(s, str):
            out.append(load_sink(s, flag=flag))
        elif isinstance(s, Sink):
            out.append(s)
        else:
            raise ConfigError(f"sinks: {type(s).__name__} is not a splade_obs Sink (nor a sink name)",
                              field="sinks", hint="pass instances of splade_obs.Sink subclasses or entry point "
                                                  "names")
    return out
