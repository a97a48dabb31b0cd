"""``splade-obs sysinfo``: print the machine/software facts a run records, as JSON on stdout."""

from __future__ import annotations

import json

import click

from .common import handle_errors
from splade_obs.sysinfo import collect_system_info


@click.command("sysinfo")
@click.option("--mixed-precision", default=None, metavar="MODE",
              help="Record this mixed-precision mode in the output (as a run would).")
@handle_errors()
def sysinfo(mixed_precision: str | None) -> None:
    """Print system information (Python, OS, CPU, memory, torch/CUDA/GPUs, library versions, git commit)
    as JSON. Environment variables are never included."""
    click.echo(json.dumps(collect_system_info(mixed_precision), indent=2))
