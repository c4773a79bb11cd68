"""Hostile and broken input, second round (issue 17): each test reproduces one reported case and
asserts the behaviour: nothing lost, nothing silently wrong, one `error:` line, no traceback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import FIXTURES, run_cli
from test_hostile_input import PROBE, one_error

EXAMPLE = Path(__file__).parents[1] / "examples" / "Wan2.1-T2V-tiny"


def run_in(cwd: Path, *args, env=None) -> subprocess.CompletedProcess:
    """`wan2diffusers ARGS` in a subprocess standing in `cwd`."""
    return subprocess.run([sys.executable, "-c", PROBE.format(patch=""), *map(str, args)], capture_output=True,
                          text=True, timeout=300, cwd=cwd, env=env)


# --- 5. OUT holding the working directory ---------------------------------------------------------

def test_overwriting_a_parent_of_the_working_directory_is_refused_and_nothing_moves(tmp_path):
    out = tmp_path / "out"
    run_cli("convert", FIXTURES / "t2v", out, "--only", "transformer")
    (out / "sub").mkdir()
    (out / "sub" / "mine.txt").write_text("the user's file")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    r = run_in(out / "sub", "convert", FIXTURES / "t2v", "../..", "--overwrite")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    r = run_in(out / "sub", "convert", FIXTURES / "t2v", "..", "--overwrite")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    r = run_in(out / "sub", "convert", FIXTURES / "t2v", str(out), "--overwrite")
    assert r.returncode != 0 and "holds the current folder" in r.stderr
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert (out / "sub" / "mine.txt").read_text() == "the user's file"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_a_relative_out_is_replaced_where_it_was_named(tmp_path):
    """OUT given relative to the working directory is fixed once: the old OUT set aside cannot change it."""
    (tmp_path / "work").mkdir()
    run_in(tmp_path / "work", "convert", FIXTURES / "t2v", "out", "--only", "transformer")
    r = run_in(tmp_path / "work", "convert", FIXTURES / "t2v", "out", "--only", "transformer", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["out"]


# --- 24. a dangling symlink as OUT ----------------------------------------------------------------

@pytest.mark.parametrize("suffix", ["", ".gguf"])
def test_a_dangling_symlink_out_is_refused_before_any_work(tmp_path, suffix):
    out = tmp_path / f"out{suffix}"
    os.symlink(tmp_path / "nowhere", out)
    extra = ["--to", "gguf", "--quantize", "Q8_0"] if suffix else []
    for overwrite in ([], ["--overwrite"]):
        r = run_cli("convert", FIXTURES / "t2v", out, *extra, *overwrite, ok=False)
        one_error(r, "symbolic link", "does not exist")
        assert out.is_symlink() and not (tmp_path / "nowhere").exists()


# --- 17. SIGTERM and SIGKILL of a single-file GGUF write and of repair -----------------------------

TERM_WHILE_WRITING_GGUF = """
import wan2diffusers.gguf_out as g
real = g.append_tensor
def append_then_term(writer, t, bar):
    real(writer, t, bar)
    os.kill(os.getpid(), signal.{sig})
    import time; time.sleep(5)
g.append_tensor = append_then_term
"""


def probe(patch: str, *args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE.format(patch=patch), *map(str, args)], capture_output=True,
                          text=True, timeout=300, cwd=cwd)


def test_sigterm_during_a_gguf_write_leaves_nothing(tmp_path):
    out = tmp_path / "t2v.gguf"
    r = probe(TERM_WHILE_WRITING_GGUF.format(sig="SIGTERM"), "convert", FIXTURES / "t2v", out, "--to", "gguf",
              "--quantize", "Q8_0")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_what_a_killed_gguf_write_leaves_is_reported_and_removed_by_the_next(tmp_path):
    out = tmp_path / "t2v.gguf"
    r = probe(TERM_WHILE_WRITING_GGUF.format(sig="SIGKILL"), "convert", FIXTURES / "t2v", out, "--to", "gguf",
              "--quantize", "Q8_0")
    assert r.returncode == -9
    (partial,) = list(tmp_path.iterdir())
    assert partial.name.startswith(".t2v.gguf.partial-")
    inspected = run_cli("inspect", tmp_path, "--json", ok=None)
    assert partial.name in inspected.stdout + inspected.stderr  # named, never taken for a finished file
    again = run_cli("convert", FIXTURES / "t2v", out, "--to", "gguf", "--quantize", "Q8_0", "--json").json()
    assert not partial.exists() and any(str(partial) in n for n in again.get("notes", []) + again.get("stale", []))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t2v.gguf"]


def test_sigterm_during_repair_leaves_no_work_folder(tmp_path):
    pipe = tmp_path / "pipe"
    run_cli("convert", FIXTURES / "t2v", pipe, "--only", "transformer", "--max-shard-size", "400KB")
    index = pipe / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
    patch = """
import wan2diffusers.diagnose.repairs as r
real = r._write_index
def write_then_term(*a, **k):
    real(*a, **k)
    os.kill(os.getpid(), signal.SIGTERM)
    import time; time.sleep(5)
