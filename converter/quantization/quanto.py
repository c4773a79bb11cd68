"""The optimum-quanto backend, in the format diffusers' `QuantoConfig` writes and reads.

Every value comes from optimum-quanto's own code: a `QLinear` (the class diffusers puts in place
of each quantized nn.Linear) is given the real weight and frozen, exactly what diffusers'
quantizer does at load (`set_module_tensor_to_device` then `module.freeze()`), and its
state dict is what `save_pretrained` writes.  What is planned from shapes alone comes from the
same `QLinear` frozen on the meta device.

Memory: freezing a whole weight costs about two float copies of it on top of the weight (1.2 GB
peak for a 14B FFN weight in float32), so the rows are quantized a slice at a time, each slice
by its own `QLinear`; the values are the same because every scale is computed from one row (int8,
float8: one scale per output row) or one group (int4: one scale and shift per `group_size`
values of a row), never across rows.  int4 packs two 4-bit values per byte, pairing row j with
row j + ceil(n/2) of the grouped weight (optimum.quanto.tensor.packed.pack_weights), so an int4
slice is made of the rows [a, b) and [a + half, b + half): its packed bytes are then exactly rows
[a, b) of the whole packed tensor."""

from __future__ import annotations

import math
import warnings
from functools import lru_cache

import torch
from optimum.quanto import QLinear, qfloat8, qint4, qint8

from ..read.safetensors_file import DTYPES, TAGS
from .keyformats import QUANTO
from .backend import Entry, QuantBackend

QTYPES = {"int8": qint8, "float8": qfloat8, "int4": qint4}  # as diffusers' _replace_with_quanto_layers
SLICE_ELEMENTS = 1024 * 1024  # float values quantized at once (4 MiB in float32; quanto needs ~10x that in temporaries)


def _qlinear(weights: str, out_features: int, in_features: int, dtype: torch.dtype, bias: bool = False) -> QLinear:
    return QLinear(in_features, out_features, bias=bias, dtype=dtype, weights=QTYPES[weights], device="meta")


class QuantoBackend(QuantBackend):
    name = "quanto"
    key_format = QUANTO  # how inspect/verify read back what this backend writes (keyformats.py)
    weights = tuple(QTYPES)

    def quantized_modules(self, model, keep_float):
        # diffusers.quantizers.quanto.utils._replace_with_quanto_layers: every nn.Linear below the
        # root whose attribute name (the last part of its path) is not in modules_to_not_convert,
        # which the quantizer extends with the class's _keep_in_fp32_modules.  A name that is a
        # parent module (e.g. "time_embedder") protects nothing: only Linear names count.
        skip = set(keep_float) | set(getattr(model, "_keep_in_fp32_modules", None) or [])
        return [name for name, m in model.named_modules()
                if name and isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] not in skip]

    def module_entries(self, weights, shape, dtype, bias):
        return list(_module_entries(weights, tuple(shape), dtype, bias))

    def quantize(self, weights, weight):
        if QTYPES[weights].bits == 8:
            parts = _quantize_rows(weights, weight)
        else:  # the group size QLinear chooses for this shape (QModuleMixin.__init__)
            group_size = _qlinear(weights, weight.shape[0], weight.shape[1], weight.dtype).weight_group_size
            parts = _quantize_grouped(weights, weight, group_size)
        parts.update(_buffers(weights, weight.dtype))
        return parts

    def config(self, weights, keep_float, keep_in_fp32):
        # diffusers' QuantoQuantizer extends the config's own list with _keep_in_fp32_modules in
        # place before saving, so that is what its config.json holds (null when none was given)
        return {"modules_to_not_convert": list(keep_float) + list(keep_in_fp32) if keep_float is not None else None,
                "quant_method": "quanto", "weights_dtype": weights}

    def loader_state_dict(self, model, weights, keep_float, keep_in_fp32):
        from diffusers import QuantoConfig
        from diffusers.quantizers.quanto.utils import _replace_with_quanto_layers

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # QuantoConfig is deprecated (still loads)
            config = QuantoConfig(weights_dtype=weights, modules_to_not_convert=list(keep_float))
            skip = list(keep_float) + list(keep_in_fp32)  # as QuantoQuantizer._process_model_before_weight_loading
            model = _replace_with_quanto_layers(model, config, modules_to_not_convert=skip, pre_quantized=True)
        return {k: (v.dtype, tuple(v.shape)) for k, v in model.state_dict().items()}


