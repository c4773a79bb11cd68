"""`wan2diffusers inspect`: each state a folder can be in, built from the fixtures (converted with
the CLI, then broken here), named correctly from headers alone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import FIXTURES, fixture_io, run_cli

POS_EMBED = "condition_embedder.image_embedder.pos_embed"  # what diffusers' single-file converter drops
EMB_POS = "img_emb.emb_pos"  # its original name


# ---- helpers shared by test_repair.py and test_verify.py


@pytest.fixture(scope="session")
def converted_root(tmp_path_factory):
    """Each fixture converted once by the CLI; tests copy what they break."""
    root = tmp_path_factory.mktemp("diagnose-converted")
    for name in ("t2v", "flf2v", "vace"):
        run_cli("convert", FIXTURES / name, root / name)
    run_cli("convert", FIXTURES / "flf2v", root / "flf2v-sharded", "--max-shard-size", "3MB")
    return root


def fresh(converted_root: Path, name: str, dest: Path) -> Path:
    shutil.copytree(converted_root / name, dest)
    return dest


def diffusers_int8(converted_root: Path, dest: Path) -> Path:
    """The converted t2v transformer quantized by diffusers' own path (QuantoConfig int8), saved."""
    import diffusers

    model = diffusers.WanTransformer3DModel.from_pretrained(
        str(converted_root / "t2v" / "transformer"), torch_dtype=torch.float32,
        quantization_config=diffusers.QuantoConfig(weights_dtype="int8"))
    model.save_pretrained(str(dest))
    return dest


def inspect_json(path) -> dict:
    report = run_cli("inspect", path, "--json").json()
    assert report["ok"] is True
    return report


def only_component(report: dict) -> dict:
    (comp,) = report["components"]
    return comp


def codes(comp: dict) -> list[str]:
    return [f["code"] for f in comp["findings"]]


def drop_key(folder: Path, key: str) -> None:
    """Remove one tensor from a component folder (its shard rewritten, the index updated), as a
    converter that has no rule for it leaves the folder."""
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        shard = folder / data["weight_map"].pop(key)
        tensors = load_file(str(shard))
        data["metadata"]["total_size"] -= tensors[key].numel() * tensors[key].element_size()
        index.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    else:
        shard = folder / "diffusion_pytorch_model.safetensors"
        tensors = load_file(str(shard))
    del tensors[key]
    save_file(tensors, str(shard), metadata={"format": "pt"})


def original_tensors(name: str) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted((FIXTURES / name).glob("diffusion_pytorch_model*.safetensors")):
        out.update(load_file(str(shard)))
    return out


# ---- diagnoses


def test_original_repo_folder_is_named_with_the_convert_fix():
    report = inspect_json(FIXTURES / "flf2v")
    assert report["kind"] == "original repo folder" and not report["healthy"]
    comp = only_component(report)
    assert comp["layout"] == "original" and comp["variant"] == "flf2v" and comp["class"] == "WanTransformer3DModel"
    assert comp["weights"]["kind"] == "sharded" and comp["weights"]["problems"] == []
    assert comp["parameters"] == fixture_io("flf2v")[2]["num_parameters"]
    assert EMB_POS in comp["from_pretrained"]["unexpected"] and POS_EMBED in comp["from_pretrained"]["missing"]
    (finding,) = comp["findings"]
    assert finding["code"] == "original-layout" and finding["repair"] is None
    assert finding["fix"] == f"wan2diffusers convert {FIXTURES / 'flf2v'} OUT"
    text = run_cli("inspect", FIXTURES / "flf2v").stdout
    assert "transformer: original Wan" in text and "variant:  flf2v" in text and "wan2diffusers convert" in text


