"""Which components a source holds: a folder in the original repo layout (transformer weights at
the root or in expert folders, .pth files beside them), or a single file. File names come from the
tables, where a repo keeps its transformer instances from mappings/pipeline.yaml."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ConversionError
from .mapping.tables import load_table, table_names
from .hub import missing_local_path
from .read.files import load_json, what_is
from .read.pth_file import read_pth_index
from .read.source import common_prefix
from .write.naming import MODEL_INDEX, index_name


def component_of(instance: str) -> str:
    """The table an instance converts with: transformer_2 -> transformer; a component is its own."""
    from .pipeline import transformer_instances

    return transformer_instances().get(instance, instance)


def transformer_folders(src: Path, weights_name: str) -> dict[str, Path]:
    """The transformer instances of a repo folder (mappings/pipeline.yaml transformer_layouts: the
    first layout whose folders all hold transformer weights), instance -> folder."""
    from .pipeline import load_pipeline_table

    def has_weights(folder: Path) -> bool:
        return os.path.lexists(folder / weights_name) or os.path.lexists(folder / index_name(weights_name))

    for layout in load_pipeline_table().transformer_layouts:
        folders = {inst: src if sub == "." else src / sub for inst, sub in layout.instances.items()}
        if all(has_weights(f) for f in folders.values()):
            return folders
    return {}


def discover(src: Path, only: list[str] | None = None) -> dict[str, Path]:
    """instance (output folder: transformer, transformer_2, vae, ...) -> the path to hand to
    plan_component with its component (`component_of`), in pipeline order. `only` names components:
    `transformer` takes every transformer instance."""
    src = Path(src)
    tables = {name: load_table(name) for name in table_names()}
    found: dict[str, Path] = {}
    kind = what_is(src)
    if kind == "missing":
        raise ConversionError(missing_local_path(str(src)))
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
                raise ConversionError(f"{src}: not a Wan VAE, umT5 or CLIP state dict (no known keys)")
        else:
            raise ConversionError(f"{src}: expected a .safetensors or .pth file, or a folder")
    else:
        already_converted(src, tables)
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


def already_converted(src: Path, tables: dict) -> None:
    """Refuse a folder this tool (or diffusers) already wrote, saying what to run instead."""
    from .pipeline import transformer_instances

    targets = {c for t in tables.values() for c in t.built_classes}
    folders = {t.output.folder for t in tables.values()} | set(transformer_instances())
    what = None
    if (src / MODEL_INDEX).is_file():
        what = "a Diffusers pipeline folder (model_index.json)"
    elif any((src / f / "config.json").is_file() for f in folders):
        what = "a folder of converted components (" + ", ".join(f + "/" for f in sorted(folders) if (src / f).is_dir()) + ")"
    elif (src / "config.json").is_file():
        try:
            cfg = load_json(src / "config.json", "config")
        except ConversionError:
            return
        name = cfg.get("_class_name") or (cfg.get("architectures") or [None])[0] if isinstance(cfg, dict) else None
        if name in targets:
            what = f"a converted {name} folder"
    if what:
        raise ConversionError(f"{src}: already {what}; nothing to convert. Check it with `wan2diffusers verify "
                              f"{src}`, quantize it with `wan2diffusers quantize {src} OUT --weights int8`")


def _has_all(keys: dict, required: list[str], prefixes: list[str]) -> bool:
    prefix = common_prefix(keys, prefixes)
    return all(prefix + k in keys for k in required)
