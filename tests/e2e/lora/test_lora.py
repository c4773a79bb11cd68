"""LoRA files (issue 20): every format read, converted, and judged by references we did not write --
diffusers' own LoRA loader (PEFT) on the converted Diffusers model against the official WanModel with
the LoRA merged by the formula (tests/lora_files.py), LoRAs made by PEFT + diffusers'
`save_lora_weights`, and ComfyUI's LoRA key rule (comfy/lora.py) kept as data."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import diffusers
from conftest import FIXTURES, TOL, rel_err, run_cli
from fp8_files import fixture_state_dict
from lora_files import ALPHA, RANK, apply, make_modules, write_kohya, write_original
from fp8_files import official_out
from loading import load_converted, run_official_call

MODULES = ["blocks.0.self_attn.q", "blocks.0.self_attn.o", "blocks.1.cross_attn.k", "blocks.1.ffn.2",
           "blocks.0.ffn.0", "text_embedding.0"]  # partial: some modules of some blocks


@pytest.fixture(scope="module")
def t2v(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    run_cli("convert", FIXTURES / "t2v", root / "d")
    return root / "d" / "transformer", fixture_state_dict(FIXTURES / "t2v")


def diffusers_with(folder, lora_file):
    """diffusers' own loader: the Diffusers transformer with the LoRA file loaded as an adapter."""
    model = load_converted(folder)
    model.load_lora_adapter(str(lora_file), prefix="transformer", adapter_name="test")
    return run_official_call(model, "t2v")[0][0]


SOURCES = {  # format -> how tests/lora_files.py writes it
    "original lora_down/up (lightx2v)": lambda p, m: write_original(p, m),
    "original lora_A/B (Kijai)": lambda p, m: write_original(
        p, m, names={"down": "lora_A.weight", "up": "lora_B.weight", "alpha": "alpha", "diff_b": "diff_b"}),
    "DiffSynth (no prefix, .default.)": lambda p, m: write_original(
        p, {k: {r: t for r, t in v.items() if r != "diff_b"} for k, v in m.items()}, prefix="",
        names={"down": "lora_A.default.weight", "up": "lora_B.default.weight", "alpha": "alpha"}),
    "kohya / musubi-tuner": lambda p, m: write_kohya(p, m),
    "VideoX-Fun (lora_unet__)": lambda p, m: write_kohya(p, m, prefix="lora_unet__"),
}


@pytest.mark.parametrize("fmt", list(SOURCES))
def test_every_format_to_diffusers_loads_in_diffusers_and_equals_the_official_merge(t2v, tmp_path, fmt):
    folder, sd = t2v
    modules = make_modules(sd, MODULES, diff_b="original" in fmt)
    src = tmp_path / "lora.safetensors"
    SOURCES[fmt](src, modules)
    if "DiffSynth" in fmt or "kohya" in fmt or "Fun" in fmt:
        modules = {k: {r: t for r, t in v.items() if r != "diff_b"} for k, v in modules.items()}
    run_cli("convert", src, tmp_path / "d.safetensors", "--to", "diffusers")
    got = diffusers_with(folder, tmp_path / "d.safetensors")
    expected = official_out(apply(sd, modules), "t2v")
    err = rel_err(got, expected)
    print(f"\n{fmt} -> diffusers, loaded by diffusers: rel err {err:.3g} vs the official model merged by the formula")
    assert err <= TOL
    assert rel_err(official_out(sd, "t2v"), expected) > 1e-2  # the LoRA changes the output: the test can fail


def _parse_original(path) -> tuple[dict, dict]:
    """An original-format file (diffusion_model.<module>.<part>) read back by its grammar."""
    sd, modules, extra = load_file(str(path)), {}, {}
    roles = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha", "diff_b": "diff_b"}
    for key, t in sd.items():
        rest = key.removeprefix("diffusion_model.")
        for part, role in roles.items():
            if rest.endswith("." + part):
                modules.setdefault(rest[:-len(part) - 1], {})[role] = t
                break
        else:
            extra[rest] = t
    return modules, extra


