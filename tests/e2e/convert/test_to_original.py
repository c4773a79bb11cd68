"""The way back (issue 12): `convert SRC OUT --to original` runs the tables backwards. Judged by
the official fixtures themselves: original -> Diffusers -> original gives the fixture's own key set,
byte-identical tensors (dtype keep) and config.json values; Diffusers -> original -> Diffusers gives
byte-identical Diffusers tensors; a Diffusers folder diffusers wrote itself converts back exactly."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES, run_cli
from repos import make_original_repo

TRANSFORMERS = ["t2v", "i2v", "flf2v", "vace", "ti2v_5b"]


def safetensors_tensors(folder):
    out = {}
    for f in sorted(folder.glob("diffusion_pytorch_model*.safetensors")) + sorted(folder.glob("model*.safetensors")):
        out.update(load_file(str(f)))
    return out


def assert_same_tensors(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and tuple(got[k].shape) == tuple(v.shape), k
        assert got[k].contiguous().view(torch.uint8).equal(v.contiguous().view(torch.uint8)), k  # byte for byte


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_a_transformer_goes_back_to_the_fixture_itself(tmp_path, name):
    run_cli("convert", FIXTURES / name, tmp_path / "d", "--only", "transformer")
    report = run_cli("convert", tmp_path / "d", tmp_path / "o", "--to", "original", "--json").json()
    back = tmp_path / "o"
    assert_same_tensors(safetensors_tensors(back), safetensors_tensors(FIXTURES / name))
    # config.json: the fixture's values (text_len and _diffusers_version from the conversion record)
    assert json.loads((back / "config.json").read_text()) == json.loads((FIXTURES / name / "config.json").read_text())
    (c,) = report["components"]
    assert c["file"] == "diffusion_pytorch_model.safetensors" and c["tensors"] == len(safetensors_tensors(back))
    # the component folder alone: the record beside it still gives the source's config values
    run_cli("convert", tmp_path / "d" / "transformer", tmp_path / "alone", "--to", "original")
    assert (tmp_path / "alone" / "config.json").read_text() == (back / "config.json").read_text()
    # and forward again: the very same Diffusers tensors
    run_cli("convert", back, tmp_path / "d2", "--only", "transformer")
    assert_same_tensors(safetensors_tensors(tmp_path / "d2" / "transformer"),
                        safetensors_tensors(tmp_path / "d" / "transformer"))


def test_without_a_record_the_config_says_where_its_defaults_came_from(tmp_path):
    run_cli("convert", FIXTURES / "t2v", tmp_path / "d", "--only", "transformer")
    (tmp_path / "d" / "wan2diffusers.json").unlink()
    report = run_cli("convert", tmp_path / "d" / "transformer", tmp_path / "o", "--to", "original", "--json").json()
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    fixture = json.loads((FIXTURES / "t2v" / "config.json").read_text())
    assert {k: v for k, v in cfg.items() if k != "text_len"} == {k: v for k, v in fixture.items() if k != "text_len"}
    assert cfg["text_len"] == 512  # every Wan-AI repo's; the tiny fixture's 16 is not in the Diffusers config
    assert report["components"][0]["config_from"]["text_len"].startswith("mappings/transformer.yaml")


@pytest.mark.parametrize("name", ["t2v_a14b", "i2v_a14b"])
def test_a_two_expert_pipeline_goes_back_to_expert_folders(tmp_path, name):
    src = make_original_repo(tmp_path / "src", name, with_tokenizer=True)
    run_cli("convert", src, tmp_path / "d")
    (tmp_path / "d" / "wan2diffusers.json").unlink()  # the pipeline row gives model_type and the version
    run_cli("convert", tmp_path / "d", tmp_path / "o", "--to", "original", "--only", "transformer")
    for expert in ("high_noise_model", "low_noise_model"):
        assert_same_tensors(safetensors_tensors(tmp_path / "o" / expert), safetensors_tensors(src / expert))
        assert json.loads((tmp_path / "o" / expert / "config.json").read_text()) == \
            json.loads((src / expert / "config.json").read_text())


@pytest.mark.parametrize("name,file", [("vae", "Wan2.1_VAE.pth"), ("vae22", "Wan2.2_VAE.pth"),
                                       ("t5", "models_t5_umt5-xxl-enc-bf16.pth")])
def test_a_pth_component_goes_back_as_torch_save_writes_it(tmp_path, name, file):
    run_cli("convert", FIXTURES / name / file, tmp_path / "d")
    run_cli("convert", tmp_path / "d", tmp_path / "o", "--to", "original")
    got = torch.load(tmp_path / "o" / file, weights_only=True, mmap=True)
    want = torch.load(FIXTURES / name / file, weights_only=True)
    assert_same_tensors(got, want)


def test_a_pipeline_goes_back_to_the_original_repo_layout(tmp_path):
    src = make_original_repo(tmp_path / "src", "t2v", with_tokenizer=True)
    run_cli("convert", src, tmp_path / "d")
    report = run_cli("convert", tmp_path / "d", tmp_path / "o", "--to", "original", "--json").json()
    o = tmp_path / "o"
    assert sorted(c["file"] for c in report["components"]) == sorted(
        ["diffusion_pytorch_model.safetensors", "Wan2.1_VAE.pth", "models_t5_umt5-xxl-enc-bf16.pth"])
    for f in ("Wan2.1_VAE.pth", "models_t5_umt5-xxl-enc-bf16.pth"):
        assert_same_tensors(torch.load(o / f, weights_only=True), torch.load(src / f, weights_only=True))
    tok = sorted(p.name for p in (src / "google" / "umt5-xxl").iterdir())
    assert sorted(p.name for p in (o / "google" / "umt5-xxl").iterdir()) == tok
    # the original repo layout converts forward again
    run_cli("convert", o, tmp_path / "d2")
    for comp in ("transformer", "vae", "text_encoder"):
        assert_same_tensors(safetensors_tensors(tmp_path / "d2" / comp), safetensors_tensors(tmp_path / "d" / comp))


def test_folders_diffusers_and_transformers_wrote_themselves_go_back_exactly(tmp_path):
    """Not made by this tool: diffusers' own save_pretrained (its order, sharding and, for umT5,
    transformers' tied embedding) of the converted models."""
    import diffusers
    import transformers

    src = make_original_repo(tmp_path / "src", "i2v", with_tokenizer=False)
    run_cli("convert", src, tmp_path / "d", "--only", "transformer,vae,text_encoder")
    theirs = tmp_path / "theirs"
    diffusers.WanTransformer3DModel.from_pretrained(str(tmp_path / "d" / "transformer")).save_pretrained(
        str(theirs / "transformer"), max_shard_size="300KB")
    diffusers.AutoencoderKLWan.from_pretrained(str(tmp_path / "d" / "vae")).save_pretrained(str(theirs / "vae"))
    transformers.UMT5EncoderModel.from_pretrained(str(tmp_path / "d" / "text_encoder")).save_pretrained(
        str(theirs / "text_encoder"))
    run_cli("convert", theirs, tmp_path / "o", "--to", "original")
    assert_same_tensors(safetensors_tensors(tmp_path / "o"), safetensors_tensors(src))
    for f in ("Wan2.1_VAE.pth", "models_t5_umt5-xxl-enc-bf16.pth"):
        assert_same_tensors(torch.load(tmp_path / "o" / f, weights_only=True), torch.load(src / f, weights_only=True))


