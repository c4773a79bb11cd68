"""The one small interface a quantization backend implements, and the registry of backends.

A backend answers four questions, the first three from shapes alone (nothing is read):
which Linear modules the loader will quantize, which entries (name, dtype, shape) one quantized
module stores, and what `quantization_config` goes into config.json; the fourth is the values of
those entries for one weight tensor.  Everything else (reading, planning, sharding, writing,
verifying) is the backend-free machinery of converter/component.py and converter/quantization/plan.py.
Backends: optimum-quanto (quanto.py; diffusers marks QuantoConfig deprecated) and torchao (ao.py).
A backend whose files carry metadata beyond {"format": "pt"} says so in `file_metadata`."""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConversionError
from .formats import PACKAGES
from .keyformats import KeyFormat


@dataclass(frozen=True)
class Entry:
    """One stored tensor of a quantized module, relative to the module (e.g. `weight._data`)."""

    name: str
    dtype: str  # safetensors tag
    shape: tuple[int, ...]


class QuantBackend(ABC):
    name: str  # as it appears in mappings/quantization.yaml
    key_format: "KeyFormat"  # its stored names, as inspect/verify/repair read them back
    weights: tuple[str, ...]  # the weight dtypes it offers (--quantize / --weights choices)

    @abstractmethod
    def quantized_modules(self, model: torch.nn.Module, keep_float: list[str]) -> list[str]:
        """The modules (state-dict prefixes) of `model` (on the meta device) whose weight the loader
        expects quantized, given the policy's `keep_float` names."""

    @abstractmethod
    def module_entries(self, weights: str, shape: tuple[int, ...], dtype: str, bias: bool) -> list[Entry]:
        """Every entry the quantized module stores, in its state-dict order, for a float weight of
        `shape` and `dtype` (tag).  An entry named like one of the float module's own tensors
        (`bias`) is that tensor, written as planned; the others come from `quantize`."""

    @abstractmethod
    def quantize(self, weights: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """The values of the module's entries that are not its float tensors, for one weight."""

    def from_scaled_fp8(self, weights: str, ref, shape: tuple[int, ...]) -> dict[str, torch.Tensor] | None:
        """The entries of a weight stored as fp8 with a per-tensor scale (a ComfyUI fp8_scaled source,
        `ref.scale`), written without quantizing again when the format can hold those values as
        they are; None: quantize the dequantized values like any float weight."""
        return None

    @abstractmethod
    def config(self, weights: str, keep_float: list[str], keep_in_fp32: list[str]) -> dict[str, Any]:
        """The `quantization_config` written into config.json, as the loader reads it back."""

    @abstractmethod
    def loader_state_dict(self, model: torch.nn.Module, weights: str, keep_float: list[str],
                          keep_in_fp32: list[str]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """What the loader will expect in the file: `model` (a fresh meta instance of the target)
        quantized the way the loader does it, as key -> (dtype, shape).  The coverage proof."""


    def file_metadata(self, weights: str, state_dict_keys: list[str], quantized: dict) -> dict[str, str]:
        """Metadata each written file carries besides {"format": "pt"} (`quantized`: module ->
        (in_features, dtype tag) of its float weight). None by default."""
        return {}


BACKENDS = {"quanto": f"{__package__}.quanto:QuantoBackend", "torchao": f"{__package__}.ao:TorchaoBackend"}
# The weight types each backend offers, known without importing it: the policy is checked against
# these on every run, and importing optimum.quanto (it pulls in transformers' model classes) took
# 1.7 s of a torchao run that never uses it.  Each class's `weights` must equal its entry (a test says so).
OFFERS = {"quanto": ("int8", "float8", "int4"), "torchao": ("int8", "float8")}


def get_backend(name: str) -> QuantBackend:
    if name not in BACKENDS:
        raise ConversionError(f"unknown quantization backend {name!r} (known: {', '.join(BACKENDS)})")
    module, _, cls = BACKENDS[name].partition(":")
    try:
        return getattr(importlib.import_module(module), cls)()
    except ImportError as e:
        raise ConversionError(f"quantization backend {name!r} is not installed ({e}); "
                              f"pip install '{PACKAGES[name]}'") from None
