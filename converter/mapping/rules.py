"""Whole-key templates: `blocks.{n}.self_attn.q.{p}` becomes an anchored regular expression
whose groups are the placeholders; a match gives the bindings that fill the target template."""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field, replace
from functools import lru_cache

from ..errors import ConversionError
from .schema import Fixed, Nested, Table

_PLACEHOLDER = re.compile(r"\{(\w+)\}")


@dataclass(frozen=True)
class Template:
    text: str
    regex: re.Pattern
    layouts: dict = field(default_factory=dict)  # nested placeholders in text -> Layout (from facts)

    def match(self, key: str) -> dict[str, str] | None:
        m = self.regex.fullmatch(key)
        if not m:
            return None
        b = m.groupdict()
        for name, layout in self.layouts.items():  # a flat index binds the nested indices it stands for
            nested = layout.forward.get(b.get(name))
            if nested is None or any(b.get(k, v) != v for k, v in nested.items()):
                return None
            b.update(nested)
        return b

    def fill(self, bindings: dict[str, str]) -> str:
        b = dict(bindings)
        for name, layout in self.layouts.items():  # backwards: nested indices -> the flat index
            if name not in b:
                b[name] = layout.backward[tuple(b[k] for k in layout.names)]
        return _PLACEHOLDER.sub(lambda m: b[m.group(1)], self.text)


@dataclass(frozen=True)
class Layout:
    """A `Nested` placeholder resolved with the facts: flat index <-> nested indices (as strings)."""
    names: tuple[str, ...]
    forward: dict[str, dict[str, str]]
    backward: dict[tuple[str, ...], str]


def compile_template(text: str, placeholders: dict) -> Template:
    kinds = {}
    for k, v in placeholders.items():
        if isinstance(v, Nested):  # the flat index and the indices it stands for are all numbers
            kinds[k] = "index"
            kinds.update((n, "index") for n in v.nested if n not in placeholders)
        elif isinstance(v, Fixed):  # one number, given by a fact: matched as a number, checked by its layout
            kinds[k] = "index"
        else:
            kinds[k] = v if isinstance(v, str) else tuple(v)
    return _compile(text, tuple(sorted(kinds.items())))


@lru_cache(maxsize=None)
def _compile(text: str, placeholders: tuple) -> Template:
    kinds = dict(placeholders)
    out, pos, seen = [], 0, set()
    for m in _PLACEHOLDER.finditer(text):
        out.append(re.escape(text[pos:m.start()]))
        name = m.group(1)
        if name in seen:
            out.append(f"(?P={name})")
        else:
            kind = kinds[name]
            alt = r"\d+" if kind == "index" else "|".join(re.escape(v) for v in kind)
            out.append(f"(?P<{name}>{alt})")
            seen.add(name)
        pos = m.end()
    out.append(re.escape(text[pos:]))
    return Template(text, re.compile("".join(out)))


def template_for(table: Table, text: str, layouts: dict | None = None) -> Template:
    """`layouts` (from resolve_layouts) restricts nested placeholders to their positions."""
    t = compile_template(text, table.placeholders)
    used = {n: lay for n, lay in (layouts or {}).items() if "{" + n + "}" in text}
    return replace(t, layouts=used) if used else t


def resolve_layouts(table: Table, facts: dict) -> dict[str, Layout]:
    """Enumerate every `Nested` placeholder of the table with the derived facts."""
    out = {}
    for name, spec in table.placeholders.items():
        if not isinstance(spec, (Nested, Fixed)):
            continue
        needed = [spec.fixed] if isinstance(spec, Fixed) else [*spec.ranges, *spec.strides, spec.offset]
        if any(isinstance(x, str) and facts.get(x) is None for x in needed):
            continue  # its facts belong to another variant of the table: no rule of this one uses it

        def number(x, what):
            value = facts.get(x) if isinstance(x, str) else x
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConversionError(f"{table.component} table: placeholder {name}: {what} {x!r} is {value!r}, not a number")
            return value

        if isinstance(spec, Fixed):
            value = str(number(spec.fixed, "value"))
            out[name] = Layout((), {value: {}}, {(): value})
            continue
        ranges = [number(r, "range") for r in spec.ranges]
        strides = [number(s, "stride") for s in spec.strides]
        offset = number(spec.offset, "offset")
        forward, backward = {}, {}
        for idx in itertools.product(*(range(r) for r in ranges)):
            flat = str(offset + sum(i * s for i, s in zip(idx, strides)))
            if flat in forward:
                raise ConversionError(f"{table.component} table: placeholder {name}: two positions give index {flat}")
            forward[flat] = dict(zip(spec.nested, map(str, idx)))
            backward[tuple(map(str, idx))] = flat
        out[name] = Layout(tuple(spec.nested), forward, backward)
    return out
