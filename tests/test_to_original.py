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
    shutil.rmtree(tmp_path / "d")
