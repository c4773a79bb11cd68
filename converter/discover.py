"""Which components a source holds: a folder in the original repo layout (transformer weights at
the root, .pth files beside them), or a single file.  File names come from the tables."""

from __future__ import annotations

from pathlib import Path

from .errors import ConversionError
from .mapping.tables import load_table, table_names
from .hub import missing_local_path
from .read.files import load_json, what_is
from .read.pth_file import read_pth_index
from .read.source import common_prefix
from .write.naming import MODEL_INDEX, index_name


def discover(src: Path, only: list[str] | None = None) -> dict[str, Path]:
    """component -> the path to hand to plan_component, in pipeline order."""
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
                if (src / t.source.weights_name).exists() or (src / index_name(t.source.weights_name)).exists():
                    found[name] = src
            elif any((src / f).is_file() for f in t.source.file_names):
                found[name] = src
        if not found:
            names = [t.source.weights_name or t.source.file_names[0] for t in tables.values()]
            raise ConversionError(f"{src}: no Wan weights here (looked for {', '.join(names)})")
    if only:
        unknown = set(only) - set(tables)
        if unknown:
            raise ConversionError(f"--only: unknown component(s) {sorted(unknown)}; choose from {sorted(tables)}")
        missing = [c for c in only if c not in found]
        if missing:
            raise ConversionError(f"{src}: no {', '.join(missing)} weights here")
        found = {c: p for c, p in found.items() if c in only}
    return found


def already_converted(src: Path, tables: dict) -> None:
    """Refuse a folder this tool (or diffusers) already wrote, saying what to run instead."""
    targets = {v.target_class for t in tables.values() for v in t.variants}
    folders = {t.output.folder for t in tables.values()}
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
