"""``splade-obs config show``: the effective training config (defaults < ``--config`` file < flags), redacted.

``--format params`` prints exactly the MLflow params a run with the same options logs
(``TrainConfig.params()``, the function the MLflow sink uses too).
"""

from __future__ import annotations

import json
from typing import Any

import click

from splade_obs.errors import ErrorCategory

from .common import debug_option, handle_errors
from .options import config_from_flags, config_options


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


@click.group("config")
def config() -> None:
    """Inspect the training configuration (reference: docs/config.md)."""


@config.command("show", context_settings={"max_content_width": 110})
@config_options
@click.option("--format", "fmt", type=click.Choice(["yaml", "json", "params"]), default="yaml", show_default=True,
              help="yaml/json: the nested config (loadable with --config); params: the MLflow params a run logs, "
                   "one key=value per line.")
@debug_option
@click.pass_context
@handle_errors(ErrorCategory.CONFIG_ERROR)
def show(ctx: click.Context, config_file: str | None, fmt: str, debug: bool, **flags: Any) -> None:
    """Print the config `splade-obs train` would run with the same --config and flags (secrets redacted)."""
    from splade_obs.data import with_demo_defaults
    from splade_obs.redaction import redact

    cfg = with_demo_defaults(config_from_flags(ctx, config_file, flags))  # as the run fills them in
    if fmt == "params":
        for key, value in cfg.params().items():
            click.echo(f"{key}={value}")
        return
    data = _plain(redact(cfg.to_dict()))
    if fmt == "json":
        click.echo(json.dumps(data, indent=2))
    else:
        import yaml

        click.echo(yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True), nl=False)
