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

from conftest import EXAMPLE, FIXTURES, run_cli

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
    from wan2diffusers.read.pth_file import read_pth_index

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
    # the child's own peak: VmHWM of its address space (ru_maxrss would carry over the peak of the
    # test process it was spawned from, which the tests before this one may have grown)
    probe = ("import re, sys\nfrom wan2diffusers.cli import main\n"
             "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    code = e.code\n"
             "hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)\n"
             "print('MAXRSS', hwm, code, file=sys.stderr)\n")
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


# ================================ data safety (items 1-6) ========================================

PROBE = """
import os, signal, sys
from wan2diffusers.cli import main
{patch}
main(sys.argv[1:])
"""
KILL_AFTER_SWAP = """
import wan2diffusers.diagnose.repairs as r
real = r._swap
def swap_then_die(folder, work):
    real(folder, work)
    os.kill(os.getpid(), signal.SIGKILL)  # after the swap, before the backup: the worst moment
r._swap = swap_then_die
"""
KILL_WHILE_WRITING = """
import wan2diffusers.component as c
real = c.write_component
def write_then_die(cp, folder, *a, **k):
    real(cp, folder, *a, **k)
    os.kill(os.getpid(), signal.SIGKILL)
c.write_component = write_then_die
"""


def killed(patch: str, *args) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-c", PROBE.format(patch=patch), *map(str, args)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == -9, (r.returncode, r.stderr)
    return r


