"""Which components a source holds: a folder in the original repo layout (transformer weights at
the root, .pth files beside them), or a single file.  File names come from the tables."""

from __future__ import annotations

from pathlib import Path

from .errors import ConversionError
from .mapping.tables import load_table, table_names
from .read.files import what_is
from .read.pth_file import read_pth_index
from .read.source import common_prefix
from .write.naming import index_name


def discover(src: Path, only: list[str] | None = None) -> dict[str, Path]:
    """component -> the path to hand to plan_component, in pipeline order."""
    src = Path(src)
    tables = {name: load_table(name) for name in table_names()}
    found: dict[str, Path] = {}
    kind = what_is(src)
    if kind == "missing":
        raise ConversionError(f"{src}: no such file or folder")
    if kind not in ("a regular file", "a folder"):
        raise ConversionError(f"{src}: is {kind}; expected a checkpoint file or folder")
    if kind == "a regular file":
        if src.suffix == ".safetensors":
            found = {n: src for n, t in tables.items() if t.source.weights_name}
        elif src.suffix in (".pth", ".pt", ".bin"):
            keys = read_pth_index(src)
            found = {n: src for n, t in tables.items() if not t.source.weights_name
                     and _has_all(keys, t.source.required_keys, t.source.strip_prefixes)}
            if not found:
                raise ConversionError(f"{src}: not a Wan 2.1 VAE, umT5 or CLIP state dict (no known keys)")
        else:
            raise ConversionError(f"{src}: expected a .safetensors or .pth file, or a folder")
    else:
        for name, t in tables.items():
            if t.source.weights_name:
                if (src / t.source.weights_name).exists() or (src / index_name(t.source.weights_name)).exists():
                    found[name] = src
            elif any((src / f).is_file() for f in t.source.file_names):
                found[name] = src
        if not found:
            names = [t.source.weights_name or t.source.file_names[0] for t in tables.values()]
            raise ConversionError(f"{src}: no Wan 2.1 weights here (looked for {', '.join(names)})")
    if only:
        unknown = set(only) - set(tables)
        if unknown:
            raise ConversionError(f"--only: unknown component(s) {sorted(unknown)}; choose from {sorted(tables)}")
        missing = [c for c in only if c not in found]
        if missing:
            raise ConversionError(f"{src}: no {', '.join(missing)} weights here")
        found = {c: p for c, p in found.items() if c in only}
    return found


def _has_all(keys: dict, required: list[str], prefixes: list[str]) -> bool:
    prefix = common_prefix(keys, prefixes)
    return all(prefix + k in keys for k in required)
