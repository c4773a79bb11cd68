"""ComfyUI fp8 files written (issue 21): `--to comfyui --quantize fp8_scaled` and `--dtype fp8_e4m3fn`,
judged by the header of a real Comfy-Org file (tests/data/) and by ComfyUI's own quantizer formula
(comfy/quant_ops.py TensorCoreFP8Layout.quantize, tests/fp8_files.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import DATA, FIXTURES, rel_err, run_cli, TOL
from fp8_files import FP8, comfy_quantize, dequantized, fixture_state_dict
from fp8_files import HEADS, diffusers_out, official_out

HEADER = json.loads((DATA / "comfy_org_wan22_t2v_low_noise_fp8_scaled_header.json").read_text())


@pytest.fixture(scope="module")
def diffusers_t2v_a14b_low(tmp_path_factory):
    """The Wan 2.2 T2V-A14B low-noise expert fixture, converted to a Diffusers transformer folder."""
    root = tmp_path_factory.mktemp("a14b")
    run_cli("convert", FIXTURES / "t2v_a14b" / "low_noise_model", root / "d")
    return root / "d"


@pytest.fixture(scope="module")
def fp8_scaled(diffusers_t2v_a14b_low, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp8") / "c"
    report = run_cli("convert", diffusers_t2v_a14b_low, out, "--to", "comfyui", "--quantize", "fp8_scaled",
                     "--json").json()
    (path,) = (out / "diffusion_models").glob("*.safetensors")
    return path, report


def header(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return {k: (list(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}


def test_keys_and_dtypes_are_those_of_comfy_orgs_file(fp8_scaled):
    path, report = fp8_scaled
    assert path.name.endswith("_fp8_scaled.safetensors") and report["components"][0]["fp8"] == "fp8_scaled"
    ours = {k: v for k, v in header(path).items() if not k.startswith("blocks.") or k.startswith("blocks.0.")}
    theirs = HEADER["tensors"]
    assert sorted(ours) == sorted(theirs)
    for key, (shape, dtype) in theirs.items():
        assert ours[key][1] == dtype, key
        assert len(ours[key][0]) == len(shape), key  # the fixture is tiny: same rank, other sizes
    blocks = {k.split(".")[1] for k in header(path) if k.startswith("blocks.")}
    assert blocks == {"0", "1"}  # every block as block 0


def test_weights_are_comfyuis_quantizer_output_byte_for_byte(fp8_scaled):
    path, _ = fp8_scaled
    written = load_file(str(path))
    source = fixture_state_dict(FIXTURES / "t2v_a14b" / "low_noise_model")  # float32, original keys
    n = 0
    for key, w in source.items():
        if written[key].dtype != FP8:
            assert torch.equal(written[key], w.to(torch.float16)), key  # kept: F16, as Comfy-Org's
            continue
        q, scale = comfy_quantize(w.to(torch.float32))
        layer = key.removesuffix(".weight")
        assert torch.equal(written[key].view(torch.uint8), q.view(torch.uint8)), key
        assert torch.equal(written[f"{layer}.scale_weight"], scale), key
        assert float(written[f"{layer}.scale_input"]) == 1.0 and written[f"{layer}.scale_input"].ndim == 0
        n += 1
    assert n == 26 and written["scaled_fp8"].dtype == FP8 and written["scaled_fp8"].shape == (0,)


def test_round_trip_to_diffusers_is_within_fp8_rounding_and_runs(fp8_scaled, diffusers_t2v_a14b_low, tmp_path):
    path, _ = fp8_scaled
    run_cli("convert", path, tmp_path / "back", "--dtype", "fp32", *HEADS)
    source = fixture_state_dict(FIXTURES / "t2v_a14b" / "low_noise_model")
    deq = dequantized(path)
    for key, w in source.items():
        d = deq[key]
        if load_file(str(path))[key].dtype != FP8:
            assert torch.equal(d, w.half().float()), key
            continue
        scale = float(load_file(str(path))[key.removesuffix(".weight") + ".scale_weight"])
        bound = torch.maximum(w.abs() * 2 ** -4, torch.full_like(w, 2 ** -10 * scale)) * (1 + 1e-6)
        assert bool(((d - w).abs() <= bound).all()), key
    fixture = "t2v_a14b/low_noise_model"
    got = diffusers_out(tmp_path / "back" / "transformer", fixture)
    assert rel_err(got, official_out(deq, fixture)) <= TOL


def test_kept_tensors_follow_dtype(diffusers_t2v_a14b_low, tmp_path):
    run_cli("convert", diffusers_t2v_a14b_low, tmp_path / "c", "--to", "comfyui", "--quantize", "fp8_scaled",
            "--dtype", "fp32")
    (path,) = (tmp_path / "c" / "diffusion_models").glob("*.safetensors")
    written = load_file(str(path))
    source = fixture_state_dict(FIXTURES / "t2v_a14b" / "low_noise_model")
    for key, w in source.items():
        if written[key].dtype != FP8:
            assert torch.equal(written[key], w), key  # byte-identical to the float32 source


def test_plain_fp8_is_the_cast_with_no_scales(diffusers_t2v_a14b_low, tmp_path):
    run_cli("convert", diffusers_t2v_a14b_low, tmp_path / "c", "--to", "comfyui", "--dtype", "fp8_e4m3fn")
    (path,) = (tmp_path / "c" / "diffusion_models").glob("*.safetensors")
    assert path.name.endswith("_fp8_e4m3fn.safetensors")
    written = load_file(str(path))
    assert not any("scale" in k for k in written) and "scaled_fp8" not in written
    source = fixture_state_dict(FIXTURES / "t2v_a14b" / "low_noise_model")
    assert set(written) == set(source)
    for key, w in source.items():
        want = w.to(FP8) if key.endswith(".weight") and w.ndim == 2 else w.half()
        assert written[key].dtype == want.dtype and torch.equal(written[key].float(), want.float()), key


@pytest.mark.parametrize("args,says", [
    (("--quantize", "int8", "--to", "comfyui"), "--quantize int8: --to comfyui takes fp8_scaled"),
    (("--quantize", "fp8_scaled"), "--to diffusers takes int8, float8, int4"),
    (("--dtype", "fp8_e4m3fn", "--to", "original"), "--to original takes fp32, bf16, fp16"),
])
def test_fp8_options_are_refused_where_they_do_not_apply(diffusers_t2v_a14b_low, tmp_path, args, says):
    r = run_cli("convert", diffusers_t2v_a14b_low, tmp_path / "o", *args, ok=False)
    assert says in r.stderr
    assert not (tmp_path / "o").exists()
