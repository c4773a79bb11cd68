"""Wan 2.2 (issue 11): whole original repos (T2V-A14B, I2V-A14B with two experts; TI2V-5B with the
Wan 2.2 VAE) -> Diffusers pipeline folders. Each expert reproduces the official output of the
Wan 2.2 code on its own inputs; the pipelines load with no weight warning and generate."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES, TOL, rel_err, run_cli
from repos import make_original_repo
from loading import load_pipeline
from loading import load_converted, run_official_call

EXPERTS = ("high_noise_model", "low_noise_model")


def expert_output(folder, fixture: str):
    """The converted expert on the official inputs of `fixture` (e.g. t2v_a14b/high_noise_model)."""
    return run_official_call(load_converted(folder), fixture)


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


def test_inspect_verify_quantize_repair_and_publish_take_a_two_expert_pipeline(tmp_path):
    src = make_original_repo(tmp_path / "Wan2.2-T2V-A14B-tiny", "t2v_a14b")
    out = tmp_path / "pipe"
    run_cli("convert", src, out, "--max-shard-size", "1MB")  # both experts sharded
    report = run_cli("inspect", out, "--json").json()
    assert report["healthy"] and [c["component"] for c in report["components"]][:2] == ["transformer", "transformer_2"]
    verified = run_cli("verify", out, "--source", src, "--json").json()
    assert verified["ok"] and [c["compared"] for c in verified["components"]][:2] == [69, 69]

    # a swapped pair is caught: transformer_2 is compared with the low-noise expert
    swapped = tmp_path / "swapped"
    shutil.copytree(out, swapped)
    (swapped / "transformer").rename(swapped / "tmp")
    (swapped / "transformer_2").rename(swapped / "transformer")
    (swapped / "tmp").rename(swapped / "transformer_2")
    assert not run_cli("verify", swapped, "--source", src, "--json", ok=False).json()["ok"]

    # both experts quantized, by quantize and by convert --quantize: the same files
    run_cli("quantize", out, tmp_path / "q8", "--weights", "int8", "--max-shard-size", "1MB")
    run_cli("convert", src, tmp_path / "c8", "--quantize", "int8", "--max-shard-size", "1MB")
    for expert in ("transformer", "transformer_2"):
        cfg = json.loads((tmp_path / "q8" / expert / "config.json").read_text())
        assert cfg["quantization_config"]["quant_method"] == "torchao"  # the default backend
        files = sorted(p.name for p in (tmp_path / "q8" / expert).iterdir())
        assert files == sorted(p.name for p in (tmp_path / "c8" / expert).iterdir())
        for name in files:  # the same tensors (a shard's data order follows its source's)
            if name.endswith(".safetensors"):
                a, b = (load_file(str(tmp_path / d / expert / name)) for d in ("q8", "c8"))
                assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (expert, name)
    q8 = run_cli("verify", tmp_path / "q8", "--source", src, "--json").json()
    assert q8["ok"] and all(c["compared"] == 69 for c in q8["components"][:2])

    # repair: a lost index in transformer_2, a lost boundary_ratio
    index = out / "transformer_2" / "diffusion_pytorch_model.safetensors.index.json"
    assert index.is_file()
    index.unlink()
    mi = json.loads((out / "model_index.json").read_text())
    del mi["boundary_ratio"]
    (out / "model_index.json").write_text(json.dumps(mi))
    broken = run_cli("inspect", out, "--json").json()
    assert not broken["healthy"] and any("boundary_ratio" in p for p in broken["model_index_problems"])
    fixed = run_cli("repair", out, "--backup", tmp_path / "bk", "--json").json()
    assert fixed["ok"] and fixed["pipeline"]["fixed"] == {"boundary_ratio": 0.875}
    assert index.is_file() and json.loads((out / "model_index.json").read_text())["boundary_ratio"] == 0.875
    assert "boundary_ratio" not in json.loads((tmp_path / "bk" / "model_index.json").read_text())
    assert run_cli("inspect", out, "--json").json()["healthy"]
    out_t, expected = expert_output(out / "transformer_2", "t2v_a14b/low_noise_model")
    assert rel_err(out_t, expected) <= TOL

    # publish: the card says Wan 2.2 and names the 2.2 base model; both experts are uploaded
    dry = run_cli("publish", out, "me/Wan2.2-T2V-A14B-tiny-Diffusers", "--base-model", "Wan-AI/Wan2.2-T2V-A14B",
                  "--dry-run", "--no-measure", "--json").json()
    card = (out / "README.md").read_text()
    assert dry["card_metadata"]["base_model"] == "Wan-AI/Wan2.2-T2V-A14B"
    assert "Wan 2.2 two-expert model" in card and "boundary_ratio 0.875" in card and "| transformer_2 |" in card
    assert any(f["path"].startswith("transformer_2/") for f in dry["files"])


def test_i2v_a14b_pipeline_loads_cleanly_and_generates_from_an_image(converted, capfd):
    from PIL import Image

    folder, _ = converted["i2v_a14b"]
    pipe = load_pipeline(folder, capfd)
    assert pipe.image_encoder is None and pipe.transformer_2 is not None  # no CLIP branch in Wan 2.2 I2V
    image = Image.new("RGB", (32, 32), (120, 60, 200))
    # a text prompt, as users call it: diffusers 0.42's I2V pipeline cleans it with ftfy (a dependency:
    # without it the first call fails with NameError)
    frames = pipe(image=image, prompt="a cat", negative_prompt="", height=32, width=32, num_frames=5,
                  num_inference_steps=2, max_sequence_length=16, output_type="pt", guidance_scale=1.0,
                  generator=torch.Generator().manual_seed(0)).frames
    assert tuple(frames.shape) == (1, 5, 3, 32, 32) and torch.isfinite(frames).all()
