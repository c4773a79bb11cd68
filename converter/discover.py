"""Which components a source holds: a folder in the original repo layout (transformer weights at
the root or in expert folders, .pth files beside them), or a single file. File names come from the
tables, where a repo keeps its transformer instances from mappings/pipeline.yaml."""

from __future__ import annotations

from pathlib import Path

from .errors import ConversionError
from .mapping.tables import load_table, table_names
from .hub import missing_local_path
from .layouts import Located, locate
from .layouts import diffusers
from .layouts.original import transformer_folders
from .read.pth_file import read_pth_index
from .read.source import common_prefix


def component_of(instance: str) -> str:
    """The table an instance converts with: transformer_2 -> transformer; a component is its own."""
    from .pipeline import transformer_instances

    return transformer_instances().get(instance, instance)


def discover(src: Path, only: list[str] | None = None) -> dict[str, Path]:
    """instance (output folder: transformer, transformer_2, vae, ...) -> the path to hand to
    plan_component with its component (`component_of`), in pipeline order. `only` names components:
    `transformer` takes every transformer instance."""
    src = Path(src)
    tables = {name: load_table(name) for name in table_names()}
    found: dict[str, Path] = {}
    located = locate(src)
    if located.what == "missing":
        raise ConversionError(missing_local_path(str(src)))
    if located.what not in ("a regular file", "a folder"):
        raise ConversionError(f"{src}: is {located.what}; expected a checkpoint file or folder")
    if located.layout == "diffusers":
        already_converted(located)
    if located.what == "a regular file":
        if src.suffix == ".safetensors":
            found = {n: src for n, t in tables.items() if t.source.weights_name}
        elif src.suffix in (".pth", ".pt", ".bin"):
            keys = read_pth_index(src)
            found = {n: src for n, t in tables.items() if not t.source.weights_name
                     and _has_all(keys, t.source.required_keys, t.source.strip_prefixes)}
            if not found:
                raise ConversionError(f"{src}: not a Wan VAE, umT5 or CLIP state dict (no known keys)")
        else:
            raise ConversionError(f"{src}: expected a .safetensors or .pth file, or a folder")
    else:
        for name, t in tables.items():
            if t.source.weights_name:
                found.update(transformer_folders(src, t.source.weights_name))
            elif any((src / f).is_file() for f in t.source.file_names):
                found[name] = src
        if not found:
            names = [t.source.weights_name or t.source.file_names[0] for t in tables.values()]
            raise ConversionError(f"{src}: no Wan weights here (looked for {', '.join(names)})")
    if only:
        unknown = set(only) - set(tables)
        if unknown:
            raise ConversionError(f"--only: unknown component(s) {sorted(unknown)}; choose from {sorted(tables)}")
        missing = [c for c in only if c not in {component_of(i) for i in found}]
        if missing:
            raise ConversionError(f"{src}: no {', '.join(missing)} weights here")
        found = {i: p for i, p in found.items() if component_of(i) in only}
    return found


def already_converted(located: Located) -> None:
    """Refuse a folder this tool (or diffusers) already wrote, saying what to run instead."""
    src = located.path
    if located.kind == diffusers.PIPELINE:
        what = "a Diffusers pipeline folder (model_index.json)"
    elif located.kind == diffusers.SUBFOLDERS:
        what = "a folder of converted components (" + ", ".join(sorted(p.name + "/" for p in diffusers.subfolders(src))) + ")"
    else:
        what = f"a converted {diffusers.converted_class(src)} folder"
    raise ConversionError(f"{src}: already {what}; nothing to convert. Check it with `wan2diffusers verify "
                          f"{src}`, quantize it with `wan2diffusers quantize {src} OUT --weights int8`")


def _has_all(keys: dict, required: list[str], prefixes: list[str]) -> bool:
    prefix = common_prefix(keys, prefixes)
    return all(prefix + k in keys for k in required)
