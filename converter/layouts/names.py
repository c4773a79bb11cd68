"""The file and folder names the layouts look for, all from the tables (mappings/*.yaml)."""

from __future__ import annotations

from pathlib import Path

from ..mapping.tables import load_table, table_names
from ..write.naming import MODEL_INDEX
from ..write.workfiles import RECORD_NAME


def weight_stems() -> list[str]:
    """Every weights file name a table writes or reads (diffusion_pytorch_model.safetensors, ...)."""
    names = []
    for c in table_names():
        t = load_table(c)
        names += [t.output.weights_name] + ([t.source.weights_name] if t.source.weights_name else [])
    return list(dict.fromkeys(names))


def pth_names() -> dict[str, str]:
    """.pth file name of an original repo -> its component."""
    return {n: c for c in table_names() for n in load_table(c).source.file_names}


def output_folders() -> dict[str, str]:
    """Folder of a pipeline folder -> its component: each table's, and the extra transformer
    instances of mappings/pipeline.yaml (transformer_2, Wan 2.2 A14B's second expert)."""
    from ..pipeline import transformer_instances

    folders: dict[str, str] = {}
    for c in table_names():
        folders[load_table(c).output.folder] = c
        if c == "transformer":  # pipeline order: transformer, transformer_2, vae, ...
            for name in transformer_instances():
                folders.setdefault(name, c)
    return folders


def model_root(path: Path) -> Path:
    """The model folder PATH belongs to: the pipeline folder (or folder of component subfolders)
    holding it when PATH is one of its component folders, else PATH itself."""
    path = Path(path)
    parent = path.parent
    if path.name in output_folders() and parent != path:
        if ((parent / MODEL_INDEX).is_file() or (parent / RECORD_NAME).is_file()
                or any((parent / f).is_dir() for f in output_folders() if f != path.name)):
            return parent
    return path
