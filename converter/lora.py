"""Wan LoRA files (mappings/lora.yaml): which format a file is, every key placed on a module of the
Wan transformer and a role, and the keys of the same LoRA in another format. Module names move
between the original and the Diffusers naming through mappings/transformer.yaml, run on module
names: a LoRA is the transformer mapping applied to the modules it touches.

Nothing is guessed: a key that is not PREFIX + MODULE + PART of one format, a module the
transformer table does not know, a role the target format cannot hold (a full-weight `diff` in a
diffusers file) or another kind of adapter (LoHa, LoKr, DoRA) is refused in one line naming it.
Only headers are read to plan; the values are read when written (alphas: read to plan)."""

from __future__ import annotations

import re
import math
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field

from .errors import ConversionError
from .mapping.rules import compile_template, template_for
from .mapping.schema import Strict
from .mapping.tables import load_table, parse_yaml, tables_root
from .read.safetensors_file import SafetensorsHeader, TensorRef, itemsize, read_header, read_tensor

SPEC_FILE = "lora.yaml"
ROLES = ("down", "up", "alpha", "bias", "diff", "diff_b", "diff_m")


class Format(Strict):
    read_prefixes: list[str]
    write_prefix: str
    names: Literal["original", "diffusers"]
    separator: str
    write: dict[str, str]
    holds: list[str]
    alpha: Literal["kept", "folded"] = "kept"


class Fit(Strict):
    touches: list[str]  # a LoRA touching a module whose name holds one of these ([]: any LoRA)
    says: str


class LoraSpec(Strict):
    schema_version: int = Field(ge=1, le=1)
    description: str
    parts: dict[str, list[str]]
    other_adapters: dict[str, list[str]]
    formats: dict[str, Format]
    fits: list[Fit]


@lru_cache(maxsize=None)
def load_lora_spec() -> LoraSpec:
    path = tables_root().joinpath(SPEC_FILE)
    spec = parse_yaml(path.read_text(encoding="utf-8"), str(path), LoraSpec, "LoRA layout")
    if set(spec.parts) != set(ROLES):
        raise ConversionError(f"{path}: parts must name exactly the roles {', '.join(ROLES)}")
    return spec


@dataclass(frozen=True)
class ModuleRule:
    """One module of the transformer in both namings (templates with {n}/{b}); `param`: a tensor of
    its own (the modulation), not a Linear's weight."""

    original: str
    diffusers: str
    param: bool = False


@lru_cache(maxsize=None)
def module_rules() -> tuple[ModuleRule, ...]:
    """From mappings/transformer.yaml: every rename rule of a `{p}` module (weight/bias: a Linear, a
    norm, a conv) and every rename of a bare parameter (a block's modulation)."""
    out = []
    for rule in load_table("transformer").rules:
        if rule.op != "rename" or len(rule.sources) != 1 or len(rule.targets) != 1:
            continue
        s, t = rule.sources[0], rule.targets[0]
        if s.endswith(".{p}") and t.endswith(".{p}"):
            out.append(ModuleRule(s[:-4], t[:-4]))
        elif "{p}" not in s and not s.endswith(".weight"):
            out.append(ModuleRule(s, t, param=True))
    return tuple(out)


def rename_module(name: str, names: str, to: str, separator: str = ".") -> str | None:
    """A module name (in `names` naming, dots written as `separator`) in the `to` naming, with dots;
    None when the transformer table has no such module."""
    table = load_table("transformer")
    for r in module_rules():
        if r.param:
            continue
        src, dst = (r.original, r.diffusers) if names == "original" else (r.diffusers, r.original)
        if separator == ".":
            b = template_for(table, src).match(name)
        else:
            b = compile_template(src.replace(".", separator), table.placeholders).match(name)
        if b is not None:
            return template_for(table, src if names == to else dst).fill(b)
    return None


def param_key(module: str, names: str) -> str | None:
    """The modulation tensor of a block (`blocks.3` -> `blocks.3.modulation` / `.scale_shift_table`)."""
    table = load_table("transformer")
    for r in module_rules():
        if r.param and r.original.endswith(".modulation"):
            b = template_for(table, r.original).match(f"{module}.modulation")
            if b is not None:
                return template_for(table, r.original if names == "original" else r.diffusers).fill(b)
    return None


@dataclass
class LoraModule:
    name: str  # original naming, dots
    parts: dict[str, TensorRef] = field(default_factory=dict)  # role -> tensor

    @property
    def rank(self) -> int | None:
        down = self.parts.get("down")
        return int(down.shape[0]) if down is not None else None

    @cached_property
    def alpha(self) -> float | None:
        """The module's alpha, read once."""
        ref = self.parts.get("alpha")
        return None if ref is None else float(read_tensor(ref).float().reshape(-1)[0])

    def scale(self) -> float:
        """alpha / rank, the factor B @ A is multiplied by (1 when there is no alpha: ComfyUI's and
        WanVideoWrapper's reading, and what a diffusers file means: its alpha is folded in)."""
        a, r = self.alpha, self.rank
        return 1.0 if a is None or not r else a / r


