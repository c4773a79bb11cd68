"""ComfyUI's file layout (mappings/comfyui.yaml): per component the models/ folder, the key layout
its loader reads and the file name; loaded and validated here."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import Field

from .mapping.schema import Strict
from .mapping.tables import parse_yaml, tables_root

LAYOUT_FILE = "comfyui.yaml"


class ComfyComponent(Strict):
    folder: str
    keys: Literal["original", "diffusers"]
    file: str
    experts: dict[str, str] = {}  # expert folder of the original repo -> the file name's suffix


class ComfyLayout(Strict):
    schema_version: int = Field(ge=1, le=1)
    description: str
    components: dict[str, ComfyComponent]


@lru_cache(maxsize=None)
def load_comfy_layout() -> ComfyLayout:
    path = tables_root().joinpath(LAYOUT_FILE)
    return parse_yaml(path.read_text(encoding="utf-8"), str(path), ComfyLayout, "ComfyUI layout")


DTYPE_NAMES = {"F32": "fp32", "BF16": "bf16", "F16": "fp16", "F64": "fp64"}
