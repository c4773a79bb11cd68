"""Peak memory of a conversion is bounded by the largest tensors, not the model: measured as the
maximum resident set size of a child process (mapped file pages count there too), relative to
the same conversion of the tiny fixture (same imports and code path, negligible data)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from conftest import FIXTURES
from wan2diffusers.read.safetensors_file import iter_cast, read_header

MB = 1024 * 1024
TIME = "/usr/bin/time"


def peak_rss_mb(*args) -> float:
    """Maximum resident set size of `wan2diffusers ARGS`, as /usr/bin/time -v reports it (the
    child is exec'ed from `time` itself, so nothing of this test process is counted)."""
    cmd = [TIME, "-v", sys.executable, "-m", "wan2diffusers.cli", *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    kb = next(int(line.split(":")[1]) for line in r.stderr.splitlines() if "Maximum resident set size" in line)
    return kb / 1024


@pytest.fixture(scope="module")
def big_t2v(tmp_path_factory):
    """The T2V fixture layout with 6 blocks widened so each FFN weight is 32 MB (float32) and the
    model ~0.6 GB: enough for a whole-model load to show."""
    from test_tables import real_size_source

    src = real_size_source("t2v", dim=1024, ffn=8192, layers=6, config=True)
    root = tmp_path_factory.mktemp("big")
    folder = root / "src"
    folder.mkdir()
    tensors = {k: torch.full(r.shape, 0.5) for k, r in src.tensors.items()}
    save_file(tensors, str(folder / "diffusion_pytorch_model.safetensors"))
    cfg = dict(src.original_config, num_heads=8)
    import json
    (folder / "config.json").write_text(json.dumps(cfg))
    largest = max(t.numel() * 4 for t in tensors.values()) / MB
    total = sum(t.numel() * 4 for t in tensors.values()) / MB
    return folder, largest, total


@pytest.mark.skipif(not os.access(TIME, os.X_OK), reason="needs GNU time (/usr/bin/time -v)")
@pytest.mark.parametrize("dtype", ["keep", "bf16"])
def test_peak_rss_is_bounded_by_the_largest_tensor(big_t2v, tmp_path, dtype):
    folder, largest, total = big_t2v
    assert total > 8 * largest  # the bound below is well under a whole-model load
    # the baseline runs the same code path (same imports) on the 2 MB fixture; both target
    # layouts are cached first, so neither run pays for building one
    for src in (FIXTURES / "t2v", folder):
        peak_rss_mb("convert", src, tmp_path / "warm", "--dry-run")
    baseline = peak_rss_mb("convert", FIXTURES / "t2v", tmp_path / "tiny", "--dtype", dtype)
    converted = peak_rss_mb("convert", folder, tmp_path / "out", "--dtype", dtype)
    assert (tmp_path / "out" / "transformer" / "config.json").exists()
    grew = converted - baseline
    print(f"dtype {dtype}: baseline {baseline:.0f} MB, conversion {converted:.0f} MB, largest tensor "
          f"{largest:.0f} MB, model {total:.0f} MB")
    # one tensor read plus its cast (a 64 MB chunk at most), plus what the allocator keeps
    # back after freeing them (glibc raises its mmap threshold up to 32 MB after a free)
    assert grew <= 3 * largest + 32, (grew, largest)
    assert converted < baseline + total / 4  # nowhere near a whole-model load


def test_a_streamed_cast_equals_a_whole_cast(tmp_path):
    t = torch.randn(1001, 7)
    save_file({"w": t}, str(tmp_path / "w.safetensors"))
    ref = read_header(tmp_path / "w.safetensors").tensors["w"]
    for chunk in (4, 28, 1000, 1 << 20):  # chunk boundaries inside rows, at rows, larger than all
        data = b"".join(bytes(c) for c in iter_cast(ref, torch.bfloat16, chunk=chunk))
        assert torch.equal(torch.frombuffer(bytearray(data), dtype=torch.bfloat16).reshape(1001, 7), t.bfloat16())
