"""`wan2diffusers verify`: is OUT exactly what its classes load, and (with --source) exactly what
the mapping makes of the original checkpoint?"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..errors import ConversionError
from ..sizes import human_size
from .common import MAX_DETAILS, fail


@click.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--source", type=click.Path(path_type=Path), default=None,
              help="The original checkpoint OUT was converted from: compare every tensor through the mapping.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable report on stdout.")
def verify(out: Path, source: Path | None, as_json: bool):
    """Check OUT (a pipeline folder, a component folder or a file): every component's keys and
    shapes against its Diffusers/transformers class built on the meta device from its
    config.json, strictly (nothing missing, unexpected or mis-shaped; the index agrees with
    the shards). With --source, every output tensor is compared with what the mapping makes of
    the source tensors, one tensor at a time. Reports the sha256 of every file. Exits 1 on any
    difference, naming the keys."""
    from .. import api

    try:
        report = api.verify(out, source, progress=not as_json)
    except ConversionError as e:
        fail(e, as_json)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        for c in report["components"]:
            state = "ok" if not c["differences"] else f"{len(c['differences'])} difference(s)"
            against = ""
            if source is not None and not c["differences"]:
                against = f" (not compared: {c['not_compared']})" if "not_compared" in c else \
                    f", {c['compared']} tensors equal the source's" + \
                    (" (quantized ones within half a step)" if "quanto" in c["layout"] else "")
            click.echo(f"{c['component']}: {c['layout']}, {c['tensors']} tensors vs {c['class']}: {state}{against}")
        for f in report["files"]:
            click.echo(f"  {f['sha256']}  {f['file']} ({human_size(f['bytes'])})")
    if not report["ok"]:
        diffs = report["differences"]
        click.echo(f"error: {report['path']}: verify failed: {len(diffs)} difference(s)", err=True)
        for x in diffs[:MAX_DETAILS]:
            click.echo(f"  {x['component']}: {x['key'] + ': ' if x['key'] else ''}{x['problem']}", err=True)
        if len(diffs) > MAX_DETAILS:
            click.echo(f"  ... and {len(diffs) - MAX_DETAILS} more", err=True)
        sys.exit(1)
    if not as_json:
        click.echo("verified: " + ("identical to the source through the mapping" if source else "keys and shapes match"))
