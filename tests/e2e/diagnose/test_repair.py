"""`wan2diffusers repair`: each broken folder built from the fixtures (converted by the CLI, then
broken here) is diagnosed, repaired in place with a backup, reproduces the official outputs,
and passes `verify`."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLWan

from conftest import FIXTURES, TOL, fixture_io, rel_err, run_cli
from test_inspect import (EMB_POS, POS_EMBED, codes, converted_root, drop_key, fresh, inspect_json,  # noqa: F401
                          only_component)
from loading import load_converted, run_official_call

INDEX = "diffusion_pytorch_model.safetensors.index.json"


def official_output_ok(folder: Path, name: str) -> None:
    out, expected = run_official_call(load_converted(folder), name)
    assert rel_err(out, expected) <= TOL


def verify_ok(folder: Path, source: Path | None = None) -> dict:
    args = ["verify", folder, "--json"] + (["--source", source] if source else [])
    report = run_cli(*args).json()
    assert report["ok"] and report["differences"] == []
    return report


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_flf2v_missing_pos_embed_is_refused_without_source_and_restored_with_it(converted_root, tmp_path):
    root = fresh(converted_root, "flf2v-sharded", tmp_path / "flf2v")
    folder = root / "transformer"
    original_index = json.loads((folder / INDEX).read_text())
    drop_key(folder, POS_EMBED)
    comp = only_component(inspect_json(folder))
    assert comp["variant"] == "flf2v"  # from the config's pos_embed_seq_len, though the weights lack the key
    assert comp["from_pretrained"]["missing"] == [POS_EMBED]
    assert codes(comp) == ["missing-keys"]
    finding = comp["findings"][0]
    assert finding["repair"] == "restore-from-source" and finding["needs_source"] and EMB_POS in finding["fix"]
    assert comp["config"]["contradictions"] == {}  # the config is right: the weights are incomplete

    before = tree_digest(root)
    refused = run_cli("repair", root, ok=False)
    assert POS_EMBED in refused.stderr and "--source" in refused.stderr
    assert tree_digest(root) == before and sorted(p.name for p in tmp_path.iterdir()) == ["flf2v"]

    backup = tmp_path / "backup"
    done = run_cli("repair", root, "--source", FIXTURES / "flf2v", "--backup", backup, "--json").json()
    (c,) = done["components"]
    assert done["ok"] and c["repairs"] == ["restore-from-source"]
    index = json.loads((folder / INDEX).read_text())
    shard = index["weight_map"][POS_EMBED]  # one shard rewritten with the tensor added, the others untouched
    assert sorted(c["backed_up"]) == sorted([shard, INDEX])
    assert sorted(p.name for p in (backup / "transformer").iterdir()) == sorted([shard, INDEX])
    assert index["metadata"] == original_index["metadata"]  # total_size as convert wrote it
    assert {k: v for k, v in index["weight_map"].items() if k != POS_EMBED} == \
        {k: v for k, v in original_index["weight_map"].items() if k != POS_EMBED}
    official_output_ok(folder, "flf2v")
    verify_ok(root, FIXTURES / "flf2v")
    assert only_component(inspect_json(folder))["healthy"]


@pytest.mark.parametrize("breakage", ["lost", "wrong"])
def test_lost_or_wrong_index_is_rebuilt_from_the_shard_headers(converted_root, tmp_path, breakage):
    folder = fresh(converted_root, "flf2v-sharded", tmp_path / "flf2v") / "transformer"
    original_index = json.loads((folder / INDEX).read_text())
    if breakage == "lost":
        (folder / INDEX).unlink()
        expect = "no diffusion_pytorch_model.safetensors.index.json"
    else:
        wrong = json.loads(json.dumps(original_index))
        first, last = sorted(set(wrong["weight_map"].values()))[0], sorted(set(wrong["weight_map"].values()))[-1]
        moved = next(k for k, f in wrong["weight_map"].items() if f == first)
        wrong["weight_map"][moved] = last
        dropped = next(k for k, f in wrong["weight_map"].items() if f == last and k != moved)
        del wrong["weight_map"][dropped]
        (folder / INDEX).write_text(json.dumps(wrong))
        expect = f"points to the wrong shard for {moved}"
    comp = only_component(inspect_json(folder))
    assert codes(comp) == ["index"] and expect in comp["findings"][0]["message"]
    assert comp["findings"][0]["repair"] == "rebuild-index"
    assert comp["weights"]["problems"] and comp["from_pretrained"]["missing"] == []
    if breakage == "wrong":
        assert f"does not list {dropped}" in comp["findings"][0]["message"]
        with pytest.raises(Exception):  # what the user saw
            load_converted(folder)
    text = run_cli("repair", folder, "--backup", "none").stdout
    assert "rebuilt diffusion_pytorch_model.safetensors.index.json from the shard headers" in text
    assert json.loads((folder / INDEX).read_text()) == original_index  # exactly what convert wrote
    assert not list(tmp_path.glob("*.backup-*"))
    official_output_ok(folder, "flf2v")
    verify_ok(folder, FIXTURES / "flf2v")


def test_config_missing_fields_are_derived_from_the_weights(converted_root, tmp_path):
    folder = fresh(converted_root, "flf2v", tmp_path / "flf2v") / "transformer"
    cfg = json.loads((folder / "config.json").read_text())
    gone = ["in_channels", "text_dim", "image_dim", "added_kv_proj_dim", "pos_embed_seq_len", "cross_attn_norm", "qk_norm"]
    for k in gone:
        del cfg[k]
    (folder / "config.json").write_text(json.dumps(cfg))
    comp = only_component(inspect_json(folder))
    assert sorted(comp["config"]["missing_fields"]) == sorted(gone)
    assert codes(comp) == ["config"] and comp["findings"][0]["repair"] == "complete-config"
    fp = comp["from_pretrained"]
    assert fp["mismatched"] and fp["unexpected"]  # the class defaults (14B, no image input) do not fit
    done = run_cli("repair", folder, "--json").json()
    (backup,) = folder.parent.parent.glob("flf2v.backup-*")  # beside the model folder, not inside it
    backup = backup / "transformer"
    assert json.loads((backup / "config.json").read_text()) == cfg and done["components"][0]["backed_up"] == ["config.json"]
    written = json.loads((folder / "config.json").read_text())
    for field, value in fixture_io("flf2v")[2]["diffusers_reference_config"].items():
        assert written[field] == value, field
    official_output_ok(folder, "flf2v")
    verify_ok(folder, FIXTURES / "flf2v")


def test_config_that_cannot_be_derived_is_refused_with_the_reason(converted_root, tmp_path):
    """dim 128 is no published size: without config.json the head count is unknowable."""
    folder = fresh(converted_root, "vace", tmp_path / "vace") / "transformer"
    (folder / "config.json").unlink()
    comp = only_component(inspect_json(folder))
    assert comp["config"]["state"] == "absent" and codes(comp) == ["config"]
    assert comp["findings"][0]["repair"] is None and "head count" in comp["findings"][0]["fix"]
    refused = run_cli("repair", folder, ok=False)
    assert "no config.json" in refused.stderr and "num_heads" in refused.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["diffusion_pytorch_model.safetensors"]


def test_leftover_original_shards_are_moved_into_the_backup(converted_root, tmp_path):
    """A Diffusers single file with the original shards and index beside it (copied in before
    converting): diffusers opens the index and loads the original keys."""
    folder = fresh(converted_root, "t2v", tmp_path / "t2v") / "transformer"
    stray = [p for p in (FIXTURES / "t2v").iterdir() if p.name.startswith("diffusion_pytorch_model")]
    for p in stray:
        shutil.copy(p, folder / p.name)
    comp = only_component(inspect_json(folder))
    assert comp["weights"]["kind"] == "single file" and comp["from_pretrained_opens"] == INDEX
    assert codes(comp) == ["leftovers"] and sorted(comp["leftovers"]) == sorted(p.name for p in stray)
    assert f"from_pretrained would open {INDEX} instead of diffusion_pytorch_model.safetensors" in comp["findings"][0]["message"]
    with pytest.raises(AssertionError, match="missing_keys"):
        load_converted(folder)
    run_cli("repair", folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    (backup,) = folder.parent.parent.glob("t2v.backup-*")  # beside the model folder, not inside it
    backup = backup / "transformer"
    assert sorted(p.name for p in backup.iterdir()) == sorted(p.name for p in stray)
    official_output_ok(folder, "t2v")
    verify_ok(folder, FIXTURES / "t2v")


def test_original_weights_where_diffusers_ones_belong_are_converted_in_place(tmp_path):
    pipe = tmp_path / "pipe"
    (pipe / "transformer").mkdir(parents=True)
    (pipe / "vae").mkdir()
    originals = [p for p in (FIXTURES / "t2v").iterdir() if p.name.startswith("diffusion_pytorch_model")
                 or p.name == "config.json"]
    for p in originals:
        shutil.copy(p, pipe / "transformer" / p.name)
    shutil.copy(FIXTURES / "vae" / "Wan2.1_VAE.pth", pipe / "vae")
    (pipe / "transformer" / "README.md").write_text("notes\n")
    report = inspect_json(pipe)
    assert report["kind"] == "folder of component subfolders"
    for comp in report["components"]:
        assert comp["layout"] == "original" and codes(comp) == ["original-layout"]
        assert comp["findings"][0]["repair"] == "convert-in-place"
    assert run_cli("repair", pipe, "--dry-run").stdout.count("would apply convert-in-place") == 2
    assert not list(tmp_path.glob("pipe.backup-*"))

    run_cli("repair", pipe)
    (backup,) = tmp_path.glob("pipe.backup-*")
    assert sorted(p.name for p in (backup / "transformer").iterdir()) == sorted(p.name for p in originals)
    assert [p.name for p in (backup / "vae").iterdir()] == ["Wan2.1_VAE.pth"]
    assert sorted(p.name for p in (pipe / "transformer").iterdir()) == [
        "README.md", "config.json", "diffusion_pytorch_model.safetensors"]
    official_output_ok(pipe / "transformer", "t2v")
    inputs, expected, _ = fixture_io("vae")
    vae = AutoencoderKLWan.from_pretrained(str(pipe / "vae"), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        assert rel_err(vae.encode(inputs["sample"]).latent_dist.mean, expected["mu"]) <= TOL
    verify_ok(pipe / "transformer", FIXTURES / "t2v")
    verify_ok(pipe / "vae", FIXTURES / "vae")
    assert inspect_json(pipe)["healthy"]


def test_an_original_repo_folder_is_refused_with_the_convert_command(tmp_path):
    src = shutil.copytree(FIXTURES / "i2v", tmp_path / "i2v")
    before = tree_digest(src)
    refused = run_cli("repair", src, ok=False)
    assert "wan2diffusers convert" in refused.stderr and "original repo folder" in refused.stderr
    assert tree_digest(src) == before


def test_a_healthy_folder_is_left_alone(converted_root, tmp_path):
    root = fresh(converted_root, "t2v", tmp_path / "t2v")
    before = tree_digest(root)
    assert "healthy, nothing to do" in run_cli("repair", root).stdout
    assert tree_digest(root) == before and sorted(p.name for p in tmp_path.iterdir()) == ["t2v"]


def test_vae_and_clip_configs_are_completed_from_their_weights(tmp_path):
    """The other tables' facts run on Diffusers/transformers keys mapped backwards (the VAE's
    nested decoder indices, CLIP's transposed projection); the head count, which the weights
    cannot tell, stays what config.json says."""
    import transformers

    pipe = tmp_path / "pipe"
    run_cli("convert", FIXTURES / "vae" / "Wan2.1_VAE.pth", pipe)
    run_cli("convert", FIXTURES / "clip" / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth", pipe / "x",
            "--clip-heads", "2")
    (pipe / "x" / "image_encoder").rename(pipe / "image_encoder")
    gone = {"vae": ["base_dim", "dim_mult", "num_res_blocks", "temperal_downsample"],
            "image_encoder": ["hidden_size", "intermediate_size", "image_size", "patch_size", "projection_dim"]}
    for comp, fields in gone.items():
        path = pipe / comp / "config.json"
        cfg = json.loads(path.read_text())
        for k in fields:
            del cfg[k]
        path.write_text(json.dumps(cfg))
    report = inspect_json(pipe)
    by = {c["component"]: c for c in report["components"]}
    for comp, fields in gone.items():
        assert codes(by[comp]) == ["config"] and sorted(by[comp]["config"]["missing_fields"]) == sorted(fields)
    run_cli("repair", pipe, "--backup", "none")
    assert inspect_json(pipe)["healthy"]
    for comp, name in (("vae", "vae"), ("image_encoder", "clip")):
        info = fixture_io(name)[2]
        written = json.loads((pipe / comp / "config.json").read_text())
        for field, value in (info.get("diffusers_reference_config") or info["transformers_reference_config"]).items():
            if field != "_class_name":
                assert written[field] == value, (comp, field)
    inputs, expected, _ = fixture_io("vae")
    vae = AutoencoderKLWan.from_pretrained(str(pipe / "vae"), torch_dtype=torch.float32).eval()
    inputs_c, expected_c, _ = fixture_io("clip")
    clip = transformers.CLIPVisionModelWithProjection.from_pretrained(str(pipe / "image_encoder")).eval()
    with torch.no_grad():
        assert rel_err(vae.encode(inputs["sample"]).latent_dist.mean, expected["mu"]) <= TOL
        hidden = clip(pixel_values=inputs_c["pixel_values"], output_hidden_states=True).hidden_states[-2]
    assert rel_err(hidden, expected_c["visual_31"]) <= TOL
    verify_ok(pipe / "vae", FIXTURES / "vae")
    verify_ok(pipe / "image_encoder", FIXTURES / "clip")
