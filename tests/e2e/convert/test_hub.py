"""SRC as a Hub repo id: only the needed files are asked for; offline, a clear one-line error;
a repo already in the local Hub cache converts with no network."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from wan2diffusers.hub import allow_patterns, diffusers_patterns, looks_like_repo_id
from repos import make_original_repo


def cli(args, hf_home, offline=True):
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_DISABLE_TELEMETRY": "1"}
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    else:
        env.pop("HF_HUB_OFFLINE", None)
        env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # nothing listens there: no network
    return subprocess.run([sys.executable, "-m", "wan2diffusers.cli", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=300)


def test_repo_ids_and_patterns():
    assert looks_like_repo_id("Wan-AI/Wan2.1-T2V-14B")
    assert not looks_like_repo_id("some/local/folder") and not looks_like_repo_id("model.safetensors")
    every = allow_patterns(None)
    assert {"config.json", "diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model-*-of-*.safetensors",
            "Wan2.1_VAE.pth", "models_t5_umt5-xxl-enc-bf16.pth", "google/umt5-xxl/*",
            "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"} <= set(every)
    assert "xlm-roberta-large/*" not in every and "assets/*" not in every
    assert allow_patterns(["vae"]) == ["Wan2.1_VAE.pth", "Wan2.2_VAE.pth", "README.md"]  # whichever the repo has


def test_no_network_is_one_clear_line(tmp_path):
    for offline in (True, False):
        r = cli(["convert", "Wan-AI/Wan2.1-T2V-1.3B", tmp_path / "out"], tmp_path / "hf", offline)
        assert r.returncode != 0 and "Traceback" not in r.stderr
        lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and "Wan-AI/Wan2.1-T2V-1.3B" in lines[0], r.stderr
        assert not (tmp_path / "out").exists()


def cached_repo(hf_home, repo_id: str, variant: str, commit: str = "0123456789abcdef0123456789abcdef01234567"):
    """An original repo as the local Hub cache holds it (snapshots/<commit>, refs/main)."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    make_original_repo(repo / "snapshots" / commit, variant)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_a_cached_repo_converts_offline(tmp_path):
    cached_repo(tmp_path / "hf", "Wan-AI/Wan2.1-T2V-1.3B", "t2v")
    r = cli(["convert", "Wan-AI/Wan2.1-T2V-1.3B", tmp_path / "out"], tmp_path / "hf")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "model_index.json").exists()


def test_a_cached_wan22_a14b_repo_converts_offline_with_both_experts(tmp_path):
    cached_repo(tmp_path / "hf", "Wan-AI/Wan2.2-T2V-A14B", "t2v_a14b")
    r = cli(["convert", "Wan-AI/Wan2.2-T2V-A14B", tmp_path / "out"], tmp_path / "hf")
    assert r.returncode == 0, r.stderr
    index = json.loads((tmp_path / "out" / "model_index.json").read_text())
    assert index["boundary_ratio"] == 0.875 and index["transformer_2"] == ["diffusers", "WanTransformer3DModel"]
    # only what the transformers need: each expert's folder, nothing of the encoders
    wanted = allow_patterns(["transformer"])
    assert {"high_noise_model/config.json", "low_noise_model/diffusion_pytorch_model-*-of-*.safetensors",
            "low_noise_model/diffusion_pytorch_model.safetensors.index.json"} <= set(wanted)
    assert not [p for p in wanted if p.endswith(".pth")]


def test_a_cached_diffusers_repo_goes_back_offline(tmp_path):
    """--to original|comfyui of a published *-Diffusers repo id: its files from the Hub cache."""
    from conftest import run_cli

    run_cli("convert", make_original_repo(tmp_path / "src", "t2v"), tmp_path / "d")
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    repo = tmp_path / "hf" / "hub" / "models--Wan-AI--Wan2.1-T2V-tiny-Diffusers"
    import shutil

    shutil.copytree(tmp_path / "d", repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    r = cli(["convert", "Wan-AI/Wan2.1-T2V-tiny-Diffusers", tmp_path / "o", "--to", "original"], tmp_path / "hf")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "o" / "Wan2.1_VAE.pth").is_file() and (tmp_path / "o" / "config.json").is_file()
    r = cli(["convert", "Wan-AI/Wan2.1-T2V-tiny-Diffusers", tmp_path / "c", "--to", "comfyui"], tmp_path / "hf")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "c" / "diffusion_models" / "Wan2.1-T2V-tiny-Diffusers_fp32.safetensors").is_file()
    assert "model_index.json" in diffusers_patterns(None) and "transformer_2/*" in diffusers_patterns(None)
