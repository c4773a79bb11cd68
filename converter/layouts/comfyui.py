"""A ComfyUI models folder (`convert --to comfyui` writes one): one .safetensors file per
component in the models/ subfolder mappings/comfyui.yaml names, with the key layout ComfyUI's
loader reads there. Claimed when it has a subfolder only ComfyUI uses (diffusion_models/,
text_encoders/, clip_vision/) and no Diffusers weights in its vae/."""

from __future__ import annotations

from pathlib import Path

from . import Located
from .names import output_folders, weight_stems

NAME = "comfyui"


def claim(path: Path, what: str) -> Located | None:
    files = comfy_files(path) if what == "a folder" else []
    return Located(path, NAME, "ComfyUI models folder", tuple(files), what) if files else None


def key_layouts() -> dict[str, str]:
    """models/ subfolder -> the key layout ComfyUI's loader reads there (original, diffusers)."""
    from ..comfyui import load_comfy_layout

    return {spec.folder: spec.keys for spec in load_comfy_layout().components.values()}


def comfy_files(path: Path) -> list[Path]:
    folders = set(key_layouts())
    if not any((path / f).is_dir() for f in folders - set(output_folders())):
        return []
    stems = tuple(name.removesuffix(".safetensors") for name in weight_stems())
    if any(p.name.startswith(stems) for f in folders & set(output_folders()) for p in (path / f).glob("*.safetensors")):
        return []  # Diffusers weights in vae/: a pipeline folder
    return sorted(p for f in sorted(folders) if (path / f).is_dir() for p in (path / f).glob("*.safetensors"))
