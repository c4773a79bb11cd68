"""Read a `torch.save` state dict (.pth, zip format) tensor by tensor, like a safetensors header:
the pickle is walked by a restricted unpickler that only knows how tensors and storages are
described (the same allow-list spirit as `torch.load(weights_only=True)`; no code in the file
runs), and each tensor becomes a TensorRef into the uncompressed zip member holding its storage.
No tensor data is read here."""

from __future__ import annotations

import math
import pickle
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path

from ..errors import ConversionError
from .files import require_file
from .safetensors_file import TensorRef, itemsize

STORAGE_TAGS = {
    "FloatStorage": "F32", "DoubleStorage": "F64", "HalfStorage": "F16", "BFloat16Storage": "BF16",
    "LongStorage": "I64", "IntStorage": "I32", "ShortStorage": "I16", "CharStorage": "I8",
    "ByteStorage": "U8", "BoolStorage": "BOOL",
}


# dtypes a tensor saved through an untyped storage names (torch.save writes `_rebuild_tensor_v3`
# with `torch.storage.UntypedStorage` and the dtype for those that have no typed storage: float8)
DTYPE_TAGS = {"float32": "F32", "float64": "F64", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
              "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
              "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}


class _Storage:
    def __init__(self, tag: str, key: str, numel: int):
        self.tag, self.key, self.numel = tag, key, numel  # an untyped storage: tag U8, numel in bytes


class _Tensor:
    def __init__(self, storage: _Storage, offset: int, size, stride, tag: str | None = None):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)
        self.tag = tag or storage.tag


class _StorageType:
    def __init__(self, tag: str):
        self.tag = tag


class _Dtype:
    def __init__(self, tag: str):
        self.tag = tag


MAX_PICKLE_BYTES = 8 * 1024 * 1024  # data.pkl of the 11 GB umT5-XXL file: ~30 KB; each pickle byte may cost ~60 B


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _rebuild_tensor(storage, storage_offset, size, stride, *args, **kwargs):
    """torch._utils._rebuild_tensor_v2's arguments, checked: anything else is a corrupt file."""
    if not isinstance(storage, _Storage):
        raise ValueError(f"_rebuild_tensor_v2 got {type(storage).__name__} for a storage")
    if not _is_int(storage_offset) or storage_offset < 0:
        raise ValueError(f"_rebuild_tensor_v2 got storage offset {storage_offset!r}")
    for name, dims in (("size", size), ("stride", stride)):
        if not isinstance(dims, (tuple, list)) or not all(_is_int(d) for d in dims):
            raise ValueError(f"_rebuild_tensor_v2 got {name} {dims!r}")
    if len(size) != len(stride):
        raise ValueError(f"_rebuild_tensor_v2 got {len(size)} sizes and {len(stride)} strides")
    return _Tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, *args):
    """torch._utils._rebuild_tensor_v3 (an untyped storage and the tensor's dtype), checked."""
    if not isinstance(dtype, _Dtype):
        raise ValueError(f"_rebuild_tensor_v3 got {type(dtype).__name__} for a dtype")
    t = _rebuild_tensor(storage, storage_offset, size, stride)
    t.tag = dtype.tag
    return t


def _rebuild_parameter(data, requires_grad, backward_hooks, *args):
    if not isinstance(data, _Tensor):
        raise ValueError(f"_rebuild_parameter got {type(data).__name__} for a tensor")
    return data


MAX_NESTING = 16  # a state dict's description nests 3-4 deep


class _Unpickler(pickle._Unpickler):
    """Python's own unpickler (the pure-Python one, so that opcodes can be checked as they run):
    a dict key must be a string (a state dict's keys: a deep tuple or a 5000-digit integer as a key
    would crash or stall the hash), and tuples and lists nest at most MAX_NESTING deep."""

    def __init__(self, f, path: Path):
        super().__init__(f)
        self.path = path
        self.depths: dict[int, int] = {}  # id of a tuple/list made here -> how deep it nests
        self.dispatch = dict(pickle._Unpickler.dispatch)
        base = pickle._Unpickler
        self.dispatch[pickle.SETITEM[0]] = lambda u: (u._keys(u.stack[-2:-1]), base.load_setitem(u))
        self.dispatch[pickle.SETITEMS[0]] = lambda u: (u._keys(u.stack[0::2]), base.load_setitems(u))
        for op, load in ((pickle.TUPLE, base.load_tuple), (pickle.TUPLE1, base.load_tuple1),
                         (pickle.TUPLE2, base.load_tuple2), (pickle.TUPLE3, base.load_tuple3),
                         (pickle.LIST, base.load_list)):
            self.dispatch[op[0]] = lambda u, load=load: (load(u), u._made(u.stack[-1], u.stack[-1]))
        self.dispatch[pickle.APPEND[0]] = lambda u: (u._made(u.stack[-2], [u.stack[-1]]), base.load_append(u))
        self.dispatch[pickle.APPENDS[0]] = lambda u: (u._made(u.metastack[-1][-1], u.stack), base.load_appends(u))

    def _depth(self, x) -> int:
        return self.depths.get(id(x), 1) if isinstance(x, (tuple, list, dict)) else 0

    def _made(self, container, items) -> None:
        """`container` now holds `items` (all its elements, or those just appended)."""
        d = max([self._depth(container) if isinstance(container, list) else 1]
                + [1 + self._depth(x) for x in items])
        if d > MAX_NESTING:
            raise ConversionError(f"{self.path}: the pickle nests containers {d}+ deep, more than a state dict "
                                  f"ever does (corrupt or hostile file)")
        self.depths[id(container)] = d

    def _keys(self, keys) -> None:
        for k in keys:
            if type(k) is not str:
                raise ConversionError(f"{self.path}: a dict key in the pickle is a {type(k).__name__}, not a "
                                      f"string: not a state dict (corrupt or hostile file)")

    def find_class(self, module, name):
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_tensor_v3":
            return _rebuild_tensor_v3
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in STORAGE_TAGS:
            return _StorageType(STORAGE_TAGS[name])
        if module == "torch.storage" and name == "UntypedStorage":
            return _StorageType("U8")
        if module == "torch" and name in DTYPE_TAGS:
            return _Dtype(DTYPE_TAGS[name])
        raise ConversionError(f"{self.path}: refusing to load: the pickle asks for {module}.{name}, "
                              f"which a plain state dict of tensors does not need")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise ConversionError(f"{self.path}: unsupported storage reference {pid!r}")
        _, stype, key, _location, numel = pid
        if not isinstance(stype, _StorageType):
            raise ConversionError(f"{self.path}: unsupported storage type {stype!r}")
        if not isinstance(key, (str, int)) or isinstance(key, bool) or not _is_int(numel) or numel < 0:
            raise ConversionError(f"{self.path}: corrupt storage reference {pid!r}"[:300])
        return _Storage(stype.tag, str(key), numel)


