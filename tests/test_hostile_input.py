"""Hostile and broken input (issue 9): each test reproduces one case and asserts the behaviour:
one `error:` line naming the file (and key or field), a non-zero exit, no traceback, nothing
written; never a hang, never a user's file lost, never a hidden file published."""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import FIXTURES, run_cli

SHARD1 = "diffusion_pytorch_model-00001-of-00002.safetensors"
SHARD2 = "diffusion_pytorch_model-00002-of-00002.safetensors"
INDEX = "diffusion_pytorch_model.safetensors.index.json"
T2V_FILES = (SHARD1, SHARD2, INDEX, "config.json")


def one_error(result, *fragments) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def nothing_written(out: Path) -> None:
    assert not out.exists()
    if out.parent.exists():
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], list(out.parent.iterdir())


@pytest.fixture
def t2v(tmp_path) -> Path:
    src = tmp_path / "t2v"
    src.mkdir()
    for name in T2V_FILES:
        shutil.copy(FIXTURES / "t2v" / name, src / name)
    return src


def t2v_tensors() -> dict:
    return {**load_file(str(FIXTURES / "t2v" / SHARD1)), **load_file(str(FIXTURES / "t2v" / SHARD2))}


def write_raw_safetensors(path: Path, header_json: bytes, data: bytes = b"") -> None:
    path.write_bytes(struct.pack("<Q", len(header_json)) + header_json + data)


# --- 7. a key twice in one header ---------------------------------------------------------------

def test_a_header_with_the_same_key_twice_is_refused(tmp_path):
    entry = '{{"dtype": "F32", "shape": [2], "data_offsets": [{}, {}]}}'
    f = tmp_path / "dup.safetensors"
    write_raw_safetensors(f, f'{{"a.weight": {entry.format(0, 8)}, "a.weight": {entry.format(8, 16)}}}'.encode(),
                          b"\0" * 16)
    with pytest.raises(Exception, match="a.weight"):  # the reference library refuses it too
        load_file(str(f))
    for command in ("convert", "inspect"):
        args = (command, f, tmp_path / "out") if command == "convert" else (command, f)
        line = one_error(run_cli(*args, ok=False), str(f), "'a.weight' twice")
        assert "corrupt safetensors header" in line
    nothing_written(tmp_path / "out")


# --- 8. config.json values are type-checked ----------------------------------------------------

@pytest.mark.parametrize("field,value", [
    ("eps", '"abc"'), ("num_heads", "true"), ("num_heads", '"4"'), ("num_heads", "4.0"), ("num_heads", "-4"),
    ("num_heads", "9" * 5000), ("dim", '"128"'), ("eps", "-1e-6"),
])
def test_config_values_of_the_wrong_type_are_refused_before_writing(t2v, tmp_path, field, value):
    cfg = (t2v / "config.json").read_text()
    old = json.loads(cfg)[field]
    (t2v / "config.json").write_text(cfg.replace(f'"{field}": {json.dumps(old)}', f'"{field}": {value}'))
    assert json.loads(cfg)[field] == old and f'"{field}": {value}' in (t2v / "config.json").read_text()
    out = tmp_path / "out"
    line = one_error(run_cli("convert", t2v, out, ok=False), str(t2v / "config.json"), f"{field}=")
    assert "expected a positive" in line
    nothing_written(out)


def test_set_values_are_type_checked_too(t2v, tmp_path):
    one_error(run_cli("convert", t2v, tmp_path / "out", "--set", "transformer.num_heads=four", ok=False),
              "--set transformer.num_heads='four'", "expected a positive integer")


# --- 9. .pth tensors with impossible strides or wrong argument types ---------------------------

def hostile_pth(path: Path, storage, offset, size, stride) -> Path:
    """A zip-format .pth whose one tensor is rebuilt by torch._utils._rebuild_tensor_v2 with the given
    arguments (as a hostile file can say anything), over a 12-float storage."""
    import pickle
    from collections import OrderedDict

    import torch._utils as tu

    real = tu._rebuild_tensor_v2

    def fake(*args):
        raise AssertionError("never called: the pickle is only written")

    fake.__module__, fake.__name__, fake.__qualname__ = "torch._utils", "_rebuild_tensor_v2", "_rebuild_tensor_v2"
    marker = object()

    class Rebuild:
        def __reduce__(self):
            return (fake, (marker if storage is None else storage, offset, size, stride, False, OrderedDict()))

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", 12) if obj is marker else None

    import io
    buf = io.BytesIO()
    tu._rebuild_tensor_v2 = fake
    try:
        Pickler(buf, protocol=2).dump({"w": Rebuild()})
    finally:
        tu._rebuild_tensor_v2 = real
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", buf.getvalue())
        zf.writestr("archive/data/0", b"\0" * 48)
        zf.writestr("archive/version", "3\n")
    return path


