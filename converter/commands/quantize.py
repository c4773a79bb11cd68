"""`wan2diffusers quantize`: an already-converted Diffusers folder -> its quantized variant."""

from __future__ import annotations

from pathlib import Path

import click

from .. import api
from .common import backend_option, run_reporting

WEIGHTS = ("int8", "float8", "int4")  # checked against mappings/quantization.yaml when run


@click.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--weights", type=click.Choice(WEIGHTS), required=True,
              help="Weight dtype of the quantized Linear layers (see --backend).")
@click.option("--max-shard-size", default="5GB", show_default=True,
              help="Largest output shard (e.g. 5GB, 500MB), as save_pretrained splits.")
@backend_option
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (atomically, when the new one is complete).")
@click.option("--dry-run", is_flag=True, help="Read headers, prove the keys and plan the quantized layout; write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable report on stdout.")
def quantize(src: Path, out: Path, weights: str, max_shard_size: str, backend: str | None, overwrite: bool,
             dry_run: bool, as_json: bool):
    """Quantize the transformer of the Diffusers folder SRC into OUT, one weight at a time.

    SRC is a transformer folder (config.json + diffusion_pytorch_model*.safetensors, e.g. the
    transformer/ that `wan2diffusers convert` writes) or a pipeline folder holding one; OUT is
    the same kind of folder. In a pipeline folder the other components are hard-linked (copied
    where a link is refused) unchanged. The Linear layers the policy (mappings/quantization.yaml)
    does not keep float are written as diffusers' torchao (or quanto) backend writes them, so
    `from_pretrained(OUT)` loads them quantized with no extra argument."""
    def action():
        return api.quantize(src, out, weights=weights, overwrite=overwrite, max_shard_size=max_shard_size,
                            dry_run=dry_run, log=None if as_json else click.echo, backend=backend,
                            progress=not as_json)

    run_reporting(action, as_json, out, "nothing was written", "; nothing was written")
