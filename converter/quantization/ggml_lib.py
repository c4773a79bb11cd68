"""ggml's own reference quantizers, called in place: `ggml_quantize_chunk` of the prebuilt ggml in
the `libggml-python` wheel (ggml 0.20.2; Linux x86_64/aarch64, macOS arm64 and Windows wheels, no
compiler needed), through ctypes.

Why not a port: llama-quantize runs exactly this function (ggml/src/ggml.c ggml_quantize_chunk ->
ggml-quants.c quantize_q*_K / quantize_q8_0 ... with no importance matrix), so calling it gives its
bytes by construction, at C speed; a numpy port of the K quantizers' iterative scale search would be
slower and would need proving against this anyway. The wheel is built without -march=native: its
portable C gives the same bytes as ggml-quants.c built without FMA (llama.cpp b3962), which is the
reference (an FMA build rounds differently in the K quantizers' scale search). The legacy types
(Q8_0 ... Q4_0) give the bytes gguf-py's `gguf.quants.quantize` gives (tests/e2e/gguf/test_gguf.py).

Rows are quantized independently (every type's blocks lie along a row), so a tensor is handed over
a slice of rows at a time and each slice is split between threads: ctypes releases the GIL during
the call, and the C code keeps no state between rows without an importance matrix."""

from __future__ import annotations

import ctypes
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

from ..errors import ConversionError

INSTALL = "pip install 'libggml-python>=0.20.2'"
THREADS = max(1, os.cpu_count() or 1)


@lru_cache(maxsize=None)
def _library():
    try:
        import libggml
    except ImportError:
        raise ConversionError(f"GGUF K-quants and legacy quants need ggml's quantizers: {INSTALL}") from None
    root = Path(libggml.__file__).parent
    names = {"win32": ("ggml-base.dll",), "darwin": ("libggml-base.dylib",)}.get(sys.platform, ("libggml-base.so",))
    found = [p for sub in ("lib64", "lib", "bin", ".") for n in names for p in [root / sub / n] if p.is_file()]
    if not found:
        raise ConversionError(f"{root}: the libggml-python package has no {names[0]}; reinstall it: {INSTALL}")
    try:
        lib = ctypes.CDLL(str(found[0]))
    except OSError as e:
        raise ConversionError(f"{found[0]}: cannot be loaded ({e}); reinstall it: {INSTALL}") from None
    fn = lib.ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_void_p]
    needs = lib.ggml_quantize_requires_imatrix
    needs.restype = ctypes.c_bool
    needs.argtypes = [ctypes.c_int]
    return fn, needs


@lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(THREADS, thread_name_prefix="ggml-quantize")


def row_bytes(block: int, type_size: int, n_per_row: int) -> int:
    if n_per_row % block:
        raise ConversionError(f"a row of {n_per_row} values is not a whole number of {block}-value blocks")
    return n_per_row // block * type_size


def quantize(values, type_id: int, block: int, type_size: int):
    """`values`: a C-contiguous float32 numpy array of rows (2-D); the quantized rows as a uint8
    array of shape (rows, bytes per row), exactly as ggml_quantize_chunk writes them."""
    import numpy as np

    fn, needs_imatrix = _library()
    if needs_imatrix(type_id):
        raise ConversionError(f"ggml type {type_id} needs an importance matrix, which is not offered")
    values = np.ascontiguousarray(values, dtype=np.float32)
    rows, n = values.shape
    per_row = row_bytes(block, type_size, n)
    out = np.empty((rows, per_row), dtype=np.uint8)
    if rows == 0:
        return out
    step = max(1, -(-rows // THREADS))
    spans = [(a, min(rows, a + step)) for a in range(0, rows, step)]

    def run(span):
        a, b = span
        written = fn(type_id, values[a:b].ctypes.data, out[a:b].ctypes.data, 0, b - a, n, None)
        if written != (b - a) * per_row:
            raise ConversionError(f"ggml_quantize_chunk wrote {written} bytes for {b - a} rows, expected "
                                  f"{(b - a) * per_row}")

    if len(spans) == 1:
        run(spans[0])
    else:
        for f in [_pool().submit(run, s) for s in spans]:
            f.result()
    return out
