"""Which components a source holds, for convert (strict): `locate` says which layout SRC is in; a
Diffusers folder is refused naming what to run instead; an original repo folder lists its
transformer instances and .pth files (layouts/original.instances), a checkpoint file what it can
be converted as (layouts/file.instances)."""

from __future__ import annotations

from pathlib import Path

from .errors import ConversionError
from .mapping.tables import load_table, table_names
from .hub import missing_local_path
from .layouts import Located, diffusers, locate, original
from .layouts import file as file_layout


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
    located = locate(src)
    if located.what == "missing":
        raise ConversionError(missing_local_path(str(src)))
    if located.what not in ("a regular file", "a folder"):
        raise ConversionError(f"{src}: is {located.what}; expected a checkpoint file or folder")
    if located.layout == "diffusers":
        already_converted(located)
    # a file (a LoRA or GGUF file too: the checkpoint-file reader says what it is not) or a folder of weights
    found = (file_layout.instances if located.what == "a regular file" else original.instances)(src, tables)
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
