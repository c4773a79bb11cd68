"""Write a safetensors file without holding it: the header is computed from the plan (names,
dtypes, shapes), then each tensor's bytes are appended one at a time."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

from ..read.safetensors_file import TensorRef, copy_bytes

# The data section starts at a multiple of ALIGN in the file, and a writer puts the tensors whose size
# is a multiple of ALIGN first (data_order), so each of them starts aligned too: a loader that maps
# the file hands kernels aligned pointers. torch 2.13's CPU `_weight_int8pack_mm` (what quanto runs
# for an int8 weight in a bf16 model on CPU) crashes the process on int8 data that is not 16-byte
# aligned (measured: offsets 8 crash, 0/16/32/48 run).
ALIGN = 16


def data_order(nbytes: int) -> bool:
    """Sort key: False (first) for a tensor that keeps the next one aligned."""
    return nbytes % ALIGN != 0


def header_bytes(entries: list[tuple[str, str, tuple[int, ...], int]], metadata: dict[str, str]) -> bytes:
    """entries: (key, dtype tag, shape, nbytes) in data order."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for key, tag, shape, nbytes in entries:
        header[key] = {"dtype": tag, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((ALIGN - 8 - len(raw)) % ALIGN)  # the data section at 8 + len(raw), a multiple of ALIGN
    return len(raw).to_bytes(8, "little") + raw


def write_safetensors(path: Path, entries: list[tuple[str, str, tuple[int, ...], int]],
                      produce: Callable[[int], object], metadata: dict[str, str],
                      on_bytes: Callable[[int], None] = lambda n: None) -> None:
    """`produce(i)` returns entry i as a tensor (already in its final dtype and shape), as a
    TensorRef whose bytes are copied unchanged, or as an iterator of byte chunks."""
    with open(path, "wb", buffering=0) as out:
        out.write(header_bytes(entries, metadata))
        for i, (key, tag, shape, nbytes) in enumerate(entries):
            item = produce(i)
            if isinstance(item, TensorRef):
                if item.nbytes != nbytes:
                    raise AssertionError(f"{key}: planned {nbytes} bytes, source has {item.nbytes}")
                copy_bytes(item, out)
            elif not hasattr(item, "contiguous"):  # an iterator of byte chunks (a streamed cast)
                written = write_chunks(out, item)
                if written != nbytes:
                    raise AssertionError(f"{key}: planned {nbytes} bytes, streamed {written}")
            else:
                import torch

                t = item.contiguous()
                if tuple(t.shape) != tuple(shape) or t.numel() * t.element_size() != nbytes:
                    raise AssertionError(f"{key}: planned {list(shape)}, produced {list(t.shape)} {t.dtype}")
                _write_all(out, t.reshape(-1).view(torch.uint8).numpy().data if nbytes else b"")
            on_bytes(nbytes)


def write_chunks(out, chunks: Iterable) -> int:
    """Write each chunk while the next is made (one writer thread; writes release the GIL). A chunk
    is written before the one after it is asked for (iter_cast reuses its buffers on that promise)."""
    from concurrent.futures import ThreadPoolExecutor

    written = 0
    with ThreadPoolExecutor(1) as writer:
        pending = None
        for data in chunks:
            if pending is not None:
                pending.result()
            pending = writer.submit(_write_all, out, data)
            written += len(memoryview(data).cast("B"))
        if pending is not None:
            pending.result()
    return written


def _write_all(out, data: Iterable) -> None:
    view = memoryview(data)
    while view:
        n = out.write(view)
        view = view[n:]
