"""The torchao backend, in the format diffusers' `TorchAoConfig` writes with `save_pretrained` and
reads back with a plain `from_pretrained` (diffusers quantizers/torchao/torchao_quantizer.py).

Which modules: diffusers quantizes the `weight` of every nn.Linear unless a name in
modules_to_not_convert (extended with the class's _keep_in_fp32_modules) occurs in the parameter's
name followed by a dot, or is it (`check_if_quantized_param`): a *substring* rule, unlike quanto's
attribute-name rule, so a parent module (time_embedder) does protect its Linears here.

Values and layout come from torchao's own code: `Int8WeightOnlyConfig` / `Float8WeightOnlyConfig`
(version 2) make an `Int8Tensor` / `Float8Tensor` with `from_hp(weight, granularity=PerRow())`
(torchao quantization/quant_api.py), and `flatten_tensor_state_dict`
(torchao prototype/safetensors/safetensors_support.py) turns `<module>.weight` into
`<module>._weight_qdata`, `_weight_scale` (and int8's `_weight_zero_point`), with a JSON
description of each original tensor and `tensor_names` in the file's metadata. PerRow scales are
computed from one row each, so a weight is quantized a slice of rows at a time with the very same
values (never a whole float weight in memory)."""

from __future__ import annotations

import json
from functools import lru_cache

import torch

from ..quiet import quiet_imports
from ..read.safetensors_file import DTYPES, TAGS
from .keyformats import TORCHAO
from .backend import Entry, QuantBackend

SLICE_ELEMENTS = 1024 * 1024  # float values quantized at once (4 MB in float32: cache-sized; 4M took 2x as long)

# The dtype a weight is quantized from, and so the dtype torchao's tensor says it dequantizes to.
# float8: Float8Tensor's matmul multiplies the input by `dequantize()` in that dtype, with no cast
# (torchao quantization/quantize_/workflows/float8/float8_tensor.py, _float8_addmm_impl), so a
# float32 Float8Tensor fails in a model loaded in bfloat16 -- which is how Wan runs and what a plain
# from_pretrained of a torchao folder gives. diffusers' own path for a bf16 load quantizes the
# bf16 weight: so do we. int8's kernel casts to the input's dtype: its weights keep their dtype.
HP_DTYPE = {"float8": "BF16"}


@lru_cache(maxsize=None)
def _torchao():  # once: it is asked for each slice of rows quantized
    with quiet_imports():
        import torchao.quantization as q
        from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict
        from torchao.prototype.safetensors.safetensors_utils import TensorSubclassAttributeJSONEncoder

    return q, flatten_tensor_state_dict, TensorSubclassAttributeJSONEncoder


def ao_config(weights: str):
    q, _, _ = _torchao()
    return {"int8": q.Int8WeightOnlyConfig, "float8": q.Float8WeightOnlyConfig}[weights]()


def _quantize_tensor(weights: str, w: torch.Tensor):
    """What torchao's quantize_ makes of one Linear weight for this config (quant_api.py)."""
    q, _, _ = _torchao()
    config = ao_config(weights)
    if weights == "int8":
        return q.Int8Tensor.from_hp(w, granularity=config.granularity)
    return q.Float8Tensor.from_hp(w, float8_dtype=config.weight_dtype, granularity=config.granularity)


@lru_cache(maxsize=None)
def _layout(weights: str, in_features: int, dtype: str) -> tuple[tuple[tuple[str, str, tuple[int, ...]], ...], str]:
    """(entry name, dtype tag, shape without the row count) of each flattened part, and the JSON
    description of the tensor, from torchao on a two-row weight of this width and dtype."""
    _, flatten, encoder = _torchao()
    t = _quantize_tensor(weights, torch.zeros(2, in_features, dtype=DTYPES[dtype]))
    data, _ = flatten({"m.weight": t})
    parts = []
    for key, v in data.items():
        assert v.shape[0] == 2, (key, tuple(v.shape))  # PerRow: every part has one row per weight row
        parts.append((key.removeprefix("m."), TAGS[v.dtype], tuple(v.shape[1:])))
    return tuple(parts), json.dumps(t, cls=encoder)


def hp_dtype(weights: str, dtype: str) -> str:
    """The dtype (tag) a `dtype` weight is quantized from for `weights` (see HP_DTYPE)."""
    return HP_DTYPE.get(weights, dtype)


