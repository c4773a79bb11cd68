"""Wan 2.2 S2V-14B (issue 22, first step): recognised and refused in one line that says what it is and
why (no Diffusers class; its GGUF/ComfyUI/fp8 files are not written yet), by every command, with
nothing written. The checkpoint is a tiny WanModel_S2V built by the official code (wan22) in the
layout of Wan-AI/Wan2.2-S2V-14B, with its S2V config (wan22 wan/configs/wan_s2v_14B.py)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import official
from conftest import FIXTURES, run_cli
from repos import T5_PTH, VAE_PTH

pytestmark = pytest.mark.skipif(not official.available(), reason="the official Wan code (wan22) is not installed")

# wan_s2v_14B.py's transformer settings, at tiny widths
INIT = dict(cond_dim=16, audio_dim=64, num_audio_token=4, enable_adain=True, adain_mode="attn_norm",
            audio_inject_layers=[0, 2], zero_init=True, zero_timestep=True, enable_motioner=False,
            add_last_motion=True, enable_tsm=False, trainable_token_pos_emb=False, enable_framepack=True,
            framepack_drop_mode="padd", model_type="s2v", patch_size=(1, 2, 2), text_len=512, in_dim=16, dim=128,
            ffn_dim=256, freq_dim=40, text_dim=32, out_dim=16, num_heads=4, num_layers=4)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("s2v") / "Wan2.2-S2V-14B-tiny"
    root.mkdir()
    torch.manual_seed(7500)
    model = official.s2v_module().WanModel_S2V(**INIT)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(root / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    model.save_config(str(root))
    shutil.copy(FIXTURES / "vae" / VAE_PTH, root / VAE_PTH)
    shutil.copy(FIXTURES / "t5" / T5_PTH, root / T5_PTH)
    (root / "wav2vec2-large-xlsr-53-english").mkdir()  # the audio encoder the repo ships (transformers)
    (root / "wav2vec2-large-xlsr-53-english" / "config.json").write_text(json.dumps({"model_type": "wav2vec2"}))
    return root


def said_once(r):
    lines = [line for line in (r.stdout + r.stderr).splitlines() if "S2V" in line]
    assert lines and all("not converted yet" in line and "no S2V transformer class" in line for line in lines), \
        r.stdout + r.stderr
    assert "no rule knows" not in r.stdout + r.stderr


@pytest.mark.parametrize("to", [[], ["--to", "gguf", "--quantize", "Q8_0"], ["--dtype", "bf16"]])
def test_convert_refuses_s2v_in_one_line_and_writes_nothing(repo, tmp_path, to):
    out = tmp_path / ("s2v.gguf" if "gguf" in to else "out")
    said_once(run_cli("convert", repo, out, *to, ok=False))
    assert not out.exists() and not list(tmp_path.iterdir())


def test_inspect_names_s2v(repo):
    r = run_cli("inspect", repo, "--json", ok=None)
    report = json.loads(r.stdout)
    transformer = next(c for c in report["components"] if c["component"] == "transformer")
    text = json.dumps(transformer)
    assert "S2V" in text and "not converted yet" in text and "no rule knows" not in text
