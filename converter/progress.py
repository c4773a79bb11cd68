"""Progress for a log file: tqdm's bars show only on a terminal (disable=None), so where stderr is
not one, each finished file gets one line instead, and a long run never stays silent for minutes."""

from __future__ import annotations

import sys


def file_done(what: str, path, nbytes: int, enabled: bool = True) -> None:
    """`what` wrote `path` (`nbytes`): one report line (stdout) when stderr, where the bars go, is not a terminal."""
    if not enabled or sys.stderr.isatty():
        return
    size = float(nbytes)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            break
        size /= 1000
    print(f"{what}: wrote {getattr(path, 'name', path)} ({size:.1f} {unit})", flush=True)  # with the report