@pytest.fixture(scope="module")
def pipeline_once(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pipeline")
    run_cli("convert", EXAMPLE, root / "pipe", "--max-shard-size", "400KB")
    return root / "pipe"


@pytest.fixture
def pipe(pipeline_once, tmp_path) -> Path:
    dest = tmp_path / "pipe"
    shutil.copytree(pipeline_once, dest, symlinks=True)
    return dest


def digest(folder: Path) -> dict[str, bytes]:
    """Every file and symlink under `folder`: a symlink as its target text, a file as its bytes."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_symlink():
            out[rel] = b"-> " + os.readlink(p).encode()
        elif p.is_file():
            out[rel] = p.read_bytes()
    return out


def wrong_index(folder: Path, tag: str) -> bytes:
    """Point one key of the transformer's index at the wrong shard (repair rebuilds the index)."""
    index = json.loads((folder / INDEX).read_text())
    key = sorted(index["weight_map"])[0]
    shards = sorted(set(index["weight_map"].values()))
    index["weight_map"][key] = next(s for s in shards if s != index["weight_map"][key])
    index["metadata"]["tag"] = tag
    (folder / INDEX).write_text(json.dumps(index))
    return (folder / INDEX).read_bytes()


# --- 1. a second repair never overwrites an earlier backup --------------------------------------

def test_repair_backup_dir_used_twice_keeps_both_backups(pipe, tmp_path):
    backup = tmp_path / "backups"
    first = wrong_index(pipe / "transformer", "first")
    r1 = run_cli("repair", pipe, "--backup", backup, "--json").json()
    assert r1["ok"] and Path(r1["backup"]) == backup
    assert (backup / "transformer" / INDEX).read_bytes() == first
    second = wrong_index(pipe / "transformer", "second")
    r2 = run_cli("repair", pipe, "--backup", backup, "--json").json()
    assert r2["ok"] and Path(r2["backup"]).parent == backup and Path(r2["backup"]) != backup
    assert (backup / "transformer" / INDEX).read_bytes() == first  # untouched
    assert (Path(r2["backup"]) / "transformer" / INDEX).read_bytes() == second


def test_default_backups_of_two_repairs_in_the_same_second_are_two_folders(pipe, tmp_path):
    made = []
    for tag in ("a", "b"):
        wrong_index(pipe / "transformer", tag)
        made.append(Path(run_cli("repair", pipe, "--json").json()["backup"]))
    assert made[0] != made[1] and all(json.loads((m / "transformer" / INDEX).read_text())["metadata"]["tag"] == t
                                      for m, t in zip(made, "ab"))


def test_backup_inside_the_repaired_folder_is_refused(pipe):
    wrong_index(pipe / "transformer", "x")
    before = digest(pipe)
    one_error(run_cli("repair", pipe, "--backup", pipe / "bk", ok=False), "lies inside")
    assert digest(pipe) == before


# --- 2. OUT inside SRC, OUT '.' or '' -----------------------------------------------------------

def test_out_inside_the_source_is_refused_even_with_overwrite(tmp_path, monkeypatch):
    src = tmp_path / "src"
    shutil.copytree(EXAMPLE, src)
    before = digest(src)
    for out, extra in ((src / "google", ["--overwrite"]), (src / "google" / "umt5-xxl", ["--overwrite"]),
                       (src / "converted", []), (src, ["--overwrite"]), (tmp_path, ["--overwrite"])):
        one_error(run_cli("convert", src, out, *extra, ok=False), str(out))
        assert digest(src) == before
    monkeypatch.chdir(tmp_path)
    for out in (".", "", "./"):
        one_error(run_cli("convert", src, out, "--overwrite", ok=False), "not the current one")
    assert digest(src) == before


# --- 3. what a SIGKILL leaves is cleaned, reported and never published ---------------------------

def test_a_killed_repair_is_reported_set_aside_by_the_next_repair_and_never_published(pipe, tmp_path):
    folder = pipe / "transformer"
    wrong = wrong_index(folder, "killed")
    original = digest(folder)
    killed(KILL_AFTER_SWAP, "repair", pipe, "--backup", tmp_path / "bk1")
    (work,) = [p for p in pipe.iterdir() if p.name.startswith(".transformer.repair-")]
    assert (work / INDEX).read_bytes() == wrong  # the previous content, only here now

    report = run_cli("inspect", pipe, "--json").json()
    assert not report["healthy"] and any(str(work) in x for x in report["leftovers"])
    assert str(work) in run_cli("inspect", pipe).stdout
    v = run_cli("verify", pipe, ok=False)
    assert str(work) in v.stderr
    dry = run_cli("publish", pipe, "me/x", "--dry-run", "--no-measure", "--json").json()
    assert not any(f["path"].startswith(".") or "/." in f["path"] for f in dry["files"])
    assert any(x.startswith(work.name) for x in dry["left_out"])

    r = run_cli("repair", pipe, "--backup", tmp_path / "bk2", "--json").json()
    assert r["ok"] and any("moved" in n and work.name in n for n in r["notes"])
    assert not work.exists()
    kept = tmp_path / "bk2" / "interrupted" / work.name.lstrip(".")
    assert (kept / INDEX).read_bytes() == wrong  # nothing of the user's was lost
    assert run_cli("inspect", pipe, "--json").json()["healthy"]
    assert original.keys() == digest(folder).keys()


def test_a_killed_conversion_is_removed_by_the_next_one(tmp_path):
    out = tmp_path / "out"
    killed(KILL_WHILE_WRITING, "convert", FIXTURES / "t2v", out)
    (partial,) = [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]
    assert not out.exists()
    report = run_cli("convert", FIXTURES / "t2v", out, "--json").json()
    assert not partial.exists() and any(str(partial) in n for n in report["notes"])
    nothing_left = [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    assert nothing_left == []


# --- 4. the default backup of a component lands outside the pipeline folder --------------------

def test_default_backup_of_a_component_is_beside_the_pipeline_not_in_it(pipe, tmp_path):
    wrong = wrong_index(pipe / "transformer", "component")
    names_before = sorted(p.name for p in pipe.iterdir())
    r = run_cli("repair", pipe / "transformer", "--json").json()
    backup = Path(r["backup"])
    assert backup.parent == pipe.parent and backup.name.startswith("pipe.backup-")
    assert (backup / "transformer" / INDEX).read_bytes() == wrong
    assert sorted(p.name for p in pipe.iterdir()) == names_before


def test_publish_leaves_out_backups_hidden_folders_and_foreign_files_and_inspect_flags_backups(pipe):
    (pipe / "transformer.backup-20260101-000000").mkdir()
    (pipe / "transformer.backup-20260101-000000" / "config.json").write_text("{}")
    (pipe / ".cache").mkdir()
    (pipe / ".cache" / "secret.json").write_text("{}")
    (pipe / "vae" / "notes.pth").write_bytes(b"x")
    dry = run_cli("publish", pipe, "me/x", "--dry-run", "--no-measure", "--json").json()
    sent = {f["path"] for f in dry["files"]}
    assert not any("backup" in s or s.startswith(".") or s.endswith(".pth") for s in sent)
    assert {"transformer.backup-20260101-000000/", ".cache/", "vae/notes.pth"} <= set(dry["left_out"])
    assert "model_index.json" in sent and "transformer/config.json" in sent
    report = run_cli("inspect", pipe, "--json").json()
    assert any("transformer.backup-20260101-000000" in x for x in report["leftovers"])


def test_the_real_upload_sends_exactly_the_listed_files(pipe, tmp_path):
    from fake_hub import FakeHub
    from test_publish import TOKEN, cli

    (pipe / "transformer.backup-1").mkdir()
    (pipe / "transformer.backup-1" / "config.json").write_text("{}")
    (pipe / ".transformer.repair-1-x").mkdir()
    (pipe / ".transformer.repair-1-x" / "config.json").write_text("{}")
    dry = run_cli("publish", pipe, "me/x", "--dry-run", "--no-measure", "--json").json()
    with FakeHub(TOKEN) as hub:
        r = cli(["publish", pipe, "me/x", "--no-measure", "--json"],
                {"HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HOME": str(tmp_path / "hf")})
        assert r.returncode == 0, r.stderr
        sent = hub.files("me/x")
    assert set(sent) == {f["path"] for f in dry["files"]}
    for name in sent:
        assert sent[name] == (pipe / name).read_bytes()


# --- 5. repair and symlinks -----------------------------------------------------------------------

def test_repair_of_a_symlinked_component_folder_backs_up_the_link_and_leaves_its_target(pipe, tmp_path):
    real = tmp_path / "elsewhere" / "transformer"
    real.parent.mkdir()
    shutil.move(str(pipe / "transformer"), str(real))
    os.symlink(real, pipe / "transformer")
    wrong_index(real, "link")
    target_before = digest(real)
    r = run_cli("repair", pipe, "--backup", tmp_path / "bk", "--json").json()
    assert r["ok"]
    assert digest(real) == target_before  # the link's target is never modified
    assert not (pipe / "transformer").is_symlink() and (pipe / "transformer" / INDEX).is_file()
    link = tmp_path / "bk" / "transformer" / "transformer"
    assert link.is_symlink() and Path(os.readlink(link)) == real
    assert run_cli("inspect", pipe, "--json").json()["healthy"]


def test_repair_keeps_symlinked_files_as_links_and_backs_up_a_replaced_link(pipe, tmp_path):
    folder = pipe / "transformer"
    store = tmp_path / "store"
    store.mkdir()
    for name in [p.name for p in folder.iterdir() if p.suffix == ".safetensors"] + ["config.json"]:
        shutil.move(str(folder / name), str(store / name))
        os.symlink(os.path.relpath(store / name, folder), folder / name)
    wrong_index(folder, "links")
    cfg = json.loads((store / "config.json").read_text())
    cfg.pop("ffn_dim")  # complete-config rewrites config.json: the link is replaced, so it is backed up
    (store / "config.json").write_text(json.dumps(cfg))
    store_before = digest(store)
    r = run_cli("repair", pipe, "--backup", tmp_path / "bk", "--json").json()
    assert r["ok"], r
    assert digest(store) == store_before  # link targets untouched
    shards = [p for p in folder.iterdir() if p.suffix == ".safetensors"]
    assert shards and all(p.is_symlink() for p in shards)  # still links, not copies
    assert not (folder / "config.json").is_symlink() and "ffn_dim" in json.loads((folder / "config.json").read_text())
    backed = tmp_path / "bk" / "transformer" / "config.json"
    assert backed.is_symlink() and os.readlink(backed) == os.path.relpath(store / "config.json", folder)


# --- 6. publish never follows a symlink out of OUT --------------------------------------------------

def test_publish_refuses_a_symlink_to_a_file_outside_out(pipe, tmp_path):
    secret = tmp_path / "secret.json"
    secret.write_text('{"token": "hf_x"}')
    os.symlink(secret, pipe / "vae" / "extra.json")
    r = run_cli("publish", pipe, "me/x", "--dry-run", "--no-measure", ok=False)
    one_error(r, str(pipe / "vae" / "extra.json"), "outside")
    os.unlink(pipe / "vae" / "extra.json")
    os.symlink(tmp_path, pipe / "linked")
    one_error(run_cli("publish", pipe, "me/x", "--dry-run", "--no-measure", ok=False), "linked", "outside")


# --- 15. NaN / Inf in a source tensor ---------------------------------------------------------------

def test_nan_and_inf_in_the_source_are_named_with_check_finite(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    tensors = t2v_tensors()
    tensors["blocks.1.ffn.2.weight"][0, :3] = float("nan")
    tensors["head.head.bias"][0] = float("-inf")
    save_file(tensors, str(src / "diffusion_pytorch_model.safetensors"))
    shutil.copy(FIXTURES / "t2v" / "config.json", src / "config.json")
    expected = {k: int((~torch.isfinite(v)).sum()) for k, v in tensors.items() if not torch.isfinite(v).all()}
    assert expected == {"blocks.1.ffn.2.weight": 3, "head.head.bias": 1}

    r = run_cli("convert", src, tmp_path / "checked", "--check-finite", "--json")
    report = r.json()
    assert report["finite_check"] == "done" and report["components"][0]["nonfinite"] == expected
    assert "warning:" in r.stderr and "blocks.1.ffn.2.weight (3)" in r.stderr and "head.head.bias (1)" in r.stderr

    plain = run_cli("convert", src, tmp_path / "plain")
    assert "not checked for NaN/Inf" in plain.stdout and "warning" not in plain.stderr
    clean = run_cli("convert", FIXTURES / "t2v", tmp_path / "clean", "--check-finite", "--json").json()
    assert clean["components"][0]["nonfinite"] == {}
