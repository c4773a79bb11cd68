"""ComfyUI fp8 files as a source (issue 21): fp8_scaled (both schemes) and plain fp8 single files,
made from the official fixtures by ComfyUI's own formulas (tests/fp8_files.py), converted to
Diffusers. Judged by the official WanModel run on the weights ComfyUI dequantizes, and by
ComfyUI's dequantization formula itself."""

from __future__ import annotations


import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import FIXTURES, TOL, rel_err, run_cli
from fp8_files import FP8, HEADS, dequantized, diffusers_out, make_fp8_file, official_out
from loading import load_converted, run_official_call

@pytest.mark.parametrize("fixture,scheme,prefix", [
    ("t2v", "scale_weight", ""),
    ("t2v", "comfy_quant", ""),
    ("t2v", "comfy_quant_metadata", ""),
    ("t2v", "plain", ""),
    ("t2v", "scale_weight", "model.diffusion_model."),
    ("t2v_a14b/low_noise_model", "scale_weight", ""),
])
def test_fp8_file_to_diffusers_reproduces_the_official_model_on_the_dequantized_weights(tmp_path, fixture, scheme,
                                                                                       prefix):
    src = make_fp8_file(FIXTURES / fixture, tmp_path / "model_fp8.safetensors", scheme, prefix)
    report = run_cli("convert", src, tmp_path / "out", "--dtype", "fp32", *HEADS, "--json").json()
    layout = report["components"][0]["source_layout"]
    assert ("fp8 (no scales)" if scheme == "plain" else "fp8_scaled") in layout, layout
    expected = official_out(dequantized(src, prefix), fixture)
    got = diffusers_out(tmp_path / "out" / "transformer", fixture)
    err = rel_err(got, expected)
    print(f"\n{fixture} {scheme}: Diffusers from fp8 vs official on ComfyUI's dequantized weights: {err:.3g}")
    assert err <= TOL
    # and the fp8 model is not the float one: the comparison above could tell them apart
    assert rel_err(expected, load_file(str(FIXTURES / fixture / "expected.safetensors"))["out"]) > 1e-3


def test_bf16_output_is_comfyuis_bf16_dequantization(tmp_path):
    """--dtype bf16: stored fp8 x scale computed in float32, rounded once to bf16 -- the same values
    ComfyUI computes when its compute dtype is bf16 (qdata.to(bf16) * scale: bf16 holds every fp8
    value exactly, and the product is rounded from float32)."""
    src = make_fp8_file(FIXTURES / "t2v", tmp_path / "m.safetensors")
    run_cli("convert", src, tmp_path / "out", "--dtype", "bf16", *HEADS)
    written = load_file(str(tmp_path / "out" / "transformer" / "diffusion_pytorch_model.safetensors"))
    stored = load_file(str(src))
    checked = 0
    for key, q in stored.items():
        if q.dtype != FP8 or q.ndim != 2:
            continue
        scale = stored[key.removesuffix(".weight") + ".scale_weight"]
        comfy = q.to(torch.bfloat16) * scale  # diffusers' float32-only modules (time_embedder): float32
        comfy32 = q.to(torch.float32) * scale
        hits = [t for t in written.values() if t.shape == comfy.shape
                and (torch.equal(t, comfy) if t.dtype == torch.bfloat16 else torch.equal(t, comfy32))]
        assert hits, key
        checked += 1
    assert checked == 26


def test_verify_source_reads_the_fp8_file_exactly(tmp_path):
    src = make_fp8_file(FIXTURES / "t2v", tmp_path / "m.safetensors")
    run_cli("convert", src, tmp_path / "out", "--dtype", "fp32", *HEADS)
    ok = run_cli("verify", tmp_path / "out", "--source", src)
    assert "identical to the source" in ok.stdout
    sd = load_file(str(src))  # one scale off by one step: the dequantized values differ
    key = "blocks.0.self_attn.q.scale_weight"
    sd[key] = torch.nextafter(sd[key], torch.tensor(1.0))
    save_file(sd, str(tmp_path / "other.safetensors"))
    bad = run_cli("verify", tmp_path / "out", "--source", tmp_path / "other.safetensors", ok=False)
    assert "blocks.0.attn1.to_q.weight" in bad.stdout + bad.stderr


def test_inspect_names_the_scheme(tmp_path):
    src = make_fp8_file(FIXTURES / "t2v", tmp_path / "m.safetensors", "comfy_quant")
    c = run_cli("inspect", src, "--json", ok=None).json()["components"][0]
    assert c["fp8"]["scheme"] == "fp8_scaled (comfy_quant)" and c["fp8"]["scaled"] == 26
    assert c["variant"] == "t2v"


def _edit(src, dst, fn):
    sd = load_file(str(src))
    fn(sd)
    save_file(sd, str(dst))
    return dst


@pytest.mark.parametrize("edit,says", [
    (lambda sd: sd.pop("blocks.0.ffn.0.scale_weight"), "blocks.0.ffn.0.weight is F8_E4M3 in a scaled fp8 file but has no"),
    (lambda sd: sd.update({"blocks.0.ffn.0.scale_weight": torch.ones(4)}), "blocks.0.ffn.0.scale_weight is F32 [4]"),
    (lambda sd: sd.update({"blocks.0.ffn.0.scale_weight": torch.tensor(float("nan"))}), "must be a finite positive"),
    (lambda sd: sd.update({"blocks.0.ffn.0.scale_weight": torch.tensor(0.0)}), "must be a finite positive"),
    (lambda sd: sd.update({"blocks.0.norm3.scale_weight": torch.tensor(1.0)}), "blocks.0.norm3"),
])
def test_bad_fp8_files_are_refused_in_one_line(tmp_path, edit, says):
    src = make_fp8_file(FIXTURES / "t2v", tmp_path / "m.safetensors")
    bad = _edit(src, tmp_path / "bad.safetensors", edit)
    r = run_cli("convert", bad, tmp_path / "out", "--dtype", "bf16", *HEADS, ok=False)
    assert says in r.stderr and str(bad) in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_format_that_is_not_fp8_is_refused(tmp_path):
    src = make_fp8_file(FIXTURES / "t2v", tmp_path / "m.safetensors", "comfy_quant")

    def nvfp4(sd):
        sd["blocks.0.ffn.0.comfy_quant"] = torch.tensor(list(b'{"format": "nvfp4"}'), dtype=torch.uint8)

    bad = _edit(src, tmp_path / "bad.safetensors", nvfp4)
    r = run_cli("convert", bad, tmp_path / "out", "--dtype", "bf16", *HEADS, ok=False)
    assert "'nvfp4' is not one this tool reads exactly" in r.stderr


