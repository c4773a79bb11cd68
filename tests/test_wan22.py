"""Wan 2.2 (issue 11): whole original repos (T2V-A14B, I2V-A14B with two experts; TI2V-5B with the
Wan 2.2 VAE) -> Diffusers pipeline folders. Each expert reproduces the official output of the
Wan 2.2 code on its own inputs; the pipelines load with no weight warning and generate."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import FIXTURES, TOL, fixture_io, rel_err, run_cli
from repos import make_original_repo
from test_pipeline import load_pipeline
from test_transformer import load_converted

EXPERTS = ("high_noise_model", "low_noise_model")


def expert_output(folder, fixture: str):
    """The converted expert on the official inputs of `fixture` (e.g. t2v_a14b/high_noise_model)."""
    inputs, expected, _ = fixture_io(fixture)
    model = load_converted(folder)
    kwargs = {"hidden_states": inputs["hidden_states"], "timestep": inputs["timestep"],
              "encoder_hidden_states": inputs["encoder_hidden_states"]}
    with torch.no_grad():
        out = model(**kwargs, return_dict=False)[0]
    return out, expected["sample"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan22")
    out = {}
    for name in ("t2v_a14b", "i2v_a14b", "ti2v_5b"):
        src = make_original_repo(root / f"src-{name}", name)
        out[name] = (root / name, run_cli("convert", src, root / name, "--json").json())
    return out


@pytest.mark.parametrize("name", ["t2v_a14b", "i2v_a14b"])
def test_a14b_repo_becomes_a_two_expert_pipeline(converted, name):
    folder, report = converted[name]
    info = json.loads((FIXTURES / name / "fixture.json").read_text())
    assert sorted(report["written"]) == ["model_index.json", "scheduler", "text_encoder", "tokenizer",
                                         "transformer", "transformer_2", "vae"]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["boundary_ratio"] == info["diffusers_boundary_ratio"] and index["expand_timesteps"] is False
    assert index["transformer_2"] == ["diffusers", "WanTransformer3DModel"]
    assert index["_class_name"] == ("WanImageToVideoPipeline" if name == "i2v_a14b" else "WanPipeline")
    if name == "i2v_a14b":  # Wan 2.2 I2V has no CLIP branch: no image encoder, no image processor
        assert index["image_encoder"] == [None, None] and index["image_processor"] == [None, None]
    # which expert lands where comes from the fixture (the official code's boundary switch)
    for expert, component in info["experts"].items():
        out, expected = expert_output(folder / component, f"{name}/{expert}")
        assert rel_err(out, expected) <= TOL, (expert, component)
    assert [c["instance"] for c in report["components"]][:2] == ["transformer", "transformer_2"]
    assert report["pipeline"]["family"] == "Wan 2.2"


def test_ti2v_repo_becomes_a_pipeline_with_expand_timesteps_and_the_2_2_vae(converted):
    folder, report = converted["ti2v_5b"]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["expand_timesteps"] is True and index["boundary_ratio"] is None
    assert index["transformer_2"] == [None, None]
    assert json.loads((folder / "vae" / "config.json").read_text())["z_dim"] == 48
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["flow_shift"] == 5.0
    out, expected = expert_output(folder / "transformer", "ti2v_5b")  # a timestep per token
    assert rel_err(out, expected) <= TOL


def test_t2v_a14b_pipeline_loads_cleanly_and_uses_both_experts(converted, capfd):
    folder, _ = converted["t2v_a14b"]
    pipe = load_pipeline(folder, capfd)
    calls = {"transformer": [], "transformer_2": []}
    for name in calls:
        getattr(pipe, name).register_forward_pre_hook(
            lambda mod, args, kwargs, name=name: calls[name].append(float(kwargs["timestep"].flatten()[0])),
            with_kwargs=True)
    frames = pipe(prompt="an astronaut dancing on the moon", negative_prompt="", height=32, width=32,
                  num_frames=5, num_inference_steps=4, max_sequence_length=16, output_type="pt",
                  guidance_scale=1.0, generator=torch.Generator().manual_seed(0)).frames
    assert tuple(frames.shape) == (1, 5, 3, 32, 32) and torch.isfinite(frames).all()
    boundary = pipe.config.boundary_ratio * pipe.scheduler.config.num_train_timesteps
    assert calls["transformer"] and calls["transformer_2"]  # both experts take part
    assert all(t >= boundary for t in calls["transformer"]) and all(t < boundary for t in calls["transformer_2"])


def test_ti2v_pipeline_generates(converted, capfd):
    folder, _ = converted["ti2v_5b"]
    pipe = load_pipeline(folder, capfd)
    frames = pipe(prompt="a cat on the beach", negative_prompt="", height=32, width=32, num_frames=5,
                  num_inference_steps=2, max_sequence_length=16, output_type="pt", guidance_scale=1.0,
                  generator=torch.Generator().manual_seed(0)).frames
    assert tuple(frames.shape) == (1, 5, 3, 32, 32) and torch.isfinite(frames).all()


def test_only_transformer_converts_both_experts(tmp_path):
    src = make_original_repo(tmp_path / "src", "t2v_a14b", with_tokenizer=False)
    report = run_cli("convert", src, tmp_path / "out", "--only", "transformer", "--json").json()
    assert [c["instance"] for c in report["components"]] == ["transformer", "transformer_2"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["transformer", "transformer_2", "wan2diffusers.json"]
    out, expected = expert_output(tmp_path / "out" / "transformer_2", "t2v_a14b/low_noise_model")
    assert rel_err(out, expected) <= TOL


def test_one_expert_folder_alone_converts_as_a_transformer(tmp_path):
    report = run_cli("convert", FIXTURES / "t2v_a14b" / "high_noise_model", tmp_path / "out", "--json").json()
    assert [c["instance"] for c in report["components"]] == ["transformer"]
    out, expected = expert_output(tmp_path / "out" / "transformer", "t2v_a14b/high_noise_model")
    assert rel_err(out, expected) <= TOL


def test_a_ti2v_transformer_with_a_2_1_vae_is_refused(tmp_path):
    src = make_original_repo(tmp_path / "src", "ti2v_5b", with_tokenizer=False)
    (src / "Wan2.2_VAE.pth").unlink()
    shutil.copy(FIXTURES / "vae" / "Wan2.1_VAE.pth", src / "Wan2.1_VAE.pth")
    r = run_cli("convert", src, tmp_path / "out", ok=False)
    assert "needs the wan2.2 VAE" in r.stderr and not (tmp_path / "out").exists()
