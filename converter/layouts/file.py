"""One checkpoint file: a .safetensors file (an original-layout transformer, a ComfyUI file in
either key layout, an fp8 file) or a torch.save .pth/.pt/.bin state dict (Wan's VAE, umT5, CLIP).
Which component and key layout it holds is read from its keys (the tables), not its name."""

from __future__ import annotations

from pathlib import Path

from ..errors import ConversionError
from ..read.pth_file import read_pth_index
from ..read.source import common_prefix
from . import Located

NAME = "file"
PTH = (".pth", ".pt", ".bin")


def claim(path: Path, what: str) -> Located | None:
    return Located(path, NAME, "single file", (path,), what) if what == "a regular file" else None


def instances(path: Path, tables: dict) -> dict[str, Path]:
    """What a checkpoint file can be converted as: a .safetensors file is a transformer (its keys
    decide the variant when it is planned), a .pth state dict the component whose required keys
    it holds (mappings' `source:` sections)."""
    if path.suffix == ".safetensors":
        return {n: path for n, t in tables.items() if t.source.weights_name}
    if path.suffix not in PTH:
        raise ConversionError(f"{path}: expected a .safetensors or .pth file, or a folder")
    keys = read_pth_index(path)
    found = {n: path for n, t in tables.items() if not t.source.weights_name
             and _has_all(keys, t.source.required_keys, t.source.strip_prefixes)}
    if not found:
        raise ConversionError(f"{path}: not a Wan VAE, umT5 or CLIP state dict (no known keys)")
    return found


def _has_all(keys: dict, required: list[str], prefixes: list[str]) -> bool:
    prefix = common_prefix(keys, prefixes)
    return all(prefix + k in keys for k in required)