@lru_cache(maxsize=None)
def _module_entries(weights: str, shape: tuple[int, ...], dtype: str, bias: bool) -> tuple[Entry, ...]:
    q = _qlinear(weights, shape[0], shape[1], DTYPES[dtype], bias)
    q.freeze()  # on the meta device: shapes and dtypes only
    return tuple(Entry(k, TAGS[v.dtype], tuple(v.shape)) for k, v in q.state_dict().items())


def _buffers(weights: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The module's own buffers (input_scale, output_scale) as a new QLinear holds them: weight-only
    quantization never changes them."""
    q = QLinear(2, 2, bias=False, dtype=dtype, weights=QTYPES[weights])
    return {k: v.detach().clone() for k, v in q.named_buffers()}


def _frozen(weights: str, rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """`rows` quantized by a QLinear of that shape, as QLinear.freeze() does it: the entries its
    frozen weight is saved as (weight._data, weight._scale, ...), not its buffers."""
    q = _qlinear(weights, rows.shape[0], rows.shape[1], rows.dtype)
    q.weight = torch.nn.Parameter(rows, requires_grad=False)
    q.freeze()
    buffers = dict(q.named_buffers())
    return {k: v for k, v in q.state_dict().items() if k not in buffers}


def _slices(n: int, per: int, minimum: int = 1) -> list[tuple[int, int]]:
    per = max(per, minimum)
    bounds = [(a, min(a + per, n)) for a in range(0, n, per)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < minimum:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


def _quantize_rows(weights: str, w) -> dict[str, torch.Tensor]:
    """int8 / float8: one scale per output row.  Slices hold at least 2 rows, since quanto
    quantizes a one-row weight per tensor (quantize_weight: an axis of size 1); a weight that
    fits in one slice is frozen whole, as diffusers does."""
    n, c = w.shape
    slices = _slices(n, SLICE_ELEMENTS // max(c, 1), minimum=2)
    if len(slices) == 1:  # as is: e.g. a one-row weight has one scalar scale
        return _frozen(weights, w[0:n])
    out: dict[str, torch.Tensor] = {}
    for a, b in slices:
        for k, v in _frozen(weights, w[a:b]).items():
            if k not in out:
                out[k] = torch.empty((n, *v.shape[1:]), dtype=v.dtype)
            out[k][a:b] = v
    return out


def _quantize_grouped(weights: str, w, group_size: int | None) -> dict[str, torch.Tensor]:
    """int4: the weight as quanto groups it (rows of `group_size` values; none: the rows
    themselves), each group with its own scale and shift; the packed byte row j holds groups j
    and j + half."""
    g = w.reshape(-1, group_size) if group_size else w
    n, c = g.shape
    half = math.ceil(n / 2)
    # at least 2 packed rows per slice: quanto quantizes a one-row weight along its other axis
    slices = _slices(half, SLICE_ELEMENTS // (2 * max(c, 1)), minimum=2)
    if len(slices) == 1:
        return _frozen(weights, w[0:w.shape[0]])
    out: dict[str, torch.Tensor] = {}
    for a, b in slices:
        lo, hi = g[a:b], g[a + half:b + half]
        for k, v in _frozen(weights, torch.cat([lo, hi])).items():
            if v.shape[0] == b - a:  # the packed data: one byte row per (lo, hi) pair of rows
                if k not in out:
                    out[k] = torch.empty((half, *v.shape[1:]), dtype=v.dtype)
                out[k][a:b] = v
            else:  # scale, shift: one row per group
                assert v.shape[0] == len(lo) + len(hi), (k, v.shape)
                if k not in out:
                    out[k] = torch.empty((n, *v.shape[1:]), dtype=v.dtype)
                out[k][a:b] = v[:b - a]
                out[k][a + half:a + half + len(hi)] = v[b - a:]
    return out