class TorchaoBackend(QuantBackend):
    name = "torchao"
    key_format = TORCHAO  # how inspect/verify read back what this backend writes (keyformats.py)
    weights = ("int8", "float8")

    def quantized_modules(self, model, keep_float):
        skip = list(keep_float) + list(getattr(model, "_keep_in_fp32_modules", None) or [])
        return [name for name, m in model.named_modules()
                if name and isinstance(m, torch.nn.Linear)
                and not any(k + "." in f"{name}.weight" or k == f"{name}.weight" for k in skip)]

    def module_entries(self, weights, shape, dtype, bias):
        parts, _ = _layout(weights, shape[1], hp_dtype(weights, dtype))
        out = [Entry(name, tag, (shape[0], *rest)) for name, tag, rest in parts]
        return out + ([Entry("bias", dtype, (shape[0],))] if bias else [])

    def quantize(self, weights, weight):
        _, flatten, _ = _torchao()
        n, c = weight.shape
        per = max(1, SLICE_ELEMENTS // max(c, 1))
        hp = DTYPES[hp_dtype(weights, TAGS[weight.dtype])]
        out: dict[str, torch.Tensor] = {}
        for a in range(0, n, per):
            b = min(n, a + per)
            data, _ = flatten({"m.weight": _quantize_tensor(weights, weight[a:b].to(hp))})
            for key, v in data.items():
                name = key.removeprefix("m.")
                if name not in out:
                    out[name] = torch.empty((n, *v.shape[1:]), dtype=v.dtype)
                out[name][a:b] = v
        return out

    def from_scaled_fp8(self, weights, ref, shape):
        """float8 from a ComfyUI fp8_scaled weight: the stored fp8 values as `_weight_qdata`, the
        per-tensor scale as every row's PerRow scale -- Float8Tensor dequantizes qdata x scale
        (torchao float8/float8_tensor.py), so the output holds exactly the source's values and
        nothing is rounded a second time."""
        from dataclasses import replace

        from ..read.safetensors_file import read_tensor

        if weights != "float8" or ref.scale is None or DTYPES[ref.dtype] != ao_config(weights).weight_dtype:
            return None
        parts, _ = _layout(weights, shape[1], hp_dtype(weights, "F32"))
        out = {}
        for name, tag, rest in parts:
            if tag == ref.dtype and rest == (shape[1],):
                out[name] = read_tensor(replace(ref, scale=None)).reshape(shape)
            elif tag == "F32" and rest in ((1,), ()):
                out[name] = torch.full((shape[0], *rest), ref.scale, dtype=torch.float32)
            else:
                return None  # a layout this does not know: quantize the values instead
        return out

    def config(self, weights, keep_float, keep_in_fp32):
        """What diffusers' TorchAoConfig.to_dict() writes (modules_to_not_convert extended in place
        with _keep_in_fp32_modules by the quantizer before saving, as for quanto)."""
        with quiet_imports():
            from diffusers import TorchAoConfig
            from diffusers.quantizers.torchao import torchao_quantizer  # noqa: F401 - imported quietly here

        skip = list(keep_float) + list(keep_in_fp32) if keep_float is not None else None
        return TorchAoConfig(ao_config(weights), modules_to_not_convert=skip).to_dict()

    def loader_state_dict(self, model, weights, keep_float, keep_in_fp32):
        quantized = set(self.quantized_modules(model, list(keep_float) + list(keep_in_fp32)))
        out = {}
        for key, v in model.state_dict().items():
            module, _, name = key.rpartition(".")
            if module in quantized and name == "weight":
                for e in self.module_entries(weights, tuple(v.shape), TAGS[v.dtype], False):
                    out[f"{module}.{e.name}"] = (DTYPES[e.dtype], e.shape)
            else:
                out[key] = (v.dtype, tuple(v.shape))
        return out

    def file_metadata(self, weights, state_dict_keys, quantized):
        """The metadata flatten_tensor_state_dict gives save_file: each original tensor's JSON
        description and `tensor_names`, the same in every shard (as diffusers writes it).
        `quantized`: module -> (in_features, dtype tag) of each quantized weight."""
        meta = {}
        for key in state_dict_keys:
            module, _, name = key.rpartition(".")
            if name == "weight" and module in quantized:
                width, dtype = quantized[module]
                meta[key] = _layout(weights, width, hp_dtype(weights, dtype))[1]
            else:
                meta[key] = json.dumps({"_type": torch.Tensor.__name__})
        meta["tensor_names"] = json.dumps(list(state_dict_keys))
        return meta
