"""A transformer as one GGUF file (`convert SRC OUT.gguf --to gguf --quantize TYPE`): the source's
own (original Wan) key names and shapes, each tensor's type chosen by mappings/gguf.yaml, values
from the `gguf` package's own `gguf.quants.quantize`. The header (every tensor's name, shape and
type) is written from the plan before any data; then the tensors are read, quantized and appended
one at a time, into a hidden file renamed to OUT when complete."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from pydantic import Field

from .errors import ConversionError
from .mapping.schema import Strict
from .mapping.tables import parse_yaml, tables_root


class FirstN(Strict):
    n: int
    to: str


class Raise(Strict):
    match: list[str]
    to: dict[str, str] = {}
    first: dict[str, FirstN] = {}


class GGUFPolicy(Strict):
    schema_version: int
    description: str
    architecture: str
    types: list[str]
    base_types: dict[str, str] = {}
    raise_: list[Raise] = Field(default=[], alias="raise")
    k_types: list[str] = []
    k_row: int = 256
    k_fallback: str = "F16"
    f32_max_params: int
    keep_f32: list[str]
    keep_unquantized: list[str]
    diffusers_single_file_lacks: list[str] = []

    def base(self, file_type: str) -> str:
        """The ggml type a file type quantizes with by default (Q4_K_M -> Q4_K)."""
        return self.base_types.get(file_type, file_type)


def gguf_module():
    """The `gguf` package (gguf-py, llama.cpp's own), or one line saying how to install it."""
    try:
        import gguf
    except ImportError as e:
        raise ConversionError(f"GGUF files need the gguf package ({e}): pip install 'gguf>=0.19'") from None
    return gguf


def single_file_gaps(keys) -> list[str]:
    """The keys of a file that diffusers' from_single_file has no place for (mappings/gguf.yaml)."""
    lacks = load_gguf_policy().diffusers_single_file_lacks
    return [k for k in keys if k in lacks]


@lru_cache(maxsize=None)
def load_gguf_policy() -> GGUFPolicy:
    path = tables_root().joinpath("gguf.yaml")
    return parse_yaml(path.read_text(encoding="utf-8"), str(path), GGUFPolicy, "GGUF policy")


@dataclass
class GGUFTensor:
    key: str
    shape: tuple[int, ...]
    qtype: str  # a gguf.GGMLQuantizationType name
    source: object  # the TensorRef to read
    nbytes: int


def tensor_type(key: str, shape: tuple[int, ...], source_dtype: str, target: str, seen: dict | None = None) -> str:
    """The GGUF type of one tensor for a file of type `target` (mappings/gguf.yaml), in two steps as
    ComfyUI-GGUF makes a file: convert.py's F16/BF16 file (1-D, tiny and `.modulation` tensors F32
    when the source is float32 or bf16; 5-D F32, as fix_5d_tensors.py adds it back), then
    llama-quantize with lcpp.patch (2-D `*weight` tensors not kept unquantized get the file's type,
    raised for some names; a K type on rows not a multiple of 256 values falls back to F16).
    `seen`: per raise rule, how many tensors it matched so far in file order (updated)."""
    gguf = gguf_module()

    p = load_gguf_policy()
    n = math.prod(shape)
    if len(shape) > 4:
        return "F32"
    plain = "BF16" if source_dtype == "BF16" else "F16"  # what ComfyUI-GGUF's convert.py writes
    if source_dtype in ("F32", "BF16") and (len(shape) == 1 or n <= p.f32_max_params
                                            or any(s in key for s in p.keep_f32)):
        plain = "F32"
    if target in ("F32", "F16", "BF16"):
        return "F32" if plain == "F32" else target
    quantize = (key.endswith("weight") and len(shape) == 2 and plain != "F32"
                and not any(s in key for s in p.keep_unquantized))
    if not quantize:
        return plain
    chosen = p.base(target)
    for i, rule in enumerate(p.raise_):
        if any(m in key for m in rule.match):
            count = (seen or {}).get(i, 0)
            first = rule.first.get(target)
            chosen = first.to if first is not None and count < first.n else rule.to.get(target, chosen)
            if seen is not None:
                seen[i] = count + 1
            break
    if chosen in p.k_types:
        return chosen if shape[-1] % p.k_row == 0 else p.k_fallback
    block, _ = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[chosen]]
    return chosen if shape[-1] % block == 0 else "F16"


