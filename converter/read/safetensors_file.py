"""Read safetensors files without mapping them: parse and validate the header, then read one
tensor's bytes at a time (or let the kernel copy them), so memory never holds more than one
tensor.  safetensors' own `safe_open` maps the whole file: every page it touches counts in RSS
until the file is closed, which is why this module uses plain positioned reads."""

from __future__ import annotations

import math
import os
import struct
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConversionError
from .files import parse_json, require_file

# safetensors dtype tag -> bytes per element. torch is imported only where tensor data is
# touched: a conversion that only copies bytes never pays for importing it.
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
            "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the format's own limit


def itemsize(tag: str) -> int:
    return ITEMSIZE[tag]


def __getattr__(name: str):
    """DTYPES (tag -> torch dtype) and TAGS (torch dtype -> tag), made on first use."""
    if name in ("DTYPES", "TAGS"):
        import torch

        dtypes = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                  "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                  "U8": torch.uint8, "BOOL": torch.bool,
                  "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
        globals()["DTYPES"], globals()["TAGS"] = dtypes, {v: k for k, v in dtypes.items()}
        return globals()[name]
    raise AttributeError(name)


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor's bytes live: file, absolute byte offset, size, dtype tag and shape."""

    file: Path
    key: str  # the key as stored in the file
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute offset in the file of the first byte this tensor uses
    nbytes: int  # bytes from `offset` that hold the tensor (its span, when strided)
    stride: tuple[int, ...] | None = None  # None: contiguous (always for safetensors)
    # fp8 stored with a per-tensor scale (ComfyUI's fp8_scaled files, converter/fp8.py): the values
    # are the stored ones times `scale`, computed in float32; None: the stored values themselves
    scale: float | None = None
    # what is added to the values as they are read (LoRAs merged by `merge`, actions/merge.py): the
    # values are computed in float32, then cast by whoever reads them; never a byte copy
    deltas: tuple = ()

    @property
    def value_dtype(self) -> str:
        """The dtype tag of the values this ref reads as: F32 for a scaled fp8 weight."""
        return "F32" if self.scale is not None else self.dtype


@dataclass(frozen=True)
class Delta:
    """factor * (up @ down) (a LoRA's matrices; up [rows, r], down [r, ...]) or factor * add (a tensor
    of the same size), added to a tensor's values as they are read."""

    factor: float
    up: TensorRef | None = None
    down: TensorRef | None = None
    add: TensorRef | None = None


