"""`wan2diffusers publish`: write the model card into a converted folder and upload it to the Hub."""

from __future__ import annotations

from pathlib import Path

import click

from .. import api
from .common import run_reporting


@click.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.argument("repo_id")
@click.option("--revision", default=None, metavar="BRANCH",
              help="Upload into this branch (created from main if missing) instead of main.")
@click.option("--private", is_flag=True, help="Create the repository private (an existing one keeps its visibility).")
@click.option("--commit-message", default=None, help="Commit message (default: says what was converted, by which tool).")
@click.option("--base-model", default=None, metavar="REPO_ID",
              help="The original repo (e.g. Wan-AI/Wan2.1-T2V-14B), when convert did not download it itself.")
@click.option("--source", type=click.Path(path_type=Path), default=None,
              help="The original folder: its README's license and tags are carried over, and --hash-sources "
                   "reads its files (default: the folder convert read, from OUT/wan2diffusers.json).")
@click.option("--record", type=click.Path(path_type=Path), default=None,
              help="The conversion record to describe (default: OUT/wan2diffusers.json; `quantize` of a pipeline "
                   "folder carries it over). For a transformer folder `quantize` made, pass the float folder's.")
@click.option("--hash-sources", is_flag=True,
              help="Stream every source file through sha256 for the card (slow on tens of GB). Without it, "
                   "only the hashes that are free are given (files from the local Hub cache).")
@click.option("--fixtures", type=click.Path(path_type=Path), default=None,
              help="The project's tests/fixtures folder, for the measured error (default: the source checkout's).")
@click.option("--no-measure", is_flag=True, help="Do not measure the mapping's error on the fixtures.")
@click.option("--dry-run", is_flag=True, help="Write the card and print what would be uploaded; no network.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable report on stdout.")
def publish(out: Path, repo_id: str, revision: str | None, private: bool, commit_message: str | None,
            base_model: str | None, source: Path | None, record: Path | None, hash_sources: bool,
            fixtures: Path | None, no_measure: bool, dry_run: bool, as_json: bool):
    """Write OUT/README.md (the model card) and upload the converted folder OUT to the Hub repo
    REPO_ID (created if missing). The token comes from HF_TOKEN or `hf auth login`."""
    def action():
        return api.publish(out, repo_id, revision=revision, private=private, commit_message=commit_message,
                           base_model=base_model, source=source, record=record, hash_sources=hash_sources,
                           fixtures=fixtures, measure=not no_measure, dry_run=dry_run,
                           log=None if as_json else click.echo)

    run_reporting(action, as_json, out, "re-run publish to resume the upload")
