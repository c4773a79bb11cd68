"""Wan LoRA files over the official fixtures, in each format, written the way their tools write them:

- original (Kijai / lightx2v, read by ComfyUI-WanVideoWrapper nodes_model_loading.py and ComfyUI
  comfy/lora.py load_lora): `diffusion_model.<module>.lora_down.weight` / `.lora_up.weight` / `.alpha`,
  `.diff_b` (bias delta), `.diff` (weight delta), `<block>.diff_m` (modulation delta);
- kohya (musubi-tuner networks/lora_wan.py + networks/lora.py: prefix `lora_unet`, the module path
  with `_`, lora_down / lora_up / alpha; scale alpha / rank);
- diffusers/PEFT: made by PEFT itself on the Diffusers model and saved by diffusers'
  `WanPipeline.save_lora_weights` (tests/e2e/lora/test_lora.py).

`apply` is the LoRA formula on an original-layout state dict: W + alpha/rank * B @ A (+ diff),
b + diff_b, modulation + diff_m, in float32 -- what the official model is run on."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

RANK, ALPHA = 4, 2.0


def make_modules(sd: dict, modules: list[str], seed: int = 0, diff_b: bool = True) -> dict:
    """module -> {down, up, alpha, diff_b?}: small random LoRA matrices for Linear modules of `sd`."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m in modules:
        w = sd[f"{m}.weight"]
        parts = {"down": torch.randn(RANK, w.shape[1], generator=g) * 0.2,
                 "up": torch.randn(w.shape[0], RANK, generator=g) * 0.2,
                 "alpha": torch.tensor(ALPHA)}
        if diff_b and f"{m}.bias" in sd:
            parts["diff_b"] = torch.randn(w.shape[0], generator=g) * 0.05
        out[m] = parts
    return out


def apply(sd: dict, modules: dict, extra: dict | None = None) -> dict:
    """The state dict with the LoRA merged by the formula (float32). `extra`: {key: delta} added as is
    (diff / diff_m)."""
    out = {k: v.clone().float() for k, v in sd.items()}
    for m, p in modules.items():
        if "down" in p:
            scale = float(p["alpha"]) / p["down"].shape[0] if "alpha" in p else 1.0
            out[f"{m}.weight"] += scale * (p["up"].float() @ p["down"].float())
        if "diff_b" in p:
            out[f"{m}.bias"] += p["diff_b"].float()
    for k, d in (extra or {}).items():
        out[k] += d.float()
    return out


NAMES = {"down": "lora_down.weight", "up": "lora_up.weight", "alpha": "alpha", "diff_b": "diff_b"}


def write_original(path, modules: dict, extra_parts: dict | None = None, prefix: str = "diffusion_model.",
                   names: dict | None = None) -> None:
    """`extra_parts`: {key without prefix: tensor} (e.g. `blocks.0.diff_m`, `blocks.0.norm3.diff`)."""
    names = names or NAMES
    sd = {f"{prefix}{m}.{names[r]}": t for m, p in modules.items() for r, t in p.items()}
    sd.update({prefix + k: v for k, v in (extra_parts or {}).items()})
    save_file(sd, str(path))


def write_kohya(path, modules: dict, prefix: str = "lora_unet_") -> None:
    sd = {}
    for m, p in modules.items():
        name = prefix + m.replace(".", "_")
        sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"], sd[f"{name}.alpha"] = p["down"], p["up"], p["alpha"]
    save_file(sd, str(path))
