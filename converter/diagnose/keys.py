"""Which side of a table a key belongs to (original Wan, Diffusers, or both), and the table run backwards: Diffusers keys -> the original keys and shapes they came from, so
the `facts:` machinery can derive a config from Diffusers weights.  Key names come from the
tables; nothing here names a key."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import lru_cache

from ..mapping import transforms
from ..mapping.rules import Template, template_for
from ..mapping.schema import Rule, Table
from ..mapping.tables import load_table, table_names
from ..read.safetensors_file import TensorRef

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
    facts, rules.resolve_layouts) is given."""
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
            shapes = transforms.output_shapes(transforms.inverse(rule), [r.shape for r in refs])
        except (KeyError, ValueError):
            continue
        for name, shape in zip(names, shapes):
            out[name] = replace(refs[0], key=name, shape=tuple(shape))
    return out
