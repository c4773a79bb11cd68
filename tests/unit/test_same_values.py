"""`same_values` (verify's byte comparison of a copied tensor, and the way back's tied-key check):
reused buffers compared whole, a last partial chunk compared as a slice; a difference anywhere is
found, at any chunk size, and a file shorter than its header is not the same."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from safetensors.numpy import save_file

from wan2diffusers.read.safetensors_file import read_header, same_values


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
