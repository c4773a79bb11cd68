"""Copying the small files that travel beside the weights (the tokenizer, configs): only regular
files (a symlink is followed to the file it names: the Hub cache links into its blobs) of a bounded
size. A FIFO, socket or device (`/dev/zero` would fill the disk), a link to a folder, or a file
larger than any tokenizer or config file is named in one line, and nothing is copied from it."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ConversionError
from ..read.files import what_is

MAX_SIDE_FILE_BYTES = 1 << 30  # a tokenizer.json is ~16 MB; nothing beside the weights comes near 1 GiB


def copy_file(src: Path, dst: Path, max_bytes: int = MAX_SIDE_FILE_BYTES) -> None:
    kind = what_is(src)
    if kind != "a regular file":
        raise ConversionError(f"{src}: is {kind}, not a file; refusing to copy it")
    size = os.stat(src).st_size
    if size > max_bytes:
        raise ConversionError(f"{src}: {size} bytes is too large for a file beside the weights; refusing to copy it")
    with open(src, "rb") as f, open(dst, "wb") as out:
        copied = _copy_limited(f, out, size)
    if copied != size:
        raise ConversionError(f"{src}: changed size while being copied")


def _copy_limited(f, out, size: int) -> int:
    done = 0
    while done < size:
        chunk = f.read(min(1 << 20, size - done))
        if not chunk:
            break
        out.write(chunk)
        done += len(chunk)
    return done


def copy_folder(src: Path, dst: Path, max_bytes: int = MAX_SIDE_FILE_BYTES) -> None:
    """`src`'s files into a new folder `dst`, checked one by one (copy_file); subfolders kept, a
    link to a folder refused (it may lead anywhere, or loop)."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True)
    for dirpath, dirnames, filenames in os.walk(src):
        here = Path(dirpath)
        for d in list(dirnames):
            if (here / d).is_symlink():
                raise ConversionError(f"{here / d}: a link to a folder; refusing to copy it")
            (dst / (here / d).relative_to(src)).mkdir()
        for name in filenames:
            copy_file(here / name, dst / (here / name).relative_to(src), max_bytes)