def test_a_peft_lora_saved_by_diffusers_converts_to_original_and_merges_as_diffusers_runs_it(t2v, tmp_path):
    """The LoRA made by PEFT on the Diffusers model and saved by diffusers' save_lora_weights: what
    diffusers computes with it equals the official model with the original-format file merged."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    folder, sd = t2v
    torch.manual_seed(3)
    model = load_converted(folder)
    model.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights=False,
                                 target_modules=["attn1.to_q", "attn2.to_v", "to_out.0", "ffn.net.0.proj"]))
    diffusers.WanPipeline.save_lora_weights(tmp_path / "peft", transformer_lora_layers=get_peft_model_state_dict(model))
    (peft_file,) = (tmp_path / "peft").glob("*.safetensors")
    with safe_open(str(peft_file), "pt") as f:
        assert all(k.startswith("transformer.") for k in f.keys())
    reference = run_official_call(model, "t2v")[0][0]  # PEFT computing the adapter in diffusers
    report = run_cli("convert", peft_file, tmp_path / "o.safetensors", "--to", "original", "--json").json()
    assert report["lora"]["format"] == "diffusers" and report["left_out"] == []
    modules, extra = _parse_original(tmp_path / "o.safetensors")
    assert not extra and len(modules) == 2 * 5  # self q, cross v, both o, ffn.0; in each of 2 blocks
    err = rel_err(official_out(apply(sd, modules), "t2v"), reference)
    print(f"\nPEFT LoRA -> original, merged into the official model: rel err {err:.3g} vs diffusers+PEFT")
    assert err <= TOL


COMFY_SUFFIXES = ("lora_up.weight", "lora_down.weight", "alpha", "diff", "diff_b")  # comfy/lora.py load_lora


def comfy_lora_keys(model_keys) -> set[str]:
    """ComfyUI's key rule, as data: comfy/lora.py model_lora_keys_unet maps, for every model key
    `diffusion_model.<k>.weight`, the name `lora_unet_<k with . as _>`; load_lora reads COMFY_SUFFIXES."""
    names = {"lora_unet_" + k[:-len(".weight")].replace(".", "_") for k in model_keys if k.endswith(".weight")}
    return {f"{n}.{s}" for n in names for s in COMFY_SUFFIXES}


def test_comfyui_keys_are_keys_comfyui_maps_and_read_back_exactly(t2v, tmp_path):
    folder, sd = t2v
    modules = make_modules(sd, MODULES)
    write_original(tmp_path / "o.safetensors", modules, {"blocks.1.norm3.diff": torch.randn(128) * 0.01})
    run_cli("convert", tmp_path / "o.safetensors", tmp_path / "c.safetensors", "--to", "comfyui")
    keys = set(load_file(str(tmp_path / "c.safetensors")))
    assert keys <= comfy_lora_keys(sd) and "lora_unet_blocks_1_norm3.diff" in keys
    # and the file reads back (as kohya's grammar) into diffusers with the same effect, the norm diff left out
    run_cli("convert", tmp_path / "c.safetensors", tmp_path / "d.safetensors", "--to", "diffusers", "--drop-unsupported")
    got = diffusers_with(folder, tmp_path / "d.safetensors")
    assert rel_err(got, official_out(apply(sd, modules), "t2v")) <= TOL


def test_diffs_are_carried_where_the_format_holds_them_and_refused_elsewhere(t2v, tmp_path):
    _, sd = t2v
    modules = make_modules(sd, ["blocks.0.self_attn.q"])
    extra = {"blocks.0.diff_m": torch.randn(1, 6, 128) * 0.01, "blocks.0.norm3.diff": torch.randn(128) * 0.01,
             "head.head.diff_b": torch.randn(64) * 0.01}
    write_original(tmp_path / "o.safetensors", modules, extra)
    back = run_cli("convert", tmp_path / "o.safetensors", tmp_path / "o2.safetensors", "--to", "original", "--json").json()
    assert back["left_out"] == []
    written = load_file(str(tmp_path / "o2.safetensors"))
    for k, v in extra.items():
        assert torch.equal(written["diffusion_model." + k], v), k
    r = run_cli("convert", tmp_path / "o.safetensors", tmp_path / "d.safetensors", "--to", "diffusers", ok=False)
    assert "a diffusers LoRA file cannot hold it" in r.stderr and not (tmp_path / "d.safetensors").exists()
    r = run_cli("convert", tmp_path / "o.safetensors", tmp_path / "c.safetensors", "--to", "comfyui", ok=False)
    assert "diffusion_model.blocks.0.diff_m" in r.stderr  # ComfyUI maps .weight keys only
    dropped = run_cli("convert", tmp_path / "o.safetensors", tmp_path / "d.safetensors", "--to", "diffusers",
                      "--drop-unsupported", "--json").json()
    assert sorted(dropped["left_out"]) == sorted(["diffusion_model.blocks.0.diff_m", "diffusion_model.blocks.0.norm3.diff",
                                                  "diffusion_model.head.head.diff_b"])


def test_kohya_round_trip_is_byte_exact(t2v, tmp_path):
    _, sd = t2v
    modules = make_modules(sd, MODULES, diff_b=False)
    write_kohya(tmp_path / "k.safetensors", modules)
    run_cli("convert", tmp_path / "k.safetensors", tmp_path / "o.safetensors", "--to", "original")
    run_cli("convert", tmp_path / "o.safetensors", tmp_path / "k2.safetensors", "--to", "kohya")
    a, b = load_file(str(tmp_path / "k.safetensors")), load_file(str(tmp_path / "k2.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_i2v_image_attention_maps_to_the_added_kv_projections(tmp_path):
    sd = fixture_state_dict(FIXTURES / "i2v")
    write_original(tmp_path / "o.safetensors", make_modules(sd, ["blocks.0.cross_attn.k_img", "img_emb.proj.1"]))
    info = run_cli("inspect", tmp_path / "o.safetensors", "--json").json()
    assert info["kind"] == "LoRA file" and "I2V" in info["fits"] and info["ranks"] == [RANK] and info["alphas"] == [ALPHA]
    run_cli("convert", tmp_path / "o.safetensors", tmp_path / "d.safetensors", "--to", "diffusers")
    keys = set(load_file(str(tmp_path / "d.safetensors")))
    assert "transformer.blocks.0.attn2.add_k_proj.lora_A.weight" in keys
    assert "transformer.condition_embedder.image_embedder.ff.net.0.proj.lora_B.bias" in keys


@pytest.mark.parametrize("key,says", [
    ("diffusion_model.blocks.0.self_attn.q.hada_w1_a", "a LoHa adapter, not a LoRA"),
    ("diffusion_model.blocks.0.self_attn.q.lokr_w1", "a LoKr adapter"),
    ("diffusion_model.blocks.0.self_attn.q.dora_scale", "a DoRA adapter"),
    ("diffusion_model.blocks.0.self_atn.q.lora_down.weight", "no module blocks.0.self_atn.q in the Wan transformer"),
])
def test_other_adapters_and_unknown_modules_are_refused(t2v, tmp_path, key, says):
    _, sd = t2v
    write_original(tmp_path / "o.safetensors", make_modules(sd, ["blocks.0.self_attn.k"]))
    data = load_file(str(tmp_path / "o.safetensors"))
    data[key] = torch.zeros(4, 128)
    save_file(data, str(tmp_path / "bad.safetensors"))
    r = run_cli("convert", tmp_path / "bad.safetensors", tmp_path / "x.safetensors", "--to", "diffusers", ok=False)
    assert says in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_model_options_are_refused_for_a_lora(t2v, tmp_path):
    _, sd = t2v
    write_original(tmp_path / "o.safetensors", make_modules(sd, ["blocks.0.self_attn.k"]))
    r = run_cli("convert", tmp_path / "o.safetensors", tmp_path / "x.safetensors", "--dtype", "bf16", ok=False)
    assert "--dtype does not apply to a LoRA file" in r.stderr
    r = run_cli("convert", FIXTURES / "t2v", tmp_path / "y", "--to", "kohya", ok=False)
    assert "kohya is a LoRA format" in r.stderr


def test_python_api(t2v, tmp_path):
    import wan2diffusers

    _, sd = t2v
    write_kohya(tmp_path / "k.safetensors", make_modules(sd, ["blocks.1.ffn.0"], diff_b=False))
    report = wan2diffusers.convert_lora(tmp_path / "k.safetensors", tmp_path / "d.safetensors", to="diffusers")
    assert report.lora["format"] == "kohya" and report.tensors == 2
    assert re.fullmatch(r"transformer\.blocks\.1\.ffn\.net\.0\.proj\.lora_[AB]\.weight",
                        sorted(load_file(str(tmp_path / "d.safetensors")))[0])


def test_merge_equals_the_official_model_with_the_lora_applied_and_diffusers_fuse_lora(t2v, tmp_path):
    """merge BASE OUT --lora FILE:STRENGTH: the merged Diffusers model = the official WanModel with the LoRA
    (matrices, diff_b, a norm diff, the modulation diff_m) applied by the formula at that strength, and
    its weights = diffusers' own fuse_lora of the converted LoRA."""
    import json

    folder, sd = t2v
    modules = make_modules(sd, MODULES)
    extra = {"blocks.0.diff_m": torch.randn(1, 6, 128) * 0.05, "blocks.1.norm3.diff": torch.randn(128) * 0.05}
    write_original(tmp_path / "o.safetensors", modules, extra)
    strength = 0.7
    report = run_cli("merge", FIXTURES / "t2v", tmp_path / "m", "--lora", f"{tmp_path / 'o.safetensors'}:{strength}",
                     "--json").json()
    assert report["loras"][0]["strength"] == strength and len(report["loras"][0]["tensors_changed"]) == 14
    record = json.loads((tmp_path / "m" / "wan2diffusers.json").read_text())
    assert record["merged_loras"][0]["lora"].endswith("o.safetensors")
    scaled = {m: {**p, "up": p["up"] * strength, "diff_b": p["diff_b"] * strength} for m, p in modules.items()}
    expected = official_out(apply(sd, scaled, {"blocks.0.modulation": extra["blocks.0.diff_m"] * strength,
                                               "blocks.1.norm3.weight": extra["blocks.1.norm3.diff"] * strength}), "t2v")
    got = run_official_call(load_converted(tmp_path / "m" / "transformer"), "t2v")[0][0]
    err = rel_err(got, expected)
    print(f"\nmerge (x{strength}, with diff_b, diff, diff_m): rel err {err:.3g} vs the official model with the LoRA applied")
    assert err <= TOL
    # diffusers' fuse_lora of the same LoRA (its diffusers file: the matrices and diff_b) gives the same weights
    run_cli("convert", tmp_path / "o.safetensors", tmp_path / "d.safetensors", "--to", "diffusers", "--drop-unsupported")
    fused = load_converted(folder)
    fused.load_lora_adapter(str(tmp_path / "d.safetensors"), prefix="transformer", adapter_name="x")
    fused.fuse_lora(lora_scale=strength)
    merged = load_converted(tmp_path / "m" / "transformer").state_dict()
    changed = 0
    for name, value in fused.state_dict().items():
        key = name.replace(".base_layer", "")
        if "lora_" in name or key not in merged or key in ("blocks.0.scale_shift_table", "blocks.1.norm2.weight"):
            continue
        assert torch.allclose(merged[key], value, rtol=1e-5, atol=1e-6), key
        changed += "base_layer" in name
    assert changed == 2 * len(MODULES)  # every LoRA'd weight and bias compared


