"""`wan2diffusers verify`: strict keys and shapes against the class on meta, tensor-by-tensor
equality with the source through the mapping, sha256 of every file; it must catch a single
changed value."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import FIXTURES, run_cli
from wan2diffusers.read.safetensors_file import read_header
from test_inspect import converted_root, diffusers_int8, fresh  # noqa: F401

T5_PTH = FIXTURES / "t5" / "models_t5_umt5-xxl-enc-bf16.pth"
CLIP_PTH = FIXTURES / "clip" / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"


def bump_one_value(path, key, index=5, delta=1e-3):
    """Change one float32 value of one tensor in a safetensors file, in place."""
    ref = read_header(path).tensors[key]
    assert ref.dtype == "F32"
    with open(path, "r+b") as f:
        f.seek(ref.offset + 4 * index)
        (v,) = struct.unpack("<f", f.read(4))
        f.seek(ref.offset + 4 * index)
        f.write(struct.pack("<f", v + delta))


def test_a_clean_conversion_verifies_with_the_sha256_of_every_file(converted_root):
    out = converted_root / "flf2v-sharded"
    report = run_cli("verify", out, "--source", FIXTURES / "flf2v", "--json").json()
    assert report["ok"] and report["differences"] == []
    (comp,) = report["components"]
    assert comp["compared"] == comp["tensors"] == 88 and comp["class"] == "WanTransformer3DModel"
    files = sorted(p for p in out.rglob("*") if p.is_file())
    assert [f["file"] for f in report["files"]] == [str(p.relative_to(out)) for p in files]
    for f, p in zip(report["files"], files):
        assert f["sha256"] == hashlib.sha256(p.read_bytes()).hexdigest() and f["bytes"] == p.stat().st_size
    text = run_cli("verify", out, "--source", FIXTURES / "flf2v").stdout
    assert "88 tensors equal the source's" in text and "identical to the source" in text


def test_a_single_changed_value_is_caught_and_named(converted_root, tmp_path):
    folder = fresh(converted_root, "vace", tmp_path / "vace") / "transformer"
    key = "vace_blocks.1.attn2.to_v.bias"
    bump_one_value(folder / "diffusion_pytorch_model.safetensors", key)
    bad = run_cli("verify", folder, "--source", FIXTURES / "vace", ok=False)
    assert f"{key}: differs from the source in 1 of 128 values" in bad.stderr
    report = run_cli("verify", folder, "--source", FIXTURES / "vace", "--json", ok=False).json()
    assert not report["ok"] and [d["key"] for d in report["differences"]] == [key]
    # keys and shapes alone cannot see it
    assert run_cli("verify", folder, "--json").json()["ok"]


@pytest.mark.parametrize("breakage", ["missing", "unexpected", "mis-shaped"])
def test_key_and_shape_differences_fail_without_a_source(converted_root, tmp_path, breakage):
    folder = fresh(converted_root, "t2v", tmp_path / "t2v") / "transformer"
    path = folder / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(path))
    if breakage == "missing":
        key = "blocks.1.attn2.norm_k.weight"
        del tensors[key]
    elif breakage == "unexpected":
        key = "blocks.0.attn1.to_q.lora_A.weight"
        tensors[key] = torch.zeros(4, 128)
    else:
        key = "proj_out.bias"
        tensors[key] = torch.zeros(63)
    save_file(tensors, str(path), metadata={"format": "pt"})
    bad = run_cli("verify", folder, ok=False)
    assert f"transformer: {key}: " in bad.stderr and "verify failed" in bad.stderr
    report = run_cli("verify", folder, "--json", ok=False).json()
    assert key in [d["key"] for d in report["differences"]]


def test_an_original_folder_does_not_verify():
    bad = run_cli("verify", FIXTURES / "t2v", ok=False)
    assert "original Wan layout" in bad.stderr


def test_dtype_conversions_and_transformers_components_verify(tmp_path):
    """bf16 output: equal to the source cast once; umT5 (bf16 source, tied embedding) and CLIP
    (chunked qkv, the head count taken from the output's config) through the same check."""
    run_cli("convert", FIXTURES / "i2v", tmp_path / "i2v", "--dtype", "bf16")
    assert run_cli("verify", tmp_path / "i2v", "--source", FIXTURES / "i2v", "--json").json()["ok"]
    run_cli("convert", T5_PTH, tmp_path / "t5")
    assert run_cli("verify", tmp_path / "t5", "--source", T5_PTH, "--json").json()["ok"]
    run_cli("convert", CLIP_PTH, tmp_path / "clip", "--clip-heads", "2")
    report = run_cli("verify", tmp_path / "clip", "--source", CLIP_PTH, "--json").json()
    assert report["ok"] and report["components"][0]["compared"] > 0
    cfg_path = tmp_path / "clip" / "image_encoder" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["projection_dim"] = 7
    cfg_path.write_text(json.dumps(cfg))
    bad = run_cli("verify", tmp_path / "clip", "--json", ok=False).json()
    assert "visual_projection.weight" in [d["key"] for d in bad["differences"]]


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_quanto_int8_is_checked_within_half_a_step(converted_root, tmp_path):
    diffusers_int8(converted_root, tmp_path / "q8")
    assert run_cli("verify", tmp_path / "q8", "--source", FIXTURES / "t2v", "--json").json()["ok"]
    path = tmp_path / "q8" / "diffusion_pytorch_model.safetensors"
    ref = read_header(path).tensors["blocks.1.ffn.net.0.proj.weight._data"]
    with open(path, "r+b") as f:
        f.seek(ref.offset + 3)
        v = f.read(1)[0]
        f.seek(ref.offset + 3)
        f.write(bytes([(v + 40) % 256]))
    bad = run_cli("verify", tmp_path / "q8", "--source", FIXTURES / "t2v", ok=False)
    assert "blocks.1.ffn.net.0.proj.weight: quantized values are not the source's" in bad.stderr
