"""The ``splade-obs`` command group."""

from __future__ import annotations

from splade_obs.api import apply_cpu_settings

# Before torch loads its OpenMP runtime (the same settings splade_obs.train applies; see apply_cpu_settings).
apply_cpu_settings()

import click  # noqa: E402
from typing import Any  # noqa: E402

from splade_obs import __version__  # noqa: E402


class _Group(click.Group):
    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        """Remember the passwords of URLs on the command line (``--tracking-uri http://user:pw@host``) before
        anything runs, so that an error quoting one, or a piece of one, finds it masked."""
        from splade_obs.redaction import remember_url_credentials

        remember_url_credentials(args)
        return _masked_usage_errors(super().parse_args, ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        return _masked_usage_errors(super().invoke, ctx)


def _masked_usage_errors(call: Any, *args: Any) -> Any:
    """click's own usage errors (``Got unexpected extra argument (http://user:pw@host)``) quote the arguments:
    masked as the command's other error lines are."""
    try:
        return call(*args)
    except click.UsageError as err:
        from splade_obs.redaction import safe_text

        err.message = safe_text(err.message)
        raise


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="splade-obs")
@click.option("--debug", is_flag=True, default=False, help="Show full tracebacks on errors (all commands).")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """splade-obs: train, evaluate and encode SPLADE models, with every fact of the run observable.

    Runs are tracked in MLflow (./mlruns by default) and traced with OpenTelemetry
    (<log-dir>/traces.jsonl by default). Run `splade-obs COMMAND --help` for details.
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def _register() -> None:
    from . import (adapt_cmd, average_cmd, config_cmd, encode_cmd, evaluate_cmd, mine_cmd, runs_cmd, sysinfo_cmd,
                   train_cmd)

    for command in (train_cmd.train, evaluate_cmd.evaluate, encode_cmd.encode, mine_cmd.mine_negatives,
                    runs_cmd.runs, sysinfo_cmd.sysinfo, average_cmd.average,
                    adapt_cmd.adapt, config_cmd.config):
        cli.add_command(command)
    from . import search_cmd; cli.add_command(search_cmd.search)  # noqa: E702 - issue 34: the engine command
    from . import fit_cmd; cli.add_command(fit_cmd.fit)  # noqa: E702 - issue 35: data to a better model


_register()


def main() -> None:
    cli(prog_name="splade-obs")


if __name__ == "__main__":
    main()