def test_merge_into_one_a14b_expert_leaves_the_other_untouched(tmp_path):
    from repos import make_original_repo

    src = make_original_repo(tmp_path / "src", "t2v_a14b", with_tokenizer=False)
    low = fixture_state_dict(FIXTURES / "t2v_a14b" / "low_noise_model")
    write_original(tmp_path / "o.safetensors", make_modules(low, MODULES))
    r = run_cli("merge", src, tmp_path / "m", "--only", "transformer", "--lora", tmp_path / "o.safetensors", ok=False)
    assert "say which one the LoRA is for" in r.stderr
    run_cli("merge", src, tmp_path / "m", "--only", "transformer", "--lora", f"low={tmp_path / 'o.safetensors'}")
    run_cli("convert", src, tmp_path / "plain", "--only", "transformer")
    name = "diffusion_pytorch_model.safetensors"
    assert (tmp_path / "m" / "transformer" / name).read_bytes() == (tmp_path / "plain" / "transformer" / name).read_bytes()
    assert (tmp_path / "m" / "transformer_2" / name).read_bytes() != (tmp_path / "plain" / "transformer_2" / name).read_bytes()


def test_a_lora_for_another_model_is_refused_not_applied_in_part(t2v, tmp_path):
    i2v = fixture_state_dict(FIXTURES / "i2v")
    write_original(tmp_path / "o.safetensors", make_modules(i2v, ["blocks.0.self_attn.q", "blocks.0.cross_attn.k_img"]))
    r = run_cli("merge", FIXTURES / "t2v", tmp_path / "m", "--lora", tmp_path / "o.safetensors", ok=False)
    assert "blocks.0.cross_attn.k_img" in r.stderr and "another variant" in r.stderr
    assert not (tmp_path / "m").exists()


