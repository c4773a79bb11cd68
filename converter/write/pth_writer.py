"""Write a `.pth` file as `torch.save(state_dict)` writes it (zip format), one tensor at a time:
the pickle (`data.pkl`) describes every tensor from its planned dtype and shape alone, then each
tensor's bytes are streamed into their own uncompressed zip member.  Nothing holds the model.

The layout is torch's own (torch/serialization.py `_save`, caffe2/serialize/inline_container.cc):
members `<archive>/data.pkl`, `.format_version`, `.storage_alignment`, `<archive>/byteorder`, `<archive>/data/<n>` (one storage per tensor,
numbered in pickling order), `<archive>/version`, `<archive>/.data/serialization_id`; every data
member starts at a multiple of 64 bytes (torch pads the local header's extra field, id "FB"), so
`torch.load(..., mmap=True)` maps it in place.  The pickle is protocol 2, each tensor reduced to
`torch._utils._rebuild_tensor_v2(storage, 0, size, stride, False, OrderedDict())` with the storage
as the persistent id `("storage", torch.<Type>Storage, "<n>", "cpu", numel)`; tests compare it byte
for byte with torch.save's."""

from __future__ import annotations

import math
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Iterable

from ..errors import ConversionError
from ..read.safetensors_file import TensorRef, iter_bytes, read_fully, reused_buffer
from .safetensors_writer import write_chunks

ALIGNMENT = 64
STORAGE_TYPES = {"F32": "FloatStorage", "F64": "DoubleStorage", "F16": "HalfStorage", "BF16": "BFloat16Storage",
                 "I64": "LongStorage", "I32": "IntStorage", "I16": "ShortStorage", "I8": "CharStorage",
                 "U8": "ByteStorage", "BOOL": "BoolStorage"}


class _Storage:
    def __init__(self, n: int, tag: str, numel: int):
        self.n, self.tag, self.numel = n, tag, numel


class _Tensor:
    def __init__(self, storage: _Storage, shape: tuple[int, ...]):
        self.storage, self.shape = storage, tuple(shape)


def _stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    out, acc = [], 1
    for d in reversed(shape):
        out.append(acc)
        acc *= d
    return tuple(reversed(out))


class _Global:
    """A name in torch's namespace, written into the pickle as torch.save writes it (a GLOBAL
    opcode) without importing torch: a .pth written from a warm family's plan needs none of it
    (importing it cost ~1.3 s and ~250 MB of RSS)."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle's save_reduce asks that a reduction's function be callable
        raise TypeError(f"{self.module}.{self.name} is only named here, for a pickle")


_REBUILD = _Global("torch._utils", "_rebuild_tensor_v2")
_STORAGE = {tag: _Global("torch", name) for tag, name in STORAGE_TYPES.items()}


class _Pickler(pickle._Pickler):  # the pure-Python pickler: its save_global can be given our names
    dispatch = dict(pickle._Pickler.dispatch)

    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", _STORAGE[obj.tag], str(obj.n), "cpu", obj.numel)
        return None

    def reducer_override(self, obj):
        if isinstance(obj, _Tensor):
            return (_REBUILD, (obj.storage, 0, obj.shape, _stride(obj.shape), False, OrderedDict()))
        return NotImplemented

    def _save_name(self, obj: _Global) -> None:
        """pickle's save_global for protocol 2, for a name that is not imported."""
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("utf-8"))
        self.memoize(obj)

    dispatch[_Global] = _save_name


def pickle_bytes(entries: list[tuple[str, str, tuple[int, ...]]]) -> bytes:
    """data.pkl for a state dict of (key, dtype tag, shape), storages numbered in order."""
    import io

    sd = {}
    for n, (key, tag, shape) in enumerate(entries):
        sd[key] = _Tensor(_Storage(n, tag, math.prod(shape)), shape)
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(sd)
    return buf.getvalue()


