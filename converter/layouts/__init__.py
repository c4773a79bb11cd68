"""Which layout a path is in. Each kind of checkpoint on disk this tool reads is a module here,
registered in LAYOUTS in the order they are asked; `locate(path)` asks them and returns what the
first one that claims the path says of it (`Located`). Every command starts from what `locate`
returns - inspect, verify, repair, convert, quantize, merge and the way back -, and a layout's own
module enumerates what it holds (files, components, transformer instances).

    lora       one LoRA file (.safetensors or torch.save), any format mappings/lora.yaml reads
    gguf       one .gguf file, or the folder of one .gguf per expert `--to gguf` writes
    comfyui    a ComfyUI models folder (diffusion_models/, vae/, text_encoders/, clip_vision/)
    diffusers  a pipeline folder, a folder of component subfolders, a converted component folder
    original   an original Wan repo folder (transformer shards, expert folders, .pth files)
    file       one checkpoint file (.safetensors / .pth): its key layout is read from its keys

A new kind of file is one module with NAME and `claim(path, what) -> Located | None` added to
LAYOUTS; the order matters only where two could claim a path (a LoRA or GGUF file before a
checkpoint file, a ComfyUI or Diffusers folder before an original repo folder). A path nothing
claims (missing, a FIFO, ...) is returned with layout None: each command says in its own words
what it expected there."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..read.files import what_is


@dataclass(frozen=True)
class Located:
    path: Path
    layout: str | None  # the claiming module's NAME; None: nothing here any layout reads
    kind: str  # in words: "pipeline folder", "GGUF file", ... ; for layout None what_is's words ("missing")
    files: tuple[Path, ...] = ()  # the files it is made of, where the layout lists them (gguf, comfyui)
    what: str = ""  # what_is(path)


def locate(path) -> Located:
    path = Path(path)
    what = what_is(path)
    for layout in LAYOUTS:
        found = layout.claim(path, what)
        if found is not None:
            return found
    return Located(path, None, what, what=what)


from . import comfyui, diffusers, file, gguf, lora, original  # noqa: E402  (the modules import Located)

LAYOUTS = (lora, gguf, comfyui, diffusers, original, file)