r._write_index = write_then_term
"""
    data = json.loads(index.read_text())
    data["weight_map"].popitem()
    index.write_text(json.dumps(data))
    before = index.read_bytes()
    r = probe(patch, "repair", pipe, "--backup", "none")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert not [p for p in (pipe).iterdir() if p.name.startswith(".")]
    assert index.read_bytes() == before


# --- 6. the layout cache cannot change what is written --------------------------------------------

def _entries(cache: Path, kind: str = ""):
    return [p for p in cache.glob("*.json") if not p.name.startswith(".") and kind in p.name]


def test_a_cache_entry_edited_with_a_recomputed_checksum_changes_nothing(tmp_path, monkeypatch):
    import hashlib

    cache = tmp_path / "cache"
    monkeypatch.setenv("WAN2DIFFUSERS_CACHE", str(cache))
    run_cli("convert", FIXTURES / "t2v", tmp_path / "a", "--only", "transformer", "--dtype", "bf16")
    good = (tmp_path / "a" / "transformer" / "config.json").read_text()
    for path in _entries(cache, "WanTransformer3DModel-"):
        if "signature" in path.name:
            continue
        entry = json.loads(path.read_text())
        cfg = json.loads(entry["layout"]["config_json"])
        cfg["num_layers"], cfg["evil"] = 40, "os.system"
        entry["layout"]["config_json"] = json.dumps(cfg)
        entry["layout"]["keep_in_fp32"] = []
        for k in ("sha256", "mac"):  # what a checksum-aware attacker recomputes
            entry[k] = hashlib.sha256(json.dumps(entry["layout"], sort_keys=True).encode()).hexdigest()
        path.write_text(json.dumps(entry))
    run_cli("convert", FIXTURES / "t2v", tmp_path / "b", "--only", "transformer", "--dtype", "bf16")
    assert (tmp_path / "b" / "transformer" / "config.json").read_text() == good
    a = load_file(str(tmp_path / "a" / "transformer" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert {k: v.dtype for k, v in a.items()} == {k: v.dtype for k, v in b.items()}
    assert any(str(v.dtype) == "torch.float32" for v in b.values())  # the norms diffusers keeps in fp32


def test_a_cache_key_file_others_can_read_disables_the_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("WAN2DIFFUSERS_CACHE", str(cache))
    run_cli("convert", FIXTURES / "t2v", tmp_path / "a", "--only", "transformer")
    key = cache / ".key"
    assert key.is_file() and key.stat().st_mode & 0o777 == 0o600
    from wan2diffusers.plan import layout_cache

    os.chmod(key, 0o644)
    assert layout_cache._secret(cache, create=False) is None


def test_a_folder_at_a_cache_entry_path_leaks_no_temporary_files(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("WAN2DIFFUSERS_CACHE", str(cache))
    run_cli("convert", FIXTURES / "t2v", tmp_path / "a", "--only", "transformer")
    for path in _entries(cache):
        path.unlink()
        path.mkdir()
    for k in range(2):
        run_cli("convert", FIXTURES / "t2v", tmp_path / f"b{k}", "--only", "transformer")
    assert not [p for p in cache.iterdir() if p.name.startswith(".tmp-")]


# --- 7. --to original checks what the record says ------------------------------------------------

@pytest.fixture
def converted_t2v(tmp_path):
    out = tmp_path / "d"
    run_cli("convert", FIXTURES / "t2v", out, "--only", "transformer")
    return out


def _edit_record(folder: Path, **fields):
    path = folder / "wan2diffusers.json"
    record = json.loads(path.read_text())
    record["components"][0]["original_config"].update(fields)
    path.write_text(json.dumps(record))


@pytest.mark.parametrize("field,value,says", [
    ("model_type", "i2v", "contradicts"),
    ("_class_name", "os.system", "contradicts"),
    ("text_len", -5, "expected a positive integer"),
    ("text_len", "512", "expected a positive integer"),
    ("_diffusers_version", "$(rm -rf ~)", "expected a version"),
    ("num_layers", 40, "contradicts"),
])
def test_values_from_the_record_must_agree_with_the_weights(converted_t2v, tmp_path, field, value, says):
    _edit_record(converted_t2v, **{field: value})
    r = run_cli("convert", converted_t2v, tmp_path / "o", "--to", "original", ok=False)
    one_error(r, "wan2diffusers.json", f"original_config.{field}", says)
    assert not (tmp_path / "o").exists()


def test_an_honest_record_still_gives_text_len(converted_t2v, tmp_path):
    _edit_record(converted_t2v, text_len=77)
    run_cli("convert", converted_t2v, tmp_path / "o", "--to", "original")
    assert json.loads((tmp_path / "o" / "config.json").read_text())["text_len"] == 77


# --- 14. malformed or deeply nested records and indexes -------------------------------------------

@pytest.mark.parametrize("record", [
    "[]", '{"record_version": 1}', '{"record_version": 1, "components": "x"}',
    "[" * 5000 + "]" * 5000, '{"record_version": ' + "[" * 50 + "1" + "]" * 50 + "}",
])
@pytest.mark.parametrize("command", ["to-original", "publish", "quantize"])
def test_a_broken_record_is_one_line_in_every_command(converted_t2v, tmp_path, record, command):
    (converted_t2v / "wan2diffusers.json").write_text(record)
    if command == "to-original":
        r = run_cli("convert", converted_t2v, tmp_path / "o", "--to", "original", ok=None)
    elif command == "publish":
        r = run_cli("publish", converted_t2v, "me/x", "--dry-run", "--no-measure", ok=None)
    else:
        r = run_cli("quantize", converted_t2v / "transformer", tmp_path / "q", "--weights", "int8", ok=None)
    assert "Traceback" not in r.stderr and not isinstance(r.exception, (RecursionError, TypeError, KeyError,
                                                                        AttributeError)), r.exception
    if r.exit_code != 0:
        one_error(r, "wan2diffusers.json")


def test_a_huge_record_is_refused_without_reading_it(converted_t2v, tmp_path):
    with open(converted_t2v / "wan2diffusers.json", "wb") as f:
        f.truncate(64 * 1024 * 1024)
    r = run_cli("publish", converted_t2v, "me/x", "--dry-run", "--no-measure", ok=False)
    one_error(r, "wan2diffusers.json", "too large")
