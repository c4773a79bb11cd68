"""GGUF files: one .gguf file (claimed by its name, so that a missing one left by an interrupted
write is reported by the GGUF reader), or the folder `convert --to gguf` writes for a two-expert
source (one .gguf per expert, a README beside them at most). converter/gguf_out.py reads them."""

from __future__ import annotations

from pathlib import Path

from . import Located

NAME = "gguf"
FILE, FOLDER = "GGUF file", "folder of gguf files"
DOC_SUFFIXES = (".md", ".txt", ".png", ".jpg", ".jpeg", ".gif", ".webp")


def claim(path: Path, what: str) -> Located | None:
    if path.suffix == ".gguf":
        return Located(path, NAME, FILE, (path,), what)
    files = folder_files(path) if what == "a folder" else []
    return Located(path, NAME, FOLDER, tuple(files), what) if files else None


def folder_files(path: Path) -> list[Path]:
    """The .gguf files of a folder of them, or [] when `path` holds other model files, or no .gguf."""
    from ..write.workfiles import RECORD_NAME, excluded

    entries = [p for p in path.iterdir() if not excluded(p.name) and p.name != RECORD_NAME]
    ggufs = sorted(p for p in entries if p.suffix == ".gguf" and p.is_file())
    others = [p for p in entries if p not in ggufs]
    docs = all(p.is_file() and p.suffix.lower() in DOC_SUFFIXES for p in others)  # a README beside the files
    return ggufs if ggufs and docs else []
