"""Atomic output: everything is written into a hidden work folder beside OUT and renamed to OUT
only when complete.  On any failure (or Ctrl-C / SIGTERM) the work folder is removed; after a
SIGKILL what remains is `.<name>.partial-*`, which nothing mistakes for a finished conversion."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ..errors import ConversionError

PARTIAL_MARK = ".partial-"


def check_destination(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise ConversionError(f"{out}: already exists (pass --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise ConversionError(f"{out}: exists and is not a folder")


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
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}{PARTIAL_MARK}", dir=out.parent))  # after the handler
        yield work
        os.chmod(work, 0o755)
        if out.exists():
            check_destination(out, overwrite)
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.replaced-", dir=out.parent))
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
