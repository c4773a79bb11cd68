"""ComfyUI's fp8 files as a source (mappings/fp8.yaml says every name): a single transformer file
whose Linear weights are stored as float8 with a per-tensor scale (Comfy-Org's `*_fp8_scaled`
files: the `scaled_fp8` marker and `.scale_weight`; the newer `comfy_quant` scheme: per-layer
formats and `.weight_scale`), or plain float8 (Kijai's `*_fp8_e4m3fn`: no scales).

`resolve` folds each scale into its weight's TensorRef (`scale`: the reader then yields the stored
values times the scale in float32, exactly as ComfyUI dequantizes) and consumes the marker, the
scales, the activation scales and the layer configs, so the planner sees one tensor per key of
the original layout. Anything it cannot read exactly is refused in one line naming the key: an
fp8 weight without a scale in a scaled file, a scale without its weight, a scale that is not one
finite positive number, a layer format that is not fp8."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Literal

from pydantic import Field

from .errors import ConversionError
from .mapping.schema import Strict
from .mapping.tables import parse_yaml, tables_root
from .read.safetensors_file import TensorRef, read_tensor
from .read.source import SourceCheckpoint, common_prefix

SPEC_FILE = "fp8.yaml"


class Scheme(Strict):
    weight_scale: str
    input_scale: str
    layer_config: str | None = None
    metadata: str | None = None


class WeightRule(Strict):
    suffix: str
    rank: int = Field(ge=1)
    keep_prefixes: list[str] = []  # modules whose weights ComfyUI reads raw (not through its ops): never fp8


class WriteSpec(Strict):
    scheme: str
    format: str
    weights: WeightRule
    scale_dtype: Literal["F32"]
    input_scale: float | None
    marker_dtype: str
    marker_shape: list[int]
    keep_dtype: Literal["F32", "F16", "BF16"]
    plain_formats: dict[str, str]


class Fp8Spec(Strict):
    schema_version: int = Field(ge=1, le=1)
    description: str
    marker: str
    schemes: dict[str, Scheme]
    formats: dict[str, str]
    scale_dtypes: list[str]
    write: WriteSpec


@lru_cache(maxsize=None)
def load_fp8_spec() -> Fp8Spec:
    path = tables_root().joinpath(SPEC_FILE)
    spec = parse_yaml(path.read_text(encoding="utf-8"), str(path), Fp8Spec, "fp8 layout")
    if spec.write.scheme not in spec.schemes or spec.write.format not in spec.formats:
        raise ConversionError(f"{path}: write.scheme/format must name one of schemes/formats")
    return spec


@dataclass
class Fp8Source:
    """What `resolve` found: the scheme in words, and what it folded or left out."""

    scheme: str  # "fp8_scaled (scale_weight)", "fp8_scaled (comfy_quant)", "fp8 (no scales)"
    scaled: int = 0  # weights whose scale was folded in
    plain: int = 0  # fp8 weights read as they are
    dropped_input_scales: int = 0

    def says(self) -> str:
        parts = [f"{self.scaled} fp8 weight(s) x their scale"] if self.scaled else []
        parts += [f"{self.plain} fp8 weight(s) as stored"] if self.plain else []
        if self.dropped_input_scales:
            parts.append(f"{self.dropped_input_scales} activation scale(s) left out (they only steer an fp8 matmul)")
        return f"{self.scheme}: " + ", ".join(parts)


def resolve(src: SourceCheckpoint, strip_prefixes: list[str]) -> SourceCheckpoint:
    """`src` with its fp8 scales folded into their weights (unchanged when it holds no fp8)."""
    spec = load_fp8_spec()
    tensors = dict(src.tensors)
    fp8_tags = set(spec.formats.values())
    quant_meta = src.metadata.get(spec.schemes["comfy_quant"].metadata or "")
    scale_names = {s.weight_scale for s in spec.schemes.values()}
    has_scales = any(k.rpartition(".")[2] in scale_names for k in tensors)
    if not (spec.marker in tensors or quant_meta or has_scales
            or any(r.dtype in fp8_tags for r in tensors.values())):
        return src
    where = src.path
    marker = tensors.pop(spec.marker, None)
    prefix = src.prefix
    if marker is not None and not prefix:  # a bare marker beside prefixed keys (model.diffusion_model.)
        prefix = common_prefix(tensors, strip_prefixes)
        tensors = {k[len(prefix):]: r for k, r in tensors.items()}
    cq = spec.schemes["comfy_quant"]
    layers = _layer_formats(src, tensors, cq, quant_meta)
    if layers:
        scheme_name, scheme = "comfy_quant", cq
    elif marker is not None or any(k.endswith("." + spec.schemes["scale_weight"].weight_scale) for k in tensors):
        scheme_name, scheme = "scale_weight", spec.schemes["scale_weight"]
        layers = {k.removesuffix(".weight"): None for k, r in tensors.items() if r.dtype in fp8_tags}
        layers.update({k.rpartition(".")[0]: None for k in tensors if k.endswith("." + scheme.weight_scale)})
    else:
        scheme_name, scheme = "", None
    found = Fp8Source(f"fp8_scaled ({scheme_name})" if scheme else "fp8 (no scales)")
    if scheme is not None:
        for other in spec.schemes.values():  # the other scheme's scale names are not ours to guess at
            if other is not scheme:
                stray = [k for k in tensors if k.rpartition(".")[2] in (other.weight_scale, other.input_scale)]
                if stray:
                    raise ConversionError(f"{where}: {stray[0]}: a {scheme_name} file does not name scales this "
                                          f"way; cannot tell which weight it scales")
        for layer, fmt in layers.items():
            weight_key, scale_key = f"{layer}.weight", f"{layer}.{scheme.weight_scale}"
            weight, scale = tensors.get(weight_key), tensors.pop(scale_key, None)
            want = spec.formats.get(fmt) if fmt else None
            if weight is None:
                raise ConversionError(f"{where}: {scale_key if scale is not None else layer}: no {weight_key} "
                                      f"for this fp8 layer")
            if weight.dtype not in fp8_tags or (want is not None and weight.dtype != want):
                raise ConversionError(f"{where}: {weight_key} is {weight.dtype}, but the file says it is "
                                      f"{fmt or 'fp8'} (scaled by {scale_key})")
            if scale is None:
                raise ConversionError(f"{where}: {weight_key} is {weight.dtype} in a scaled fp8 file but has no "
                                      f"{scale_key}: its values cannot be known")
            tensors[weight_key] = replace(weight, scale=_scale_value(where, scale_key, scale, spec))
            found.scaled += 1
            input_key = f"{layer}.{scheme.input_scale}"
            if tensors.pop(input_key, None) is not None:
                found.dropped_input_scales += 1
        stray = [k for k in tensors if k.rpartition(".")[2] in (scheme.weight_scale, scheme.input_scale)]
        if stray:
            raise ConversionError(f"{where}: {stray[0]}: a scale whose layer has no fp8 weight")
    found.plain = sum(1 for r in tensors.values() if r.dtype in fp8_tags and r.scale is None)
    return replace(src, tensors=tensors, prefix=prefix, fp8=found)


def _layer_formats(src, tensors: dict, cq: Scheme, quant_meta: str | None) -> dict[str, str]:
    """comfy_quant: layer -> format, from the header's metadata entry and the per-layer config tensors
    (taken out of `tensors`)."""
    layers: dict[str, str] = {}
    if quant_meta:
        try:
            data = json.loads(quant_meta)
            entries = data["layers"]
            assert isinstance(entries, dict)
        except (ValueError, KeyError, TypeError, AssertionError):
            raise ConversionError(f"{src.path}: the {cq.metadata} header entry is not {{\"layers\": {{...}}}}") from None
        for layer, conf in entries.items():
            layers[layer] = _format_of(src.path, f"{cq.metadata}: {layer}", conf)
    for key in [k for k in tensors if k.endswith("." + (cq.layer_config or "\0"))]:
        ref = tensors.pop(key)
        if ref.dtype != "U8" or len(ref.shape) != 1 or ref.nbytes > 4096:
            raise ConversionError(f"{src.path}: {key}: expected uint8 bytes of JSON, found {ref.dtype} {list(ref.shape)}")
        try:
            conf = json.loads(read_tensor(ref).numpy().tobytes().decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise ConversionError(f"{src.path}: {key}: not JSON") from None
        layers[key.rpartition(".")[0]] = _format_of(src.path, key, conf)
    return layers


def _format_of(path, where: str, conf) -> str:
    spec = load_fp8_spec()
    fmt = conf.get("format") if isinstance(conf, dict) else conf
    if fmt not in spec.formats:
        raise ConversionError(f"{path}: {where}: quantization format {fmt!r} is not one this tool reads exactly "
                              f"(it reads {', '.join(spec.formats)})")
    return fmt


def _scale_value(where, key: str, ref: TensorRef, spec: Fp8Spec) -> float:
    if ref.dtype not in spec.scale_dtypes or math.prod(ref.shape) != 1 or len(ref.shape) > 1:
        raise ConversionError(f"{where}: {key} is {ref.dtype} {list(ref.shape)}; a per-tensor scale is one "
                              f"{'/'.join(spec.scale_dtypes)} value")
    value = float(read_tensor(ref).float().reshape(()))
    if not math.isfinite(value) or value <= 0:
        raise ConversionError(f"{where}: {key} is {value}; a scale must be a finite positive number")
    return value