@pytest.mark.parametrize("storage,offset,size,stride,fragment", [
    (None, 0, (3, 4), (-4, 1), "negative"),
    (None, 0, (3, 4), (1,), "2 sizes and 1 strides"),
    (None, 0, (3, 4), (4, 1, 1), "2 sizes and 3 strides"),
    (None, 0, ("3", "4"), (4, 1), "size"),
    (None, 0.5, (3, 4), (4, 1), "storage offset"),
    (None, -2, (3, 4), (4, 1), "storage offset"),
    (7, 0, (3, 4), (4, 1), "for a storage"),
    (None, 0, (3, 4), (40, 1), "outside its storage"),
    (None, 0, (30, 4), (4, 1), "outside its storage"),
    (None, 0, (3, 4), "ab", "stride"),
])
def test_pth_tensors_with_impossible_strides_or_wrong_arguments_are_refused(tmp_path, storage, offset, size,
                                                                           stride, fragment):
    path = hostile_pth(tmp_path / "Wan2.1_VAE.pth", storage, offset, size, stride)
    for command in ("inspect", "convert"):
        args = (command, path, tmp_path / "out") if command == "convert" else (command, path)
        one_error(run_cli(*args, ok=False), str(path), fragment)
    nothing_written(tmp_path / "out")


def test_the_hostile_pth_builder_makes_a_file_the_reader_accepts_when_honest(tmp_path):
    from converter.read.pth_file import read_pth_index

    refs = read_pth_index(hostile_pth(tmp_path / "ok.pth", None, 0, (3, 4), (4, 1)))
    assert refs["w"].shape == (3, 4) and refs["w"].nbytes == 48


# --- 10. a compressed or oversized data.pkl is refused before it is read ----------------------

def test_a_compressed_pickle_is_refused_before_it_is_inflated(tmp_path):
    bomb = tmp_path / "Wan2.1_VAE.pth"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        with zf.open("archive/data.pkl", "w", force_zip64=True) as f:
            block = b"(" * (1 << 20)
            for _ in range(400):  # 400 MB of MARK opcodes, a few hundred KB on disk
                f.write(block)
    assert bomb.stat().st_size < 2_000_000
    probe = ("import resource, sys\nfrom converter.cli import main\n"
             "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    code = e.code\n"
             "print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, code, file=sys.stderr)\n")
    r = subprocess.run([sys.executable, "-c", probe, "inspect", str(bomb)], capture_output=True, text=True,
                       timeout=120)
    assert "is compressed" in r.stderr and "Traceback" not in r.stderr, r.stderr
    rss_kb, code = r.stderr.split("MAXRSS ")[1].split()[:2]
    assert code == "1" and int(rss_kb) < 1024 * 1024, r.stderr


def test_an_oversized_pickle_is_refused(tmp_path):
    big = tmp_path / "Wan2.1_VAE.pth"
    with zipfile.ZipFile(big, "w") as zf:
        zf.writestr("archive/data.pkl", b"(" * (9 << 20))
    one_error(run_cli("inspect", big, ok=False), str(big), "data.pkl is", "bytes")


# --- 11. FIFOs, sockets and devices are refused at once ----------------------------------------

def _special_files(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    fifo = folder / "fifo.safetensors"
    os.mkfifo(fifo)
    sock_path = folder / "sock.safetensors"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sock_path))
    dev = folder / "null.safetensors"
    os.symlink("/dev/null", dev)
    return {"FIFO": fifo, "socket": sock_path, "character device": dev}


def test_fifo_socket_and_device_are_refused_without_hanging(tmp_path, t2v):
    for what, path in _special_files(tmp_path / "special").items():
        for command in ("convert", "inspect", "verify"):
            args = (command, path, tmp_path / "out") if command == "convert" else (command, path)
            one_error(run_cli(*args, ok=False), str(path), what)
    # as the weights file of a folder, a shard named by the index, and a config.json
    (t2v / SHARD2).unlink()
    os.mkfifo(t2v / SHARD2)
    one_error(run_cli("convert", t2v, tmp_path / "out", ok=False), SHARD2, "FIFO")
    (t2v / SHARD2).unlink()
    shutil.copy(FIXTURES / "t2v" / SHARD2, t2v / SHARD2)
    (t2v / "config.json").unlink()
    os.mkfifo(t2v / "config.json")
    one_error(run_cli("convert", t2v, tmp_path / "out", ok=False), "config.json", "FIFO")
    nothing_written(tmp_path / "out")


# --- 12. malformed metadata, deep JSON, a layout-cache entry that is not the cache's -----------

