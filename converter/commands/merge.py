"""`wan2diffusers merge`: original Wan weights + LoRA files -> a Diffusers folder with the LoRAs merged."""

from __future__ import annotations

from pathlib import Path

import click

from .. import api
from ..actions.common import parse_settings
from ..actions.convert import DTYPE_OPTIONS, OUTPUTS
from .common import run_reporting


@click.command()
@click.argument("base", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--lora", "loras", multiple=True, required=True, metavar="[EXPERT=]FILE[:STRENGTH]",
              help="A LoRA file in any format `convert` reads (original/Kijai/lightx2v, kohya/musubi, diffusers/PEFT, "
                   "DiffSynth), merged with STRENGTH (default 1). Wan 2.2 A14B: EXPERT says which expert it is "
                   "for (high / low, or transformer / transformer_2). Repeatable.")
@click.option("--dtype", type=click.Choice(DTYPE_OPTIONS), default="keep",
              show_default=True, help="Output dtype of floating tensors (the merge itself is computed in float32).")
@click.option("--to", "to", type=click.Choice(list(OUTPUTS)), default="diffusers", show_default=True,
              help="The output, as `convert --to`: a Diffusers folder, a GGUF file, the original layout, ComfyUI files.")
@click.option("--quantize", default=None, metavar="TYPE",
              help="As `convert --quantize`: int8/float8/int4 (Diffusers), a GGUF type, fp8_scaled (ComfyUI).")
@click.option("--only", default=None, metavar="LIST", help="Components to convert (as `convert --only`).")
@click.option("--max-shard-size", default=None, help="Largest output shard.  [default: 5GB]")
@click.option("--set", "settings", multiple=True, metavar="COMPONENT.FACT=VALUE",
              help="A fact the weights cannot tell (as `convert --set`).")
@click.option("--drop-unsupported", is_flag=True,
              help="Leave out, and list, the LoRA modules this model does not have (e.g. the image attention of a "
                   "Wan 2.1 I2V LoRA on a Wan 2.2 model) instead of refusing the merge.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (atomically, when the new one is complete).")
@click.option("--dry-run", is_flag=True, help="Read headers, place every LoRA module, prove coverage; write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable report on stdout.")
def merge(base: Path, out: Path, loras: tuple[str, ...], dtype: str, to: str, quantize: str | None, only: str | None,
          max_shard_size: str | None, settings: tuple[str, ...], drop_unsupported: bool, overwrite: bool, dry_run: bool,
          as_json: bool):
    """Convert BASE into OUT as `convert` does (any --to, --dtype, --quantize) with LoRAs merged into
    the transformer as it is read, a slice at a time: W + strength * alpha/rank * (B @ A) (+ diff,
    diff_b, diff_m), in float32, then cast or quantized. A LoRA module the model lacks or whose shape
    differs (another variant, size or expert) is refused, naming it; the report lists every tensor
    changed."""
    def action():
        return api.merge(base, out, loras, dtype=dtype, quantize=quantize, to=to, only=only, overwrite=overwrite,
                         max_shard_size=max_shard_size,
                         settings=parse_settings(settings), dry_run=dry_run, drop_unsupported=drop_unsupported,
                         log=None if as_json else click.echo,
                         progress=not as_json)

    run_reporting(action, as_json, out, "nothing was written", "; nothing was written")
