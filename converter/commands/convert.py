"""`wan2diffusers convert`: original Wan weights -> a Diffusers folder."""

from __future__ import annotations

from pathlib import Path

import click

from .. import api
from ..actions.common import parse_settings
from ..actions.convert import DTYPE_OPTIONS, OUTPUTS
from ..gguf_out import load_gguf_policy
from ..lora import load_lora_spec
from .common import backend_option, run_reporting


@click.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--only", default=None, metavar="LIST",
              help="Comma-separated components to convert: transformer,vae,text_encoder,image_encoder.")
@click.option("--max-shard-size", default=None,
              help="Largest output shard (e.g. 5GB, 500MB), as save_pretrained splits.  [default: 5GB]")
@click.option("--dtype", type=click.Choice(DTYPE_OPTIONS), default="keep",
              show_default=True,
              help="Output dtype of floating tensors. In bf16/fp16 the modules diffusers keeps in "
                   "float32 (_keep_in_fp32_modules) stay float32. fp8_e4m3fn/fp8_e5m2: with --to comfyui "
                   "--only transformer, ComfyUI's plain fp8 file (Linear weights cast, no scales).")
@click.option("--clip-heads", type=int, default=None,
              help="Attention heads of the CLIP vision tower, which the weights cannot tell "
                   "(default: from the table of known towers; ViT-H/14: 16).")
@click.option("--flow-shift", type=float, default=None,
              help="The scheduler's flow_shift (default per variant, see README: 3.0; FLF2V 16.0).")
@click.option("--set", "settings", multiple=True, metavar="COMPONENT.FACT=VALUE",
              help="Give a fact the weights cannot tell, e.g. transformer.num_heads=12 for a single "
                   "file of an unknown size (value parsed as YAML). Repeatable.")
@click.option("--to", "to", type=click.Choice(list(dict.fromkeys([*OUTPUTS, *load_lora_spec().formats]))),
              default="diffusers", show_default=True,
              help="Output layout: a Diffusers folder; (gguf) the transformer as one .gguf file in its "
                   "original key names, for ComfyUI-GGUF and diffusers' GGUF loader (needs --quantize TYPE); "
                   "(original) a Diffusers SRC back in the layout of the original Wan-AI repo; (comfyui) a "
                   "Diffusers SRC as ComfyUI's single files (diffusion_models/, vae/, text_encoders/, clip_vision/). "
                   "A LoRA file SRC goes to one LoRA file OUT in the format named: diffusers, original, "
                   "kohya or comfyui (mappings/lora.yaml).")
@click.option("--quantize", type=click.Choice(["int8", "float8", "int4", *load_gguf_policy().types, "fp8_scaled"]),
              default=None,
              help="Write the transformer quantized: int8, float8, int4 in a Diffusers folder (see --backend; "
                   "from_pretrained loads it with no extra argument; the other components stay float; which "
                   "modules stay float: mappings/quantization.yaml); with --to gguf, a GGUF type "
                   "(Q8_0, the K-quants Q6_K ... Q2_K, ... F32; mappings/gguf.yaml); with --to comfyui, "
                   "fp8_scaled (ComfyUI's fp8 with per-tensor scales, as Comfy-Org's files; mappings/fp8.yaml).")
@click.option("--override-config", is_flag=True,
              help="Let --set values replace what the source's config.json says (otherwise a contradiction "
                   "is refused).")
@click.option("--check-finite", is_flag=True,
              help="Read every floating source tensor once more and warn, naming the keys, about NaN or Inf "
                   "values (without it, the values are not checked and the report says so).")
@click.option("--drop-unsupported", is_flag=True,
              help="LoRA files: leave out (and list) what the target format cannot hold (e.g. a full-weight "
                   "diff in a diffusers file) instead of refusing the conversion.")
@backend_option
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (atomically, when the new one is complete).")
@click.option("--dry-run", is_flag=True, help="Read headers, detect, plan and prove coverage; write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable report on stdout.")
def convert(src: Path, out: Path, only: str | None, max_shard_size: str | None, dtype: str, clip_heads: int | None,
            flow_shift: float | None, settings: tuple[str, ...], quantize: str | None, override_config: bool,
            check_finite: bool, backend: str | None, to: str, overwrite: bool, dry_run: bool, as_json: bool,
            drop_unsupported: bool):
    """Convert the original-layout Wan 2.1 / Wan 2.2 weights in SRC into a Diffusers folder OUT.

    SRC is a Hub repo id (e.g. Wan-AI/Wan2.2-T2V-A14B: only the needed files are downloaded),
    a folder in the original repo layout (config.json with diffusion_pytorch_model.safetensors
    or its shards and index, at the root or in Wan 2.2's high_noise_model/ and low_noise_model/;
    Wan2.1_VAE.pth or Wan2.2_VAE.pth; models_t5_umt5-xxl-enc-bf16.pth;
    models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth), or one such file. A single
    .safetensors file may carry a `model.diffusion_model.` or `model.` key prefix.
    Each component goes to OUT/<component>/ (the second Wan 2.2 expert to OUT/transformer_2/)."""
    def action():
        return api.convert(src, out, dtype=dtype, quantize=quantize, only=only, overwrite=overwrite,
                           max_shard_size=max_shard_size, settings=parse_settings(settings),
                           override_config=override_config, clip_heads=clip_heads, flow_shift=flow_shift,
                           check_finite=check_finite, dry_run=dry_run, log=None if as_json else click.echo,
                           warn=lambda line: click.echo(line, err=True), progress=not as_json, backend=backend, to=to,
                           drop_unsupported=drop_unsupported)

    run_reporting(action, as_json, out, "nothing was written", "; nothing was written")
