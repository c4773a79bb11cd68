"""Atomic output: everything is written into a hidden work folder beside OUT and renamed to OUT
only when complete.  On any failure (or Ctrl-C / SIGTERM) the work folder is removed; after a
SIGKILL what remains is `.<name>.partial-<pid>-*`, which nothing mistakes for a finished
conversion, and which the next write of the same OUT removes (`clean_stale`)."""

from __future__ import annotations

import os
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

from ..errors import ConversionError
from .workfiles import PARTIAL, REPLACED, make_work_dir, work_folders

PARTIAL_MARK = f".{PARTIAL}-"


def clean_stale(out: Path, say=None) -> list[str]:
    """Before writing OUT: remove the work folders a killed earlier write of OUT left (incomplete
    output, nothing else); name, never delete, a previous OUT an interrupted --overwrite set aside.
    Returns (and says, as `note:` lines) what it found."""
    notes = []
    for w in work_folders(Path(out).parent, Path(out).name):
        if w.running:
            continue
        if w.kind == PARTIAL:
            shutil.rmtree(w.path, ignore_errors=True)
            notes.append(f"removed {w.path}, left by an interrupted earlier run (incomplete output)")
        elif w.kind == REPLACED:
            notes.append(f"{w.path} holds the output an interrupted --overwrite had set aside; "
                         f"move it back or delete it")
    for note in notes if say else []:
        say(f"note: {note}")
    return notes


def check_destination(out: Path, overwrite: bool, kind: str = "folder") -> None:
    """`kind`: what OUT is written as, "folder" or "file"; an existing OUT must be one to be replaced."""
    if out.exists() and not overwrite:
        raise ConversionError(f"{out}: already exists (pass --overwrite to replace it)")
    if out.exists() and not (out.is_dir() if kind == "folder" else out.is_file()):
        raise ConversionError(f"{out}: exists and is not a {kind}")


def check_output(src: Path, out: Path, overwrite: bool, kind: str = "folder") -> None:
    """OUT must be a new (or, with --overwrite, replaceable) folder or file that neither holds nor
    lies inside the source: replacing it would delete the source, or part of it."""
    text = str(out).strip()
    if text in ("", ".", "..") or Path(text).resolve() == Path.cwd().resolve():
        raise ConversionError(f"OUT {str(out)!r}: give a new folder for the output, not the current one")
    if os.path.lexists(src):
        s, o = Path(src).resolve(), Path(out).resolve()
        if o == s or o in s.parents:
            raise ConversionError(f"{out}: would replace the source {src} (it holds it); choose another OUT")
        if s in o.parents:
            raise ConversionError(f"{out}: lies inside the source {src}; choose an OUT outside it")
    check_destination(Path(out), overwrite, kind)


@contextmanager
def atomic_output_dir(out: Path, overwrite: bool):
    out = Path(out)
    check_destination(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum, frame):
        raise KeyboardInterrupt("terminated")

    try:
        if previous in (signal.SIG_DFL, None):
            signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread
        previous = None
    work = None
    try:
        work = make_work_dir(out, PARTIAL)  # after the handler
        yield work
        os.chmod(work, 0o755)
        if out.exists():
            check_destination(out, overwrite)
            trash = make_work_dir(out, REPLACED)
            os.rename(out, trash / "old")
            try:
                os.rename(work, out)
            except BaseException:  # put the previous output back where it was
                os.rename(trash / "old", out)
                shutil.rmtree(trash, ignore_errors=True)
                raise
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(work, out)
    except BaseException:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        if previous in (signal.SIG_DFL, None):
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
            except ValueError:
                pass
