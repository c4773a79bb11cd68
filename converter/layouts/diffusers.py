"""A Diffusers folder: a pipeline folder (model_index.json), a folder of component subfolders
(`convert --only ...` writes one: transformer/, transformer_2/, vae/, ...), or one converted
component folder (config.json naming a class a table converts to)."""

from __future__ import annotations

from pathlib import Path

from ..errors import ConversionError
from ..read.files import config_class, load_json
from ..write.naming import MODEL_INDEX
from . import Located
from .names import output_folders

NAME = "diffusers"
PIPELINE, SUBFOLDERS, COMPONENT = "pipeline folder", "folder of component subfolders", "component folder"


def claim(path: Path, what: str) -> Located | None:
    if what != "a folder":
        return None
    if (path / MODEL_INDEX).is_file():
        kind = PIPELINE
    elif subfolders(path):
        kind = SUBFOLDERS
    elif converted_class(path):
        kind = COMPONENT
    else:
        return None
    return Located(path, NAME, kind, (), what)


def subfolders(path: Path) -> dict[Path, str]:
    """The component subfolders of `path` (mappings' output folders and transformer instances) -> component."""
    return {path / f: c for f, c in output_folders().items() if (path / f).is_dir()}


def converted_class(folder: Path) -> str | None:
    """The class config.json names when a table converts to it (a converted component folder)."""
    from ..mapping.tables import load_table, table_names

    if not (folder / "config.json").is_file():
        return None
    try:
        cfg = load_json(folder / "config.json", "config")
    except ConversionError:
        return None
    if not isinstance(cfg, dict):
        return None
    name = config_class(cfg)
    built = {c for n in table_names() for c in load_table(n).built_classes}
    return name if name in built else None
