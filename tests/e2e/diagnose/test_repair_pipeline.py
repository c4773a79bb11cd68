"""repair turns a folder of component subfolders without model_index.json into a pipeline folder
(what `convert` would have written), or leaves it as is, naming what is missing."""

from __future__ import annotations

import json
import shutil

import torch

from conftest import run_cli
from repos import make_original_repo


def test_a_lost_model_index_and_scheduler_are_written_back(tmp_path, capfd):
    src = make_original_repo(tmp_path / "src", "t2v")
    out = tmp_path / "out"
    run_cli("convert", src, out)
    index = (out / "model_index.json").read_bytes()
    scheduler = (out / "scheduler" / "scheduler_config.json").read_bytes()
    (out / "model_index.json").unlink()
    shutil.rmtree(out / "scheduler")

    report = run_cli("inspect", out, "--json").json()
    assert report["kind"] == "folder of component subfolders" and report["model_index"] is False
    assert any("no model_index.json" in n and "repair" in n for n in report["notes"])

    dry = run_cli("repair", out, "--dry-run")
    assert "would write scheduler, model_index.json" in dry.stdout and not (out / "model_index.json").exists()

    result = run_cli("repair", out, "--json").json()
    assert result["ok"] and result["pipeline"] == {"left_as_is": None, "added": ["model_index.json", "scheduler"]}
    assert (out / "model_index.json").read_bytes() == index
    assert (out / "scheduler" / "scheduler_config.json").read_bytes() == scheduler
    assert not [p for p in tmp_path.iterdir() if ".repair-" in p.name]

    import diffusers

    pipe = diffusers.DiffusionPipeline.from_pretrained(str(out), dtype=torch.float32)
    assert type(pipe).__name__ == "WanPipeline"
    assert run_cli("inspect", out, "--json").json()["model_index"] is True


def test_a_folder_missing_a_component_is_left_as_is_with_the_reason(tmp_path):
    src = make_original_repo(tmp_path / "src", "i2v")
    out = tmp_path / "out"
    run_cli("convert", src, out, "--clip-heads", "2")
    (out / "model_index.json").unlink()
    shutil.rmtree(out / "image_encoder")
    before = sorted(p.name for p in out.iterdir())
    result = run_cli("repair", out)
    assert "pipeline: left as is" in result.stdout and "image_encoder" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == before
    assert json.loads((out / "transformer" / "config.json").read_text())["_class_name"] == "WanTransformer3DModel"
