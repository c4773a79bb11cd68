"""ComfyUI fp8 files made from the official fixtures the way ComfyUI's own code makes and reads them
(a reference we did not write, followed line by line):

- quantize, comfy/quant_ops.py TensorCoreFP8Layout.quantize: scale = amax(|w|) / finfo(fp8).max,
  qdata = (w * (1.0 / scale).to(w.dtype)).to(fp8); dequantize: qdata.to(dtype) * scale.
- old scheme, comfy/utils.py convert_old_quants: the `scaled_fp8` marker, `<layer>.scale_weight`
  and `<layer>.scale_input` (Comfy-Org's repackaged files: every 2-D `.weight` F8_E4M3, 0-d F32 scales,
  the rest F16; tests/data/comfy_org_wan22_t2v_low_noise_fp8_scaled_header.json).
- comfy_quant scheme, comfy/ops.py mixed_precision_ops: `<layer>.comfy_quant` (uint8 bytes of
  JSON {"format": "float8_e4m3fn"}) or the `_quantization_metadata` header entry, with
  `<layer>.weight_scale` / `<layer>.input_scale`.
- plain fp8 (Kijai's `*_fp8_e4m3fn` files): the weights cast to fp8, no scales.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import official
from conftest import FIXTURES
from loading import load_converted, run_official_call

FP8 = torch.float8_e4m3fn


def fixture_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(folder).glob("diffusion_pytorch_model*.safetensors")):
        out.update(load_file(str(f)))
    return out


def comfy_quantize(w: torch.Tensor, dtype=FP8) -> tuple[torch.Tensor, torch.Tensor]:
    """comfy/quant_ops.py TensorCoreFP8Layout.quantize, as written there."""
    scale = torch.amax(w.abs()) / torch.finfo(dtype).max
    scale = scale.to(dtype=torch.float32)
    return (w * (1.0 / scale).to(w.dtype)).to(dtype, memory_format=torch.contiguous_format), scale


def is_quantized(key: str, t: torch.Tensor) -> bool:
    return key.endswith(".weight") and t.ndim == 2


def make_fp8_file(fixture: Path, path: Path, scheme: str = "scale_weight", prefix: str = "",
                  keep=torch.float16) -> Path:
    """scheme: scale_weight (marker + .scale_weight/.scale_input), comfy_quant (per-layer .comfy_quant
    tensors), comfy_quant_metadata (the _quantization_metadata header entry), plain (no scales)."""
    sd, out, layers = fixture_state_dict(fixture), {}, {}
    for key, w in sd.items():
        if not is_quantized(key, w):
            out[key] = w.to(keep)
            continue
        layer = key.removesuffix(".weight")
        if scheme == "plain":
            out[key] = w.to(FP8)
            continue
        q, scale = comfy_quantize(w)
        out[key] = q
        if scheme == "scale_weight":
            out[f"{layer}.scale_weight"], out[f"{layer}.scale_input"] = scale, torch.tensor(1.0)
        else:
            out[f"{layer}.weight_scale"], out[f"{layer}.input_scale"] = scale, torch.tensor(1.0)
            layers[layer] = {"format": "float8_e4m3fn"}
            if scheme == "comfy_quant":
                out[f"{layer}.comfy_quant"] = torch.tensor(list(json.dumps(layers[layer]).encode()), dtype=torch.uint8)
    metadata = None
    if scheme == "scale_weight":
        out["scaled_fp8"] = torch.empty(0, dtype=FP8)
    elif scheme == "comfy_quant_metadata":
        metadata = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}
    out = {prefix + k: v for k, v in out.items()}
    save_file(out, str(path), metadata=metadata)
    return path


def dequantized(path: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """The float32 state dict ComfyUI computes from such a file (qdata.to(float32) * scale), in the
    original key names: what the official WanModel is run on."""
    sd = {k[len(prefix):]: v for k, v in load_file(str(path)).items()}
    out = {}
    for key, t in sd.items():
        if key == "scaled_fp8" or key.endswith((".scale_weight", ".scale_input", ".weight_scale", ".input_scale",
                                                ".comfy_quant")):
            continue
        layer = key.removesuffix(".weight")
        scale = sd.get(f"{layer}.scale_weight", sd.get(f"{layer}.weight_scale"))
        out[key] = t.to(torch.float32) * scale if scale is not None else t.to(torch.float32)
    return out


HEADS = ("--set", "transformer.num_heads=4")  # a single file has no config.json; the fixtures are 4-headed


def official_out(state_dict: dict, fixture: str) -> torch.Tensor:
    info = json.loads((FIXTURES / fixture / "fixture.json").read_text())
    model = official.wan_model_module().WanModel(**info["official_init_kwargs"]).eval()
    model.load_state_dict(state_dict, strict=True)
    i = load_file(str(FIXTURES / fixture / "inputs.safetensors"))
    with torch.no_grad():
        return model(x=[i["x"]], t=i["t"], context=[i["context"]], seq_len=int(i["seq_len"]))[0]


def diffusers_out(folder, fixture: str) -> torch.Tensor:
    return run_official_call(load_converted(folder), fixture)[0][0]
