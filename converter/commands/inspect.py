"""`wan2diffusers inspect`: what a checkpoint folder or file is and what is wrong with it, from
headers only."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import ConversionError
from .common import fail


@click.command("inspect")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable report on stdout.")
def inspect_cmd(path: Path, as_json: bool):
    """Diagnose PATH without reading tensor data: a pipeline folder, a folder of component
    subfolders, a component folder, an original Wan repo folder, or a single file.

    For each component: the layout (original Wan, Diffusers, quantized with quanto, mixed, single
    file with a key prefix), variant and size, dtypes, parameter count, shard health, what
    from_pretrained would complain about, and the fix `repair` or `convert` would apply.
    Exits 0 when it could inspect (see "healthy" in --json), 1 when PATH cannot be read."""
    from .. import api
    from ..diagnose.report import render

    try:
        report = api.inspect(path)
    except ConversionError as e:
        fail(e, as_json)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        for line in render(report):
            click.echo(line)
