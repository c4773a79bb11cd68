"""Atomic output: everything is written into a hidden work folder beside OUT and renamed to OUT
only when complete.  On any failure (or Ctrl-C / SIGTERM) the work folder is removed; after a
SIGKILL what remains is `.<name>.partial-<pid>-*`, which nothing mistakes for a finished
conversion, and which the next write of the same OUT removes (`clean_stale`)."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ..errors import ConversionError
from .workfiles import PARTIAL, REPLACED, make_work_dir, work_folders

PARTIAL_MARK = f".{PARTIAL}-"


def clean_stale(out: Path, say=None) -> list[str]:
    """Before writing OUT: remove the work folders (and work files) a killed earlier write of OUT
    left (incomplete output, nothing else); name, never delete, a previous OUT an interrupted
    --overwrite set aside. Returns (and says, as `note:` lines) what it found."""
    notes = []
    out = absolute(out)
    for w in work_folders(out.parent, out.name):
        if w.running:
            continue
        if w.kind == PARTIAL:
            if w.path.is_dir():
                shutil.rmtree(w.path, ignore_errors=True)
            else:
                w.path.unlink(missing_ok=True)
            notes.append(f"removed {w.path}, left by an interrupted earlier run (incomplete output)")
        elif w.kind == REPLACED:
            notes.append(f"{w.path} holds the output an interrupted --overwrite had set aside; "
                         f"move it back or delete it")
    for note in notes if say else []:
        say(f"note: {note}")
    return notes


def absolute(path) -> Path:
    """PATH made absolute once, lexically (symlinks kept): a relative OUT must not change meaning
    when the folder the process stands in is moved aside by --overwrite."""
    return Path(os.path.abspath(os.fspath(path)))


def check_destination(out: Path, overwrite: bool, kind: str = "folder") -> None:
    """`kind`: what OUT is written as, "folder" or "file"; an existing OUT must be one to be replaced."""
    out = Path(out)
    if out.is_symlink() and not out.exists():
        raise ConversionError(f"{out}: is a symbolic link to {os.readlink(out)}, which does not exist; "
                              f"remove the link or give another OUT")
    if out.exists() and not overwrite:
        raise ConversionError(f"{out}: already exists (pass --overwrite to replace it)")
    if out.exists() and not (out.is_dir() if kind == "folder" else out.is_file()):
        raise ConversionError(f"{out}: exists and is not a {kind}")


def holds_cwd(path: Path) -> bool:
    """Whether PATH is the folder this process runs in, or one that holds it."""
    cwd, p = Path.cwd().resolve(), Path(path).resolve()
    return p == cwd or p in cwd.parents


def check_output(src: Path, out: Path, overwrite: bool, kind: str = "folder") -> None:
    """OUT must be a new (or, with --overwrite, replaceable) folder or file that neither holds nor
    lies inside the source (replacing it would delete the source, or part of it), nor holds the
    folder the command runs in (the shell would be left in a deleted folder)."""
    text = str(out).strip()
    o = Path(text or ".").resolve()
    if text in ("", ".", "..") or o == Path.cwd().resolve():
        raise ConversionError(f"OUT {str(out)!r}: give a new folder for the output, not the current one")
    if holds_cwd(o):
        raise ConversionError(f"OUT {str(out)!r}: holds the current folder {Path.cwd().resolve()}; replacing it "
                              f"would pull the folder you are in away; run from outside it or give another OUT")
    if os.path.lexists(src):
        s = Path(src).resolve()
        if o == s or o in s.parents:
            raise ConversionError(f"{out}: would replace the source {src} (it holds it); choose another OUT")
        if s in o.parents:
            raise ConversionError(f"{out}: lies inside the source {src}; choose an OUT outside it")
    check_destination(Path(out), overwrite, kind)


@contextmanager
def sigterm_as_interrupt():
    """SIGTERM raises KeyboardInterrupt in the main thread while the block runs, so the cleanup of
    a work folder or file runs on `kill` as on Ctrl-C (a handler someone else set is kept)."""
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum, frame):
        raise KeyboardInterrupt("terminated")

    ours = False
    try:
        if previous in (signal.SIG_DFL, None):
            signal.signal(signal.SIGTERM, on_term)
            ours = True
    except ValueError:  # not the main thread
        pass
    try:
        yield
    finally:
        if ours:
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
            except ValueError:
                pass


def _swap_in(work: Path, out: Path, overwrite: bool, kind: str) -> None:
    """Rename the complete `work` to `out`; an existing `out` is set aside first and put back if
    the rename fails (then removed once the new one is in place)."""
    if not os.path.lexists(out):
        os.rename(work, out)
        return
    check_destination(out, overwrite, kind)
    trash = make_work_dir(out, REPLACED)
    os.rename(out, trash / "old")
    try:
        os.rename(work, out)
    except BaseException:  # put the previous output back where it was
        os.rename(trash / "old", out)
        shutil.rmtree(trash, ignore_errors=True)
        raise
    if (trash / "old").is_dir() and not (trash / "old").is_symlink():
        shutil.rmtree(trash, ignore_errors=True)
    else:
        (trash / "old").unlink()
        trash.rmdir()


@contextmanager
def atomic_output_dir(out: Path, overwrite: bool):
    """Yield a hidden work folder beside OUT; renamed to OUT when the block completes."""
    out = absolute(out)
    check_destination(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    with sigterm_as_interrupt():
        work = None
        try:
            work = make_work_dir(out, PARTIAL)  # after the handler
            yield work
            os.chmod(work, 0o755)
            _swap_in(work, out, overwrite, "folder")
        except BaseException:
            if work is not None:
                shutil.rmtree(work, ignore_errors=True)
            raise


@contextmanager
def atomic_output_file(out: Path, overwrite: bool):
    """Yield the path of a hidden work file beside OUT (`.<name>.partial-<pid>-*`, removed by the next
    write of OUT after a SIGKILL); renamed to OUT when the block completes."""
    out = absolute(out)
    check_destination(out, overwrite, "file")
    out.parent.mkdir(parents=True, exist_ok=True)
    with sigterm_as_interrupt():
        work = None
        try:
            fd, name = tempfile.mkstemp(prefix=f".{out.name}.{PARTIAL}-{os.getpid()}-", dir=out.parent)
            os.close(fd)
            work = Path(name)
            yield work
            os.chmod(work, 0o644)
            if os.path.lexists(out):
                check_destination(out, overwrite, "file")
            os.replace(work, out)
        except BaseException:
            if work is not None:
                work.unlink(missing_ok=True)
            raise


def replace_file(path: Path, text: str, before_swap=None) -> None:
    """Write `text` into a new hidden file beside PATH (`.NAME.partial-<pid>-*`) and rename it over
    PATH: a reader sees the old file or the new one, never half of one, and a link PATH was (a file
    another folder shares) is replaced, not written through. `before_swap()` runs once the new file
    is complete, before the rename (a backup of the old file). The one way every in-place file
    rewrite is done (the record, the model card, model_index.json, layout cache entries)."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.{PARTIAL}-{os.getpid()}-", dir=path.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        if before_swap is not None:
            before_swap()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

