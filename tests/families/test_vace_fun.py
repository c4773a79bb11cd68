"""Wan 2.2 VACE-Fun A14B (issue 22): alibaba-pai's two VACE experts (high_noise_model/, low_noise_model/,
made with VideoX-Fun) -> `transformer/` + `transformer_2/` of a WanVACEPipeline with boundary_ratio
0.875, as diffusers' scripts/convert_wan_to_diffusers.py writes it. Each expert reproduces what
VideoX-Fun's own VaceWanTransformer3DModel returned (tests/vace_fun_fixture.py made the fixture)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES, TOL, rel_err, run_cli
from repos import T5_PTH, VAE_PTH, make_umt5_tokenizer
from loading import load_pipeline

FIX = FIXTURES / "vace_fun_a14b"
EXPERTS = {"high_noise_model": "transformer", "low_noise_model": "transformer_2"}  # diffusers' script


def make_vace_fun_repo(root):
    root.mkdir(parents=True)
    for expert in EXPERTS:
        (root / expert).mkdir()
        for name in ("config.json", "diffusion_pytorch_model.safetensors"):
            shutil.copy(FIX / expert / name, root / expert / name)
    shutil.copy(FIXTURES / "vae" / VAE_PTH, root / VAE_PTH)
    shutil.copy(FIXTURES / "t5" / T5_PTH, root / T5_PTH)
    make_umt5_tokenizer(root / "google" / "umt5-xxl")
    return root


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return make_vace_fun_repo(tmp_path_factory.mktemp("vace-fun") / "Wan2.2-VACE-Fun-A14B-tiny")


@pytest.fixture(scope="module")
def converted(repo, tmp_path_factory):
    out = tmp_path_factory.mktemp("vace-fun-out") / "pipe"
    return out, run_cli("convert", repo, out, "--json").json()


def run_expert(model, dtype=torch.float32):
    inp = load_file(str(FIX / "inputs.safetensors"))
    ctx = torch.zeros(1, 512, inp["context"].shape[1])
    ctx[0, :inp["context"].shape[0]] = inp["context"]
    scale = torch.tensor([0.75] * len(model.config.vace_layers))
    with torch.no_grad():
        return model(hidden_states=inp["x"][None].to(dtype), timestep=inp["t"], encoder_hidden_states=ctx.to(dtype),
                     control_hidden_states=inp["vace_context"][None].to(dtype),
                     control_hidden_states_scale=scale.to(dtype)).sample.float()


def expected(expert):
    return load_file(str(FIX / expert / "expected.safetensors"))["sample"]


def test_two_vace_experts_become_a_wan_vace_pipeline_with_its_boundary(converted):
    from diffusers import WanVACETransformer3DModel

    out, report = converted
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "WanVACEPipeline" and index["boundary_ratio"] == 0.875
    assert index["transformer"] == index["transformer_2"] == ["diffusers", "WanVACETransformer3DModel"]
    assert report["pipeline"]["name"] == "wan2.2-vace-fun-a14b" and report["pipeline"]["family"] == "Wan 2.2"
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["flow_shift"] == 3.0
    info = json.loads((FIX / "fixture.json").read_text())
    for expert, component in EXPERTS.items():
        model = WanVACETransformer3DModel.from_pretrained(str(out / component)).eval()
        assert model.config.vace_layers == info["init_kwargs"]["vace_layers"]
        assert model.config.vace_in_channels == info["init_kwargs"]["vace_in_dim"]
        got = run_expert(model)
        assert rel_err(got, expected(expert)) <= TOL, expert
        other = next(e for e in EXPERTS if e != expert)  # a swapped pair would be seen
        assert rel_err(got, expected(other)) > 100 * TOL


def test_pipeline_loads_cleanly_and_uses_both_experts_on_a_control_video(converted, capfd):
    from PIL import Image

    out, _ = converted
    pipe = load_pipeline(out, capfd)
    calls = {"transformer": 0, "transformer_2": 0}
    for name in calls:
        getattr(pipe, name).register_forward_pre_hook(lambda *a, name=name: calls.__setitem__(name, calls[name] + 1))
    video = [Image.new("RGB", (32, 32), (20 * i, 90, 160)) for i in range(5)]
    frames = pipe(video=video, prompt="a cat dancing", negative_prompt="", height=32, width=32, num_frames=5,
                  num_inference_steps=4, max_sequence_length=16, output_type="pt", guidance_scale=1.0,
                  generator=torch.Generator().manual_seed(0)).frames
    assert tuple(frames.shape) == (1, 5, 3, 32, 32) and torch.isfinite(frames).all()
    assert calls["transformer"] and calls["transformer_2"]


def test_inspect_verify_and_the_way_back(converted, repo, tmp_path):
    out, _ = converted
    report = run_cli("inspect", out, "--json").json()
    assert report["healthy"]
    verified = run_cli("verify", out, "--source", repo, "--json").json()
    assert verified["ok"] and [c["component"] for c in verified["components"]][:2] == ["transformer", "transformer_2"]
    back = tmp_path / "back"
    run_cli("convert", out, back, "--to", "original", "--only", "transformer")
    for expert in EXPERTS:  # each expert back in its folder, every tensor byte-identical
        a = load_file(str(back / expert / "diffusion_pytorch_model.safetensors"))
        b = load_file(str(repo / expert / "diffusion_pytorch_model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), expert


def test_gguf_of_each_expert_loads_in_bf16_and_runs(converted, repo, tmp_path, capfd):
    import diffusers

    out, _ = converted
    report = run_cli("convert", repo, tmp_path / "gguf", "--to", "gguf", "--quantize", "Q8_0", "--json").json()
    files = sorted(p.name for p in (tmp_path / "gguf").iterdir())
    assert len(files) == 2 and all(f.endswith(".gguf") for f in files), (files, report)
    for expert, component in EXPERTS.items():  # one file per expert, named by it
        path = next(tmp_path / "gguf" / f for f in files if expert.split("_")[0] in f)
        capfd.readouterr()
        model = diffusers.WanVACETransformer3DModel.from_single_file(
            str(path), config=str(out / component), torch_dtype=torch.bfloat16,
            quantization_config=diffusers.GGUFQuantizationConfig(compute_dtype=torch.bfloat16))
        assert "were not used" not in capfd.readouterr().err
        got = run_expert(model.eval(), torch.bfloat16)
        assert torch.isfinite(got).all() and rel_err(got, expected(expert)) <= 0.05, expert


def test_a_cached_vace_fun_repo_converts_offline(tmp_path):
    from test_hub import cli

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--alibaba-pai--Wan2.2-VACE-Fun-A14B"
    make_vace_fun_repo(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    r = cli(["convert", "alibaba-pai/Wan2.2-VACE-Fun-A14B", tmp_path / "out"], tmp_path / "hf")
    assert r.returncode == 0, r.stderr
    index = json.loads((tmp_path / "out" / "model_index.json").read_text())
    assert index["_class_name"] == "WanVACEPipeline" and index["boundary_ratio"] == 0.875
