"""scripts/regenerate_mappings.py: the shipped tables produce exactly the parameters and buffers
the installed diffusers/transformers classes have at every published size (CI fails with a
readable list when an upgrade changes a layout), and a removed or renamed table row is caught."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

MAPPINGS = ROOT / "mappings"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("regenerate_mappings", ROOT / "scripts" / "regenerate_mappings.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def edited_tables(tmp_path: Path, component: str, old: str, new: str = "") -> Path:
    """A copy of mappings/ with one table row removed (new="") or changed."""
    folder = tmp_path / "tables"
    shutil.copytree(MAPPINGS, folder)
    path = folder / f"{component}.yaml"
    text = path.read_text()
    lines = [line for line in text.splitlines(keepends=True) if old in line]
    assert len(lines) == 1, f"{old!r} is on {len(lines)} lines of {component}.yaml"
    path.write_text(text.replace(lines[0], lines[0].replace(old, new) if new else ""))
    return folder


def test_the_shipped_tables_match_every_published_checkpoint(script, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert script.main(["--check"]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    # Wan 2.1: 6 transformers (T2V 1.3B/14B, I2V, FLF2V, VACE 1.3B/14B), the VAE, umT5-XXL, CLIP ViT-H/14;
    # Wan 2.2: the T2V-A14B and I2V-A14B experts, TI2V-5B, the 2.2 VAE
    assert "17/17 checkpoints match the tables" in out and "DRIFT" not in out
    assert "Wan2.2-TI2V-5B: t2v, 5B -> WanTransformer3DModel, 825 keys" in out
    assert "Wan2.2-I2V-A14B (each expert): t2v, 14B -> WanTransformer3DModel, 1095 keys" in out
    assert "Wan2.2_VAE.pth (Wan2.2-TI2V-5B): wan2.2 -> AutoencoderKLWan, 196 keys" in out
    # the published layouts: 30/40 blocks of 26 (+2 for I2V's image keys) tensors, umT5-XXL's 24
    # layers of 10 and 2 more, the ViT-H/14's 32 layers of 16 and 8 more
    assert "Wan2.1-T2V-1.3B: t2v, 1.3B -> WanTransformer3DModel, 825 keys" in out
    assert "umt5, umt5-xxl -> UMT5EncoderModel, 242 keys" in out
    assert "vit, ViT-H/14 -> CLIPVisionModelWithProjection, 520 keys" in out
    assert list(tmp_path.iterdir()) == []  # --check writes nothing


@pytest.mark.parametrize("component,row,appeared,unconsumed", [
    ("transformer", '{from: "{b}.{n}.cross_attn.norm_k.weight"', "blocks.{n}.attn2.norm_k.weight (x30)",
     "blocks.{n}.cross_attn.norm_k.weight (x30)"),
    ("vae", '{from: "conv2.{p}"', "post_quant_conv.weight (x1)", "conv2.weight (x1)"),
    ("text_encoder", '{from: "blocks.{n}.ffn.fc1.weight"', "encoder.block.{n}.layer.1.DenseReluDense.wi_1.weight (x24)",
     "blocks.{n}.ffn.fc1.weight (x24)"),
    ("image_encoder", '{from: "visual.post_norm.{p}"', "vision_model.post_layernorm.bias (x1)",
     "visual.post_norm.bias (x1)"),
])
def test_a_removed_row_fails_the_check_with_a_readable_list(script, capsys, tmp_path, component, row, appeared,
                                                            unconsumed):
    tables = edited_tables(tmp_path, component, row)
    assert script.main(["--check", "--tables", str(tables), "--only", component]) == 1
    out = capsys.readouterr().out
    assert f"appeared in the target, no rule produces it: {appeared}" in out, out
    assert f"source key no rule takes: {unconsumed}" in out, out
    assert "DRIFT" in out and "checkpoints match the tables; drift in" in out


def test_without_check_a_proposal_is_written_and_no_table_is_touched(script, capsys, tmp_path):
    tables = edited_tables(tmp_path, "transformer", 'to: "{b}.{n}.attn1.to_out.0.{p}"', 'to: "{b}.{n}.attn1.out.{p}"')
    before = {p: p.read_bytes() for p in [*tables.iterdir(), *MAPPINGS.iterdir()] if p.suffix == ".yaml"}
    out_file = tmp_path / "drift.yaml"
    assert script.main(["--tables", str(tables), "--only", "transformer", "--out", str(out_file)]) == 0
    assert "wrote" in capsys.readouterr().out
    proposal = yaml.safe_load(out_file.read_text())
    t2v = proposal["transformer"]["Wan2.1-T2V-1.3B"]
    assert {"target": "blocks.{n}.attn1.to_out.0.weight", "count": 30, "shape": "[1536, 1536]",
            "proposed_rule": '{from: "?", to: "blocks.{n}.attn1.to_out.0.weight"}'} in t2v["appeared"]
    vanished = {row["target"]: row for row in t2v["vanished"]}
    assert vanished["blocks.{n}.attn1.out.weight"]["from"] == "blocks.{n}.self_attn.o.weight"
    assert vanished["blocks.{n}.attn1.out.weight"]["count"] == 30
    assert 'to: "{b}.{n}.attn1.out.{p}"' in vanished["blocks.{n}.attn1.out.weight"]["rule"]
    assert proposal["transformer"]["Wan2.1-VACE-14B"]["appeared"][0]["shape"].startswith("[5120")
    after = {p: p.read_bytes() for p in [*tables.iterdir(), *MAPPINGS.iterdir()] if p.suffix == ".yaml"}
    assert after == before