def test_what_cannot_go_back_is_refused_in_one_line(tmp_path):
    run_cli("convert", FIXTURES / "t2v", tmp_path / "q", "--quantize", "int8")
    r = run_cli("convert", tmp_path / "q", tmp_path / "o", "--to", "original", ok=False)
    assert "quantized" in r.stderr and not (tmp_path / "o").exists()
    r = run_cli("convert", FIXTURES / "t2v", tmp_path / "o", "--to", "original", ok=False)
    assert "not Diffusers" in r.stderr and not (tmp_path / "o").exists()
    run_cli("convert", FIXTURES / "t2v", tmp_path / "d", "--only", "transformer")
    shard = tmp_path / "d" / "transformer" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(shard))
    del tensors["blocks.0.attn1.to_q.weight"]
    from safetensors.torch import save_file

    save_file(tensors, str(shard), metadata={"format": "pt"})
    r = run_cli("convert", tmp_path / "d", tmp_path / "o", "--to", "original", ok=False)
    assert "blocks.0.attn1.to_q.weight" in r.stderr and not (tmp_path / "o").exists()
    with open(shard, "r+b") as f:  # a truncated file: named, with what is wrong
        f.truncate(shard.stat().st_size // 2)
    r = run_cli("convert", tmp_path / "d", tmp_path / "o", "--to", "original", ok=False)
    assert str(shard) in r.stderr and "truncated" in r.stderr and not (tmp_path / "o").exists()
    assert len(r.stderr.strip().splitlines()) == 1


# ComfyUI's own detection keys (docs/DESIGN.md "ComfyUI files" cites where each loader reads them)
COMFY_MARKERS = {"diffusion_models": "head.modulation", "vae": "decoder.middle.0.residual.0.gamma",
                 "text_encoders": "encoder.block.1.layer.1.DenseReluDense.wi_1.weight",
                 "clip_vision": "vision_model.encoder.layers.2.layer_norm1.weight"}


@pytest.fixture(scope="module")
def i2v_pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("comfy")
    src = make_original_repo(root / "src", "i2v", with_tokenizer=True)
    run_cli("convert", src, root / "Wan-i2v", "--clip-heads", "2")
    return src, root / "Wan-i2v"


def test_comfyui_files_hold_the_keys_comfyui_reads(tmp_path, i2v_pipeline):
    src, pipe = i2v_pipeline
    report = run_cli("convert", pipe, tmp_path / "c", "--to", "comfyui", "--json").json()
    c = tmp_path / "c"
    files = {p.parent.name: p for p in c.rglob("*.safetensors")}
    assert sorted(p.relative_to(c).as_posix() for p in files.values()) == [
        "clip_vision/clip_vision_h.safetensors", "diffusion_models/Wan-i2v_fp32.safetensors",
        "text_encoders/umt5_xxl_bf16.safetensors", "vae/wan2.1_vae.safetensors"]
    assert len(report["components"]) == 4
    for folder, marker in COMFY_MARKERS.items():
        assert marker in load_file(str(files[folder])), folder
    # the transformer and the VAE in the original keys, byte for byte the official files
    assert_same_tensors(load_file(str(files["diffusion_models"])), safetensors_tensors(src))
    assert_same_tensors(load_file(str(files["vae"])), torch.load(src / "Wan2.1_VAE.pth", weights_only=True))
    # umT5 and CLIP vision in the transformers keys, as the Diffusers folder holds them
    assert_same_tensors(load_file(str(files["text_encoders"])), safetensors_tensors(pipe / "text_encoder"))
    clip = load_file(str(files["clip_vision"]))
    assert_same_tensors(clip, safetensors_tensors(pipe / "image_encoder"))
    assert all(k.startswith(("vision_model.", "visual_projection.")) for k in clip)
    # inspect knows the folder and judges each file by what ComfyUI reads
    seen = run_cli("inspect", c, "--json").json()
    assert seen["kind"] == "ComfyUI models folder" and seen["healthy"] and len(seen["components"]) == 4
    assert sorted(x["comfyui"] for x in seen["components"]) == ["diffusers", "diffusers", "original", "original"]
    # a Diffusers-keyed transformer where ComfyUI wants the original keys is named
    shutil.copy(pipe / "transformer" / "diffusion_pytorch_model.safetensors", files["diffusion_models"])
    bad = run_cli("inspect", c, "--json").json()
    (problem,) = [f for x in bad["components"] for f in x["findings"]]
    assert not bad["healthy"]
    assert problem["code"] == "comfyui-keys" and "reads original keys" in problem["message"]


def test_comfyui_bf16_files_are_the_float_files_cast_once(tmp_path, i2v_pipeline):
    _, pipe = i2v_pipeline
    run_cli("convert", pipe, tmp_path / "f", "--to", "comfyui", "--only", "transformer")
    run_cli("convert", pipe, tmp_path / "h", "--to", "comfyui", "--only", "transformer", "--dtype", "bf16")
    full = load_file(str(tmp_path / "f" / "diffusion_models" / "Wan-i2v_fp32.safetensors"))
    half = load_file(str(tmp_path / "h" / "diffusion_models" / "Wan-i2v_bf16.safetensors"))
    assert sorted(full) == sorted(half)
    for k, v in full.items():
        assert half[k].dtype == torch.bfloat16 and torch.equal(half[k], v.to(torch.bfloat16)), k


def test_the_image_encoder_goes_back_as_what_can_be_written(tmp_path, i2v_pipeline):
    """The original CLIP .pth also held the text tower and log_scale, which the Diffusers folder
    lacks: the vision tower is written as ComfyUI's clip_vision file and the report says what is missing."""
    src, pipe = i2v_pipeline
    report = run_cli("convert", pipe, tmp_path / "o", "--to", "original", "--json").json()
    o = tmp_path / "o"
    assert not (o / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth").exists()
    assert_same_tensors(load_file(str(o / "clip_vision_h.safetensors")), safetensors_tensors(pipe / "image_encoder"))
    (note,) = report["notes"]
    assert "cannot be rebuilt" in note and "text tower" in note and "logit scale" in note
    # the table runs backwards over the image encoder too (chunk -> concat, transpose, squeeze,
    # reshape with its undo_shape): every visual.* tensor of the original file, byte for byte
    from wan2diffusers.component import produce
    from wan2diffusers.diagnose.examine import derive, diagnose
    from wan2diffusers.diagnose.layout import find
    from wan2diffusers.plan.plan import BACKWARD, build_plan
    from wan2diffusers.read.source import SourceCheckpoint

    (unit,) = find(pipe / "image_encoder").units
    weights = SourceCheckpoint(unit.path, "diffusers", unit.weights.files, dict(unit.weights.tensors), None)
    plan = build_plan(unit.table, weights, derive(unit), diagnose(unit).target, "keep", BACKWARD)
    assert plan.ok, plan.problems
    original = torch.load(src / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth", weights_only=True)
    visual = {k: v for k, v in original.items() if k.startswith("visual.")}
    from wan2diffusers.read.safetensors_file import TensorRef, read_tensor

    made = {}
    for pt in plan.tensors:
        v = produce(pt)  # dtype keep: a byte copy (TensorRef) or the op's output (tensor)
        made[pt.key] = read_tensor(v).reshape(pt.shape) if isinstance(v, TensorRef) else v
    assert_same_tensors(made, visual)
    assert {d.reason for d in plan.lost} >= {"CLIP contrastive logit scale (image-text training only)"}


def test_verify_source_works_backwards(tmp_path, i2v_pipeline):
    """verify OUT --source DIFFUSERS: every tensor of the original-layout or ComfyUI files against
    the Diffusers source run backwards; one changed value is named."""
    from safetensors.torch import save_file

    _, pipe = i2v_pipeline
    run_cli("convert", pipe, tmp_path / "o", "--to", "original")
    run_cli("convert", pipe, tmp_path / "c", "--to", "comfyui", "--dtype", "bf16")
    for out, n in (("o", 4), ("c", 4)):  # original: transformer, vae, umT5 and the CLIP vision file
        report = run_cli("verify", tmp_path / out, "--source", pipe, "--json").json()
        assert report["ok"] and all(c["compared"] == c["tensors"] > 0 for c in report["components"]), report
        assert len(report["components"]) == n, [c["component"] for c in report["components"]]
    shard = tmp_path / "o" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(shard))
    tensors["blocks.1.ffn.0.weight"][3, 5] += 1
    save_file(tensors, str(shard), metadata={"format": "pt"})
    bad = run_cli("verify", tmp_path / "o", "--source", pipe, "--json", ok=False).json()
    assert [d["key"] for d in bad["differences"]] == ["blocks.1.ffn.0.weight"]
    # one ComfyUI file given by itself (it crashed with a traceback before: its folder is not OUT)
    one = next((tmp_path / "c" / "diffusion_models").iterdir())
    report = run_cli("verify", one, "--source", pipe, "--json").json()
    assert report["ok"] and report["components"][0]["compared"] == report["components"][0]["tensors"] > 0


def test_the_python_api_goes_back_too(tmp_path, i2v_pipeline):
    import wan2diffusers

    src, pipe = i2v_pipeline
    report = wan2diffusers.convert(pipe, tmp_path / "o", to="original", only=["transformer"])
    assert report.to == "original" and report.components[0]["file"] == "diffusion_pytorch_model.safetensors"
    assert_same_tensors(safetensors_tensors(tmp_path / "o"), safetensors_tensors(src))
    report = wan2diffusers.convert(pipe, tmp_path / "c", to="comfyui", dtype="bf16", only=["vae"])
    assert report.components[0]["file"] == "vae/wan2.1_vae.safetensors"
    with pytest.raises(wan2diffusers.ConversionError, match="already exists"):
        wan2diffusers.convert(pipe, tmp_path / "c", to="comfyui")


def test_a_two_expert_pipeline_goes_to_comfyui_as_one_file_per_expert(tmp_path):
    src = make_original_repo(tmp_path / "src", "t2v_a14b", with_tokenizer=False)
    run_cli("convert", src, tmp_path / "Wan22", "--only", "transformer")
    run_cli("convert", tmp_path / "Wan22", tmp_path / "c", "--to", "comfyui")
    got = sorted(p.name for p in (tmp_path / "c" / "diffusion_models").iterdir())
    assert got == ["Wan22_high_noise_fp32.safetensors", "Wan22_low_noise_fp32.safetensors"]
    for expert, suffix in (("high_noise_model", "high_noise"), ("low_noise_model", "low_noise")):
        assert_same_tensors(load_file(str(tmp_path / "c" / "diffusion_models" / f"Wan22_{suffix}_fp32.safetensors")),
                            safetensors_tensors(src / expert))
