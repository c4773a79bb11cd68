"""ComfyUI's fp8 transformer files, written (`convert SRC OUT --to comfyui --quantize fp8_scaled`, or
`--dtype fp8_e4m3fn` for the plain kind): what Comfy-Org's repackaged `*_fp8_scaled` files hold
(mappings/fp8.yaml `write`), from a transformer planned back to the original key names.

Each 2-D `.weight` is quantized the way ComfyUI's own quantizer does it (comfy/quant_ops.py
TensorCoreFP8Layout.quantize): scale = amax(|w|) / 448 in float32, q = (w * (1 / scale)).to(fp8),
torch's round-to-nearest-even, from the source's values in float32 (a bf16 source's values are
exact in float32; nothing is rounded twice); its `.scale_weight` (0-d F32) and `.scale_input`
(0-d F32, 1.0: ComfyUI drops an input scale of 1.0) beside it; the marker `scaled_fp8` (F8_E4M3,
shape [0]). The other tensors go as the plan writes them (F16 unless --dtype says otherwise).
Plain fp8: the weights cast to fp8 (round-to-nearest-even), no scales, no marker; a value beyond
fp8's range is refused, never written as NaN.

The object has the face component.write_weights writes (like QuantizedPlan): `tensors`,
`produce`, `expect`, `close`, `file_metadata`; one weight is held at a time."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import ConversionError
from ..fp8 import load_fp8_spec
from ..plan.plan import FLOAT_TAGS, PlannedTensor
from ..read.safetensors_file import DTYPES


@dataclass
class Fp8Entry:
    key: str
    dtype: str
    shape: tuple[int, ...]
    weight: PlannedTensor | None  # the float weight it comes from (None: the marker)
    part: str  # "weight", "scale", "input", "marker"

    @property
    def nbytes(self) -> int:
        return DTYPES[self.dtype].itemsize * math.prod(self.shape)


@dataclass
class Fp8Plan:
    kind: str  # "fp8_scaled" or a plain format (fp8_e4m3fn, fp8_e5m2)
    tensors: list
    quantized: int
    fp8_tag: str  # the weights' dtype (F8_E4M3, F8_E5M2)
    _parts: dict = field(default_factory=dict, repr=False)

    def file_metadata(self) -> dict[str, str]:
        return {}

    def expect(self, entries) -> None:
        pass

    def close(self) -> None:
        self._parts.clear()

    def produce(self, entry):
        from ..component import produce

        if isinstance(entry, PlannedTensor):
            return produce(entry)
        spec = load_fp8_spec().write
        if entry.part == "marker":
            return torch.empty(tuple(spec.marker_shape), dtype=DTYPES[spec.marker_dtype])
        if entry.part == "input":
            return torch.tensor(spec.input_scale, dtype=torch.float32)
        parts = self._parts.get(entry.weight.key)
        if parts is None:
            parts = self._parts[entry.weight.key] = self._quantize(entry.weight, DTYPES[self.fp8_tag])
        value = parts.pop(entry.part)
        if not parts:
            del self._parts[entry.weight.key]
        return value

    def _quantize(self, pt: PlannedTensor, fp8_dtype) -> dict:
        """One weight's entries, computed a slice of rows at a time (each value alone: the slices give
        the bytes the whole tensor would; memory: one float32 slice and the fp8 weight)."""
        where = f"{pt.sources[0].file}: {pt.sources[0].key}"
        slices = list(row_slices(pt))
        q = torch.empty(tuple(pt.shape), dtype=fp8_dtype)
        if self.kind != "fp8_scaled":  # plain: the values cast as they are
            for rows, w in slices:
                values = w()
                q[rows] = values.to(fp8_dtype)
                bad = int(torch.isnan(q[rows].float()).sum()) - int(torch.isnan(values).sum())
                if bad > 0:
                    raise ConversionError(f"{where}: {bad} value(s) beyond the {self.kind} range (|x| > "
                                          f"{torch.finfo(fp8_dtype).max:g}); --quantize fp8_scaled scales them into it")
            return {"weight": q}
        amax = torch.zeros((), dtype=torch.float32)
        for _, w in slices:  # the first pass: amax (exact, in any order)
            amax = torch.maximum(amax, torch.amax(w().abs()))
        if not torch.isfinite(amax):
            raise ConversionError(f"{where}: holds NaN or Inf; an fp8 scale cannot be computed")
        scale = (amax / torch.finfo(fp8_dtype).max).to(torch.float32)
        if float(scale) == 0:  # an all-zero weight: ComfyUI's formula would divide by zero
            scale = torch.tensor(1.0, dtype=torch.float32)
        inverse = (1.0 / scale).to(torch.float32)
        for rows, w in slices:  # the second pass: ComfyUI's (w * (1 / scale)).to(fp8), slice by slice
            q[rows] = (w() * inverse).to(fp8_dtype)
        return {"weight": q, "scale": scale}


SLICE_ELEMENTS = 4 * 1024 * 1024  # float32 values per slice (16 MB)


def row_slices(pt: PlannedTensor):
    """(rows, a function giving those rows' float32 values) covering a 2-D planned weight: read from
    the source a slice at a time when only its name changes (LazyRows), else computed whole once."""
    from ..read.safetensors_file import LazyRows

    n, c = pt.shape
    if not (pt.is_elementwise and len(pt.sources[0].shape) == 2 and tuple(pt.sources[0].shape) == tuple(pt.shape)):
        whole = source_values(pt)
        yield slice(0, n), lambda: whole
        return
    lazy = LazyRows(pt.sources[0], (n, c), torch.float32)
    per = max(1, SLICE_ELEMENTS // max(c, 1))
    for a in range(0, n, per):
        rows = slice(a, min(n, a + per))
        yield rows, (lambda rows=rows: lazy[rows])


def source_values(pt: PlannedTensor) -> torch.Tensor:
    """A planned weight's values in float32, read from the source (its op applied), not from a cast copy."""
    from ..mapping import transforms
    from ..read.safetensors_file import read_tensor

    inputs = [read_tensor(r).to(torch.float32) for r in pt.sources]
    if transforms.is_view(pt.rule):
        return inputs[0].reshape(pt.shape)
    return transforms.apply(pt.rule, inputs)[pt.part].to(torch.float32).reshape(pt.shape)


def plan_fp8(cp, kind: str) -> Fp8Plan:
    """The fp8 file of a transformer planned backwards (`cp`): which tensors are quantized
    (mappings/fp8.yaml write.weights) and every entry written, in the plan's order."""
    spec = load_fp8_spec()
    rule = spec.write.weights
    scheme = spec.schemes[spec.write.scheme]
    if kind == "fp8_scaled":
        fp8_tag = spec.formats[spec.write.format]
    elif kind in spec.write.plain_formats:
        fp8_tag = spec.write.plain_formats[kind]
    else:
        raise ConversionError(f"{kind!r}: choose fp8_scaled or {', '.join(spec.write.plain_formats)}")
    entries: list = []
    n = 0
    for pt in cp.plan.tensors:
        module, _, name = pt.key.rpartition(".")
        if name != rule.suffix or len(pt.shape) != rule.rank or pt.key.startswith(tuple(rule.keep_prefixes)):
            entries.append(pt)
            continue
        if pt.sources[0].value_dtype not in FLOAT_TAGS:
            raise ConversionError(f"{pt.sources[0].file}: {pt.sources[0].key} is {pt.sources[0].dtype}, not a float weight")
        n += 1
        entries.append(Fp8Entry(pt.key, fp8_tag, tuple(pt.shape), pt, "weight"))
        if kind == "fp8_scaled":
            entries.append(Fp8Entry(f"{module}.{scheme.weight_scale}", spec.write.scale_dtype, (), pt, "scale"))
            if spec.write.input_scale is not None:
                entries.append(Fp8Entry(f"{module}.{scheme.input_scale}", spec.write.scale_dtype, (), pt, "input"))
    if kind == "fp8_scaled":
        entries.append(Fp8Entry(spec.marker, spec.write.marker_dtype, tuple(spec.write.marker_shape), None, "marker"))
    return Fp8Plan(kind, entries, n, fp8_tag)
