"""Progress for a log file: tqdm's bars show only on a terminal (disable=None), so where stderr is
not one, each finished file gets one line instead, and a long run never stays silent for minutes."""

from __future__ import annotations

import sys

from .sizes import human_size


def file_done(what: str, path, nbytes: int, enabled: bool = True) -> None:
    """`what` wrote `path` (`nbytes`): one report line (stdout) when stderr, where the bars go, is not a terminal."""
    if not enabled or sys.stderr.isatty():
        return
    print(f"{what}: wrote {getattr(path, 'name', path)} ({human_size(nbytes)})", flush=True)  # with the report
