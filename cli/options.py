"""The config options of ``train`` and ``config show``, generated from the config dataclasses' metadata.

Each config key with a flag becomes one click option (name, help, default and choices from
``splade_obs.config``); values stay text and go through the config's one typed validation, so a bad
``--batch-size x`` is a ``CONFIG_ERROR`` naming ``optim.batch_size``, ``command line`` and ``int``.
Only flags actually given override the ``--config`` file.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import click
from click.core import ParameterSource

from splade_obs.config import TrainConfig
from splade_obs.config_schema import COMMAND_LINE, FieldSpec, config_fields

F = TypeVar("F", bound=Callable[..., Any])

_METAVARS = {int: "INTEGER", float: "FLOAT", str: "TEXT"}
_NULL_WORDS = ("none", "null")


def flag_specs() -> list[FieldSpec]:
    """The config keys that have a command-line flag."""
    return [s for s in config_fields() if s.flag]


def _option(spec: FieldSpec) -> Callable[[F], F]:
    assert spec.flag and spec.param
    if spec.base is bool:
        return click.option(f"{spec.flag}/--no-{spec.flag[2:]}", spec.param, default=spec.default,
                            help=spec.help)
    if spec.repeatable:
        return click.option(spec.flag, spec.param, multiple=True, metavar=spec.metavar, help=spec.help)
    show_default = spec.default is not None
    if spec.choices:
        kw: dict[str, Any] = {"is_flag": False, "flag_value": spec.bare} if spec.bare else {}
        return click.option(spec.flag, spec.param, type=click.Choice(spec.choices,
                                                                     case_sensitive=not spec.case_insensitive),
                            default=spec.default, show_default=show_default, help=spec.help, **kw)
    # Text on purpose: the config's validation converts it (one path, one error format for files and flags).
    return click.option(spec.flag, spec.param, type=str, default=spec.default, show_default=show_default,
                        metavar=spec.metavar or _METAVARS.get(spec.base, "TEXT"), help=spec.help)


config_file_option = click.option(
    "--config", "config_file", type=click.Path(dir_okay=False),
    help="YAML, TOML or JSON file with config sections (docs/config.md); flags override it.")


def config_options(fn: F) -> F:
    """Decorate a command with ``--config`` and one option per config flag (in config order)."""
    for spec in reversed(flag_specs()):
        fn = _option(spec)(fn)
    return config_file_option(fn)


def _given(ctx: click.Context, param: str) -> bool:
    source = ctx.get_parameter_source(param)
    return source is not None and source not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)


def overrides_from_flags(ctx: click.Context, params: dict[str, Any]) -> dict[str, Any]:
    """Dotted key -> value for the config flags given on the command line (not those left at their default).

    ``none``/``null`` clear an optional numeric key (``--max-steps none`` over a file's value).
    """
    out: dict[str, Any] = {}
    for spec in flag_specs():
        if spec.param not in params or not _given(ctx, spec.param):
            continue
        value = params[spec.param]
        if spec.repeatable:
            value = tuple(value)
        elif (spec.optional and spec.base is not str and isinstance(value, str)
              and value.strip().lower() in _NULL_WORDS):
            value = None
        out[spec.key] = value
    return out


def config_from_flags(ctx: click.Context, config_file: str | None, params: dict[str, Any]) -> TrainConfig:
    """The effective config: defaults < ``--config`` file < flags given."""
    return TrainConfig.load(config_file, overrides_from_flags(ctx, params), overrides_source=COMMAND_LINE)


sink_option = click.option(
    "--sink", "sink_names", multiple=True, metavar="NAME",
    help="Also send the run's events to the sink installed under this name (entry point group "
         "splade_obs.sinks; repeatable; docs/api.md).")
