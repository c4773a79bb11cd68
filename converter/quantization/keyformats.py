"""How each backend names the tensors of a quantized module in a saved file, read without importing
torch or the backend: inspect, verify and repair fold a quantized module's stored tensors back onto
the key of the float weight they stand for, and verify asks which stored tensor holds the data and
which the scale.  These are the libraries' own names, not Wan key names; nothing outside this module
names them (the writers take theirs from the libraries themselves: quanto.py, ao.py)."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class KeyFormat:
    """One backend's serialisation of a quantized Linear's weight: `pattern` matches every stored
    key that stands for `<module>.weight`, with groups `module` and `part`; `roles` names the parts
    (data, scale, ...); `extra` matches the further per-module tensors a backend adds; `data` names
    the parts that hold the values, `shaped` those of them stored in the weight's own shape (quanto
    int4 stores groups of 128 values, two a byte: its data's shape is not the weight's)."""

    backend: str
    pattern: re.Pattern
    roles: dict[str, str]  # part -> role
    data: frozenset[str]
    shaped: frozenset[str]
    packed: dict[str, int] | None = None  # data part -> values per stored element
    extra: re.Pattern | None = None

    def fold(self, tensors: dict) -> tuple[dict, dict[str, list[str]]] | None:
        """(keys with each quantized weight folded onto `<module>.weight` (its stored data's dtype,
        as many values as the weight; in the weight's shape unless `unshaped`), `<module>.weight` -> the stored keys it stands for), or None
        when no key is this format's."""
        weights = {m.group("module") for k in tensors if (m := self.pattern.match(k)) and m.group("part") in self.data}
        if not weights:
            return None
        out: dict = {}
        parts: dict[str, list[str]] = {}
        for key, ref in tensors.items():
            m = self.pattern.match(key)
            x = self.extra.match(key) if self.extra else None
            if m and m.group("module") in weights:
                base = m.group("module") + ".weight"
                parts.setdefault(base, []).append(key)
                if m.group("part") in self.data:  # as many values as the weight (shape: see `unshaped`)
                    n = (self.packed or {}).get(m.group("part"), 1)
                    out[base] = replace(ref, key=base, shape=(n * ref.shape[0], *ref.shape[1:]))
            elif x and x.group("module") in weights:
                parts.setdefault(x.group("module") + ".weight", []).append(key)
            else:
                out[key] = ref
        return out, parts

    def unshaped(self, parts: dict[str, list[str]]) -> set[str]:
        """The folded weights whose stored data does not have the weight's shape."""
        return {base for base, stored in parts.items()
                if not any((m := self.pattern.match(k)) and m.group("part") in self.shaped for k in stored)}

    def by_role(self, stored: list[str]) -> dict[str, str]:
        """The stored keys of one weight by role: {"data": ..., "scale": ...}."""
        found = {}
        for key in stored:
            m = self.pattern.match(key)
            if m and m.group("part") in self.roles:
                found[self.roles[m.group("part")]] = key
        return found


# optimum-quanto (diffusers QuantoConfig; optimum/quanto/tensor/weights/qbytes.py and packed int4):
# `<m>.weight` becomes `<m>.weight._data` (+ `._scale`, int4's `._shift`; int4 packs its data in
# `<m>.weight._data._data`, two 4-bit values a byte: rows j and j + half) and the module gains
# `<m>.input_scale` / `<m>.output_scale`.
QUANTO = KeyFormat(
    "quanto",
    re.compile(r"^(?P<module>.+)\.weight\._(?P<part>data(?:\._data)?|scale|shift)$"),
    roles={"data": "data", "data._data": "packed data", "scale": "scale", "shift": "shift"},
    data=frozenset({"data", "data._data"}),
    shaped=frozenset({"data"}),
    packed={"data._data": 2},
    extra=re.compile(r"^(?P<module>.+)\.(?P<part>input_scale|output_scale)$"),
)

# torchao (diffusers TorchAoConfig; torchao/prototype/safetensors/safetensors_support.py
# flatten_tensor_state_dict): `<m>.weight` becomes `<m>._weight_qdata` (+ `_weight_scale`, int8's
# `_weight_zero_point`).
TORCHAO = KeyFormat(
    "torchao",
    re.compile(r"^(?P<module>.+)\._weight_(?P<part>qdata|scale|zero_point)$"),
    roles={"qdata": "data", "scale": "scale", "zero_point": "zero point"},
    data=frozenset({"qdata"}),
    shaped=frozenset({"qdata"}),
)

KEY_FORMATS = (TORCHAO, QUANTO)  # tried in this order


def fold_quantized(tensors: dict) -> tuple[dict, dict[str, list[str]], KeyFormat | None]:
    """Quantized keys folded onto the key of the unquantized model (its shape): returns (keys,
    base key -> the stored keys it stands for, the format found or None)."""
    for fmt in KEY_FORMATS:
        folded = fmt.fold(tensors)
        if folded is not None:
            return (*folded, fmt)
    return dict(tensors), {}, None

