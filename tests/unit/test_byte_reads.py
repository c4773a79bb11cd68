"""Reads of a tensor's stored bytes into reused buffers.  `same_values` (verify's byte comparison of
a copied tensor, and the way back's tied-key check): a difference anywhere is found, at any chunk
size, and a file shorter than its header is not the same.  `iter_bytes` (the .pth writer's byte
copies): the bytes in order, each chunk intact while the writer writes it and the next is read."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from safetensors.numpy import save_file

from wan2diffusers.read.safetensors_file import iter_bytes, read_header, same_values


@pytest.mark.parametrize("chunk", [64, 1000, 4096, 1 << 24])
def test_a_difference_anywhere_is_found(tmp_path, chunk):
    base = np.arange(3000, dtype=np.float32).reshape(30, 100)  # 12000 bytes: whole and partial chunks
    variants = {"same": base.copy()}
    for where in (0, 15, 16, 999, 1000, 2999):  # element indices: first, chunk edges, last
        v = base.copy().reshape(-1)
        v[where] = -1
        variants[f"at{where}"] = v.reshape(30, 100)
    save_file({"base": base}, str(tmp_path / "a.safetensors"))
    save_file(variants, str(tmp_path / "b.safetensors"))
    a = read_header(tmp_path / "a.safetensors").tensors["base"]
    b = read_header(tmp_path / "b.safetensors").tensors
    small = read_header(tmp_path / "a.safetensors").tensors["base"]
    assert same_values(small, replace(small), 64)  # warm the shared buffers with a small chunk first
    for key, ref in b.items():
        assert same_values(a, ref, chunk) == (key == "same"), (key, chunk)


def test_a_truncated_file_is_not_the_same(tmp_path):
    save_file({"t": np.ones((64, 64), dtype=np.float32)}, str(tmp_path / "a.safetensors"))
    ref = read_header(tmp_path / "a.safetensors").tensors["t"]
    (tmp_path / "b.safetensors").write_bytes((tmp_path / "a.safetensors").read_bytes()[:-100])
    cut = replace(ref, file=tmp_path / "b.safetensors")
    assert not same_values(ref, cut, 4096)


@pytest.mark.parametrize("chunk", [40, 4096, 1 << 24])
def test_iter_bytes_gives_the_stored_bytes_while_the_writer_holds_a_chunk(tmp_path, chunk):
    import io

    from wan2diffusers.write.safetensors_writer import write_chunks

    values = {"a": np.arange(5000, dtype=np.float32), "b": np.arange(7, dtype=np.int16), "c": np.zeros(0, np.float32)}
    save_file(values, str(tmp_path / "t.safetensors"))
    refs = read_header(tmp_path / "t.safetensors").tensors
    for key, value in values.items():
        out = io.BytesIO()
        assert write_chunks(out, iter_bytes(refs[key], chunk)) == value.nbytes  # chunk i written while i+1 is read
        assert out.getvalue() == value.tobytes(), (key, chunk)
    cut = replace(refs["a"], nbytes=refs["a"].nbytes + 4096)  # past the end of the file: named, not short
    with pytest.raises(Exception, match="truncated"):
        list(iter_bytes(cut, chunk))