def test_metadata_that_is_not_a_string_map_is_refused(tmp_path):
    f = tmp_path / "meta.safetensors"
    header = {"__metadata__": {"format": ["pt"]}, "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    write_raw_safetensors(f, json.dumps(header).encode(), b"\0" * 4)
    one_error(run_cli("inspect", f, ok=False), str(f), "__metadata__")
    header["__metadata__"] = "pt"
    write_raw_safetensors(f, json.dumps(header).encode(), b"\0" * 4)
    one_error(run_cli("inspect", f, ok=False), str(f), "__metadata__")


@pytest.mark.parametrize("where", ["header", "config.json", "index"])
def test_deeply_nested_json_is_one_line(t2v, tmp_path, where):
    deep = "[" * 200_000 + "]" * 200_000
    if where == "header":
        target = tmp_path / "deep.safetensors"
        write_raw_safetensors(target, deep.encode())
        src = target
    elif where == "config.json":
        (t2v / "config.json").write_text(deep)
        target, src = t2v / "config.json", t2v
    else:
        (t2v / INDEX).write_text(deep)
        target, src = t2v / INDEX, t2v
    one_error(run_cli("convert", src, tmp_path / "out", ok=False), str(target))
    nothing_written(tmp_path / "out")


@pytest.mark.parametrize("entry", ['[1, 2, 3]', '"text"', "[" * 100_000, "null"])
def test_a_foreign_layout_cache_entry_is_ignored_and_rebuilt(tmp_path, monkeypatch, entry):
    cache = tmp_path / "cache"
    monkeypatch.setenv("WAN2DIFFUSERS_CACHE", str(cache))
    run_cli("convert", FIXTURES / "t2v", tmp_path / "first")
    (path,) = cache.glob("WanTransformer3DModel-*.json")
    path.write_text(entry)
    run_cli("convert", FIXTURES / "t2v", tmp_path / "second")
    a, b = (load_file(str(tmp_path / o / "transformer" / "diffusion_pytorch_model.safetensors"))
            for o in ("first", "second"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads(path.read_text())["class"] == "WanTransformer3DModel"  # rebuilt


def test_a_cache_entry_with_a_valid_digest_but_a_foreign_shape_is_ignored(tmp_path, monkeypatch):
    from converter.plan import layout_cache

    cache = tmp_path / "cache"
    monkeypatch.setenv("WAN2DIFFUSERS_CACHE", str(cache))
    run_cli("convert", FIXTURES / "t2v", tmp_path / "first")
    (path,) = cache.glob("WanTransformer3DModel-*.json")
    data = json.loads(path.read_text())
    data["layout"]["shapes"] = {"proj_out.weight": "not a shape"}
    data["sha256"] = layout_cache._digest(data["layout"])
    path.write_text(json.dumps(data))
    run_cli("convert", FIXTURES / "t2v", tmp_path / "second")


# --- 13. say what a path is; random bytes are a corrupt header ---------------------------------

def test_an_index_naming_a_folder_or_a_fifo_says_so(t2v, tmp_path):
    (t2v / SHARD2).unlink()
    (t2v / SHARD2).mkdir()
    one_error(run_cli("convert", t2v, tmp_path / "out", ok=False), str(t2v / INDEX), f"{SHARD2}, which is a folder")
    (t2v / SHARD2).rmdir()
    os.mkfifo(t2v / SHARD2)
    one_error(run_cli("convert", t2v, tmp_path / "out", ok=False), str(t2v / INDEX), "FIFO")
    nothing_written(tmp_path / "out")


@pytest.mark.parametrize("command", ["inspect", "verify", "repair"])
def test_random_bytes_are_a_corrupt_header(tmp_path, command):
    f = tmp_path / "random.safetensors"
    f.write_bytes(os.urandom(5000))
    line = one_error(run_cli(command, f, ok=False), str(f))
    assert "corrupt" in line and "match no table" not in line


# --- 14. one transposed weight is named, not blamed on config.json ------------------------------

@pytest.mark.parametrize("with_config", [True, False])
def test_a_transposed_weight_in_one_block_is_named(tmp_path, with_config):
    src = tmp_path / "src"
    src.mkdir()
    tensors = t2v_tensors()
    tensors["blocks.0.ffn.0.weight"] = tensors["blocks.0.ffn.0.weight"].T.contiguous()
    save_file(tensors, str(src / "diffusion_pytorch_model.safetensors"))
    if with_config:
        shutil.copy(FIXTURES / "t2v" / "config.json", src / "config.json")
    line = one_error(run_cli("convert", src, tmp_path / "out", ok=False), "blocks.0.ffn.0.weight",
                     "[128, 256]", "[256, 128]")
    assert "contradicts" not in line
    nothing_written(tmp_path / "out")
