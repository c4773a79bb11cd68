"""Recognise what a checkpoint is (variant, size) and derive the complete target config from
the table's `variants`, `sizes`, `facts` and `config` sections and the weights' shapes."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

from ..errors import ConversionError
from ..mapping.rules import template_for
from ..mapping.schema import Fact, Table, config_entry
from ..read.source import SourceCheckpoint

MISSING = "__required__"


@dataclass
class Detection:
    component: str
    variant: str
    size: str
    target_class: str
    facts: dict[str, Any]
    config: dict[str, Any]
    notes: list[str]
    label: str = ""  # what the weights are, in words (the variant, or the table's `kinds:` label)

    @property
    def says(self) -> str:
        return self.label or self.variant


def detect(table: Table, src: SourceCheckpoint, overrides: dict[str, Any] | None = None,
           override_config: bool = False, variant: str | None = None) -> Detection:
    """`overrides`: fact name -> value given by the user (e.g. a head count the weights cannot tell).
    One that contradicts the source's config.json is refused unless `override_config`. `variant`:
    the table variant the pipeline this component goes into needs (mappings/pipeline.yaml
    `variants:`), instead of the first whose keys are present."""
    overrides = overrides or {}
    unknown = set(overrides) - set(table.facts)
    if unknown:
        raise ConversionError(f"{table.component}: cannot override {sorted(unknown)}; known facts: {sorted(table.facts)}")
    keys = src.tensors
    absent = [k for k in table.source.required_keys if k not in keys]
    if absent:
        sample = ", ".join(sorted(keys)[:3]) or "no tensors at all"
        raise ConversionError(
            f"{src.path}: not a Wan {table.component} checkpoint: no {absent[0]} "
            f"(holds {len(keys)} tensors, e.g. {sample})")
    if variant is not None:
        asked, variant = variant, next((v for v in table.variants if v.name == variant), None)
        if variant is None:
            raise ConversionError(f"mappings/pipeline.yaml asks for the {asked!r} variant of mappings/"
                                  f"{table.component}.yaml, which has none of that name")
    else:
        variant = next(v for v in table.variants if all(k in keys for k in v.when_present))
    notes: list[str] = []
    cfg = src.original_config or {}

    facts: dict[str, Any] = {}
    for name, fact in table.facts.items():
        if name in overrides:
            check_value(fact, overrides[name], f"--set {table.component}.{name}")
            field = fact.config or fact.check
            if field and field in cfg and cfg[field] != overrides[name]:
                if not override_config:
                    raise ConversionError(
                        f"--set {table.component}.{name}={overrides[name]!r} contradicts {src.path / 'config.json'} "
                        f"({field}={cfg[field]!r}); drop --set, or add --override-config to use the given value")
                notes.append(f"{name}={overrides[name]!r} as given, overriding config.json's {cfg[field]!r}")
            else:
                notes.append(f"{name}={overrides[name]!r} as given (not derived)")
            facts[name] = overrides[name]
        else:
            try:
                facts[name] = _evaluate(name, fact, table, src, variant.name, facts)
            except KeyError as e:  # a table bug: a fact used before it is derived
                raise ConversionError(f"{table.component} table: fact {name} uses {e} before it is derived") from None

    size = ""
    if "dim" in facts and table.sizes:
        size = next((s.name for s in table.sizes if s.dim == facts["dim"]), f"custom (dim {facts['dim']})")

    # what the weights are: a kind of the variant the table names by its facts (Wan 2.2 I2V-A14B and
    # TI2V-5B keep T2V's blocks), else the variant; config.json's model_type is compared with that
    kind = next((k for k in table.kinds if k.variant == variant.name
                 and all(facts.get(f) == v for f, v in k.facts.items())), None)
    model_type = cfg.get("model_type")
    says = kind.model_type if kind is not None else variant.name
    if model_type and model_type != says:
        notes.append(f"config.json says model_type={model_type!r}; the weights say {says} (trusted)")

    config: dict[str, Any] = {}
    for field, entry in table.config.items():
        chosen = config_entry(entry, variant.name)
        if chosen is not None:
            config[field] = facts[chosen.fact] if chosen.fact else chosen.const
    return Detection(table.component, variant.name, size, variant.target_class, facts, config, notes,
                     kind.label if kind is not None else "")


MAX_INT = 2**31 - 1
TYPE_WORDS = {"int": f"a positive integer up to {MAX_INT}", "float": "a positive number below 1e6",
              "indices": f"a list of block indices (integers from 0 to {MAX_INT})"}


def _whole(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def short_repr(value, most: int = 60) -> str:
    """A value as an error message shows it: its repr, cut to `most` characters."""
    text = repr(value)
    return text if len(text) <= most else text[:most - 3] + "..."


def check_value(f: Fact, value: Any, where: str) -> None:
    """A value from outside (config.json, --set) must be what the table says the fact is."""
    if f.type is None:
        return
    if f.type == "int":
        ok = _whole(value) and 0 < value <= MAX_INT
    elif f.type == "float":
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
              and 0 < value < 1e6)
    else:
        ok = isinstance(value, list) and all(_whole(v) and 0 <= v <= MAX_INT for v in value)
    if not ok:
        raise ConversionError(f"{where}={short_repr(value)}: expected {TYPE_WORDS[f.type]}")


def _evaluate(name: str, f: Fact, table: Table, src: SourceCheckpoint, variant: str, facts: dict) -> Any:
    if f.variant is not None and variant not in f.variant:
        return None
    keys, cfg = src.tensors, src.original_config or {}

    def fallback(why: str):
        if f.else_size is not None:
            size = next((s for s in table.sizes if s.dim == facts.get("dim")), None)
            if size is not None and getattr(size, f.else_size) is not None:
                return getattr(size, f.else_size)
            known = ", ".join(f"{s.name} (dim {s.dim})" for s in table.sizes)
            raise ConversionError(
                f"{src.path}: {why}, and dim {facts.get('dim')} is not a known size ({known}); "
                + (f.hint or f"give it with --set {table.component}.{name}=VALUE"))
        if f.else_every is not None:
            step, upto = f.else_every
            return list(range(0, facts[upto], step))
        if f.else_ != MISSING:
            return f.else_
        raise ConversionError(f"{src.path}: cannot derive {name}: {why}")

    if "const" in f.model_fields_set:
        value = f.const
    elif f.shape is not None:
        key, index = f.shape
        if key not in keys:
            return fallback(f"no {key}")
        same_in_every_block(table, keys, key)
        shape = keys[key].shape
        try:
            if isinstance(index, int):
                value = shape[index]
            else:
                a, _, b = index.partition(":")
                value = list(shape[slice(int(a) if a else None, int(b) if b else None)])
        except IndexError:
            raise ConversionError(f"{keys[key].file}: {key} has shape {list(shape)}, too few dims") from None
    elif f.present is not None:
        if f.present not in keys:
            return fallback(f"no {f.present}") if f.else_ != MISSING else False
        value = facts[f.then_fact] if f.then_fact else (f.then if "then" in f.model_fields_set else True)
    elif f.count is not None:
        t = template_for(table, f.count)
        found = [int(b["n"]) for k in keys if (b := t.match(k))]
        value = max(found) + 1 if found else 0
    elif f.config is not None:
        if f.config in cfg:
            value = cfg[f.config]
            check_value(f, value, f"{src.path / 'config.json'}: {f.config}")
        else:
            return fallback(f"config.json has no {f.config}" if src.original_config else "there is no config.json")
    elif f.divide is None:  # indices, shapes, present_at, length, add
        value = _list_fact(name, f, table, src, facts)
    else:  # divide
        a, b = (facts[x] for x in f.divide)
        if not b or a % b:
            raise ConversionError(f"{src.path}: {f.divide[0]}={a} is not divisible by {f.divide[1]}={b}")
        value = a // b

    if f.subtract is not None:
        value -= f.subtract
    if f.square_root:
        root = math.isqrt(value) if value >= 0 else -1
        if root * root != value:
            raise ConversionError(f"{src.path}: cannot derive {name}: {value} is not a perfect square")
        value = root
    if f.multiply_by is not None:
        value *= facts[f.multiply_by]
    if f.every is not None or f.divide_by is not None:
        value = _every_divide(name, f, src, facts, value)
    if f.divide_by_product_of is not None:
        d = math.prod(facts[f.divide_by_product_of])
        if value % d:
            raise ConversionError(f"{src.path}: {name}: {value} is not divisible by {d}")
        value //= d
    if f.check is not None and f.check in cfg:
        check_value(f, cfg[f.check], f"{src.path / 'config.json'}: {f.check}")
        if cfg[f.check] != value:
            raise ConversionError(
                f"{src.path / 'config.json'}: {f.check}={cfg[f.check]!r} contradicts the weights ({value!r})")
    return value


def same_in_every_block(table: Table, keys: dict, key: str) -> None:
    """A fact read from one block (blocks.0...) holds for all: the same key in every other block
    must have the same shape. If not, name the key that differs (one transposed or foreign tensor),
    rather than let a wrong fact contradict config.json or fail the coverage everywhere."""
    for rule in table.rules:
        for text in rule.sources:
            if "{n}" not in text:
                continue
            t = template_for(table, text)
            bound = t.match(key)
            if bound is None:
                continue
            same = [k for k in keys if (b := t.match(k)) is not None and {**b, "n": bound["n"]} == bound]
            shapes = Counter(tuple(keys[k].shape) for k in same)
            if len(shapes) < 2:
                return
            common, n = shapes.most_common(1)[0]
            odd = sorted((k for k in same if tuple(keys[k].shape) != common), key=lambda k: k != key)
            if n == 1 or tuple(keys[key].shape) != common:  # a tie, or the block read is the odd one
                odd = [key]
                others = [k for k in same if tuple(keys[k].shape) != tuple(keys[key].shape)]
                common = tuple(keys[others[0]].shape)
                n = len(others)
            raise ConversionError(
                f"{keys[odd[0]].file}: {odd[0]} has shape {list(keys[odd[0]].shape)}, but the same tensor "
                f"of {n} other block(s) has {list(common)} (transposed or from another model?)"
                + (f"; {len(odd) - 1} more differ" if len(odd) > 1 else ""))


def _list_fact(name: str, f: Fact, table: Table, src: SourceCheckpoint, facts: dict) -> Any:
    """The list-valued kinds: over the {n} of a template, in index order (e.g. a flat block list)."""
    keys = src.tensors

    def matched(text: str) -> list[tuple[int, str]]:
        t = template_for(table, text)
        return sorted((int(b["n"]), k) for k in keys if (b := t.match(k)))

    if f.indices is not None:
        return [n for n, _ in matched(f.indices)]
    if f.shapes is not None:
        text, dim = f.shapes
        try:
            return [keys[k].shape[dim] for _, k in matched(text)]
        except IndexError:
            raise ConversionError(f"{src.path}: {name}: a {text} has too few dims") from None
    if f.present_at is not None:
        text, over = f.present_at
        t = template_for(table, text)
        return [t.fill({"n": str(n)}) in keys for n in facts[over]]
    if f.member_of is not None:
        have, over = (facts[x] for x in f.member_of)
        return [n in have for n in over]
    if f.length is not None:
        return len(facts[f.length])
    return sum(facts[x] if isinstance(x, str) else x for x in f.add)


def _every_divide(name: str, f: Fact, src: SourceCheckpoint, facts: dict, value: Any) -> Any:
    def number(x):
        return facts[x] if isinstance(x, str) else x

    if f.every is not None:
        step = number(f.every)
        if not isinstance(value, list) or not step or len(value) % step:
            raise ConversionError(f"{src.path}: {name}: cannot take every {step}th of {value!r}")
        value = value[::step]
    if f.divide_by is not None:
        d = number(f.divide_by)
        items = value if isinstance(value, list) else [value]
        if not d or any(v % d for v in items):
            raise ConversionError(f"{src.path}: {name}: {value!r} is not divisible by {d}")
        value = [v // d for v in items] if isinstance(value, list) else value // d
    return value


def within_limits(table, cfg: dict, where) -> None:
    """Refuse a config from disk whose module counts no real model has (the table's `limits:`),
    before any model is built from it."""
    for field, most in table.limits.items():
        value = cfg.get(field)
        n = len(value) if isinstance(value, list) else value
        if isinstance(n, int) and not isinstance(n, bool) and n > most:
            shown = f"a list of {n}" if isinstance(value, list) else repr(value)
            raise ConversionError(f"{where}: {field}={shown}: no real {table.component} has more than {most}; "
                                  f"not building a model from it")
