"""A LoRA file: one .safetensors (or torch.save .ckpt/.pth/.pt) file whose keys are LoRA parts
(lora_A/lora_down/..., or another adapter's: refused by name when read). converter/lora.py reads it."""

from __future__ import annotations

from pathlib import Path

from ..errors import ConversionError
from . import Located

NAME = "lora"


def claim(path: Path, what: str) -> Located | None:
    from ..lora import PTH_SUFFIXES, lora_file, looks_like_lora

    if path.suffix not in (".safetensors", *PTH_SUFFIXES) or what != "a regular file":
        return None
    try:
        is_lora = looks_like_lora(lora_file(path).tensors)
    except ConversionError:
        return None  # unreadable: the checkpoint file layout says what is wrong with it
    return Located(path, NAME, "LoRA file", (path,), what) if is_lora else None