@dataclass
class Lora:
    path: Path
    format: str
    prefix: str
    modules: dict[str, LoraModule]  # original module name -> its tensors
    metadata: dict[str, str]

    def blocks(self) -> list[int]:
        """The indices of the main block stack it touches (the first of the table's `{b}` families)."""
        main = load_table("transformer").placeholders["b"][0]
        return sorted({int(b["n"]) for _, b in map(_module_template, self.modules) if b.get("b") == main and "n" in b})

    def describe(self) -> dict:
        ranks = sorted({m.rank for m in self.modules.values() if m.rank})
        alphas = sorted({m.alpha for m in self.modules.values() if m.alpha is not None})
        roles: dict[str, int] = {}
        for m in self.modules.values():
            for role in m.parts:
                roles[role] = roles.get(role, 0) + 1
        table = load_table("transformer")  # each module as its template with the block index as N
        kinds = sorted({template_for(table, text).fill({**b, "n": "N"}) if "n" in b else name
                        for name in self.modules for text, b in [_module_template(name)]})
        return {"path": str(self.path), "format": self.format, "prefix": self.prefix, "modules": len(self.modules),
                "ranks": ranks, "alphas": alphas, "roles": roles, "blocks": self.blocks(), "module_kinds": kinds,
                "fits": fits(self)}


def fits(lora: Lora) -> str:
    """Which models the modules say it is for (mappings/lora.yaml `fits`: the first entry one of its
    modules matches)."""
    for fit in load_lora_spec().fits:
        if not fit.touches or any(t in name for name in lora.modules for t in fit.touches):
            return fit.says
    return ""


def _module_template(name: str) -> tuple[str, dict]:
    """The transformer table's template of an original module name (a block's own parameter holder,
    `blocks.3` of diff_m, as its parameter's template less the parameter) and its bindings."""
    table = load_table("transformer")
    for r in module_rules():
        text = r.original.rpartition(".")[0] if r.param else r.original
        b = template_for(table, text).match(name)
        if b is not None:
            return text, b
    return name, {}


def looks_like_lora(keys) -> bool:
    spec = load_lora_spec()
    tails = {p for names in spec.parts.values() for p in names if p != "alpha"} | \
            {p for names in spec.other_adapters.values() for p in names}
    return any(k.endswith(tuple("." + t for t in tails)) for k in keys)


def _split(rest: str, spec: LoraSpec) -> tuple[str, str, str] | None:
    """`rest` (a key without its prefix) as (module, role, part), the longest part name first."""
    candidates = sorted(((p, r) for r, ps in spec.parts.items() for p in ps), key=lambda x: -len(x[0]))
    for part, role in candidates:
        if rest.endswith("." + part):
            return rest[:-len(part) - 1], role, part
    return None


PTH_SUFFIXES = (".ckpt", ".pth", ".pt")


def lora_file(path: Path):
    """The LoRA file's tensors and metadata: a .safetensors file, or a torch.save file (.ckpt/.pth/.pt:
    PEFT's state dict as the official Wan 2.2 Animate relighting LoRA ships it)."""
    if Path(path).suffix in PTH_SUFFIXES:
        from .read.pth_file import read_pth_index

        return SafetensorsHeader(Path(path), read_pth_index(Path(path)), {})
    return read_header(path)


def read_lora(path: Path) -> Lora:
    """The LoRA file at `path`: its format (the first whose grammar places every key), each module in
    original naming with its tensors."""
    spec = load_lora_spec()
    header = lora_file(path)
    keys = list(header.tensors)
    for adapter, parts in spec.other_adapters.items():
        hit = next((k for k in keys if k.endswith(tuple("." + p for p in parts))), None)
        if hit is not None:
            raise ConversionError(f"{path}: {hit}: a {adapter} adapter, not a LoRA (A/B matrices); not converted")
    problems = {}
    for name, fmt in spec.formats.items():
        for prefix in fmt.read_prefixes:
            if not all(k.startswith(prefix) for k in keys):
                continue
            modules, bad = _place(keys, header.tensors, prefix, fmt, spec)
            if not bad:
                return Lora(Path(path), name, prefix, modules, header.metadata)
            problems[f"{name} ({prefix or 'no prefix'})"] = bad
    if not problems:
        raise ConversionError(f"{path}: not a Wan LoRA file: its keys have no prefix of a known format "
                              f"(e.g. {keys[0] if keys else 'no tensors'})")
    name, bad = min(problems.items(), key=lambda kv: len(kv[1]))
    raise ConversionError(f"{path}: {bad[0]}; read as {name}, {len(bad)} key(s) fit no module of the Wan "
                          f"transformer (mappings/transformer.yaml)")