def _aligned_info(zf: zipfile.ZipFile, name: str, size: int) -> zipfile.ZipInfo:
    """A stored member whose data will start at a multiple of ALIGNMENT (torch's "FB" padding)."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.file_size = size
    start = zf.fp.tell() + 30 + len(name.encode("utf-8")) + 20  # local header + name + zip64 extra
    pad = (-(start + 4)) % ALIGNMENT
    info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
    return info


def write_pth(path: Path, entries: list[tuple[str, str, tuple[int, ...], int]],
              produce: Callable[[int], Iterable], on_bytes: Callable[[int], None] = lambda n: None) -> None:
    """`entries`: (key, dtype tag, shape, nbytes) in state-dict order; `produce(i)` gives entry i's
    bytes as an iterator of byte chunks (or one bytes-like object), or as a TensorRef whose stored
    bytes are copied unchanged (_copy_member)."""
    archive = Path(path).stem
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        def member(name: str, data: bytes) -> None:
            with zf.open(_aligned_info(zf, f"{archive}/{name}", len(data)), "w", force_zip64=True) as f:
                f.write(data)

        member("data.pkl", pickle_bytes([(k, t, s) for k, t, s, _ in entries]))
        member(".format_version", b"1")
        member(".storage_alignment", str(ALIGNMENT).encode())
        member("byteorder", b"little")
        for n, (key, _, _, nbytes) in enumerate(entries):
            with zf.open(_aligned_info(zf, f"{archive}/data/{n}", nbytes), "w", force_zip64=True) as f:
                item = produce(n)
                written = _copy_member(f, item) if isinstance(item, TensorRef) else None
                if written is None:  # zipfile's CRC-32 and write of a chunk (both release the GIL) while the next is read
                    chunks = iter_bytes(item) if isinstance(item, TensorRef) else item
                    written = write_chunks(f, [chunks] if isinstance(chunks, (bytes, bytearray, memoryview)) else chunks)
                if written != nbytes:
                    raise AssertionError(f"{key}: planned {nbytes} bytes, produced {written}")
            on_bytes(nbytes)
        member("version", b"3\n")
        member(".data/serialization_id", "".join(str(b % 10) for b in os.urandom(40)).encode())


def _copy_member(f, ref: TensorRef) -> int | None:
    """A member that is a source tensor's bytes unchanged, copied as cp copies (os.copy_file_range:
    the bytes never pass through this process) while their CRC-32 is computed from a read of the same
    bytes on another thread (zlib, ~6 GB/s, into one reused buffer).  zipfile's member writer `f` is
    then told the size and CRC it would have counted; its close() writes them into the local header
    and the central directory.  None (nothing written) where the OS cannot copy between these files
    (EXDEV, EINVAL) or zipfile's writer is not the one this was written against: the caller streams."""
    from concurrent.futures import ThreadPoolExecutor

    out = getattr(f, "_fileobj", None)
    if not hasattr(os, "copy_file_range") or out is None or ref.stride is not None or ref.scale is not None \
            or ref.deltas or not all(hasattr(f, a) for a in ("_crc", "_file_size", "_compress_size")) or f._file_size:
        return None
    out.flush()
    start = out.tell()
    with open(ref.file, "rb", buffering=0) as src, ThreadPoolExecutor(1) as pool:
        crc, done = None, 0
        while done < ref.nbytes:
            try:
                # a first chunk of 16 MiB: the CRC read starts once the kernel has shown it copies (not
                # after a first GiB, which left the CRC of a 2 GB embedding running past its copy)
                k = os.copy_file_range(src.fileno(), out.fileno(),
                                       min(ref.nbytes - done, (16 << 20) if crc is None else (1 << 30)),
                                       ref.offset + done, start + done)
            except OSError:
                if done:
                    raise
                return None  # e.g. between file systems the kernel will not copy across: stream instead
            if k == 0:
                raise ConversionError(f"{ref.file}: truncated while reading {ref.key}")
            if crc is None:  # the kernel copies: the CRC-32 from a read beside the rest of the copy
                crc = pool.submit(_crc32, ref, memoryview(reused_buffer("crc", min(16 << 20, ref.nbytes))))
            done += k
        value = crc.result() if crc is not None else 0
    out.seek(start + done)
    f._crc, f._file_size, f._compress_size = value, done, done
    return done


def _crc32(ref: TensorRef, buf: memoryview) -> int:
    import zlib

    crc = 0
    with open(ref.file, "rb", buffering=0) as f:
        for off in range(0, ref.nbytes, len(buf)):
            view = buf[:min(len(buf), ref.nbytes - off)]
            if read_fully(f, view, ref.offset + off) != len(view):
                raise ConversionError(f"{ref.file}: truncated while reading {ref.key}")
            crc = zlib.crc32(view, crc)
    return crc