def test_merge_into_every_output(t2v, tmp_path):
    """The LoRA is folded into the source as it is read, so every output merges: the original layout
    from a Diffusers base (loaded by the official WanModel strictly), GGUF Q8_0 (dequantized by gguf-py)
    and torchao float8 (dequantized by torchao in bf16), each against the formula."""
    import gguf
    import numpy as np

    import official

    folder, sd = t2v
    modules = make_modules(sd, MODULES)
    write_original(tmp_path / "o.safetensors", modules)
    merged = apply(sd, modules)
    # the original layout, from the Diffusers folder
    run_cli("merge", folder, tmp_path / "orig", "--to", "original", "--lora", tmp_path / "o.safetensors")
    back = load_file(str(next((tmp_path / "orig").glob("diffusion_pytorch_model*.safetensors"))))
    err = rel_err(official_out(back, "t2v"), official_out(merged, "t2v"))
    assert err <= TOL and official is not None
    # GGUF Q8_0, from the original folder
    run_cli("merge", FIXTURES / "t2v", tmp_path / "m.gguf", "--to", "gguf", "--quantize", "Q8_0",
            "--lora", tmp_path / "o.safetensors")
    changed = 0
    for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors:
        if t.name.endswith(".weight") and merged[t.name].ndim == 2 and t.name.removesuffix(".weight") in modules:
            deq = torch.from_numpy(np.asarray(gguf.quants.dequantize(t.data, t.tensor_type)).copy()).reshape(merged[t.name].shape)
            ref = merged[t.name]
            assert float((deq - ref).abs().max()) <= float(ref.abs().max()) / 127 + 1e-6, t.name
            assert float((deq - sd[t.name]).abs().max()) > float(ref.abs().max()) / 64, t.name  # the merge is in it
            changed += 1
    assert changed == len(MODULES)
    # torchao float8, loaded by diffusers in bf16
    run_cli("merge", FIXTURES / "t2v", tmp_path / "q", "--quantize", "float8", "--lora", tmp_path / "o.safetensors")
    model = diffusers.WanTransformer3DModel.from_pretrained(str(tmp_path / "q" / "transformer"), torch_dtype=torch.bfloat16)
    w = model.blocks[0].attn1.to_q.weight.dequantize().float()
    ref = merged["blocks.0.self_attn.q.weight"]
    assert float((w - ref).abs().max()) <= 0.07 * float(ref.abs().max())
    assert float((w - sd["blocks.0.self_attn.q.weight"]).abs().max()) > 0.1 * float(ref.abs().max())