def add_deltas(flat, ref: TensorRef, e0: int) -> None:
    """Add `ref`'s deltas for its flat elements [e0, e0 + len(flat)) to `flat` (float32, in place): only
    the rows of B @ A those elements lie in are computed; an added tensor is read for that range only."""
    import torch

    e1 = e0 + flat.numel()
    numel = math.prod(ref.shape)
    rows = ref.shape[0] if ref.shape else 1
    cols = max(1, numel // max(rows, 1))
    for d in ref.deltas:
        if d.add is not None:
            item = ITEMSIZE[d.add.dtype]
            part = TensorRef(d.add.file, d.add.key, d.add.dtype, (e1 - e0,), d.add.offset + e0 * item, (e1 - e0) * item)
            flat.add_(read_tensor(part).to(torch.float32), alpha=d.factor)
            continue
        r0, r1 = e0 // cols, -(-e1 // cols)
        up, down = _lora_matrix(d.up), _lora_matrix(d.down)
        if e0 == r0 * cols and e1 == r1 * cols:  # whole rows: added in place, no copy of the block
            flat.view(r1 - r0, cols).addmm_(up[r0:r1], down, alpha=d.factor)
        else:
            block = (up[r0:r1] @ down).reshape(-1)[e0 - r0 * cols:e1 - r0 * cols]
            flat.add_(block, alpha=d.factor)


_matrices: dict = {}  # the LoRA matrices read lately (small: rank x width), shared by the threads that read


def _lora_matrix(ref: TensorRef):
    import torch

    t = _matrices.get(ref)
    if t is None:
        if len(_matrices) > 16:
            _matrices.clear()
        t = _matrices[ref] = read_tensor(ref).to(torch.float32).reshape(ref.shape[0], -1)
    return t


def with_deltas(values, ref: TensorRef, e0: int = 0, inplace: bool = False):
    """`values` (flat or shaped, the stored or scaled values of `ref` from element e0 on) with `ref`'s
    deltas added, in float32 (unchanged when it has none); `inplace`: float32 `values` may be changed."""
    import torch

    if not ref.deltas:
        return values
    out = values if values.dtype == torch.float32 and inplace else values.to(torch.float32, copy=True)
    add_deltas(out.reshape(-1), ref, e0)
    return out


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    tensors: dict[str, TensorRef]
    metadata: dict[str, str]


def read_header(path: Path) -> SafetensorsHeader:
    """Parse and validate a safetensors header; raise ConversionError naming the file."""
    path = Path(path)
    size = require_file(path, "safetensors file")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ConversionError(f"{path}: not a safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise ConversionError(
                    f"{path}: corrupt or truncated safetensors header "
                    f"(header length {n} bytes, file {size} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise ConversionError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        header = parse_json(raw, path, "safetensors header")
    except ConversionError as e:  # "<path>: <why>" -> "<path>: corrupt safetensors header (<why>)"
        raise ConversionError(f"{path}: corrupt safetensors header ({str(e).removeprefix(f'{path}: ')})") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{path}: corrupt safetensors header (not a JSON object)")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise ConversionError(f"{path}: corrupt safetensors header (__metadata__ is not a map of strings "
                              f"to strings, as the format requires)")
    data_start = 8 + n
    tensors: dict[str, TensorRef] = {}
    spans = []
    for key, entry in header.items():
        try:
            tag, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            shape = tuple(int(d) for d in shape)
            begin, end = int(begin), int(end)
        except (KeyError, TypeError, ValueError):
            raise ConversionError(f"{path}: corrupt safetensors header (bad entry for {key!r})") from None
        if tag not in ITEMSIZE:
            raise ConversionError(f"{path}: {key}: unsupported dtype {tag!r}")
        if any(d < 0 for d in shape) or begin < 0 or end < begin:
            raise ConversionError(f"{path}: {key}: corrupt safetensors header (negative size or offsets)")
        expected = math.prod(shape) * itemsize(tag)
        if end - begin != expected:
            raise ConversionError(
                f"{path}: {key}: corrupt safetensors header ({end - begin} bytes for shape "
                f"{list(shape)} {tag}, expected {expected})")
        tensors[key] = TensorRef(path, key, tag, shape, data_start + begin, end - begin)
        spans.append((begin, end, key))

    spans.sort()
    for (b0, e0, k0), (b1, _, k1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise ConversionError(f"{path}: corrupt safetensors header ({k0} and {k1} overlap)")
    data_end = max((e for _, e, _ in spans), default=0)
    if data_start + data_end > size:
        raise ConversionError(
            f"{path}: truncated: the header promises {data_end} bytes of tensor data, "
            f"the file holds {size - data_start}")
    return SafetensorsHeader(path, tensors, dict(metadata))


def read_tensor(ref: TensorRef):
    """Read exactly one tensor into fresh memory (no mmap)."""
    import torch

    dtype = __getattr__("DTYPES")[ref.dtype]
    buf = bytearray(ref.nbytes)
    try:
        with open(ref.file, "rb", buffering=0) as f:
            got = read_fully(f, memoryview(buf), ref.offset)
    except OSError as e:
        raise ConversionError(f"{ref.file}: cannot read {ref.key}: {e.strerror or e}") from None
    if got != ref.nbytes:
        raise ConversionError(f"{ref.file}: truncated while reading {ref.key}")
    if ref.nbytes == 0:
        return torch.empty(ref.shape, dtype=__getattr__("DTYPES")[ref.value_dtype])
    flat = torch.frombuffer(buf, dtype=dtype)
    if ref.stride is not None:
        return with_deltas(scaled(flat.as_strided(ref.shape, ref.stride).contiguous(), ref.scale), ref, inplace=True)
    return with_deltas(scaled(flat.reshape(ref.shape), ref.scale), ref, inplace=True)


def scaled(values, scale: float | None):
    """Stored fp8 values times their per-tensor scale, in float32 (as ComfyUI's TensorCoreFP8Layout
    dequantizes: qdata.to(float32) * scale, comfy/quant_ops.py); unchanged when there is no scale."""
    import torch

    if scale is None:
        return values
    return fp8_lookup(values, scale, torch.float32)


def fp8_table(fp8_dtype, scale: float | None, dtype):
    """The value of each of the 256 fp8 codes (times `scale`, in float32) cast to `dtype`: exactly what
    the elementwise expression gives for that code, so a lookup is the cast (fp8_lookup)."""
    import torch

    codes = torch.arange(256, dtype=torch.uint8).view(fp8_dtype).to(torch.float32)
    if scale is not None:
        codes = codes * torch.tensor(scale, dtype=torch.float32)
    return codes, codes.to(dtype)


def fp8_lookup(values, scale: float | None, dtype, out=None, where: str = "fp8 values"):
    """fp8 `values` (a torch tensor) as `dtype` through fp8_table (into `out` when given); a cast
    that would turn a finite value into Inf is refused like any cast (check_overflow's message)."""
    import torch

    wide, table = fp8_table(values.dtype, scale, dtype)
    if out is None:
        out = torch.empty(values.shape, dtype=dtype)
    codes = values.reshape(-1).view(torch.uint8)
    # index_select with a reused int64 index: 1.4 G values/s here (numpy's take 0.74, torch's cast 0.24-0.48)
    index = torch.frombuffer(reused_buffer("fp8_index", max(8, codes.numel() * 8)), dtype=torch.int64)[:codes.numel()]
    index.copy_(codes)
    torch.index_select(table, 0, index, out=out.reshape(-1))
    overflowing = torch.isinf(table) & torch.isfinite(wide)  # codes whose value the target cannot hold
    if bool(overflowing.any()) and bool(overflowing.numpy()[codes.numpy()].any()):
        check_overflow(fp8_lookup(values, scale, torch.float32), out, where)
    return out


def same_values(a: TensorRef, b: TensorRef, chunk: int = 16 * 1024 * 1024) -> bool:
    """Whether two contiguous tensors hold the same dtype, shape and bytes: read a chunk at a time
    into two reused buffers (fresh bytes objects cost a page fault per 4 KiB) and compared whole
    (bytearray == bytearray is a memcmp; bytes of a slice or a memoryview compare ran 1 GB/s)."""
    if (a.dtype, tuple(a.shape), a.nbytes, a.scale, a.deltas) != (b.dtype, tuple(b.shape), b.nbytes, b.scale, b.deltas) \
            or a.stride or b.stride:
        return False
    size = min(chunk, a.nbytes)
    bufs = [reused_buffer("same0", size), reused_buffer("same1", size)]
    views = [memoryview(buf) for buf in bufs]
    with open(a.file, "rb", buffering=0) as fa, open(b.file, "rb", buffering=0) as fb:
        for off in range(0, a.nbytes, chunk):
            n = min(chunk, a.nbytes - off)
            for f, ref, view in ((fa, a, views[0]), (fb, b, views[1])):
                if read_fully(f, view[:n], ref.offset + off) != n:
                    return False  # a file shorter than its header says
            if n == len(bufs[0]):
                if bufs[0] != bufs[1]:
                    return False
            elif views[0][:n].tobytes() != views[1][:n].tobytes():  # a last chunk, or a small tensor
                return False
    return True


def read_fully(f, view: memoryview, offset: int) -> int:
    """Bytes read into `view` from `offset` of the open file `f`, short reads retried; fewer than
    len(view) only at the end of the file."""
    got = 0
    while got < len(view):
        k = os.preadv(f.fileno(), [view[got:]], offset + got) if hasattr(os, "preadv") else _pread(f, view[got:], offset + got)
        if not k:
            break
        got += k
    return got


def copy_bytes(ref: TensorRef, out, chunk: int = 64 * 1024 * 1024) -> None:
    """Append a tensor's bytes to the open file `out`, kernel-side when the OS allows it
    (os.copy_file_range: the bytes never enter this process).  Contiguous, unscaled tensors only."""
    assert ref.stride is None and ref.scale is None and not ref.deltas, ref.key
    with open(ref.file, "rb", buffering=0) as src:
        out.flush()
        remaining, src_off = ref.nbytes, ref.offset
        if hasattr(os, "copy_file_range"):
            try:
                while remaining:
                    k = os.copy_file_range(src.fileno(), out.fileno(), min(remaining, 1 << 30), src_off)
                    if k == 0:
                        raise ConversionError(f"{ref.file}: truncated while reading {ref.key}")
                    remaining -= k
                    src_off += k
                return
            except OSError:
                pass  # e.g. EXDEV/EINVAL on some filesystems: fall back to plain reads
        src.seek(src_off)
        while remaining:
            data = src.read(min(chunk, remaining))
            if not data:
                raise ConversionError(f"{ref.file}: truncated while reading {ref.key}")
            out.write(data)
            remaining -= len(data)


def iter_chunks(ref: TensorRef, chunk: int = 64 * 1024 * 1024):
    """A tensor's values as flat tensors of at most `chunk` bytes, read in order (a strided .pth
    tensor is read whole, made contiguous)."""
    import torch

    if ref.stride is not None:
        yield read_tensor(ref).reshape(-1)
        return
    src_dtype = __getattr__("DTYPES")[ref.dtype]  # a scaled ref yields float32 values (read_tensor's)
    item = ITEMSIZE[ref.dtype]
    step = max(item, chunk - chunk % item)
    with open(ref.file, "rb", buffering=0) as f:
        done = 0
        while done < ref.nbytes:
            n = min(step, ref.nbytes - done)
            buf = bytearray(n)
            if read_fully(f, memoryview(buf), ref.offset + done) != n:  # a short read retried, not taken for truncation
                raise ConversionError(f"{ref.file}: truncated while reading {ref.key}")
            yield with_deltas(scaled(torch.frombuffer(buf, dtype=src_dtype), ref.scale), ref, done // item, inplace=True)
            done += n


CAST_CHUNK = 16 * 1024 * 1024  # source bytes per step of a streamed cast (measured: 16 MB beat 8/32/64)
_buffers = threading.local()  # per thread: the cast's reused buffers (fresh memory costs a page fault per 4 KiB)


@contextmanager
def _claimed(kind: str):
    """Whether this thread's reused buffers of `kind` are free for the caller (True, and held until
    it leaves) or already held by a generator still alive (False: the caller takes fresh ones)."""
    flag = f"busy_{kind}"
    shared = not getattr(_buffers, flag, False)
    if shared:
        setattr(_buffers, flag, True)
    try:
        yield shared
    finally:
        if shared:
            setattr(_buffers, flag, False)


def reused_buffer(name: str, nbytes: int, shared: bool = True) -> bytearray:
    if not shared:
        return bytearray(nbytes)
    have = getattr(_buffers, name, None)
    if have is None or len(have) < nbytes:
        have = bytearray(nbytes)
        setattr(_buffers, name, have)
    return have


def cast_checked(src, dtype, where: str):
    """`src` (a torch tensor) cast to `dtype`, refusing a cast that turns finite values into Inf
    (fp32 -> fp16 beyond +-65504): an overflow is never written silently. `where`: file: key."""
    out = src.to(dtype)
    check_overflow(src, out, where)
    return out


def check_overflow(src, out, where: str) -> None:
    """Refuse when `out` (a cast of `src`) holds more Inf values than `src` (one line naming `where`)."""
    import torch

    if not out.is_floating_point() or out.dtype == src.dtype or not src.is_floating_point():
        return
    if torch.finfo(out.dtype).max >= torch.finfo(src.dtype).max or out.numel() == 0:
        return
    lo, hi = torch.aminmax(out)  # one reduction pass, no temporary (isinf's bool tensor cost 7x the cast)
    if bool(torch.isfinite(lo) & torch.isfinite(hi)):
        return  # no Inf in the output (nor NaN): nothing overflowed
    inf = torch.isinf(out)
    if not bool(inf.any()):
        return
    n = int(inf.sum()) - int(torch.isinf(src).sum())
    if n > 0:
        name = str(out.dtype).removeprefix("torch.")
        raise ConversionError(f"{where}: {n} value(s) beyond the {name} range (|x| > {torch.finfo(out.dtype).max:g}) "
                              f"would become Inf; nothing was written (bf16 keeps float32's range: --dtype bf16)")


def iter_cast(ref: TensorRef, dtype, chunk: int = CAST_CHUNK):
    """A contiguous tensor's values cast to `dtype`, as raw bytes, one chunk at a time: an
    elementwise cast needs no more than a few chunks in memory.  Disk speed: the next chunk is read
    (another thread; file reads release the GIL) while this one is cast, into buffers reused from
    tensor to tensor, and the cast writes into one of two reused output buffers.  So a yielded
    chunk stays valid until the one after the next is asked for: the writer may write chunk i while
    chunk i+1 is made (write_safetensors does), never later."""
    import torch

    assert ref.stride is None, ref.key
    src_dtype = __getattr__("DTYPES")[ref.dtype]
    item = ITEMSIZE[ref.dtype]
    step = max(item, chunk - chunk % item)
    out_item = torch.empty((), dtype=dtype).element_size()
    spans = [(off, min(step, ref.nbytes - off)) for off in range(0, ref.nbytes, step)]
    with _claimed("cast") as shared:  # a second cast alive at once gets buffers of its own
        inputs = [reused_buffer("in0", step, shared), reused_buffer("in1", step, shared)]
        outputs = [torch.frombuffer(reused_buffer(f"out{i}", step // item * out_item, shared), dtype=dtype)
                   for i in range(2)]
        yield from _cast_steps(ref, spans, item, src_dtype, inputs, outputs)


def _cast_steps(ref: TensorRef, spans, item: int, src_dtype, inputs, outputs):
    import torch

    scale = ref.scale  # a scaled fp8 ref: its float32 values (stored x scale) cast once to the target
    for i, view in enumerate(_read_ahead(ref, spans, inputs)):
        count = len(view) // item
        out = outputs[i % 2][:count]
        src = torch.frombuffer(view, dtype=src_dtype, count=count)
        if ref.deltas:  # a merge: the values (scaled) + the deltas of this range, in float32, cast once
            values = with_deltas(scaled(src, scale), ref, spans[i][0] // item, inplace=True)  # the buffer is read again
            out.copy_(values)
            check_overflow(values, out, f"{ref.file}: {ref.key} (merged)")
        elif src_dtype.itemsize == 1 and src_dtype.is_floating_point:  # fp8 (x its scale): a table lookup
            fp8_lookup(src, scale, out.dtype, out, f"{ref.file}: {ref.key}")
        else:
            out.copy_(src)
            check_overflow(src, out, f"{ref.file}: {ref.key}")
        yield memoryview(out.view(torch.uint8).numpy())


def _read_ahead(ref: TensorRef, spans, buffers):
    """Each span (offset in the tensor, bytes) of `ref` read into buffers[i % len(buffers)] and
    yielded as a view of it, while the next span is read on another thread (file reads release the
    GIL).  Span i+2 is read into span i's buffer once span i+1 is asked for: what the consumer keeps
    of a yielded view beyond that decides how many buffers it needs (iter_cast: 2, iter_bytes: 3)."""
    from concurrent.futures import ThreadPoolExecutor

    views = [memoryview(b) for b in buffers]
    with open(ref.file, "rb", buffering=0) as f, ThreadPoolExecutor(1) as reader:
        def read(i: int) -> None:
            off, n = spans[i]
            if read_fully(f, views[i % len(views)][:n], ref.offset + off) != n:
                raise ConversionError(f"{ref.file}: truncated while reading {ref.key}")

        pending = reader.submit(read, 0) if spans else None
        for i, (_, n) in enumerate(spans):
            pending.result()
            if i + 1 < len(spans):
                pending = reader.submit(read, i + 1)
            yield views[i % len(views)][:n]


def iter_bytes(ref: TensorRef, chunk: int = CAST_CHUNK):
    """A contiguous tensor's stored bytes, one chunk at a time, read ahead on another thread into
    three buffers reused from tensor to tensor: no torch, no copy beyond the read.  The contract of
    iter_cast: a yielded chunk stays valid until the one after the next is asked for (the writer
    writes chunk i while chunk i+1 is made; chunk i+2 is read into chunk i-1's buffer)."""
    assert ref.stride is None and ref.scale is None and not ref.deltas, ref.key
    spans = [(off, min(chunk, ref.nbytes - off)) for off in range(0, ref.nbytes, chunk)]
    with _claimed("bytes") as shared:  # a second copy alive at once gets buffers of its own
        buffers = [reused_buffer(f"bytes{i}", min(chunk, ref.nbytes), shared) for i in range(3)]
        yield from _read_ahead(ref, spans, buffers)


def _pread(f, view: memoryview, offset: int) -> int:
    f.seek(offset)
    return f.readinto(view)


def count_nonfinite(ref: TensorRef) -> int:
    """How many NaN or +-Inf values a floating tensor holds (0 for integer tensors), chunk by chunk."""
    import torch

    if not ref.dtype.startswith(("F", "BF")):
        return 0
    wide = ref.value_dtype.startswith("F8")  # isfinite has no float8 kernel
    return sum(int((~torch.isfinite(part.float() if wide else part)).sum()) for part in iter_chunks(ref))


class LazyRows:
    """A contiguous tensor on disk seen as a 2-D matrix of rows, read a slice of rows at a time and
    cast to `dtype`: quantizing a weight slice by slice then never holds the whole weight.
    Supports what row-wise code needs of a tensor: .shape, .dtype, .reshape(-1, k), [a:b]."""

    def __init__(self, ref: TensorRef, shape: tuple[int, int], dtype):
        assert ref.stride is None and len(shape) == 2, ref.key
        self.ref, self.shape, self.dtype = ref, tuple(shape), dtype

    def reshape(self, rows: int, cols: int) -> "LazyRows":
        numel = self.shape[0] * self.shape[1]
        if rows == -1:
            rows = numel // cols
        assert rows * cols == numel, (self.shape, rows, cols)
        return LazyRows(self.ref, (rows, cols), self.dtype)

    def __getitem__(self, rows: slice):
        a, b, step = rows.indices(self.shape[0])
        assert step == 1
        b = max(a, b)
        item = ITEMSIZE[self.ref.dtype]
        row_bytes = self.shape[1] * item
        part = TensorRef(self.ref.file, self.ref.key, self.ref.dtype, (b - a, self.shape[1]),
                         self.ref.offset + a * row_bytes, (b - a) * row_bytes, scale=self.ref.scale)
        values = with_deltas(read_tensor(part), self.ref, a * self.shape[1], inplace=True)
        return cast_checked(values, self.dtype, f"{self.ref.file}: {self.ref.key}")
