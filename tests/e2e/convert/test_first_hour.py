"""The first hour of a new user (issue 10): the import name, the Python API (the same reports as
`--json`, one exception type with the CLI's message), and the messages a new user meets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import wan2diffusers
from conftest import EXAMPLE, FIXTURES, rel_err, run_cli, TOL
from loading import load_converted, run_official_call

VOLATILE = {"seconds", "output", "created"}


def stable(report: dict) -> dict:
    """A report without what differs between two runs into two folders (times, output paths)."""
    def clean(x):
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items() if k not in VOLATILE}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x
    return clean(report)


def test_the_import_name_is_wan2diffusers_and_nothing_named_converter_is_installed():
    assert wan2diffusers.__name__ == "wan2diffusers" and callable(wan2diffusers.convert)
    package = Path(wan2diffusers.__file__).parent
    if package.name != "wan2diffusers":
        pytest.skip(f"an editable install: wan2diffusers is imported from the checkout's {package}")
    site = package.parent
    assert not (site / "converter").exists()  # what the design card's folder name would clash with
    record = next(site.glob("wan2diffusers-*.dist-info/RECORD")).read_text()
    tops = {line.split(",")[0].split("/")[0] for line in record.splitlines() if line}
    assert "wan2diffusers" in tops and "converter" not in tops
    assert (package / "mappings" / "transformer.yaml").is_file()


def test_api_convert_reproduces_the_official_output_and_matches_the_cli_report(tmp_path):
    report = wan2diffusers.convert(FIXTURES / "t2v", tmp_path / "api")
    assert isinstance(report, wan2diffusers.Report) and report.ok and report["ok"]
    out, expected = run_official_call(load_converted(Path(report.output) / "transformer"), "t2v")
    assert rel_err(out, expected) <= TOL
    cli = run_cli("convert", FIXTURES / "t2v", tmp_path / "cli", "--json").json()
    assert stable(report) == stable(cli)
    assert json.loads(json.dumps(report)) == report  # what --json prints


def test_api_inspect_verify_repair_quantize_return_the_json_reports(tmp_path):
    out = tmp_path / "pipe"
    lines = []
    wan2diffusers.convert(EXAMPLE, out, only=["transformer", "text_encoder"], log=lines.append)
    assert any(line.startswith("wrote transformer:") and "/s)" in line for line in lines)
    assert any("vae left out (--only)" in line for line in lines)
    inspected = wan2diffusers.inspect(out)
    assert inspected == run_cli("inspect", out, "--json").json() and inspected.healthy
    verified = wan2diffusers.verify(out, EXAMPLE, progress=False)
    assert verified.ok and verified.differences == [] and verified.components[0]["compared"] > 0
    assert wan2diffusers.repair(out).ok
    q = wan2diffusers.quantize(out, tmp_path / "q8", weights="int8")
    assert q.ok and q.quantization["weights"] == "int8" and q.record


def test_api_errors_are_one_exception_with_the_cli_message(tmp_path):
    with pytest.raises(wan2diffusers.ConversionError) as e:
        wan2diffusers.convert(tmp_path / "nothing-here", tmp_path / "out")
    cli = run_cli("convert", tmp_path / "nothing-here", tmp_path / "out", ok=False)
    assert cli.stderr.splitlines()[0] == f"error: {e.value}"
    with pytest.raises(wan2diffusers.ConversionError, match="expected a positive integer"):
        wan2diffusers.convert(FIXTURES / "t2v", tmp_path / "o", settings={"transformer": {"num_heads": "x"}})
    assert not (tmp_path / "o").exists()


def test_a_mistyped_local_path_is_named_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(EXAMPLE.parent.parent)
    r = run_cli("convert", "examples/Wan2.1-T2V-tin", tmp_path / "out", ok=False)
    line = r.stderr.splitlines()[0]
    assert "no such file or folder" in line and "examples/Wan2.1-T2V-tiny" in line
    assert "download" not in r.stdout + r.stderr and "Hub" not in line


def test_convert_of_an_already_converted_folder_says_what_to_run(tmp_path):
    run_cli("convert", EXAMPLE, tmp_path / "pipe")
    for path in (tmp_path / "pipe", tmp_path / "pipe" / "transformer"):
        line = run_cli("convert", path, tmp_path / "again", ok=False).stderr.splitlines()[0]
        assert "already a" in line and "wan2diffusers verify" in line and "wan2diffusers quantize" in line


def test_set_contradicting_config_json_is_refused_unless_overridden(tmp_path):
    r = run_cli("convert", FIXTURES / "t2v", tmp_path / "a", "--set", "transformer.num_heads=8", ok=False)
    assert "contradicts" in r.stderr and "num_heads=4" in r.stderr and "--override-config" in r.stderr
    assert not (tmp_path / "a").exists()
    ok = run_cli("convert", FIXTURES / "t2v", tmp_path / "b", "--set", "transformer.num_heads=8",
                 "--override-config", "--json").json()
    assert ok["components"][0]["config"]["num_attention_heads"] == 8
    assert any("overriding config.json" in n for n in ok["components"][0]["notes"])
    same = run_cli("convert", FIXTURES / "t2v", tmp_path / "c", "--set", "transformer.num_heads=4", "--json").json()
    assert same["components"][0]["config"]["num_attention_heads"] == 4


def test_an_unknowable_fact_suggests_set(tmp_path):
    src = tmp_path / "single.safetensors"
    from safetensors.torch import load_file, save_file
    tensors = {}
    for p in sorted((FIXTURES / "t2v").glob("diffusion_pytorch_model-*.safetensors")):
        tensors.update(load_file(str(p)))
    save_file(tensors, str(src))
    line = run_cli("convert", src, tmp_path / "out", ok=False).stderr.splitlines()[0]
    assert "--set transformer.num_heads=" in line


def test_repair_of_an_original_folder_says_its_refusal_once(tmp_path):
    r = run_cli("repair", EXAMPLE, ok=False)
    refusals = [line for line in r.stderr.splitlines() if "original repo folder" in line]
    assert len(refusals) == 1 and refusals[0].strip().startswith("transformer, vae, text_encoder:")
    assert (r.stdout + r.stderr).count("original repo folder") == 1  # said once in all (issue 17, item 22)


def test_inspect_does_not_promise_repair_when_nothing_is_marked(tmp_path):
    f = tmp_path / "transformer"
    f.mkdir()
    (f / "diffusion_pytorch_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}" + b" " * 14)
    text = run_cli("inspect", f).stdout
    assert "fixes those marked repair" not in text and "none of them is one repair can fix" in text


def test_repair_backup_none_reports_deleted_not_backed_up(tmp_path):
    run_cli("convert", EXAMPLE, tmp_path / "pipe", "--max-shard-size", "400KB")
    index = tmp_path / "pipe" / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["metadata"]["total_size"] += 1
    index.write_text(json.dumps(data))
    r = run_cli("repair", tmp_path / "pipe", "--backup", "none", "--json").json()
    (c,) = [c for c in r["components"] if c["component"] == "transformer"]
    assert c["backed_up"] == [] and c["deleted"] == [index.name] and r["backup"] is None


def test_quantize_takes_a_partial_conversion_and_publish_takes_its_transformer_folder(tmp_path):
    run_cli("convert", EXAMPLE, tmp_path / "only", "--only", "transformer")
    q = run_cli("quantize", tmp_path / "only", tmp_path / "q", "--weights", "int8", "--json").json()
    assert (tmp_path / "q" / "transformer" / "config.json").is_file() and q["record"]
    run_cli("quantize", tmp_path / "only" / "transformer", tmp_path / "qt", "--weights", "int8")
    dry = run_cli("publish", tmp_path / "qt", "me/qt", "--dry-run", "--no-measure", "--json").json()
    assert {f["path"] for f in dry["files"]} == {"README.md", "config.json", "diffusion_pytorch_model.safetensors"}
    card = (tmp_path / "qt" / "README.md").read_text()
    assert 'WanTransformer3DModel.from_pretrained("me/qt", dtype=torch.bfloat16)' in card
    assert "subfolder" not in card and "torch_dtype" not in card


def test_the_card_uses_the_dtype_keyword_the_installed_diffusers_takes(tmp_path):
    """diffusers 0.42 deprecates torch_dtype: loading with the card's keyword gives no FutureWarning."""
    import warnings

    import diffusers
    import torch

    from wan2diffusers.publishing.card import dtype_keyword

    run_cli("convert", FIXTURES / "t2v", tmp_path / "out")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        diffusers.WanTransformer3DModel.from_pretrained(str(tmp_path / "out" / "transformer"),
                                                        **{dtype_keyword(): torch.bfloat16})
    assert not [w for w in caught if "torch_dtype" in str(w.message)]
    shutil.rmtree(tmp_path / "out")