def test_merge_into_a_diffusers_base(t2v, tmp_path):
    """A Diffusers folder as BASE: its transformer rewritten with the LoRA (float, or quantized with
    --quantize), the rest of the pipeline linked; the record says what was merged."""
    import json

    folder, sd = t2v
    modules = make_modules(sd, MODULES)
    write_original(tmp_path / "o.safetensors", modules)
    base = folder.parent
    r = run_cli("merge", base, tmp_path / "m", "--lora", tmp_path / "o.safetensors", "--dtype", "bf16", ok=False)
    assert "--dtype does not apply to merging into the Diffusers folder" in r.stderr
    run_cli("merge", base, tmp_path / "m", "--lora", tmp_path / "o.safetensors")
    got = run_official_call(load_converted(tmp_path / "m" / "transformer"), "t2v")[0][0]
    assert rel_err(got, official_out(apply(sd, modules), "t2v")) <= TOL
    record = json.loads((tmp_path / "m" / "wan2diffusers.json").read_text())
    assert record["derived_from"]["by"] == "wan2diffusers merge" and len(record["merged_loras"]) == 1


@pytest.mark.parametrize("expert", ["high_noise_model", "low_noise_model"])
def test_a14b_expert_loras_load_in_diffusers_and_equal_the_official_merge(tmp_path, expert):
    """Each Wan 2.2 A14B expert with a LoRA of its own (kohya format, as musubi-tuner trains one per
    expert): converted to diffusers, loaded by diffusers into that expert = the official expert merged."""
    fixture = f"t2v_a14b/{expert}"
    sd = fixture_state_dict(FIXTURES / fixture)
    modules = make_modules(sd, MODULES, seed=11, diff_b=False)
    write_kohya(tmp_path / "k.safetensors", modules)
    run_cli("convert", FIXTURES / fixture, tmp_path / "d")
    run_cli("convert", tmp_path / "k.safetensors", tmp_path / "l.safetensors", "--to", "diffusers")
    model = load_converted(tmp_path / "d" / "transformer")
    model.load_lora_adapter(str(tmp_path / "l.safetensors"), prefix="transformer", adapter_name="x")
    got = run_official_call(model, fixture)[0][0]
    assert rel_err(got, official_out(apply(sd, modules), fixture)) <= TOL


