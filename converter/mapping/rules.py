"""Whole-key templates: `blocks.{n}.self_attn.q.{p}` becomes an anchored regular expression
whose groups are the placeholders; a match gives the bindings that fill the target template."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from .schema import Table

_PLACEHOLDER = re.compile(r"\{(\w+)\}")


@dataclass(frozen=True)
class Template:
    text: str
    regex: re.Pattern

    def match(self, key: str) -> dict[str, str] | None:
        m = self.regex.fullmatch(key)
        return m.groupdict() if m else None

    def fill(self, bindings: dict[str, str]) -> str:
        return _PLACEHOLDER.sub(lambda m: bindings[m.group(1)], self.text)


def compile_template(text: str, placeholders: dict) -> Template:
    return _compile(text, tuple(sorted((k, v if isinstance(v, str) else tuple(v)) for k, v in placeholders.items())))


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


def template_for(table: Table, text: str) -> Template:
    return compile_template(text, table.placeholders)
