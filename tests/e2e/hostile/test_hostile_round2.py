"""Hostile and broken input, second round (issue 17): each test reproduces one reported case and
asserts the behaviour: nothing lost, nothing silently wrong, one `error:` line, no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import EXAMPLE, FIXTURES, run_cli
from test_hostile_input import PROBE, one_error



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


# --- 8. a cast that overflows is refused, and verify names Inf where the source is finite -----------

@pytest.fixture
def huge_t2v(tmp_path):
    """The t2v fixture with one value beyond the float16 range in a block weight."""
    from safetensors.torch import save_file

    from test_hostile_input import SHARD1, T2V_FILES

    src = tmp_path / "huge"
    src.mkdir()
    for name in T2V_FILES:
        (src / name).write_bytes((FIXTURES / "t2v" / name).read_bytes())
    tensors = load_file(str(src / SHARD1))
    key = next(k for k in tensors if k.endswith("self_attn.q.weight"))
    tensors[key][0, 0] = 1.0e5
    save_file(tensors, str(src / SHARD1), metadata={"format": "pt"})
    return src, key


@pytest.mark.parametrize("how", [["--dtype", "fp16"], ["--dtype", "fp16", "--quantize", "int8"],
                                 ["--to", "gguf", "--quantize", "F16"]])
def test_a_cast_beyond_the_fp16_range_is_refused(huge_t2v, tmp_path, how):
    src, key = huge_t2v
    out = tmp_path / ("o.gguf" if "gguf" in how else "o")
    r = run_cli("convert", src, out, "--only", "transformer", *how, ok=False)
    one_error(r, key, "float16 range", "Inf")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".o")]


def test_bf16_keeps_the_value_and_verify_names_an_inf_the_source_does_not_have(huge_t2v, tmp_path):
    import torch
    from safetensors.torch import save_file

    src, key = huge_t2v
    out = tmp_path / "o"
    run_cli("convert", src, out, "--only", "transformer", "--dtype", "bf16")
    path = out / "transformer" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(path))
    from wan2diffusers.mapping.tables import load_table  # noqa: F401 - the key's Diffusers name below

    target = next(k for k in tensors if k.endswith("attn1.to_q.weight") and k.startswith(f"blocks.{key.split('.')[1]}."))
    assert float(tensors[target][0, 0]) == pytest.approx(1.0e5, rel=1e-2)
    tensors[target][0, 0] = float("inf")
    save_file(tensors, str(path), metadata={"format": "pt"})
    v = run_cli("verify", out, "--source", src, "--json", ok=False)
    assert any(d["key"] == target and "Inf where the source has finite" in d["problem"]
               for d in v.json()["differences"])
    assert torch.isinf(tensors[target]).any()


# --- 16. a device or FIFO in a folder copied beside the weights ------------------------------------

@pytest.mark.parametrize("direction", ["forward", "back"])
def test_a_link_to_dev_zero_in_the_tokenizer_is_named_not_copied(tmp_path, direction):
    from repos import make_original_repo

    src = make_original_repo(tmp_path / "src", "t2v")
    if direction == "forward":
        tok = next(p for p in src.rglob("*") if p.is_dir() and p.name == "umt5-xxl")
        os.symlink("/dev/zero", tok / "evil.json")
        r = run_cli("convert", src, tmp_path / "o", ok=False)
    else:
        run_cli("convert", src, tmp_path / "d")
        os.symlink("/dev/zero", tmp_path / "d" / "tokenizer" / "evil.json")
        r = run_cli("convert", tmp_path / "d", tmp_path / "o", "--to", "original", ok=False)
    one_error(r, "evil.json", "character device")
    assert not (tmp_path / "o").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.")]


# --- 9 and 18. every option is honoured or refused in one line ------------------------------------

@pytest.fixture(scope="module")
def diffusers_t2v(tmp_path_factory):
    out = tmp_path_factory.mktemp("opts") / "d"
    run_cli("convert", FIXTURES / "t2v", out, "--only", "transformer")
    return out


@pytest.mark.parametrize("to,args,says", [
    ("original", ["--set", "transformer.num_heads=4"], "--set does not apply to --to original"),
    ("original", ["--flow-shift", "5"], "--flow-shift does not apply"),
    ("original", ["--clip-heads", "2"], "--clip-heads does not apply"),
    ("original", ["--quantize", "int8"], "--quantize does not apply"),
    ("original", ["--backend", "quanto"], "--backend does not apply"),
    ("comfyui", ["--max-shard-size", "1MB"], "--max-shard-size does not apply"),
    ("gguf", ["--quantize", "Q8_0", "--dtype", "bf16"], "--dtype does not apply"),
    ("gguf", ["--quantize", "Q8_0", "--max-shard-size", "1MB"], "--max-shard-size does not apply"),
    ("gguf", ["--quantize", "Q8_0", "--only", "vae"], "--to gguf writes the transformer only"),
    ("gguf", ["--quantize", "Q8_0", "--set", "transformer.num_heads=4"], "--set does not apply"),
    ("diffusers", ["--only", "vae,nope"], "unknown component"),
    ("diffusers", ["--only", ""], "give component names"),
    ("diffusers", ["--only", "transformer,"], "give component names"),
    ("diffusers", ["--override-config"], "give --set too"),
])
def test_an_option_the_output_cannot_honour_is_refused(diffusers_t2v, tmp_path, to, args, says):
    src = FIXTURES / "t2v" if to == "diffusers" else diffusers_t2v
    out = tmp_path / ("o.gguf" if to == "gguf" else "o")
    r = run_cli("convert", src, out, "--to", to, *args, ok=False)
    one_error(r, says)
    assert not out.exists()


@pytest.mark.parametrize("to", ["original", "gguf"])
def test_check_finite_is_honoured_by_every_output(diffusers_t2v, tmp_path, to):
    args = ["--quantize", "Q8_0"] if to == "gguf" else []
    out = tmp_path / ("o.gguf" if to == "gguf" else "o")
    r = run_cli("convert", diffusers_t2v, out, "--to", to, *args, "--check-finite", "--json").json()
    assert r["finite_check"] == "done"
    text = run_cli("convert", diffusers_t2v, tmp_path / "p", "--to", "original", "--check-finite").stdout
    assert "no NaN or Inf in the" in text


def test_check_finite_names_a_nan_on_the_way_back(diffusers_t2v, tmp_path):
    import shutil

    import torch
    from safetensors.torch import save_file

    d = tmp_path / "d"
    shutil.copytree(diffusers_t2v, d)
    path = d / "transformer" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(path))
    key = sorted(tensors)[0]
    tensors[key].view(-1)[0] = float("nan")
    save_file(tensors, str(path), metadata={"format": "pt"})
    r = run_cli("convert", d, tmp_path / "o", "--to", "original", "--check-finite")
    assert key in r.stderr and "NaN or Inf" in r.stderr
    assert torch.isnan(load_file(str(path))[key]).any()


# --- 12. a pickle that would crash the interpreter ------------------------------------------------

def _pth_with_pickle(path: Path, pkl: bytes) -> Path:
    import zipfile

    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pkl)
        zf.writestr("archive/version", "3\n")
    return path


DEEP = 300_000
HOSTILE_PICKLES = {
    # {((((1,),),)...): 2}: hashing the key recursed until the interpreter crashed (segfault)
    "deep tuple key": b"\x80\x02}" + b"K\x01" + b"\x85" * DEEP + b"K\x02s.",
    "deep tuple key (20k)": b"\x80\x02}" + b"K\x01" + b"\x85" * 20_000 + b"K\x02s.",
    # {<a 5000-digit int>: 2}: ValueError traceback
    "long int key": b"\x80\x02}" + b"\x8b" + (2100).to_bytes(4, "little") + b"\x7f" * 2100 + b"K\x02s.",
    # {"a": [[[[...]]]]}
    "deep list value": b"\x80\x02}X\x01\x00\x00\x00a" + b"]" * 50_000 + b"a" * 49_999 + b"s.",
    "deep tuple in SETITEMS": b"\x80\x02}(" + b"K\x01" + b"\x85" * DEEP + b"K\x02u.",
}


@pytest.mark.parametrize("name", list(HOSTILE_PICKLES))
def test_a_hostile_pickle_is_one_line_and_never_crashes(tmp_path, name):
    path = _pth_with_pickle(tmp_path / "Wan2.1_VAE.pth", HOSTILE_PICKLES[name])
    r = subprocess.run([sys.executable, "-c", PROBE.format(patch=""), "inspect", str(path)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])  # not a signal, not a traceback
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0], r.stderr[-2000:]


def test_a_float8_pth_written_by_torch_save_is_read():
    """torch.save writes float8 tensors with _rebuild_tensor_v3 over an untyped storage."""
    import tempfile

    import torch

    from wan2diffusers.read.pth_file import read_pth_index
    from wan2diffusers.read.safetensors_file import read_tensor

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "f8.pth"
        a = torch.randn(4, 6).to(torch.float8_e4m3fn)
        b = torch.randn(5)
        torch.save({"a": a, "b": b, "c": a[1:3]}, path)
        refs = read_pth_index(path)
        assert refs["a"].dtype == "F8_E4M3" and refs["b"].dtype == "F32"
        assert torch.equal(read_tensor(refs["a"]).view(torch.uint8), a.view(torch.uint8))
        assert torch.equal(read_tensor(refs["b"]), b)
        assert torch.equal(read_tensor(refs["c"]).view(torch.uint8), a[1:3].view(torch.uint8))


# --- 13. F8 tensors in a folder whose original file is a .pth ---------------------------------------

def test_f8_tensors_bound_for_a_pth_are_refused_before_planning_is_said_done(tmp_path):
    import torch
    from safetensors.torch import save_file

    from repos import make_original_repo

    src = make_original_repo(tmp_path / "src", "t2v")
    run_cli("convert", src, tmp_path / "d", "--only", "vae")
    path = next((tmp_path / "d" / "vae").glob("*.safetensors"))
    tensors = load_file(str(path))
    key = next(k for k, v in tensors.items() if v.dim() == 5)
    tensors[key] = tensors[key].to(torch.float8_e4m3fn)
    save_file(tensors, str(path), metadata={"format": "pt"})
    r = run_cli("convert", tmp_path / "d", tmp_path / "o", "--to", "original", ok=False)
    one_error(r, key, "F8_E4M3", ".pth")
    assert not (tmp_path / "o").exists()


# --- 10. an untied umT5 embedding goes back as the values the encoder runs on -----------------------

@pytest.mark.parametrize("differ", [True, False])
def test_an_untied_embed_tokens_is_what_goes_back(tmp_path, differ):
    import torch
    from safetensors.torch import save_file
    from transformers import UMT5EncoderModel

    from wan2diffusers.read.pth_file import read_pth_index
    from wan2diffusers.read.safetensors_file import read_tensor

    run_cli("convert", FIXTURES / "t5" / "models_t5_umt5-xxl-enc-bf16.pth", tmp_path / "d")
    path = tmp_path / "d" / "text_encoder" / "model.safetensors"
    tensors = load_file(str(path))
    other = tensors["shared.weight"] * (2 if differ else 1)
    tensors["encoder.embed_tokens.weight"] = other
    save_file(tensors, str(path), metadata={"format": "pt"})
    runs_on = UMT5EncoderModel.from_pretrained(str(path.parent)).encoder.embed_tokens.weight
    assert torch.equal(runs_on, other)  # transformers keeps the copy when it differs
    r = run_cli("convert", tmp_path / "d", tmp_path / "o", "--to", "original", "--json").json()
    (pth,) = (tmp_path / "o").glob("*.pth")
    written = read_tensor(read_pth_index(pth)["token_embedding.weight"])
    assert torch.equal(written, other)
    assert any("encoder.embed_tokens.weight differs" in n for n in r["notes"]) == differ


# --- 15. impossible sizes in a Diffusers config.json are refused before any model is built -----------

@pytest.mark.parametrize("command", ["inspect", "verify", "to-original", "quantize", "repair"])
def test_an_impossible_layer_count_is_refused_in_seconds(diffusers_t2v, tmp_path, command):
    import shutil
    import time

    d = tmp_path / "d"
    shutil.copytree(diffusers_t2v, d)
    cfg_path = d / "transformer" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["num_layers"] = 20000
    cfg_path.write_text(json.dumps(cfg))
    started = time.perf_counter()
    args = {"inspect": ["inspect", d, "--json"], "verify": ["verify", d, "--json"],
            "to-original": ["convert", d, tmp_path / "o", "--to", "original"],
            "quantize": ["quantize", d / "transformer", tmp_path / "q", "--weights", "int8"],
            "repair": ["repair", d, "--dry-run", "--json"]}[command]
    r = run_cli(*args, ok=None)
    assert time.perf_counter() - started < 30
    assert "Traceback" not in r.stderr and not isinstance(r.exception, (RecursionError, MemoryError)), r.exception
    if command == "repair":  # repair would write config.json from the weights
        assert "complete-config" in r.stdout
    else:
        assert "num_layers=20000" in r.stdout + r.stderr
    assert not (tmp_path / "o").exists() and not (tmp_path / "q").exists()


# --- 11. "healthy" means "loads as written" -----------------------------------------------------

@pytest.fixture(scope="module")
def int8_t2v(tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "q"
    run_cli("convert", FIXTURES / "t2v", out, "--only", "transformer", "--quantize", "int8")
    return out


def _edited_config(src: Path, tmp_path: Path, edit) -> Path:
    import shutil

    d = tmp_path / "edited"
    shutil.copytree(src, d)
    path = d / "transformer" / "config.json"
    cfg = json.loads(path.read_text())
    edit(cfg)
    path.write_text(json.dumps(cfg))
    return d


def _torchao_type(name):
    def edit(cfg):
        cfg["quantization_config"] = {"quant_method": "torchao", "modules_to_not_convert": None,
                                      "quant_type": {"default": {"_type": name, "_version": 2, "_data": {}}},
                                      "quant_type_kwargs": {}}
    return edit


@pytest.mark.parametrize("case,edit,says", [
    ("other backend", lambda c: c["quantization_config"].update(quant_method="quanto", weights_dtype="int8"),
     "stored in the torchao format"),
    ("policy edited", lambda c: c["quantization_config"].update(modules_to_not_convert=[]),
     "would quantize other modules"),
    ("config dropped", lambda c: c.pop("quantization_config"), "no quantization_config"),
])
def test_a_quantized_folder_whose_config_does_not_match_is_not_healthy(int8_t2v, tmp_path, case, edit, says):
    d = _edited_config(int8_t2v, tmp_path, edit)
    report = run_cli("inspect", d, "--json").json()
    assert not report["healthy"]
    assert any(says in f["message"] for c in report["components"] for f in c["findings"]), report
    run_cli("verify", d, ok=False)


@pytest.mark.parametrize("name,says", [("os.system", "which torchao does not have"),
                                       ("Int8WeightOnlyConfig", "but they are float")])
def test_a_float_folder_with_a_quantization_config_is_not_healthy(diffusers_t2v, tmp_path, name, says):
    d = _edited_config(diffusers_t2v, tmp_path, _torchao_type(name))
    report = run_cli("inspect", d, "--json").json()
    assert not report["healthy"]
    assert any("but they are float" in f["message"] for c in report["components"] for f in c["findings"])


def test_model_index_naming_a_wrong_class_is_not_healthy_and_repair_fixes_it(tmp_path):
    from repos import make_original_repo

    src = make_original_repo(tmp_path / "src", "t2v")
    pipe = tmp_path / "pipe"
    run_cli("convert", src, pipe)
    index_path = pipe / "model_index.json"
    index = json.loads(index_path.read_text())
    index["transformer"] = ["diffusers", "AutoencoderKLWan"]
    index["_class_name"] = "WanVACEPipeline"
    index_path.write_text(json.dumps(index))
    report = run_cli("inspect", pipe, "--json").json()
    assert not report["healthy"]
    problems = " ".join(report["model_index_problems"])
    assert "transformer" in problems and "AutoencoderKLWan" in problems and "WanVACEPipeline" in problems
    run_cli("verify", pipe, ok=False)
    run_cli("repair", pipe, "--backup", tmp_path / "bk")
    assert run_cli("inspect", pipe, "--json").json()["healthy"]
    fixed = json.loads(index_path.read_text())
    assert fixed["transformer"] == ["diffusers", "WanTransformer3DModel"] and fixed["_class_name"] == "WanPipeline"


# --- 19. library import noise stays out of our output ---------------------------------------------

def test_no_library_noise_in_what_the_commands_print(tmp_path):
    noise = ("Failed to load", "_pytree", "Unable to import", "triton", "register_constant")
    runs = [("convert", EXAMPLE, tmp_path / "p"), ("convert", FIXTURES / "t2v", tmp_path / "q", "--quantize", "int8"),
            ("publish", tmp_path / "q", "me/x", "--dry-run"), ("verify", tmp_path / "q", "--source", FIXTURES / "t2v")]
    for args in runs:
        r = run_in(tmp_path, *args)
        assert r.returncode == 0, r.stderr
        for word in noise:
            assert word not in r.stdout + r.stderr, (args, word, r.stderr)


# --- 20. Wan 2.2 I2V-A14B and TI2V-5B are said to be what they are --------------------------------

@pytest.mark.parametrize("name,kind", [("i2v_a14b", "i2v (Wan 2.2 I2V"), ("ti2v_5b", "ti2v (Wan 2.2 TI2V-5B")])
def test_wan22_models_built_from_t2v_blocks_are_named_for_what_they_are(tmp_path, name, kind):
    from repos import make_original_repo

    src = make_original_repo(tmp_path / "src", name)
    r = run_cli("convert", src, tmp_path / "o", "--dry-run")
    assert f"detected: {kind}" in r.stdout and "detected: t2v" not in r.stdout
    assert "model_type" not in r.stdout  # no contradiction to note: config.json says what the weights are


# --- 21. publish says when it could not measure the fixture error -----------------------------------

def test_publish_says_on_the_console_when_no_fixture_was_found(int8_t2v, tmp_path, monkeypatch):
    from wan2diffusers.publishing import measure

    monkeypatch.setattr(measure, "default_fixtures", lambda: None)  # as installed from a wheel
    r = run_cli("publish", int8_t2v, "me/x", "--dry-run")
    assert "the fixture error was not measured" in r.stdout and "--fixtures" in r.stdout


# --- 22. repair takes the --set its refusal recommends, and says the refusal once --------------------

def test_repair_honours_the_set_its_refusal_recommends(tmp_path):
    import shutil

    folder = tmp_path / "p" / "transformer"
    folder.mkdir(parents=True)
    for name in ("diffusion_pytorch_model-00001-of-00002.safetensors",
                 "diffusion_pytorch_model-00002-of-00002.safetensors",
                 "diffusion_pytorch_model.safetensors.index.json"):  # no config.json: the head count is unknown
        shutil.copy(FIXTURES / "t2v" / name, folder / name)
    r = run_cli("repair", tmp_path / "p", "--backup", "none", ok=False)
    assert (r.stdout + r.stderr).count("not a known size") == 1
    assert "--set transformer.num_heads=" in r.stderr
    run_cli("repair", tmp_path / "p", "--backup", "none", "--set", "transformer.num_heads=4")
    assert json.loads((folder / "config.json").read_text())["num_attention_heads"] == 4
    assert run_cli("inspect", folder, "--json").json()["healthy"]


# --- 24. small ones ---------------------------------------------------------------------------------

def test_an_index_naming_a_missing_file_says_so(tmp_path):
    import shutil

    from test_hostile_input import INDEX, T2V_FILES

    src = tmp_path / "t2v"
    src.mkdir()
    for name in T2V_FILES:
        shutil.copy(FIXTURES / "t2v" / name, src / name)
    data = json.loads((src / INDEX).read_text())
    key = next(iter(data["weight_map"]))
    data["weight_map"][key] = "diffusion_pytorch_model-00009-of-00009.safetensors"
    (src / INDEX).write_text(json.dumps(data))
    report = run_cli("inspect", src, "--json").json()
    problems = [f["message"] for c in report["components"] for f in c["findings"]]
    assert any("00009-of-00009.safetensors, which does not exist here" in p for p in problems)
    assert not any("wrong shard" in p for p in problems)


def test_a_value_beyond_the_integer_range_is_named_with_the_range(tmp_path):
    r = run_cli("convert", FIXTURES / "t2v", tmp_path / "o", "--set", "transformer.num_heads=4000000000", ok=False)
    one_error(r, "4000000000", "up to 2147483647")


def test_repair_inside_the_folder_it_swaps_is_refused_before_any_change(tmp_path):
    out = tmp_path / "r"
    run_cli("convert", FIXTURES / "t2v", out, "--only", "transformer", "--max-shard-size", "400KB")
    index = out / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"].popitem()
    index.write_text(json.dumps(data))
    before = index.read_bytes()
    r = run_in(out / "transformer", "repair", ".")
    assert r.returncode == 1 and "current folder is inside it" in r.stderr and "busy" not in r.stderr
    assert index.read_bytes() == before
    assert run_in(out, "repair", "transformer").returncode == 0


def test_a_misaligned_gguf_tensor_is_not_healthy(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "bad.gguf"
    run_cli("convert", FIXTURES / "t2v", path, "--to", "gguf", "--quantize", "F32")
    reader = gguf.GGUFReader(str(path))
    t = reader.tensors[1]
    raw = bytearray(path.read_bytes())
    # the tensor info's offset field (uint64 after name, dims, type) moved off the 32-byte alignment
    off_field = t.field.parts[-1]
    pos = off_field.ctypes.data - reader.data.ctypes.data
    value = int(np.frombuffer(bytes(raw[pos:pos + 8]), dtype=np.uint64)[0])
    raw[pos:pos + 8] = np.array([value + 4], dtype=np.uint64).tobytes()
    path.write_bytes(bytes(raw))
    report = run_cli("inspect", path, "--json").json()
    assert not report["healthy"] and any("not aligned" in n for n in report["notes"])


def test_a_gguf_folder_with_a_readme_is_a_gguf_folder(tmp_path):
    from repos import make_original_repo

    src = make_original_repo(tmp_path / "src", "t2v_a14b")
    out = tmp_path / "g"
    run_cli("convert", src, out, "--to", "gguf", "--quantize", "Q8_0", "--only", "transformer")
    (out / "README.md").write_text("# my files\n")
    report = run_cli("inspect", out, "--json").json()
    assert report["kind"] == "folder of gguf files" and report["healthy"]


def test_a_log_file_gets_a_line_per_file_written(tmp_path):
    r = run_in(tmp_path, "convert", EXAMPLE, tmp_path / "p")
    assert r.returncode == 0
    for component in ("transformer", "vae", "text_encoder"):
        assert f"writing {component}: wrote" in r.stdout  # beside the report (the bars go to stderr)


@pytest.mark.parametrize("text", ["[" * 5000 + "]" * 5000, '{"weight_map": ' + "[" * 60 + "]" * 60 + "}",
                                  '{"weight_map": {"a": 1}, "metadata": []}', "null"])
@pytest.mark.parametrize("command", ["repair", "inspect", "verify", "convert"])
def test_a_broken_index_is_one_line_or_a_finding_never_a_traceback(tmp_path, text, command):
    out = tmp_path / "r"
    run_cli("convert", FIXTURES / "t2v", out, "--only", "transformer", "--max-shard-size", "400KB")
    (out / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text(text)
    args = {"repair": ["repair", out, "--backup", "none"], "inspect": ["inspect", out],
            "verify": ["verify", out], "convert": ["convert", out, tmp_path / "o", "--to", "original"]}[command]
    r = run_cli(*args, ok=None)
    assert "Traceback" not in r.stderr and (r.exception is None or isinstance(r.exception, SystemExit)), r.exception


# --- 3. GGUF without the gguf package: one line with the install command ------------------------------

def test_gguf_without_the_gguf_package_is_one_line(tmp_path):
    patch = "sys.modules['gguf'] = None  # as if it were not installed"
    r = subprocess.run([sys.executable, "-c", PROBE.format(patch=patch), "convert", str(FIXTURES / "t2v"),
                        str(tmp_path / "o.gguf"), "--to", "gguf", "--quantize", "Q8_0"],
                       capture_output=True, text=True, timeout=120)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 1 and len(lines) == 1 and "pip install 'gguf" in lines[0], r.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_source_listed_under_another_name_than_its_ref_is_still_planned(tmp_path, monkeypatch):
    """The planner follows the key a source lists a tensor under, not the TensorRef's own name: a
    tensor read from another key (the untied umT5 embedding) is planned and written, never lost
    while coverage says proven."""
    from dataclasses import replace

    from safetensors.torch import save_file

    from wan2diffusers.actions import to_original
    from wan2diffusers.read.pth_file import read_pth_index

    def untied_keeping_the_refs_name(weights, target, name, notes):
        a = weights.tensors["encoder.embed_tokens.weight"]
        weights.tensors["shared.weight"] = replace(a)  # its own key stays encoder.embed_tokens.weight
        notes.append("read shared.weight from encoder.embed_tokens.weight")

    run_cli("convert", FIXTURES / "t5" / "models_t5_umt5-xxl-enc-bf16.pth", tmp_path / "d")
    path = tmp_path / "d" / "text_encoder" / "model.safetensors"
    tensors = load_file(str(path))
    tensors["encoder.embed_tokens.weight"] = tensors["shared.weight"] * 2
    save_file(tensors, str(path), metadata={"format": "pt"})
    monkeypatch.setattr(to_original, "_untied", untied_keeping_the_refs_name)
    run_cli("convert", tmp_path / "d", tmp_path / "o", "--to", "original")
    (pth,) = (tmp_path / "o").glob("*.pth")
    assert "token_embedding.weight" in read_pth_index(pth)
    assert len(read_pth_index(pth)) == len(read_pth_index(FIXTURES / "t5" / "models_t5_umt5-xxl-enc-bf16.pth"))