def test_keep_is_refused_for_an_fp8_source(tmp_path):
    src = make_fp8_file(FIXTURES / "t2v", tmp_path / "m.safetensors")
    r = run_cli("convert", src, tmp_path / "out", *HEADS, ok=False)
    assert "--dtype bf16, fp16 or fp32" in r.stderr


def test_float8_keeps_the_fp8_values_as_stored_and_runs_in_bf16(tmp_path):
    """--quantize float8 (torchao) from fp8_scaled: `_weight_qdata` is the stored fp8 bytes and each
    row's scale the tensor's; diffusers loads it in bf16 and torchao's Float8Tensor dequantizes to
    exactly ComfyUI's values (no second rounding); verify --source agrees; the model runs."""
    import diffusers

    src = make_fp8_file(FIXTURES / "t2v", tmp_path / "m.safetensors")
    run_cli("convert", src, tmp_path / "q", "--quantize", "float8", *HEADS)
    stored = load_file(str(src))
    model = diffusers.WanTransformer3DModel.from_pretrained(str(tmp_path / "q" / "transformer"),
                                                            torch_dtype=torch.bfloat16)
    pairs = {"blocks.0.attn1.to_q": "blocks.0.self_attn.q", "blocks.1.ffn.net.2": "blocks.1.ffn.2",
             "blocks.1.attn2.to_out.0": "blocks.1.cross_attn.o"}
    for ours, theirs in pairs.items():
        w = model.get_submodule(ours).weight
        q, scale = stored[f"{theirs}.weight"], stored[f"{theirs}.scale_weight"]
        assert torch.equal(w.qdata.view(torch.uint8), q.view(torch.uint8)), ours
        assert torch.equal(w.dequantize(), (q.to(torch.float32) * scale).to(torch.bfloat16)), ours
    assert "identical to the source" in run_cli("verify", tmp_path / "q", "--source", src).stdout
    out, expected = run_official_call(model, "t2v", torch.bfloat16)
    assert torch.isfinite(out).all() and rel_err(out.float(), expected) < 0.2


@pytest.mark.parametrize("qtype", ["Q8_0", "F16", "BF16"])
def test_gguf_from_fp8_quantizes_the_dequantized_values(tmp_path, qtype):
    """gguf-py's own quantizer on ComfyUI's dequantized float32 values is the reference."""
    import gguf
    import numpy as np

    src = make_fp8_file(FIXTURES / "t2v", tmp_path / "m.safetensors")
    run_cli("convert", src, tmp_path / "m.gguf", "--to", "gguf", "--quantize", qtype, *HEADS)
    deq = dequantized(src)
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    checked = 0
    for t in reader.tensors:
        if t.name.endswith(".weight") and len(deq[t.name].shape) == 2:
            want = gguf.quants.quantize(deq[t.name].numpy(), t.tensor_type)  # the type the policy chose
            assert np.array_equal(np.asarray(t.data).view(np.uint8).reshape(-1), want.view(np.uint8).reshape(-1)), t.name
            checked += t.tensor_type == gguf.GGMLQuantizationType[qtype]
    assert checked >= 20


@pytest.mark.parametrize("fixture", ["i2v", "flf2v", "vace", "ti2v_5b", "i2v_a14b/high_noise_model"])
def test_every_variant_reads_as_its_dequantized_float32_file(tmp_path, fixture):
    """The other variants (img_emb, emb_pos, vace_blocks, the 5B's 48 channels): the fp8 file converts
    to exactly what the float32 file of ComfyUI's dequantized values converts to (that path is proven
    against the official outputs by test_transformer.py / test_wan22.py)."""
    src = make_fp8_file(FIXTURES / fixture, tmp_path / "m.safetensors")
    save_file(dequantized(src), str(tmp_path / "f32.safetensors"))
    facts = ["--set", "transformer.vace_layers=[0, 3]"] if fixture == "vace" else []  # no config.json: give it
    for name in ("m", "f32"):
        run_cli("convert", tmp_path / f"{name}.safetensors", tmp_path / name, "--dtype", "fp32", *HEADS, *facts)
    a = load_file(str(next((tmp_path / "m" / "transformer").glob("*.safetensors"))))
    b = load_file(str(next((tmp_path / "f32" / "transformer").glob("*.safetensors"))))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sum(1 for k in load_file(str(src)) if k.endswith(".scale_weight")) >= 20


def test_bf16_output_from_fp8_runs_in_bf16(tmp_path):
    src = make_fp8_file(FIXTURES / "t2v", tmp_path / "m.safetensors")
    run_cli("convert", src, tmp_path / "out", "--dtype", "bf16", *HEADS)
    model = load_converted(tmp_path / "out" / "transformer", torch.bfloat16)
    got = run_official_call(model, "t2v", torch.bfloat16)[0][0].float()
    assert rel_err(got, official_out(dequantized(src), "t2v")) < 0.05