def _place(keys, tensors, prefix: str, fmt: Format, spec: LoraSpec) -> tuple[dict, list[str]]:
    modules: dict[str, LoraModule] = {}
    bad = []
    for key in keys:
        split = _split(key[len(prefix):], spec)
        if split is None:
            bad.append(f"{key}: not a LoRA part ({', '.join(p for ps in spec.parts.values() for p in ps)})")
            continue
        module, role, _ = split
        if role == "diff_m":
            name = module.replace(fmt.separator, ".") if fmt.names == "original" else None
            if name is None or param_key(name, "original") is None:
                bad.append(f"{key}: no block {module} with a modulation")
                continue
        else:
            name = rename_module(module, fmt.names, "original", fmt.separator)
            if name is None:
                bad.append(f"{key}: no module {module} in the Wan transformer")
                continue
        m = modules.setdefault(name, LoraModule(name))
        if role in m.parts:
            bad.append(f"{key}: a second {role} for {name}")
            continue
        m.parts[role] = tensors[key]
    for m in modules.values():
        if ("down" in m.parts) != ("up" in m.parts):
            bad.append(f"{prefix}{m.name}: has {'down' if 'down' in m.parts else 'up'} without "
                       f"{'up' if 'down' in m.parts else 'down'}")
        elif "down" in m.parts and m.parts["down"].shape[0] != m.parts["up"].shape[-1]:
            bad.append(f"{prefix}{m.name}: rank {m.parts['down'].shape[0]} (down) vs {m.parts['up'].shape[-1]} (up)")
        if "alpha" in m.parts and "down" not in m.parts:
            bad.append(f"{prefix}{m.name}: an alpha without its LoRA matrices")
    return modules, bad


@dataclass
class Entry:
    key: str
    dtype: str
    shape: tuple[int, ...]
    source: TensorRef
    factor: float = 1.0  # the source multiplied by this (diffusers: alpha / rank folded in)

    @property
    def nbytes(self) -> int:
        return itemsize(self.dtype) * math.prod(self.shape)


def plan_lora(lora: Lora, to: str, drop: bool = False) -> tuple[list[Entry], list[str]]:
    """Every key of `lora` written in format `to`, in module order; and what was left out (only with
    `drop`: else a role `to` cannot hold is refused, naming the keys)."""
    spec = load_lora_spec()
    if to not in spec.formats:
        raise ConversionError(f"--to {to}: a LoRA goes to {', '.join(spec.formats)}")
    fmt = spec.formats[to]
    entries, left_out, refused = [], [], []
    for name in sorted(lora.modules, key=_natural):
        m = lora.modules[name]
        target = name if fmt.names == "original" else rename_module(name, "original", fmt.names)
        scale = m.scale() if fmt.alpha == "folded" else 1.0
        roles = {r: ref for r, ref in m.parts.items() if not (r == "alpha" and fmt.alpha == "folded")}
        for role, ref in roles.items():
            held = _held(role, fmt, "down" in roles)
            if held is None or target is None:
                (left_out if drop else refused).append(f"{lora.prefix}{_source_name(lora, name)}.{role}")
                continue
            part = fmt.write.get(held) or spec.parts[held][0]
            factor = 1.0
            if fmt.alpha == "folded" and held in ("down", "up") and scale != 1.0:
                down, up = _split_scale(scale)
                factor = down if held == "down" else up
            key = f"{fmt.write_prefix}{target.replace('.', fmt.separator)}.{part}"
            entries.append(Entry(key, ref.dtype, tuple(ref.shape), ref, factor))
    if refused:
        raise ConversionError(f"{lora.path}: {refused[0]}: a {to} LoRA file cannot hold it"
                              + (f" (and {len(refused) - 1} more)" if len(refused) > 1 else "")
                              + "; nothing was written (--drop-unsupported leaves such keys out and lists them)")
    keys = [e.key for e in entries]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ConversionError(f"{lora.path}: two tensors would be written as {dup}")
    return entries, left_out


def _held(role: str, fmt: Format, has_matrices: bool) -> str | None:
    """The role a tensor takes in `fmt`: its own, or a bias delta as PEFT's lora_B bias (and back)
    when the module has its LoRA matrices; None when `fmt` cannot hold it."""
    if role in fmt.holds:
        return role
    if role == "diff_b" and "bias" in fmt.holds and has_matrices:
        return "bias"
    if role == "bias" and "diff_b" in fmt.holds:
        return "diff_b"
    return None


def _split_scale(scale: float) -> tuple[float, float]:
    """alpha / rank as (factor of down, factor of up), as diffusers' converter splits it
    (loaders/lora_conversion_utils.py get_alpha_scales)."""
    down, up = scale, 1.0
    while down * 2 < up:
        down *= 2
        up /= 2
    return down, up


def _source_name(lora: Lora, name: str) -> str:
    fmt = load_lora_spec().formats[lora.format]
    target = name if fmt.names == "original" else rename_module(name, "original", fmt.names) or name
    return target.replace(".", fmt.separator)


def _natural(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def produce(entry: Entry):
    """An entry's value: the source bytes, or the source x factor computed in float32 and rounded
    once to its dtype."""
    import torch

    if entry.factor == 1.0:
        return entry.source
    t = read_tensor(entry.source)
    return (t.to(torch.float32) * entry.factor).to(t.dtype)
