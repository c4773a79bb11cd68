"""GGUF K-quants (issue 19): `--to gguf --quantize Q2_K ... Q6_K`.

Judged by references, not by our own code:
- the type of every tensor against ComfyUI-GGUF's tools/lcpp.patch (img_tensor_get_type and the
  LLM_ARCH_WAN exclusions, applied by llama-quantize in the name order of convert.py's F16 file),
  restated here from the patch, independently of mappings/gguf.yaml;
- the bytes of every quantized tensor against ggml's own `ggml_quantize_chunk` (libggml-python,
  called here through its own ctypes binding) on the whole source tensor in float32;
- the values, dequantized by gguf-py's numpy code, against the source;
- diffusers' GGUF loader reproducing the official WanModel's output.

The official fixtures are 128 wide, so only their 256-wide `ffn.2` weights can take a K type (the
others fall back to F16, as the patch does); a 256-wide model made by the official Wan code
(wan22's WanModel, seeded) puts every block weight through the K quantizers."""

from __future__ import annotations

import ctypes
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import official
from conftest import FIXTURES, rel_err, run_cli

gguf = pytest.importorskip("gguf")
libggml = pytest.importorskip("libggml")

K_FILES = ["Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K"]
KEEP = ("modulation.", "patch_embedding.", "text_embedding.", "time_projection.", "time_embedding.", "img_emb.",
        "head.")  # lcpp.patch, LLM_ARCH_WAN: never quantized


def patch_type(key: str, shape, file_type: str, counters: dict) -> str:
    """What ComfyUI-GGUF's route gives one tensor of a float32 source, restated from its code:
    convert.py (1-D, <= 1024 values, `.modulation`: F32; else F16), then llama-quantize + lcpp.patch."""
    n = int(np.prod(shape))
    if len(shape) > 4:
        return "F32"  # fix_5d_tensors.py adds it back in F32
    if len(shape) == 1 or n <= 1024 or ".modulation" in key:
        return "F32"
    if not key.endswith("weight") or len(shape) != 2 or any(k in key for k in KEEP) or "_norm.weight" in key:
        return "F16"
    base = {"Q2_K": "Q2_K", "Q3_K_S": "Q3_K", "Q3_K_M": "Q3_K", "Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K",
            "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K"}[file_type]
    new = base
    if ".v.weight" in key:
        i = counters.get("wv", 0)
        if file_type == "Q2_K":
            new = "Q3_K"
        elif file_type == "Q3_K_M":
            new = "Q5_K" if i < 2 else "Q4_K"
        elif file_type in ("Q4_K_M", "Q5_K_M"):
            new = "Q6_K"
        elif file_type == "Q4_K_S" and i < 4:
            new = "Q5_K"
        counters["wv"] = i + 1
    elif ".ffn.2.weight" in key:
        new = {"Q3_K_M": "Q4_K", "Q4_K_S": "Q5_K", "Q4_K_M": "Q6_K", "Q5_K_M": "Q6_K"}.get(file_type, base)
    return new if shape[-1] % 256 == 0 else "F16"


