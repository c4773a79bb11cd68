"""Byte-identity of every kind of output on the fixtures (issue 18: a restructuring must not change
one byte of what is written). Each case runs the CLI as a user would and digests every file it wrote
(sha256; JSON files with the installed libraries' version fields removed, the conversion record
skipped: it holds a timestamp); the digests must equal tests/data/output_baseline.json.

This is a regression guard, not a proof of correctness (the other tests judge the values against
the official code and the reference libraries): when a change of output is intended, regenerate the
baseline and say why in the commit:

    WAN2DIFFUSERS_WRITE_BASELINE=1 .venv/bin/python -m pytest -q tests/e2e/convert/test_output_baseline.py

Torchao and quanto outputs are left out: their bytes follow the installed library's version (their
values are judged against the libraries themselves in test_quantize*.py)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from conftest import DATA, FIXTURES, run_cli
from fp8_files import fixture_state_dict
from lora_files import make_modules, write_original
from repos import make_original_repo

BASELINE = DATA / "output_baseline.json"
VOLATILE = ("_diffusers_version", "transformers_version")  # set by the installed library at save time
SKIP = ("wan2diffusers.json",)  # the conversion record: a timestamp, absolute paths


def digest(out: Path) -> dict[str, str]:
    files = [out] if out.is_file() else sorted(p for p in out.rglob("*") if p.is_file())
    result = {}
    for f in files:
        if f.name in SKIP:
            continue
        data = f.read_bytes()
        if f.suffix == ".pth":  # torch.save's zip: its members, less the random serialization id torch writes
            import zipfile

            with zipfile.ZipFile(f) as z:
                data = b"".join(n.encode() + z.read(n) for n in sorted(z.namelist())
                                if not n.endswith("/.data/serialization_id"))
        if f.suffix == ".json":
            value = json.loads(data)
            if isinstance(value, dict):
                value = {k: v for k, v in value.items() if k not in VOLATILE}
            data = json.dumps(value, sort_keys=True).encode()
        result[f.name if out.is_file() else f.relative_to(out).as_posix()] = hashlib.sha256(data).hexdigest()
    return result


def cases(tmp: Path) -> dict[str, tuple]:
    """name -> (CLI arguments with {OUT}, a setup that makes inputs first, or None)."""
    sd = fixture_state_dict(FIXTURES / "t2v")
    lora = tmp / "lora.safetensors"
    write_original(lora, make_modules(sd, ["blocks.0.self_attn.q", "blocks.1.ffn.0", "text_embedding.2"], seed=5))
    a14b = make_original_repo(tmp / "a14b-src", "t2v_a14b", with_tokenizer=False)
    ti2v = make_original_repo(tmp / "ti2v-src", "ti2v_5b", with_tokenizer=False)
    t2v_d = tmp / "t2v-d"
    run_cli("convert", FIXTURES / "t2v", t2v_d)
    vae_d = tmp / "vae-d"
    run_cli("convert", FIXTURES / "vae" / "Wan2.1_VAE.pth", vae_d)
    F = FIXTURES
    return {
        "t2v": ("convert", F / "t2v"),
        "t2v bf16": ("convert", F / "t2v", "--dtype", "bf16"),
        "t2v fp16 sharded": ("convert", F / "t2v", "--dtype", "fp16", "--max-shard-size", "1MB"),
        "i2v": ("convert", F / "i2v"),
        "flf2v": ("convert", F / "flf2v"),
        "vace": ("convert", F / "vace"),
        "ti2v_5b repo": ("convert", ti2v),
        "t2v_a14b repo": ("convert", a14b),
        "vae": ("convert", F / "vae" / "Wan2.1_VAE.pth"),
        "vae22": ("convert", F / "vae22" / "Wan2.2_VAE.pth"),
        "t5": ("convert", F / "t5" / "models_t5_umt5-xxl-enc-bf16.pth"),
        "clip": ("convert", F / "clip" / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth", "--clip-heads", "2"),
        "gguf Q8_0": ("convert", F / "t2v", "--to", "gguf", "--quantize", "Q8_0", "GGUF"),
        "gguf Q4_K_M": ("convert", F / "t2v", "--to", "gguf", "--quantize", "Q4_K_M", "GGUF"),
        "gguf a14b Q5_K_M": ("convert", a14b, "--to", "gguf", "--quantize", "Q5_K_M"),
        "back original": ("convert", t2v_d, "--to", "original"),
        "back original vae": ("convert", vae_d, "--to", "original"),
        "back comfyui bf16": ("convert", t2v_d, "--to", "comfyui", "--dtype", "bf16"),
        "comfyui fp8_scaled": ("convert", t2v_d, "--to", "comfyui", "--quantize", "fp8_scaled"),
        "comfyui fp8_e4m3fn": ("convert", t2v_d, "--to", "comfyui", "--dtype", "fp8_e4m3fn"),
        "lora diffusers": ("convert", lora, "--to", "diffusers", "FILE"),
        "lora kohya": ("convert", lora, "--to", "comfyui", "FILE"),
        "merge": ("merge", F / "t2v", "--lora", f"{lora}:0.5"),
        "merge gguf": ("merge", F / "t2v", "--to", "gguf", "--quantize", "Q8_0", "--lora", str(lora), "GGUF"),
    }


def run_case(tmp: Path, name: str, args: tuple) -> dict[str, str]:
    *args, last = args
    kind = last if last in ("GGUF", "FILE") else None
    if kind is None:
        args.append(last)
    out = tmp / name.replace(" ", "_")
    if kind == "GGUF":
        out = out.with_suffix(".gguf")
    elif kind == "FILE":
        out = out.with_suffix(".safetensors")
    command, src, *rest = args
    run_cli(command, src, out, *rest)
    return digest(out)


def test_every_output_is_byte_identical_to_the_baseline(tmp_path):
    got = {name: run_case(tmp_path, name, args) for name, args in cases(tmp_path).items()}
    if os.environ.get("WAN2DIFFUSERS_WRITE_BASELINE") == "1":
        BASELINE.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        pytest.skip(f"wrote {BASELINE}")
    want = json.loads(BASELINE.read_text())
    assert sorted(got) == sorted(want), "cases changed: regenerate the baseline (see the docstring)"
    differ = [f"{name}: {f}" for name in want for f in sorted(set(want[name]) | set(got[name]))
              if want[name].get(f) != got[name].get(f)]
    assert not differ, "outputs changed byte-wise (intended? regenerate, see the docstring):\n" + "\n".join(differ)
