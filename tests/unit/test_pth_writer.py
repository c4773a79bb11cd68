"""The .pth writer (write/pth_writer.py) against torch.save itself: the same zip members, in the same
order, with the same bytes and CRCs (data.pkl included), every data member 64-byte aligned, for every
storage type it writes; only torch's random serialization id differs (and the local headers: ours
carry a zip64 extra field).  The pickle is written without importing torch."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import torch

from wan2diffusers.write.pth_writer import STORAGE_TYPES, write_pth

TAGS = {"F32": torch.float32, "F64": torch.float64, "F16": torch.float16, "BF16": torch.bfloat16,
        "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
        "BOOL": torch.bool}


def test_every_member_is_what_torch_save_writes(tmp_path):
    assert set(TAGS) == set(STORAGE_TYPES)
    g = torch.Generator().manual_seed(0)
    state = {}
    for i, (tag, dtype) in enumerate(TAGS.items()):
        for shape in [(3, 5), (7,), (), (0, 4), (2, 3, 4)]:
            state[f"m{i}.{tag}.{len(shape)}"] = (torch.randn(shape, generator=g) * 50).to(dtype)
    state["again.F32"] = torch.ones(2, 2)  # a storage type met a second time: memoized as torch's
    (tmp_path / "torch").mkdir()
    (tmp_path / "ours").mkdir()
    torch.save(state, tmp_path / "torch" / "model.pth")
    entries = [(k, next(t for t, d in TAGS.items() if d == v.dtype), tuple(v.shape), v.numel() * v.element_size())
               for k, v in state.items()]
    values = list(state.values())
    write_pth(tmp_path / "ours" / "model.pth", entries, lambda i: [values[i].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()])
    with zipfile.ZipFile(tmp_path / "torch" / "model.pth") as a, zipfile.ZipFile(tmp_path / "ours" / "model.pth") as b:
        ia, ib = a.infolist(), b.infolist()
        assert [i.filename for i in ia] == [i.filename for i in ib]
        for x, y in zip(ia, ib):
            if x.filename.endswith(".data/serialization_id"):
                continue
            assert a.read(x) == b.read(y) and x.CRC == y.CRC, x.filename
            with open(tmp_path / "ours" / "model.pth", "rb") as f:  # the local header says where data starts
                f.seek(y.header_offset)
                head = f.read(30)
            start = y.header_offset + 30 + int.from_bytes(head[26:28], "little") + int.from_bytes(head[28:30], "little")
            assert start % 64 == 0, x.filename
    loaded = torch.load(tmp_path / "ours" / "model.pth", weights_only=True, mmap=True)
    assert list(loaded) == list(state)
    for k, v in state.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k


def test_the_pickle_is_written_without_importing_torch():
    code = ("import sys\nfrom wan2diffusers.write.pth_writer import pickle_bytes\n"
            "pickle_bytes([('a.weight', 'BF16', (2, 3)), ('b', 'F32', ())])\n"
            "print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "False", (r.stdout, r.stderr)


def test_tensor_bytes_copied_kernel_side_or_streamed_give_the_same_members(tmp_path, monkeypatch):
    """A TensorRef member is copied by os.copy_file_range with its CRC-32 read beside it; where the
    kernel refuses (EXDEV between file systems) it is streamed instead: both give torch.save's
    members, and zipfile's own CRC check passes."""
    import errno
    import os

    from safetensors.torch import save_file

    from wan2diffusers.read.safetensors_file import read_header

    g = torch.Generator().manual_seed(1)
    state = {"a": torch.randn(300, 70, generator=g), "b": torch.randn(5, generator=g).bfloat16(),
             "c": torch.zeros(0, 3), "d": torch.arange(7, dtype=torch.int64),
             "e": torch.randn(4_500_000, generator=g)}  # 18 MB: copied in two calls, its CRC read during the second
    save_file(state, str(tmp_path / "src.safetensors"))
    refs = read_header(tmp_path / "src.safetensors").tensors
    keys = list(state)
    tags = {torch.float32: "F32", torch.bfloat16: "BF16", torch.int64: "I64"}
    assert keys[-1] == "e"
    entries = [(k, tags[state[k].dtype], tuple(state[k].shape), refs[k].nbytes) for k in keys]
    (tmp_path / "torch").mkdir()
    torch.save(state, tmp_path / "torch" / "model.pth")
    calls = []
    real = os.copy_file_range

    def counting(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(os, "copy_file_range", counting)
    for kind in ("copied", "streamed"):
        (tmp_path / kind).mkdir()
        write_pth(tmp_path / kind / "model.pth", entries, lambda i: refs[keys[i]])
        with zipfile.ZipFile(tmp_path / kind / "model.pth") as b, zipfile.ZipFile(tmp_path / "torch" / "model.pth") as a:
            assert b.testzip() is None  # every member's CRC-32 as stored
            for x in a.infolist():
                if not x.filename.endswith("serialization_id"):
                    assert a.read(x) == b.read(x.filename), (kind, x.filename)
        loaded = torch.load(tmp_path / kind / "model.pth", weights_only=True)
        assert all(torch.equal(loaded[k], state[k]) for k in keys)
        if kind == "copied":
            assert len(calls) >= 5  # the non-empty tensors went kernel-side
            assert [c[2] for c in calls[-2:]] == [16 << 20, refs["e"].nbytes - (16 << 20)]  # "e" in two calls

            def refuse(*args):
                raise OSError(errno.EXDEV, "Invalid cross-device link")

            monkeypatch.setattr(os, "copy_file_range", refuse)
