"""One checkpoint file: a .safetensors file (an original-layout transformer, a ComfyUI file in
either key layout, an fp8 file) or a torch.save .pth/.pt/.bin state dict (Wan's VAE, umT5, CLIP).
Which component and key layout it holds is read from its keys (the tables), not its name."""

from __future__ import annotations

from pathlib import Path

from . import Located

NAME = "file"
SAFETENSORS, PTH = (".safetensors",), (".pth", ".pt", ".bin")


def claim(path: Path, what: str) -> Located | None:
    return Located(path, NAME, "single file", (path,), what) if what == "a regular file" else None
