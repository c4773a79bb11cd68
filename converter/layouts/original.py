"""An original Wan repo folder: transformer weights at the root or in the expert folders of
mappings/pipeline.yaml (Wan 2.2 A14B: high_noise_model/, low_noise_model/), the VAE, umT5 and
CLIP as .pth files beside them (their names from the tables). Any other folder of weights is
claimed here too: what its keys are is read from its headers (inspect calls it a component folder)."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ConversionError
from ..write.naming import index_name
from . import Located

NAME = "original"


def claim(path: Path, what: str) -> Located | None:
    return Located(path, NAME, "folder", (), what) if what == "a folder" else None


def transformer_folders(src: Path, weights_name: str) -> dict[str, Path]:
    """The transformer instances of a repo folder (mappings/pipeline.yaml transformer_layouts: the
    first layout whose folders all hold transformer weights), instance -> folder."""
    from ..pipeline import load_pipeline_table

    def has_weights(folder: Path) -> bool:
        return os.path.lexists(folder / weights_name) or os.path.lexists(folder / index_name(weights_name))

    for layout in load_pipeline_table().transformer_layouts:
        folders = {inst: src if sub == "." else src / sub for inst, sub in layout.instances.items()}
        if all(has_weights(f) for f in folders.values()):
            return folders
    return {}


def instances(src: Path, tables: dict) -> dict[str, Path]:
    """Instance (transformer, transformer_2, vae, ...) -> where its weights are: the transformer
    instances by the pipeline table's folders, the others by their .pth names (mappings' `source:`)."""
    found: dict[str, Path] = {}
    for name, t in tables.items():
        if t.source.weights_name:
            found.update(transformer_folders(src, t.source.weights_name))
        elif any((src / f).is_file() for f in t.source.file_names):
            found[name] = src
    if not found:
        names = [t.source.weights_name or t.source.file_names[0] for t in tables.values()]
        raise ConversionError(f"{src}: no Wan weights here (looked for {', '.join(names)})")
    return found
