"""The one place that decides what belongs to a model folder and what is this tool's own work:

- work folders: every write happens in a hidden folder beside its target, `.<name>.<kind>-<pid>-<random>`
  (kind: partial = a conversion being written, repair = a component being rebuilt, replaced / old =
  the previous content during the final swap). A crash or SIGKILL can leave one behind; the pid
  in its name tells a dead run's folder from a running one's.
- backups: `<name>.backup-<time>[-k]` folders that repair fills; never overwritten.
- the model: what `publish` uploads and `from_pretrained` reads; everything else (hidden files,
  work folders, backups, the conversion record, files of other kinds) is left out of an upload
  and flagged by `inspect`.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConversionError

PARTIAL, REPAIR, REPLACED, OLD = "partial", "repair", "replaced", "old"
WORK_KINDS = (PARTIAL, REPAIR, REPLACED, OLD)
BACKUP_MARK = ".backup-"
RECORD_NAME = "wan2diffusers.json"  # the conversion record convert leaves at the top of OUT
WORK = re.compile(r"^\.(?P<name>.+)\.(?P<kind>" + "|".join(WORK_KINDS) + r")-(?:(?P<pid>\d+)-)?[^/]*$")
# what a model folder holds: weights, configs, tokenizer files, the model card and pictures for it
MODEL_SUFFIXES = (".safetensors", ".json", ".model", ".txt", ".md", ".png", ".jpg", ".jpeg", ".gif", ".webp",
                  ".mp4")


def make_work_dir(target: Path, kind: str) -> Path:
    """A fresh hidden work folder beside `target`, named after it, its kind and this process."""
    assert kind in WORK_KINDS, kind
    target = Path(target)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.{kind}-{os.getpid()}-", dir=target.parent))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class WorkFolder:
    path: Path
    name: str  # what it was for (the target's name)
    kind: str
    running: bool  # its process still runs (or the name carries no pid and its age says nothing)

    @property
    def describe(self) -> str:
        what = {PARTIAL: "an interrupted conversion's work folder (incomplete output)",
                REPAIR: "an interrupted repair's work folder (may hold the folder's previous files)",
                REPLACED: "the previous output of an interrupted --overwrite",
                OLD: "the previous content of an interrupted repair"}[self.kind]
        return f"{self.path}: {what}" + (" (its process still runs)" if self.running else "")


def work_folders(parent: Path, name: str | None = None) -> list[WorkFolder]:
    """The hidden work folders in `parent` (those made for `name` only, when given)."""
    out = []
    try:
        entries = sorted(Path(parent).iterdir())
    except OSError:
        return []
    for p in entries:
        m = WORK.match(p.name)
        if not m or (name is not None and m.group("name") != name) or p.is_symlink():
            continue
        if not p.is_dir() and not (m.group("kind") == PARTIAL and p.is_file()):  # a GGUF file is written as a file
            continue
        pid = m.group("pid")
        out.append(WorkFolder(p, m.group("name"), m.group("kind"), bool(pid) and _alive(int(pid))))
    return out


def is_backup(part: str) -> bool:
    return BACKUP_MARK in part


def excluded(part: str) -> bool:
    """A path part that is never part of the model: hidden (work folders, caches) or a backup."""
    return part.startswith(".") or is_backup(part)


def not_model_files(root: Path) -> list[str]:
    """Paths under `root` (relative, posix) that are not part of the model: hidden entries, work
    folders, backups, the record, files of other kinds. Folders are named once, not file by file."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        out += [(rel_dir / d).as_posix() + "/" for d in sorted(dirnames) if excluded(d)]
        dirnames[:] = sorted(d for d in dirnames if not excluded(d))
        for f in sorted(filenames):
            rel = (rel_dir / f).as_posix()
            if not belongs(rel) and rel != RECORD_NAME:  # the record is never uploaded, by design: not news
                out.append(rel)
    return out


def belongs(rel: str) -> bool:
    """Whether a file at `rel` (relative to the model folder, posix) is part of the model."""
    if any(excluded(p) for p in rel.split("/")):
        return False
    if rel == RECORD_NAME:
        return False
    return rel.lower().endswith(MODEL_SUFFIXES)


def model_files(root: Path) -> list[tuple[str, Path]]:
    """Every file of the model under `root`: (relative posix path, path), sorted. A symlink that
    leads outside `root` is refused (an upload would send a file that is not in the folder)."""
    root = Path(root)
    real_root = root.resolve()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not excluded(d))
        for d in dirnames:
            _inside(Path(dirpath) / d, real_root, root)
        for f in sorted(filenames):
            p = Path(dirpath) / f
            rel = p.relative_to(root).as_posix()
            if belongs(rel):
                _inside(p, real_root, root)
                if not p.is_file():
                    raise ConversionError(f"{p}: is not a regular file; refusing to upload it")
                out.append((rel, p))
    return sorted(out)


def _inside(p: Path, real_root: Path, root: Path) -> None:
    if p.is_symlink():
        target = p.resolve()
        if target != real_root and real_root not in target.parents:
            raise ConversionError(f"{p}: a symlink to {os.readlink(p)}, outside {root}; refusing to upload a "
                                  f"file that is not in the folder (copy it in, or remove the link)")


def work_folders_near(path: Path, model: Path) -> list[WorkFolder]:
    """The work folders that concern PATH: beside it or its model folder (made for them), and
    inside the model folder or PATH (made for their components)."""
    path, model = Path(path), Path(model)
    found = work_folders(path.parent, path.name) + work_folders(model.parent, model.name)
    for folder in dict.fromkeys((model, path)):
        if folder.is_dir():
            found += work_folders(folder)
    return list(dict.fromkeys(found))


def leftovers_of(path: Path, model: Path) -> list[str]:
    """What `inspect` and `verify` report as a problem: work folders of earlier runs near PATH
    (work_folders_near), and backups inside the model folder or PATH (publish leaves them out,
    but they are not part of the model and may be large)."""
    path, model = Path(path), Path(model)
    out = [w.describe for w in work_folders_near(path, model)]
    for folder in dict.fromkeys(p for p in (model, path) if p.is_dir()):
        for p in sorted(folder.iterdir()):
            if is_backup(p.name):
                out.append(f"{p}: a backup inside the model folder (publish leaves it out; move it elsewhere)")
    return out


def backup_dir(base: Path) -> Path:
    """A new backup folder at `base`, or `base-2`, `base-3`, ...: an earlier backup is never reused."""
    base = Path(base)
    base.parent.mkdir(parents=True, exist_ok=True)
    for k in range(1, 10_000):
        candidate = base if k == 1 else base.with_name(f"{base.name}-{k}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise ConversionError(f"{base}: cannot find a free backup folder name")


def backup_stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")
