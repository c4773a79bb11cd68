"""Whole original repos -> whole Diffusers pipeline folders that load offline without weight
warnings; the T2V one generates."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import EXAMPLE, run_cli
from loading import load_pipeline
from repos import make_original_repo

@pytest.fixture(scope="module")
def t2v_pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2v")
    src = make_original_repo(root / "Wan2.1-T2V-tiny", "t2v")
    report = run_cli("convert", src, root / "out", "--json").json()
    return root / "out", report


def test_t2v_repo_becomes_a_complete_pipeline(t2v_pipeline):
    out, report = t2v_pipeline
    assert report["pipeline"] == {"name": "t2v", "family": "Wan 2.1", "class": "WanPipeline", "complete": True,
                                  "missing": [], "extras": ["tokenizer", "scheduler"], "flow_shift": 3.0,
                                  "config": {}}
    assert sorted(report["written"]) == ["model_index.json", "scheduler", "text_encoder", "tokenizer",
                                         "transformer", "vae"]
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline"
    assert index["transformer"] == ["diffusers", "WanTransformer3DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKLWan"]
    assert index["text_encoder"] == ["transformers", "UMT5EncoderModel"]
    assert index["scheduler"] == ["diffusers", "UniPCMultistepScheduler"]
    assert index["transformer_2"] == [None, None]
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["flow_shift"] == 3.0 and scheduler["prediction_type"] == "flow_prediction"
    assert scheduler["use_flow_sigmas"] is True


def test_t2v_pipeline_loads_offline_and_generates(t2v_pipeline, capfd, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out, _ = t2v_pipeline
    pipe = load_pipeline(out, capfd)
    assert type(pipe).__name__ == "WanPipeline"
    frames = pipe(prompt="an astronaut dancing on the moon", negative_prompt="", height=32, width=32,
                  num_frames=5, num_inference_steps=2, max_sequence_length=16, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).frames
    assert tuple(frames.shape) == (1, 5, 3, 32, 32)
    assert torch.isfinite(frames).all() and frames.std() > 0


@pytest.mark.parametrize("variant,cls", [("i2v", "WanImageToVideoPipeline"), ("flf2v", "WanImageToVideoPipeline"),
                                         ("vace", "WanVACEPipeline")])
def test_other_repos_become_pipelines_that_load(tmp_path, capfd, monkeypatch, variant, cls):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = make_original_repo(tmp_path / "src", variant)
    report = run_cli("convert", src, tmp_path / "out", "--clip-heads", "2", "--json").json()
    assert report["pipeline"]["complete"] and report["pipeline"]["class"] == cls
    expected = {"i2v": 3.0, "flf2v": 16.0, "vace": 3.0}[variant]
    assert report["pipeline"]["flow_shift"] == expected
    pipe = load_pipeline(tmp_path / "out", capfd)
    assert type(pipe).__name__ == cls
    assert type(pipe.transformer).__name__ == ("WanVACETransformer3DModel" if variant == "vace" else "WanTransformer3DModel")
    if variant != "vace":
        assert type(pipe.image_encoder).__name__ == "CLIPVisionModelWithProjection"
        assert pipe.image_processor.crop_size == {"height": 224, "width": 224}


def test_a_partial_folder_writes_what_it_has_and_says_the_pipeline_is_incomplete(tmp_path):
    src = make_original_repo(tmp_path / "src", "t2v", with_tokenizer=False)
    (src / "models_t5_umt5-xxl-enc-bf16.pth").unlink()
    result = run_cli("convert", src, tmp_path / "out")
    assert "incomplete" in result.stdout and "text_encoder" in result.stdout and "tokenizer" in result.stdout
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["transformer", "vae", "wan2diffusers.json"]  # + the conversion record


def test_only_and_flow_shift(tmp_path):
    src = make_original_repo(tmp_path / "src", "t2v")
    run_cli("convert", src, tmp_path / "vae_only", "--only", "vae")
    assert sorted(p.name for p in (tmp_path / "vae_only").iterdir()) == ["vae", "wan2diffusers.json"]
    run_cli("convert", src, tmp_path / "shift", "--flow-shift", "5.0")
    scheduler = json.loads((tmp_path / "shift" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["flow_shift"] == 5.0
    bad = run_cli("convert", src, tmp_path / "bad", "--only", "unet", ok=False)
    assert "unknown component" in bad.stderr


def test_the_bundled_example_becomes_a_pipeline_that_generates(tmp_path, capfd):
    """README's first command: the example shipped with the project converts to a whole pipeline."""

    example = EXAMPLE
    result = run_cli("convert", example, tmp_path / "out")
    assert f"result: {(tmp_path / 'out').resolve()}" in result.stdout
    pipe = load_pipeline(tmp_path / "out", capfd)
    frames = pipe(prompt="a cat on the beach", height=16, width=16, num_frames=1, num_inference_steps=2,
                  max_sequence_length=8, output_type="pt").frames
    assert tuple(frames.shape) == (1, 1, 3, 16, 16) and torch.isfinite(frames).all()