def ggml_reference(values: np.ndarray, qtype) -> bytes:
    """ggml_quantize_chunk of the whole tensor, no importance matrix: llama-quantize's call."""
    root = Path(libggml.__file__).parent
    lib = ctypes.CDLL(str(next(p for p in root.rglob("libggml-base.*") if p.suffix in (".so", ".dylib", ".dll"))))
    fn = lib.ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_void_p]
    values = np.ascontiguousarray(values.reshape(-1, values.shape[-1]), dtype=np.float32)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    out = np.empty(values.shape[0] * values.shape[1] // block * size, dtype=np.uint8)
    fn(int(qtype), values.ctypes.data, out.ctypes.data, 0, values.shape[0], values.shape[1], None)
    return out.tobytes()


WIDE = dict(patch_size=(1, 2, 2), in_dim=16, dim=256, ffn_dim=512, freq_dim=256, text_dim=32, out_dim=16,
            num_heads=2, num_layers=3, window_size=(-1, -1), qk_norm=True, cross_attn_norm=True, eps=1e-6,
            model_type="t2v", text_len=16)


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A 256-wide Wan 2.1 T2V transformer made by the official code (seeded), in the original repo
    layout, with its official output on fixed inputs."""
    if not official.available():
        pytest.skip("the official Wan code (wan22) is not installed")
    root = tmp_path_factory.mktemp("wide")
    torch.manual_seed(1900)
    model = official.wan_model_module().WanModel(**WIDE).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 if "norm" in name and p.dim() == 1 else 0.0) + 0.05 * torch.randn_like(p))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "diffusion_pytorch_model.safetensors"),
              metadata={"format": "pt"})
    cfg = {"_class_name": "WanModel", "_diffusers_version": "0.30.0",
           **{k: WIDE[k] for k in ("dim", "eps", "ffn_dim", "freq_dim", "in_dim", "model_type", "num_heads",
                                   "num_layers", "out_dim", "text_len")}}
    (root / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(7)
    x, t, context = torch.randn(16, 3, 8, 8, generator=g), torch.tensor([500.0]), torch.randn(10, 32, generator=g)
    with torch.no_grad():
        expected = model(x=[x], t=t, context=[context], seq_len=3 * 4 * 4)[0]
    run_cli("convert", root, root.parent / "float", "--only", "transformer")
    return root, (x, t, context), expected, root.parent / "float" / "transformer"


def run_diffusers(path, config, inputs, dtype):
    import diffusers

    x, t, context = inputs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = diffusers.WanTransformer3DModel.from_single_file(
            str(path), quantization_config=diffusers.GGUFQuantizationConfig(compute_dtype=dtype), config=str(config),
            torch_dtype=dtype).eval()
    padded = torch.zeros(1, WIDE["text_len"], 32)
    padded[0, :context.shape[0]] = context
    with torch.no_grad():
        return model(hidden_states=x[None].to(dtype), timestep=t, encoder_hidden_states=padded.to(dtype),
                     return_dict=False)[0][0].float()


# worst relative error through diffusers' loader (float32) on the 256-wide official model, with margin
# (measured: Q2_K 0.151, Q3_K_S 0.0718, Q3_K_M 0.0597, Q4_K_S 0.0334, Q4_K_M 0.0298, Q5_K_S 0.0248,
# Q5_K_M 0.021, Q6_K 0.00957)
BOUND = {"Q2_K": 0.25, "Q3_K_S": 0.12, "Q3_K_M": 0.1, "Q4_K_S": 0.06, "Q4_K_M": 0.05, "Q5_K_S": 0.04,
         "Q5_K_M": 0.035, "Q6_K": 0.02}


@pytest.mark.parametrize("file_type", K_FILES)
def test_every_tensor_has_the_patch_type_and_ggml_bytes_and_diffusers_runs_it(wide, tmp_path, file_type):
    src, inputs, expected, config = wide
    out = tmp_path / f"w-{file_type}.gguf"
    report = run_cli("convert", src, out, "--to", "gguf", "--quantize", file_type, "--json").json()
    source = load_file(str(src / "diffusion_pytorch_model.safetensors"))
    reader = gguf.GGUFReader(str(out))
    assert [t.name for t in reader.tensors] == sorted(source)  # convert.py's order: llama-quantize's order
    counters, k_seen = {}, set()
    for t in reader.tensors:
        values = source[t.name].float().numpy()
        want = patch_type(t.name, values.shape, file_type, counters)
        assert t.tensor_type.name == want, (t.name, t.tensor_type.name, want)
        if want.endswith("_K"):
            k_seen.add(want)
            assert bytes(t.data.tobytes()) == ggml_reference(values, t.tensor_type), t.name
            back = gguf.quants.dequantize(t.data, t.tensor_type).reshape(values.shape)
            assert np.abs(back - values).max() <= 0.5 * np.abs(values).max(), t.name  # gguf-py reads it back
    assert counters["wv"] == 2 * WIDE["num_layers"]
    assert k_seen and report["type"] == file_type
    field = reader.fields["general.file_type"]
    assert gguf.LlamaFileType(int(field.parts[-1][0])).name == f"MOSTLY_{file_type}"
    got = run_diffusers(out, config, inputs, torch.float32)
    err = rel_err(got, expected)
    print(f"\n256-wide official WanModel, gguf {file_type} via diffusers (float32): rel err {err:.3g}")
    assert err <= BOUND[file_type]
    assert torch.isfinite(run_diffusers(out, config, inputs, torch.bfloat16)).all()  # as users run it


def test_the_legacy_types_follow_the_patch_too(wide, tmp_path):
    """lcpp.patch raises ffn.2 to Q4_1 in Q4_0 files and to Q5_1 in Q5_0 files."""
    src = wide[0]
    for file_type, ffn2 in (("Q4_0", "Q4_1"), ("Q5_0", "Q5_1"), ("Q8_0", "Q8_0")):
        out = tmp_path / f"{file_type}.gguf"
        run_cli("convert", src, out, "--to", "gguf", "--quantize", file_type)
        types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
        assert types["blocks.0.ffn.2.weight"] == ffn2 and types["blocks.0.ffn.0.weight"] == file_type
        assert types["blocks.0.self_attn.v.weight"] == file_type


@pytest.mark.parametrize("file_type", ["Q4_K_S", "Q2_K"])
def test_the_official_fixtures_take_k_types_where_rows_allow(tmp_path, file_type):
    """128-wide fixtures: the 256-wide ffn.2 weights are K-quantized, the rest falls back to F16."""
    out = tmp_path / "t2v.gguf"
    run_cli("convert", FIXTURES / "t2v", out, "--to", "gguf", "--quantize", file_type)
    source = {}
    for f in sorted((FIXTURES / "t2v").glob("*.safetensors")):
        source.update(load_file(str(f)))
    counters = {}
    for t in gguf.GGUFReader(str(out)).tensors:
        values = source[t.name].float().numpy()
        assert t.tensor_type.name == patch_type(t.name, values.shape, file_type, counters), t.name
        if t.tensor_type.name.endswith("_K"):
            assert bytes(t.data.tobytes()) == ggml_reference(values, t.tensor_type), t.name


def test_verify_and_inspect_take_a_k_quant_file(wide, tmp_path):
    src = wide[0]
    out = tmp_path / "w.gguf"
    run_cli("convert", src, out, "--to", "gguf", "--quantize", "Q4_K_M")
    report = run_cli("inspect", out, "--json").json()
    assert report["healthy"] and {"Q4_K", "Q6_K", "F16", "F32"} <= set(report["types"])
    assert run_cli("verify", out, "--source", src, "--json").json()["ok"]