def test_healthy_folder_of_components_with_its_numbers(converted_root):
    report = inspect_json(converted_root / "vace")
    assert report["kind"] == "folder of component subfolders" and report["healthy"]
    comp = only_component(report)
    info = fixture_io("vace")[2]
    assert comp["layout"] == "diffusers" and comp["variant"] == "vace"
    assert comp["class"] == info["diffusers_reference_config"]["_class_name"]
    assert comp["parameters"] == info["num_parameters"]  # counted by the official code
    assert comp["tensors"] == info["state_dict_keys"] and comp["dtypes"] == {"F32": info["state_dict_keys"]}
    assert comp["findings"] == [] and comp["from_pretrained"] == {"missing": [], "unexpected": [], "mismatched": []}
    assert any("model_index.json" in n for n in report["notes"])
    # the component folder itself, and the human report
    assert only_component(inspect_json(converted_root / "vace" / "transformer"))["healthy"]
    text = run_cli("inspect", converted_root / "vace" / "transformer").stdout
    assert "from_pretrained: loads cleanly" in text and "healthy: nothing to repair" in text


def test_single_pth_file():
    comp = only_component(inspect_json(FIXTURES / "vae" / "Wan2.1_VAE.pth"))
    assert comp["component"] == "vae" and comp["where"] == "single file" and comp["layout"] == "original"
    assert comp["class"] == "AutoencoderKLWan" and comp["parameters"] == fixture_io("vae")[2]["num_parameters"]


def test_single_file_with_a_prefix(tmp_path):
    single = tmp_path / "wan2.1_i2v_tiny.safetensors"
    save_file({f"model.diffusion_model.{k}": v for k, v in original_tensors("i2v").items()}, str(single))
    report = inspect_json(single)
    comp = only_component(report)
    assert report["kind"] == "single file" and comp["prefix"] == "model.diffusion_model."
    assert "single file with key prefix 'model.diffusion_model.'" in comp["layout_label"]
    assert comp["layout"] == "original" and comp["variant"] == "i2v"
    assert codes(comp) == ["original-layout"] and comp["findings"][0]["fix"].startswith("wan2diffusers convert")


def test_mixed_half_converted_folder(converted_root, tmp_path):
    """Block 1 left with its original names: half converted."""
    folder = fresh(converted_root, "t2v", tmp_path / "mixed") / "transformer"
    path = folder / "diffusion_pytorch_model.safetensors"
    tensors = {k: v for k, v in load_file(str(path)).items() if not k.startswith("blocks.1.")}
    tensors.update({k: v for k, v in original_tensors("t2v").items() if k.startswith("blocks.1.")})
    save_file(tensors, str(path), metadata={"format": "pt"})
    comp = only_component(inspect_json(folder))
    assert comp["layout"] == "mixed" and "half-converted" in comp["layout_label"]
    finding = next(f for f in comp["findings"] if f["code"] == "original-layout")
    assert finding["repair"] is None and "blocks.1.self_attn.q.weight" in finding["keys"]
    assert all(k.startswith("blocks.1.") for k in finding["keys"])
    assert "blocks.1.attn1.to_q.weight" in comp["from_pretrained"]["missing"]


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_quantized_with_quanto(converted_root, tmp_path):
    comp = only_component(inspect_json(diffusers_int8(converted_root, tmp_path / "q8")))
    assert comp["quantized"] and comp["layout"] == "diffusers"
    assert "quantized with quanto (int8)" in comp["layout_label"]
    assert comp["variant"] == "t2v" and comp["healthy"] and comp["dtypes"]["I8"] > 0
    assert comp["parameters"] == fixture_io("t2v")[2]["num_parameters"]


def test_config_contradicting_the_weights(converted_root, tmp_path):
    folder = fresh(converted_root, "t2v", tmp_path / "t2v") / "transformer"
    cfg = json.loads((folder / "config.json").read_text())
    cfg["ffn_dim"] = 512
    (folder / "config.json").write_text(json.dumps(cfg))
    comp = only_component(inspect_json(folder))
    assert comp["config"]["contradictions"] == {"ffn_dim": {"config": 512, "weights": 256}}
    assert [m["key"] for m in comp["from_pretrained"]["mismatched"]][:1] == ["blocks.0.ffn.net.0.proj.weight"]
    (finding,) = comp["findings"]
    assert finding["repair"] == "complete-config"


def test_what_cannot_be_read_is_a_clean_error(tmp_path):
    bad = run_cli("inspect", tmp_path / "nothing", ok=False)
    assert "no such file or folder" in bad.stderr
    (tmp_path / "empty").mkdir()
    assert "no weights here" in run_cli("inspect", tmp_path / "empty", ok=False).stderr
