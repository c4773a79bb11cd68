"""Which side of a table a key belongs to (original Wan, Diffusers, or both), quanto's extra keys,
and the table run backwards: Diffusers keys -> the original keys and shapes they came from, so
the `facts:` machinery can derive a config from Diffusers weights.  Key names come from the
tables; nothing here names a key."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from functools import lru_cache

from ..mapping import transforms
from ..mapping.rules import Template, template_for
from ..mapping.schema import Rule, Table
from ..mapping.tables import load_table, table_names
from ..read.safetensors_file import TensorRef

# optimum-quanto's serialisation of a quantized module (diffusers/transformers QuantoConfig):
# `<m>.weight` becomes `<m>.weight._data` (+ `._scale`, `._shift` for int4) and the module gains
# `<m>.input_scale` / `<m>.output_scale`. These are the library's own names, not Wan key names.
# int4 packs its data: `<m>.weight._data._data`
QUANTO_WEIGHT = re.compile(r"^(?P<base>.+\.weight)\._(?P<part>data(?:\._data)?|scale|shift)$")
DATA_PARTS = ("data", "data._data")
QUANTO_MODULE = re.compile(r"^(?P<module>.+)\.(?P<part>input_scale|output_scale)$")
# torchao's serialisation (diffusers TorchAoConfig; torchao flatten_tensor_state_dict): `<m>.weight`
# becomes `<m>._weight_qdata` (+ `_weight_scale`, int8's `_weight_zero_point`)
TORCHAO_WEIGHT = re.compile(r"^(?P<module>.+)\._weight_(?P<part>qdata|scale|zero_point)$")


@dataclass
class Sides:
    """How the keys of one weight set fall on one table's two sides."""

    component: str
    original: list[str] = field(default_factory=list)  # only an original key
    diffusers: list[str] = field(default_factory=list)  # only a Diffusers/transformers key
    both: list[str] = field(default_factory=list)  # the same name on both sides (e.g. patch_embedding.weight)
    neither: list[str] = field(default_factory=list)

    @property
    def matched(self) -> int:
        return len(self.original) + len(self.diffusers) + len(self.both)

    @property
    def layout(self) -> str:
        if self.original and self.diffusers:
            return "mixed"
        if self.original:
            return "original"
        if self.diffusers or self.both:
            return "diffusers"
        return "unknown"


@lru_cache(maxsize=None)
def _templates(component: str) -> tuple[list[Template], list[Template]]:
    table = load_table(component)
    src = [template_for(table, t) for r in table.rules for t in r.sources]
    dst = [template_for(table, t) for r in table.rules for t in r.targets]
    return src, dst


def split_quantized(tensors: dict[str, TensorRef]) -> tuple[dict[str, TensorRef], dict[str, list[str]]]:
    """Quantized keys (quanto or torchao) folded onto the key of the unquantized model:
    `<m>.weight._data` / `<m>._weight_qdata` stands for `<m>.weight` (its shape, for 8-bit types);
    returns (keys, base key -> the stored keys it stands for)."""
    if any(TORCHAO_WEIGHT.match(k) for k in tensors):
        return _split_torchao(tensors)
    weights = {m.group("base") for k in tensors if (m := QUANTO_WEIGHT.match(k)) and m.group("part") in DATA_PARTS}
    if not weights:
        return dict(tensors), {}
    modules = {w.rsplit(".", 1)[0] for w in weights}
    out: dict[str, TensorRef] = {}
    parts: dict[str, list[str]] = {}
    for key, ref in tensors.items():
        m, mm = QUANTO_WEIGHT.match(key), QUANTO_MODULE.match(key)
        if m and m.group("base") in weights:
            parts.setdefault(m.group("base"), []).append(key)
            if m.group("part") == "data":
                out[m.group("base")] = replace(ref, key=m.group("base"))
            elif m.group("part") == "data._data":  # two 4-bit values a byte: rows j and j + half
                out[m.group("base")] = replace(ref, key=m.group("base"), shape=(2 * ref.shape[0], *ref.shape[1:]))
        elif mm and mm.group("module") in modules:
            parts.setdefault(mm.group("module") + ".weight", []).append(key)
        else:
            out[key] = ref
    return out, parts


def _split_torchao(tensors: dict[str, TensorRef]) -> tuple[dict[str, TensorRef], dict[str, list[str]]]:
    out: dict[str, TensorRef] = {}
    parts: dict[str, list[str]] = {}
    for key, ref in tensors.items():
        m = TORCHAO_WEIGHT.match(key)
        if m is None:
            out[key] = ref
            continue
        base = m.group("module") + ".weight"
        parts.setdefault(base, []).append(key)
        if m.group("part") == "qdata":
            out[base] = replace(ref, key=base)
    return out, parts


def classify(component: str, keys) -> Sides:
    src, dst = _templates(component)
    sides = Sides(component)
    for key in keys:
        o = any(t.match(key) is not None for t in src)
        d = any(t.match(key) is not None for t in dst)
        (sides.both if o and d else sides.original if o else sides.diffusers if d else sides.neither).append(key)
    return sides


def best_component(keys, candidates: list[str] | None = None) -> Sides | None:
    """The table whose keys (either side) match most of `keys`; None when none matches half."""
    keys = list(keys)
    best = None
    for name in candidates or table_names():
        s = classify(name, keys)
        if best is None or s.matched > best.matched:
            best = s
    if best is None or not keys or best.matched * 2 < len(keys):
        return None
    return best


def original_view(table: Table, tensors: dict[str, TensorRef], layouts: dict | None = None) -> dict[str, TensorRef]:
    """Run the table backwards over Diffusers keys: original key -> a TensorRef carrying the
    original shape (through each op's inverse).  Only shapes are meaningful (nothing is read).
    Keys whose original name needs nested indices are left out unless `layouts` (from the
    facts, rules.resolve_layouts) is given; a reshape's original shape is not recoverable, so
    its key keeps the Diffusers shape (no fact reads one)."""
    groups: dict[tuple, dict[int, TensorRef]] = {}
    for key, ref in tensors.items():
        for i, rule in enumerate(table.rules):
            hit = next(((slot, b) for slot, t in enumerate(rule.targets)
                        if (b := template_for(table, t).match(key)) is not None), None)
            if hit is not None:
                slot, b = hit
                groups.setdefault((i, tuple(sorted(b.items()))), {})[slot] = ref
                break
    out: dict[str, TensorRef] = {}
    for (i, bindings), parts in groups.items():
        rule: Rule = table.rules[i]
        if len(parts) != len(rule.targets):
            continue
        refs = [parts[s] for s in range(len(rule.targets))]
        try:
            names = [template_for(table, t, layouts).fill(dict(bindings)) for t in rule.sources]
            if rule.op == "reshape":
                shapes = [refs[0].shape]
            else:
                inv = transforms.inverse(rule, [()] * len(rule.sources))
                shapes = transforms.output_shapes(inv, [r.shape for r in refs])
        except (KeyError, ValueError):
            continue
        for name, shape in zip(names, shapes):
            out[name] = replace(refs[0], key=name, shape=tuple(shape))
    return out