# a training checkpoint keeps its state dict under this key (PyTorch Lightning; Wan 2.2 Animate's
# relighting_lora.ckpt, which wan22 wan/animate.py reads as torch.load(path)["state_dict"])
WRAPPER = "state_dict"


def read_pth_index(path: Path) -> dict[str, TensorRef]:
    """Key -> TensorRef for every tensor of a zip-format torch.save state dict."""
    path = Path(path)
    require_file(path, "torch.save file")
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise ConversionError(f"{path}: not a zip-format torch.save file (truncated, corrupt, or the "
                              f"legacy format; re-save it with a recent torch)") from None
    except OSError as e:
        raise ConversionError(f"{path}: cannot read: {e.strerror or e}") from None
    with zf:
        names = zf.namelist()
        pkl = next((n for n in names if n.endswith("/data.pkl") or n == "data.pkl"), None)
        if pkl is None:
            raise ConversionError(f"{path}: no data.pkl inside: not a torch.save file")
        prefix = pkl[: -len("data.pkl")]
        info = zf.getinfo(pkl)
        if info.compress_type != zipfile.ZIP_STORED:  # torch.save never compresses; refuse before inflating
            raise ConversionError(f"{path}: {pkl} is compressed, which torch.save never does; refusing to "
                                  f"inflate it")
        if info.file_size > MAX_PICKLE_BYTES:
            raise ConversionError(f"{path}: {pkl} is {info.file_size} bytes, far more than a state dict's "
                                  f"description needs (at most {MAX_PICKLE_BYTES}); refusing to read it")
        try:
            with zf.open(pkl) as f:
                obj = _Unpickler(f, path).load()
        except ConversionError:
            raise
        except Exception as e:  # noqa: BLE001 - any unpickling failure is a corrupt file
            raise ConversionError(f"{path}: corrupt pickle ({type(e).__name__}: {e})") from None
        if isinstance(obj, dict) and isinstance(obj.get(WRAPPER), dict):  # a checkpoint wrapping its state dict
            obj = obj[WRAPPER]
        if not isinstance(obj, dict) or not all(isinstance(v, _Tensor) for v in obj.values()):
            raise ConversionError(f"{path}: not a flat state dict of tensors")
        size = path.stat().st_size
        members: dict[str, tuple[int, int]] = {}
        refs: dict[str, TensorRef] = {}
        with open(path, "rb") as raw:
            for key, t in obj.items():
                st = t.storage
                if st.key not in members:
                    members[st.key] = _member_span(zf, raw, path, f"{prefix}data/{st.key}", size)
                start, length = members[st.key]
                refs[str(key)] = _tensor_ref(path, str(key), t, start, length)
    return refs


def _member_span(zf: zipfile.ZipFile, raw, path: Path, name: str, size: int) -> tuple[int, int]:
    try:
        info = zf.getinfo(name)
    except KeyError:
        raise ConversionError(f"{path}: storage {name} is missing from the archive") from None
    if info.compress_type != zipfile.ZIP_STORED:
        raise ConversionError(f"{path}: storage {name} is compressed; cannot read it in place")
    raw.seek(info.header_offset)
    local = raw.read(30)
    if len(local) < 30 or local[:4] != b"PK\x03\x04":
        raise ConversionError(f"{path}: corrupt archive at {name}")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    start = info.header_offset + 30 + name_len + extra_len
    if start + info.file_size > size:
        raise ConversionError(f"{path}: truncated: {name} ends past the end of the file")
    return start, info.file_size


def _tensor_ref(path: Path, key: str, t: _Tensor, start: int, length: int) -> TensorRef:
    item = itemsize(t.tag)
    shape, stride = t.size, t.stride
    if any(s < 0 for s in shape) or any(st < 0 for st in stride):
        raise ConversionError(f"{path}: {key}: negative size or stride {list(shape)} / {list(stride)} (corrupt file)")
    numel = math.prod(shape)
    contiguous = [math.prod(shape[i + 1:]) for i in range(len(shape))]
    span = 0 if numel == 0 else 1 + sum((s - 1) * st for s, st in zip(shape, stride))
    if t.offset < 0 or (t.offset + span) * item > length or t.storage.numel * itemsize(t.storage.tag) > length:
        raise ConversionError(f"{path}: {key}: tensor lies outside its storage (corrupt file)")
    dense = numel == 0 or all(st == c for s, st, c in zip(shape, stride, contiguous) if s != 1)
    return TensorRef(path, key, t.tag, shape, start + t.offset * item, span * item,
                     None if dense else stride)
