"""Shared CLI plumbing: typed errors become one line on stderr and a per-category exit code."""

from __future__ import annotations

import functools
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, TypeVar

import click

from splade_obs.errors import EXIT_INTERRUPTED, ApplicationError, ErrorCategory, RunInterrupted, classify

F = TypeVar("F", bound=Callable[..., Any])


def debug_enabled(ctx: click.Context | None = None) -> bool:
    ctx = ctx or click.get_current_context(silent=True)
    while ctx is not None:
        if ctx.obj and isinstance(ctx.obj, dict) and ctx.obj.get("debug"):
            return True
        if ctx.params.get("debug"):
            return True
        ctx = ctx.parent
    return False


def report_error(err: ApplicationError, debug: bool) -> None:
    """Print ``error[CATEGORY]: file:line: message`` and an optional ``hint:`` line to stderr, secrets masked
    (an error may quote the URL or value it failed on: ``http://user:password@host``)."""
    from splade_obs.redaction import safe_text

    if debug:
        text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
        click.echo(safe_text(text).rstrip("\n"), err=True)
    click.echo(safe_text(err.one_line()), err=True)
    for line in err.details():
        click.echo(f"  {safe_text(line.strip())}", err=True)
    hint = err.hint_text()
    if hint:
        click.echo(f"hint: {safe_text(hint)}", err=True)


class FiniteFloatRange(click.FloatRange):
    """``click.FloatRange`` that also refuses ``nan`` and ``inf``: a NaN passes every bound (its comparisons are
    false) and went on to fail later with another category, or not at all."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        import math

        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{number} is not a finite number.", param, ctx)
        return number


def check_output_file(output: Path | None, flag: str = "--output", inputs: tuple[Path, ...] = ()) -> None:
    """Fail before the work when ``output`` must not or cannot be written: it is one of the command's ``inputs``
    (a CONFIG_ERROR: writing it would destroy the input), a folder stands at its path, or a regular file where
    one of its folders would be (FILE_SYSTEM_ERRORs; the command would otherwise fail at its very end)."""
    if output is None:
        return
    from splade_obs.errors import ConfigError, FileSystemError

    path = Path(output)
    if any(Path(p).resolve() == path.resolve() for p in inputs):
        raise ConfigError(f"{flag} {output} is also an input of this command: writing it would destroy it",
                          field=flag.lstrip("-").replace("-", "_"), hint=f"give {flag} another file")
    if path.is_dir():
        raise FileSystemError(f"{flag} needs a file, and this is a folder", file_path=str(output),
                              hint=f"give {flag} a file path")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise FileSystemError(f"{flag} {output} needs a folder here, and this is a file",
                                      file_path=str(parent), hint=f"give {flag} a path under a folder")
            return


def handle_errors(default: ErrorCategory = ErrorCategory.UNKNOWN_ERROR) -> Callable[[F], F]:
    """Decorator for click commands: typed errors -> one line + exit code, no traceback unless --debug."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
                raise
            except (KeyboardInterrupt, RunInterrupted):
                click.echo("interrupted", err=True)
                sys.exit(EXIT_INTERRUPTED)
            except BrokenPipeError:
                # the reader went away (`splade-obs config show | head`): not an error of ours; stop quietly
                # (stdout is pointed at devnull so the interpreter's final flush cannot raise again)
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                sys.exit(1)
            except Exception as exc:  # noqa: BLE001 - the CLI boundary
                err = classify(exc, default)
                logging.getLogger("splade_obs.cli").debug("command failed", exc_info=True)
                report_error(err, debug_enabled())
                sys.exit(err.exit_code)

        return wrapper  # type: ignore[return-value]

    return decorate


debug_option = click.option("--debug", is_flag=True, default=False,
                            help="Show full tracebacks on errors.")


def _set_head_pass(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from splade_obs import cpu

    try:
        cpu.set_head_pass(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from exc
    return value


def head_pass_option(fn: F) -> F:
    """``--head-pass``: how CPU inference computes the vocabulary max (:func:`splade_obs.cpu.head_pass`)."""
    return click.option(
        "--head-pass", type=click.Choice(["auto", "fp32", "bf16", "int8"]), default="auto", show_default=True,
        expose_value=False, callback=_set_head_pass,
        help="CPU encoding's vocabulary pass: int8 / bf16 select the terms that can be non-zero (a proven bound) "
             "and compute those in fp32, the same weights as fp32 to rounding; auto takes the cheapest, counting "
             "the candidates' recompute, if 1.25x below fp32, measured once per machine (docs/recipes.md).")(fn)


def encoder_options(fn: F) -> F:
    """``--max-query-length``, ``--max-doc-length``, ``--batch-size``, ``--device`` and ``--head-pass``: how a
    command encodes (evaluate, mine-negatives and search: the same flags and defaults)."""
    fn = head_pass_option(fn)
    fn = click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ...")(fn)
    for name, default in (("--batch-size", 32), ("--max-doc-length", 256), ("--max-query-length", 64)):
        fn = click.option(name, default=default, show_default=True, type=click.IntRange(min=1))(fn)
    return fn