def plan_gguf(tensors: dict, target: str) -> list[GGUFTensor]:
    """`tensors`: original key -> TensorRef of the transformer (actions/to_gguf.transformer_sources).
    Planned and written in name order, the order ComfyUI-GGUF's convert.py gives llama-quantize."""
    gguf = gguf_module()

    p = load_gguf_policy()
    if target not in p.types:
        raise ConversionError(f"--quantize {target}: a GGUF file takes {', '.join(p.types)}")
    out, seen = [], {}
    for key in sorted(tensors):
        ref = tensors[key]
        shape = tuple(ref.shape)
        q = tensor_type(key, shape, ref.value_dtype, target, seen)
        qt = gguf.GGMLQuantizationType[q]
        byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, qt) if q not in ("F32", "F16") else shape
        item = {"F32": 4, "F16": 2}.get(q, 1)
        out.append(GGUFTensor(key, shape, q, ref, math.prod(byte_shape) * item))
    return out


SLICE_ELEMENTS = 1024 * 1024  # float values quantized at once (4 MB in float32: cache-sized; 16M took 1.7x as long)


def quantized_values(t: GGUFTensor):
    """The tensor's bytes from its float32 values, a slice of rows at a time (every GGUF type
    quantizes blocks along a row, so slices give the same bytes): quantized types by ggml's own
    ggml_quantize_chunk (quantization/ggml_lib.py), float types by gguf-py's gguf.quants."""
    gguf = gguf_module()
    import numpy as np
    import torch

    from .quantization import ggml_lib
    from .read.safetensors_file import LazyRows, check_overflow, read_tensor

    qt = gguf.GGMLQuantizationType[t.qtype]
    ref = t.source
    block, type_size = gguf.GGML_QUANT_SIZES[qt]

    def quantize(values: np.ndarray) -> np.ndarray:
        if t.qtype not in ("F32", "F16", "BF16"):  # ggml's own quantizer (quantization/ggml_lib.py)
            return ggml_lib.quantize(values.reshape(-1, values.shape[-1]), int(qt), block, type_size)
        if t.qtype == "F16" and values.size:  # torch's vectorised cast: gguf-py's numpy astype ran 1.4 GB/s
            half = torch.from_numpy(values).to(torch.float16)
            lo, hi = torch.aminmax(half)
            if bool(torch.isfinite(lo) & torch.isfinite(hi)):  # no NaN/Inf: the same bits as astype (both RNE)
                return half.numpy()
        with np.errstate(over="ignore"):  # an overflow is named below, not warned about by numpy
            out = gguf.quants.quantize(values, qt)
        if t.qtype in ("F16", "BF16"):  # a float type that may not hold every float32 value
            check_overflow(torch.from_numpy(values), torch.from_numpy(out.view(np.float16)) if t.qtype == "F16"
                           else torch.from_numpy(out.view(np.int16)).view(torch.bfloat16), f"{ref.file}: {ref.key}")
        return out

    if len(t.shape) != 2 or ref.stride is not None:
        yield quantize(read_tensor(ref).float().numpy().astype(np.float32, copy=False))
        return
    rows = LazyRows(ref, t.shape, torch.float32)
    per = max(1, SLICE_ELEMENTS // max(t.shape[1], 1))
    for a in range(0, t.shape[0], per):
        yield quantize(rows[a:a + per].numpy())


def append_tensor(writer, t: GGUFTensor, bar) -> None:
    """GGUFWriter.write_tensor_data for a tensor that arrives in slices: the tensor info it pops,
    the alignment padding before and after, the slices' bytes in between (gguf-py gguf_writer.py)."""
    fout = writer.fout[0]
    name = next(iter(writer.tensors[0]))
    info = writer.tensors[0].pop(name)
    if name != t.key or info.nbytes != t.nbytes:
        raise ConversionError(f"{t.key}: the GGUF header planned {name} with {info.nbytes} bytes")
    writer.write_padding(fout, fout.tell())
    import numpy as np

    from .write.safetensors_writer import write_chunks

    def counted():
        for part in quantized_values(t):
            bar.update(part.nbytes)
            yield part.reshape(-1).view(np.uint8)

    done = write_chunks(fout, counted())  # a slice is written while the next is read and quantized
    if done != t.nbytes:
        raise ConversionError(f"{t.key}: planned {t.nbytes} bytes as {t.qtype}, quantized {done}")
    writer.write_padding(fout, t.nbytes)
    writer.state = gguf_state().WEIGHTS  # as write_tensor_data leaves it


def gguf_state():
    WriterState = gguf_module().gguf_writer.WriterState

    return WriterState


def write_gguf(tensors: list[GGUFTensor], out: Path, target: str, progress: bool = True, shown: str = "") -> None:
    """Write the file at `out` (a work file or a file inside a work folder: write/atomic.py)."""
    gguf = gguf_module()
    import numpy as np
    from tqdm import tqdm

    p = load_gguf_policy()
    writer = gguf.GGUFWriter(path=None, arch=p.architecture)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    file_type = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16"}.get(target, f"MOSTLY_{target}")
    writer.add_file_type(gguf.LlamaFileType[file_type])
    for t in tensors:  # the header, from the plan alone
        writer.add_tensor_info(t.key, t.shape, np.dtype(np.float32), t.nbytes, gguf.GGMLQuantizationType[t.qtype])
    try:
        writer.write_header_to_file(path=out)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with tqdm(total=sum(t.nbytes for t in tensors), unit="B", unit_scale=True, desc="writing gguf",
                  disable=None if progress else True, leave=False) as bar:
            for t in tensors:  # then the data, one tensor (a slice of rows) at a time
                append_tensor(writer, t, bar)
        from .progress import file_done

        file_done("writing gguf", shown or out.name, sum(t.nbytes for t in tensors), progress)
    finally:
        writer.close()


def inspect_gguf(path: Path) -> dict:
    """What `inspect` says of a GGUF file, from its header: architecture, the transformer variant
    and size the Wan tables detect from its key names and shapes, tensor types and sizes."""
    gguf = gguf_module()

    from .mapping.tables import load_table
    from .read.files import require_file
    from .read.safetensors_file import TensorRef

    from .write.workfiles import work_folders

    left = [w.describe for w in work_folders(Path(path).parent, Path(path).name)]
    if left and not os.path.lexists(path):
        raise ConversionError(f"{path}: does not exist; {left[0]}", left)
    require_file(path, "GGUF file")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - any parse failure is a corrupt file
        raise ConversionError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})".splitlines()[0]) from None
    field = reader.fields.get("general.architecture")
    arch = bytes(field.parts[-1]).decode("utf-8", "replace") if field is not None else None
    refs, types, total, misaligned = {}, {}, 0, []
    for t in reader.tensors:
        if (int(t.data_offset) - int(reader.data_offset)) % int(reader.alignment):
            misaligned.append(t.name)  # ggml maps tensors in place: an unaligned one is a corrupt file
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        refs[t.name] = TensorRef(Path(path), t.name, "F32", shape, 0, 0)
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        total += int(t.n_bytes)
    report = {"ok": True, "path": str(path), "kind": "gguf file", "architecture": arch, "tensors": len(refs),
              "types": dict(sorted(types.items())), "bytes": total, "components": [], "notes": [],
              "leftovers": left, "healthy": not left}
    if misaligned:
        report["healthy"] = False
        report["notes"].append(f"{len(misaligned)} tensor(s) not aligned to {int(reader.alignment)} bytes in the "
                               f"file (first: {misaligned[0]}): GGUF loaders map tensors in place")
    table = load_table("transformer")  # the variant and size from the keys and shapes, as convert detects them
    absent = [k for k in table.source.required_keys if k not in refs]
    if absent:
        report.update(variant=None, size=None, healthy=False)
        report["notes"].append(f"not a Wan transformer in the original key names (no {absent[0]})")
    else:
        variant = next(v.name for v in table.variants if all(k in refs for k in v.when_present))
        dim = refs["patch_embedding.weight"].shape[0]
        size = next((z.name for z in table.sizes if z.dim == dim), f"custom (dim {dim})")
        report.update(variant=variant, size=size)
    if arch != load_gguf_policy().architecture:
        report["notes"].append(f"general.architecture is {arch!r}; ComfyUI-GGUF reads Wan files as "
                               f"{load_gguf_policy().architecture!r}")
    return report


def inspect_gguf_folder(path: Path, files: list[Path]) -> dict:
    from .write.workfiles import work_folders

    reports = [inspect_gguf(f) for f in files]
    left = [w.describe for w in work_folders(path) + work_folders(path.parent, path.name)]
    return {"ok": True, "path": str(path), "kind": "folder of gguf files", "files": reports, "tensors":
            sum(r["tensors"] for r in reports), "bytes": sum(r["bytes"] for r in reports), "components": [],
            "notes": [], "leftovers": left, "healthy": not left and all(r["healthy"] for r in reports)}
