"""converter/layouts: `locate(path)` names the layout of every kind of file or folder users hand
the tool - made here as users get them (the original repos' layout, this tool's outputs, a LoRA
file in Kijai's format) - and nothing else claims it."""

from __future__ import annotations

import os
import shutil

import pytest
from safetensors.torch import load_file

from conftest import FIXTURES, run_cli
from lora_files import make_modules, write_original
from repos import VAE_PTH, make_original_repo
from wan2diffusers.layouts import LAYOUTS, locate
from wan2diffusers.layouts.original import transformer_folders


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    make_original_repo(root / "Wan2.1-T2V", "t2v")
    make_original_repo(root / "Wan2.2-T2V-A14B", "t2v_a14b", with_tokenizer=False)
    run_cli("convert", root / "Wan2.1-T2V", root / "pipeline")
    run_cli("convert", root / "Wan2.1-T2V", root / "parts", "--only", "transformer,vae")
    run_cli("convert", root / "pipeline", root / "comfy", "--to", "comfyui")
    run_cli("convert", root / "Wan2.2-T2V-A14B", root / "experts", "--to", "gguf", "--quantize", "Q8_0")
    sd = load_file(str(FIXTURES / "t2v" / "diffusion_pytorch_model-00001-of-00002.safetensors"))
    linear = sorted(k[:-len(".weight")] for k, v in sd.items() if k.endswith("attn.q.weight") and v.ndim == 2)[:1]
    write_original(root / "lora.safetensors", make_modules(sd, linear))
    shutil.copy(FIXTURES / "vae" / VAE_PTH, root / VAE_PTH)
    return root


@pytest.mark.parametrize("name,layout,kind", [
    ("Wan2.1-T2V", "original", "folder"),
    ("Wan2.2-T2V-A14B", "original", "folder"),
    ("pipeline", "diffusers", "pipeline folder"),
    ("pipeline/transformer", "diffusers", "component folder"),
    ("parts", "diffusers", "folder of component subfolders"),
    ("comfy", "comfyui", "ComfyUI models folder"),
    ("experts", "gguf", "folder of gguf files"),
    ("lora.safetensors", "lora", "LoRA file"),
    ("Wan2.1-T2V/diffusion_pytorch_model-00001-of-00002.safetensors", "file", "single file"),
    ("pipeline/transformer/diffusion_pytorch_model.safetensors", "file", "single file"),
    (VAE_PTH, "file", "single file"),
    ("experts/nothing-here.gguf", "gguf", "GGUF file"),  # claimed by name: an interrupted write is the GGUF reader's to report
])
def test_locate_names_the_layout(made, name, layout, kind):
    found = locate(made / name)
    assert (found.layout, found.kind) == (layout, kind)


def test_the_layouts_list_their_files(made):
    assert [p.name for p in locate(made / "experts").files] == ["high_noise_model.gguf", "low_noise_model.gguf"]
    comfy = [p.relative_to(made / "comfy").as_posix() for p in locate(made / "comfy").files]
    assert comfy == ["diffusion_models/pipeline_fp32.safetensors", "text_encoders/umt5_xxl_bf16.safetensors",
                     "vae/wan2.1_vae.safetensors"]


def test_an_a14b_repo_has_two_transformer_instances(made):
    folders = transformer_folders(made / "Wan2.2-T2V-A14B", "diffusion_pytorch_model.safetensors")
    assert {k: v.name for k, v in folders.items()} == {"transformer": "high_noise_model",
                                                      "transformer_2": "low_noise_model"}


def test_nothing_claims_what_is_not_a_file_or_folder(tmp_path):
    assert (locate(tmp_path / "absent").layout, locate(tmp_path / "absent").kind) == (None, "missing")
    os.mkfifo(tmp_path / "pipe.safetensors")
    found = locate(tmp_path / "pipe.safetensors")
    assert (found.layout, found.kind) == (None, "a FIFO (named pipe)")


def test_every_layout_is_registered_once():
    names = [m.NAME for m in LAYOUTS]
    assert len(names) == len(set(names)) and set(names) == {"lora", "gguf", "comfyui", "diffusers", "original", "file"}
