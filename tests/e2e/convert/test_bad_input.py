"""Bad input is refused with one clear line naming the file (and key), a non-zero exit, no
traceback, and nothing left that looks like output."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

import wan2diffusers.component
from conftest import FIXTURES, run_cli

SHARD1 = "diffusion_pytorch_model-00001-of-00002.safetensors"
SHARD2 = "diffusion_pytorch_model-00002-of-00002.safetensors"
INDEX = "diffusion_pytorch_model.safetensors.index.json"


def refused(src, out, *fragments, extra=()):
    result = run_cli("convert", src, out, *extra, ok=False)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if ".partial-" in p.name]
    return lines


@pytest.fixture
def sharded(tmp_path):
    """A private copy of the sharded T2V fixture to break."""
    src = tmp_path / "src"
    src.mkdir()
    for name in (SHARD1, SHARD2, INDEX, "config.json"):
        shutil.copy(FIXTURES / "t2v" / name, src / name)
    return src


@pytest.fixture
def single(tmp_path):
    """The T2V fixture as one file in an original-layout folder."""
    src = tmp_path / "single"
    src.mkdir()
    tensors = {**load_file(str(FIXTURES / "t2v" / SHARD1)), **load_file(str(FIXTURES / "t2v" / SHARD2))}
    shutil.copy(FIXTURES / "t2v" / "config.json", src / "config.json")
    return src, tensors


def write_single(src, tensors):
    save_file(tensors, str(src / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})


def edit_index(src, change):
    index = json.loads((src / INDEX).read_text())
    change(index["weight_map"])
    (src / INDEX).write_text(json.dumps(index))


def test_truncated_shard(sharded, tmp_path):
    path = sharded / SHARD2
    path.write_bytes(path.read_bytes()[:-100])
    lines = refused(sharded, tmp_path / "out", str(path), "truncated")
    assert len(lines) == 1


def test_corrupt_header_json(sharded, tmp_path):
    path = sharded / SHARD1
    data = bytearray(path.read_bytes())
    data[10:30] = b"\x00garbage!!garbage!!\xff"
    path.write_bytes(bytes(data))
    refused(sharded, tmp_path / "out", str(path), "corrupt")


def test_corrupt_header_length(sharded, tmp_path):
    path = sharded / SHARD1
    data = bytearray(path.read_bytes())
    data[:8] = struct.pack("<Q", 2**60)
    path.write_bytes(bytes(data))
    refused(sharded, tmp_path / "out", str(path), "header")


def test_index_names_a_missing_file(sharded, tmp_path):
    edit_index(sharded, lambda wm: wm.__setitem__("blocks.0.ffn.0.bias", "diffusion_pytorch_model-00003-of-00002.safetensors"))
    refused(sharded, tmp_path / "out", INDEX, "diffusion_pytorch_model-00003-of-00002.safetensors", "does not exist")


def test_index_key_not_in_its_shard(sharded, tmp_path):
    index = json.loads((sharded / INDEX).read_text())
    key = next(k for k, f in index["weight_map"].items() if f == SHARD2)
    edit_index(sharded, lambda wm: wm.__setitem__(key, SHARD1))
    refused(sharded, tmp_path / "out", INDEX, key, f"not in {SHARD1}")


@pytest.mark.parametrize("escape", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_index_path_leaving_the_folder(sharded, tmp_path, escape):
    shutil.copy(sharded / SHARD1, tmp_path / "outside.safetensors")
    edit_index(sharded, lambda wm: wm.__setitem__("blocks.0.ffn.0.bias", escape))
    refused(sharded, tmp_path / "out", INDEX, "outside the source folder")


def test_duplicate_keys_across_shards(sharded, tmp_path):
    first = load_file(str(sharded / SHARD1))
    second = load_file(str(sharded / SHARD2))
    dup = sorted(first)[0]
    second[dup] = first[dup]
    save_file(second, str(sharded / SHARD2), metadata={"format": "pt"})
    refused(sharded, tmp_path / "out", "duplicate key", dup)


def test_stray_lora_weight(single, tmp_path):
    src, tensors = single
    tensors["blocks.0.self_attn.q.lora_A.weight"] = torch.zeros(4, 128)
    write_single(src, tensors)
    lines = refused(src, tmp_path / "out", "no rule knows blocks.0.self_attn.q.lora_A.weight",
                    str(src / "diffusion_pytorch_model.safetensors"))
    assert "nothing was written" in lines[0]


def test_missing_key(single, tmp_path):
    src, tensors = single
    del tensors["blocks.1.ffn.2.bias"]
    write_single(src, tensors)
    refused(src, tmp_path / "out", "missing key blocks.1.ffn.2.bias", "blocks.1.ffn.net.2.bias")


def test_wrong_shape(single, tmp_path):
    src, tensors = single
    tensors["blocks.0.cross_attn.v.weight"] = torch.zeros(128, 64)
    write_single(src, tensors)
    refused(src, tmp_path / "out", "blocks.0.cross_attn.v.weight", "wrong shape", "[128, 64]", "[128, 128]")


def test_config_contradicting_the_weights(single, tmp_path):
    src, tensors = single
    write_single(src, tensors)
    config = json.loads((src / "config.json").read_text())
    config["ffn_dim"] = 13824
    (src / "config.json").write_text(json.dumps(config))
    refused(src, tmp_path / "out", "config.json", "ffn_dim=13824", "contradicts")


def test_config_not_json(single, tmp_path):
    src, tensors = single
    write_single(src, tensors)
    (src / "config.json").write_text("{not json")
    refused(src, tmp_path / "out", str(src / "config.json"), "not valid JSON")


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", tmp_path / "out", str(tmp_path / "empty"), "no Wan weights")


def test_missing_source(tmp_path):
    refused(tmp_path / "nope", tmp_path / "out", str(tmp_path / "nope"), "no such file")


def test_a_checkpoint_that_is_not_wan(tmp_path):
    src = tmp_path / "llm"
    src.mkdir()
    llm = {"model.embed_tokens.weight": torch.zeros(32, 8), "model.layers.0.self_attn.q_proj.weight": torch.zeros(8, 8),
           "model.layers.0.mlp.up_proj.weight": torch.zeros(16, 8), "lm_head.weight": torch.zeros(32, 8)}
    save_file(llm, str(src / "diffusion_pytorch_model.safetensors"))
    refused(src, tmp_path / "out", "not a Wan transformer checkpoint", "patch_embedding.weight")
    refused(src / "diffusion_pytorch_model.safetensors", tmp_path / "out2", "not a Wan transformer")


def test_unrelated_files_are_ignored(sharded, tmp_path):
    (sharded / "README.md").write_text("# Wan2.1")
    (sharded / "configuration.json").write_text("{}")
    (sharded / "assets").mkdir()
    (sharded / "assets" / "logo.png").write_bytes(b"\x89PNG")
    run_cli("convert", sharded, tmp_path / "out")
    assert (tmp_path / "out" / "transformer" / "config.json").exists()


def test_existing_output_is_refused_then_replaced_with_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    refused_existing = run_cli("convert", FIXTURES / "t2v", out, ok=False)
    assert "already exists" in refused_existing.stderr and "--overwrite" in refused_existing.stderr
    assert (out / "keep.txt").read_text() == "mine"
    run_cli("convert", FIXTURES / "t2v", out, "--overwrite")
    assert not (out / "keep.txt").exists() and (out / "transformer" / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_output_inside_out_is_not_the_source(sharded):
    result = run_cli("convert", sharded, sharded, "--overwrite", ok=False)
    assert "would replace the source" in result.stderr
    assert (sharded / INDEX).exists()


def test_interrupted_write_leaves_nothing(sharded, tmp_path, monkeypatch):
    calls = []
    real = wan2diffusers.component.produce

    def interrupted(pt):
        calls.append(pt.key)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(pt)

    monkeypatch.setattr(wan2diffusers.component, "produce", interrupted)
    out = tmp_path / "out"
    result = run_cli("convert", sharded, out, ok=False)
    assert result.exit_code == 130 and "interrupted" in result.stderr
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["src"]


def test_failure_while_writing_keeps_the_previous_output(sharded, tmp_path, monkeypatch):
    out = tmp_path / "out"
    run_cli("convert", sharded, out)
    before = (out / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()
    monkeypatch.setattr(wan2diffusers.component, "produce",
                        lambda pt: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    result = run_cli("convert", sharded, out, "--overwrite", "--dtype", "bf16", ok=False)
    assert "No space left on device" in result.stderr
    assert (out / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_json_error_report(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_cli("convert", tmp_path / "empty", tmp_path / "out", "--json", ok=False)
    report = json.loads(result.stdout)
    assert report["ok"] is False and "no Wan weights" in report["error"]
