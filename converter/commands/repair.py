"""`wan2diffusers repair`: fix a checkpoint folder in place, atomically, with a backup."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .. import api
from ..actions.common import parse_settings
from .common import run_reporting


@click.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--source", type=click.Path(path_type=Path), default=None,
              help="The original checkpoint (repo folder or file) the folder was converted from: restores "
                   "tensors the weights cannot give back (e.g. FLF2V's pos_embed).")
@click.option("--backup", default=None, metavar="DIR|none",
              help="Where replaced and removed files go (default: PATH.backup-<time> beside PATH); "
                   "`none` deletes them.")
@click.option("--set", "settings", multiple=True, metavar="COMPONENT.FACT=VALUE",
              help="A fact the weights cannot tell, for a conversion in place (as convert --set).")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest shard of a conversion in place.")
@click.option("--dry-run", is_flag=True, help="Say what would be done; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable report on stdout.")
def repair(path: Path, source: Path | None, backup: str | None, settings: tuple[str, ...], max_shard_size: str,
           dry_run: bool, as_json: bool):
    """Fix what `inspect` finds in PATH, in place: original-layout weights converted, a lost or
    wrong index rebuilt from the shard headers, config.json completed from the weights, missing
    tensors restored from --source, leftover files moved out. Each component folder is rebuilt
    in a hidden work folder, checked, and swapped in atomically; whatever it replaces goes into
    the backup. A component with a problem repair cannot fix is left untouched, with the reason
    (exit 1)."""
    def action():
        return api.repair(path, source=source, backup=backup, settings=parse_settings(settings),
                          max_shard_size=max_shard_size, dry_run=dry_run, log=None if as_json else click.echo,
                          progress=not as_json)

    report = run_reporting(action, as_json, path, "the folder was not changed")
    if not report["ok"]:
        reasons: dict[str, list[str]] = {}  # one line per reason, naming every component it refused
        for c in report["components"]:
            for r in c["refused"]:
                reasons.setdefault(r, []).append(c["component"])
        click.echo(f"error: {len(reasons)} problem(s) repair cannot fix (those components were left as they were)",
                   err=True)
        for r, components in reasons.items():
            click.echo(f"  {', '.join(components)}: {r}", err=True)
        sys.exit(1)