def test_lora_and_merge_outputs_run_in_bf16(t2v, tmp_path):
    """As users run Wan: the converted LoRA loaded by diffusers into the model in bfloat16, and a
    bf16 merge loaded in bfloat16; both run, and agree with the float32 result to bf16 precision."""
    folder, sd = t2v
    modules = make_modules(sd, MODULES)
    write_original(tmp_path / "o.safetensors", modules)
    expected = official_out(apply(sd, modules), "t2v")
    run_cli("convert", tmp_path / "o.safetensors", tmp_path / "d.safetensors", "--to", "diffusers")
    model = load_converted(folder, torch.bfloat16)
    model.load_lora_adapter(str(tmp_path / "d.safetensors"), prefix="transformer", adapter_name="x")
    got = run_official_call(model, "t2v", torch.bfloat16)[0][0].float()
    assert rel_err(got, expected) < 0.05
    run_cli("merge", FIXTURES / "t2v", tmp_path / "m", "--dtype", "bf16", "--lora", tmp_path / "o.safetensors")
    merged = run_official_call(load_converted(tmp_path / "m" / "transformer", torch.bfloat16), "t2v", torch.bfloat16)[0][0]
    assert rel_err(merged.float(), expected) < 0.05


def test_merge_drop_unsupported_applies_what_fits_and_lists_the_rest(t2v, tmp_path):
    """A Wan 2.1 I2V LoRA (image attention) on a T2V model, the case ComfyUI logs as 'lora key not
    loaded': refused by default (above); with --drop-unsupported the modules the model has are merged,
    the others listed -- and the result is the official model with just those applied."""
    folder, sd = t2v
    i2v = fixture_state_dict(FIXTURES / "i2v")
    both = make_modules(i2v, ["blocks.0.self_attn.q", "blocks.1.ffn.2", "blocks.0.cross_attn.k_img"])
    write_original(tmp_path / "o.safetensors", both)
    report = run_cli("merge", FIXTURES / "t2v", tmp_path / "m", "--lora", tmp_path / "o.safetensors",
                     "--drop-unsupported", "--json").json()
    assert report["loras"][0]["left_out"] == ["blocks.0.cross_attn.k_img"]
    kept = {k: v for k, v in both.items() if k != "blocks.0.cross_attn.k_img"}
    got = run_official_call(load_converted(tmp_path / "m" / "transformer"), "t2v")[0][0]
    assert rel_err(got, official_out(apply(sd, kept), "t2v")) <= TOL
    r = run_cli("convert", FIXTURES / "t2v", tmp_path / "x", "--drop-unsupported", ok=False)
    assert "applies to LoRA files and to merge" in r.stderr
