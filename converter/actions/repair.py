"""What `repair` does: fix a checkpoint folder in place, atomically, with a backup."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ConversionError
from ..write.naming import MODEL_INDEX
from ..write.workfiles import backup_dir, backup_stamp, work_folders_near
from .common import silent


def run_repair(path: Path, source: Path | None, backup: str | None, overrides: dict, max_shard_size: str,
               dry_run: bool, say=silent, progress: bool = True) -> dict:
    """Every component of PATH repaired (SIGTERM handled as Ctrl-C: a work folder is removed)."""
    from ..write.atomic import sigterm_as_interrupt

    with sigterm_as_interrupt():
        return _run_repair(path, source, backup, overrides, max_shard_size, dry_run, say, progress)


def _run_repair(path: Path, source: Path | None, backup: str | None, overrides: dict, max_shard_size: str,
                dry_run: bool, say=silent, progress: bool = True) -> dict:
    from ..diagnose.repairs import apply, plan_repairs
    from ..diagnose.report import inspect_path
    from ..write.atomic import absolute, holds_cwd

    path = absolute(path)  # "." names the folder, not a work folder beside an empty name
    if source is not None and not Path(source).exists():
        raise ConversionError(f"{source}: no such file or folder (--source)")
    backups = Backups(path, backup)
    notes = [] if dry_run else set_aside_stale_work(path, backups)
    for note in notes:
        say(f"note: {note}")
    found, diags, _ = inspect_path(path, overrides)
    plans = plan_repairs(diags, source)
    for rp in plans if not dry_run else []:  # before any change: a folder repair swaps may not hold the cwd
        where = rp.diagnosis.unit.path.resolve()
        if rp.repairs and not rp.refused and holds_cwd(where):
            raise ConversionError(f"{rp.diagnosis.unit.path}: the current folder is inside it, and repair swaps the "
                                  f"whole folder; run repair from outside it (cd {where.parent} && wan2diffusers "
                                  f"repair {where.name}); nothing was changed")
    components = []
    said_refused = None
    for rp in plans:
        unit = rp.diagnosis.unit
        info = {"component": rp.component, "path": str(unit.path), "repairs": rp.repairs, "refused": rp.refused,
                "done": [], "backed_up": [], "deleted": []}
        components.append(info)
        if rp.refused:
            if rp.refused == said_refused:  # the whole folder refused once (an original repo folder)
                say(f"{rp.component}: refused (the same reason)")
                continue
            say(f"{rp.component}: refused ({unit.path}; the reason follows the report)")  # said once, at the end
            said_refused = rp.refused
            continue
        if not rp.repairs:
            say(f"{rp.component}: healthy, nothing to do")
            continue
        if dry_run:
            say(f"{rp.component}: would apply {', '.join(rp.repairs)}")
            continue
        dest = backups.for_unit(unit.path)
        apply(rp, dest, source, overrides.get(unit.component), max_shard_size, progress)
        info["done"] = rp.done
        info["backed_up" if dest else "deleted"] = rp.backed_up
        say(f"{rp.component}: repaired ({unit.path})")
        for line in rp.done:
            say(f"  {line}")
        if rp.backed_up:
            where = f"backed up to {backups.root / backups.rel(unit.path)}" if dest else "deleted (--backup none)"
            say(f"  {where}: {', '.join(rp.backed_up)}")
    ok = not any(c["refused"] for c in components)
    pipeline = repair_pipeline(path, dry_run, say, backups) if ok else None
    return {"ok": ok, "path": str(path), "dry_run": dry_run, "components": components, "pipeline": pipeline,
            "backup": str(backups.root) if backups.root is not None else None, "notes": notes}


class Backups:
    """Where what repair replaces goes: a new folder per run, never an earlier backup.
    Default: `<model>.backup-<time>` beside the model folder (the pipeline folder when PATH is a
    component inside one, so that the backup is never part of what publish uploads); `--backup DIR`:
    DIR itself when it is new or empty, else a new `<name>.backup-<time>` inside it."""

    def __init__(self, path: Path, option: str | None):
        from ..layouts.names import model_root

        self.model = model_root(path)
        self.root: Path | None = None  # made on first use
        stamp = backup_stamp()
        if option == "none":
            self.base = None
        elif option:
            given = Path(option)
            if given.resolve() == self.model.resolve() or self.model.resolve() in given.resolve().parents:
                raise ConversionError(f"--backup {option}: lies inside {self.model}, the folder being repaired; "
                                      f"choose a folder outside it")
            if os.path.lexists(given) and not given.is_dir():
                raise ConversionError(f"--backup {option}: exists and is not a folder")
            empty = given.is_dir() and not any(given.iterdir())
            self.base = given if not given.exists() or empty else given / f"{self.model.name}.backup-{stamp}"
        else:
            self.base = self.model.parent / f"{self.model.name}.backup-{stamp}"

    def rel(self, unit_path: Path) -> Path:
        try:
            return Path(unit_path).relative_to(self.model)
        except ValueError:
            return Path()

    def folder(self) -> Path:
        if self.root is None:
            if self.base.is_dir() and not any(self.base.iterdir()):
                self.root = self.base  # the empty folder the user named
            else:
                self.root = backup_dir(self.base)
        return self.root

    def for_unit(self, unit_path: Path):
        """A callable giving the unit's backup folder (made on first use), or None (--backup none)."""
        if self.base is None:
            return None

        def dest() -> Path:
            d = self.folder() / self.rel(unit_path)
            d.mkdir(parents=True, exist_ok=True)
            return d
        return dest


def set_aside_stale_work(path: Path, backups: Backups) -> list[str]:
    """Work folders an interrupted repair (or conversion) left beside PATH or inside the model
    folder: they may hold the folder's previous files, so they go into the backup, never deleted;
    with --backup none they are named and left."""
    notes = []
    for w in work_folders_near(path, backups.model):
        if w.running:
            continue
        if backups.base is None:
            notes.append(f"left {w.describe}; --backup none: check and delete it by hand")
            continue
        dest = backups.folder() / "interrupted" / w.path.name.lstrip(".")
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.rename(w.path, dest)
        notes.append(f"moved {w.describe} -> {dest}")
    return notes


def repair_pipeline(path: Path, dry_run: bool, say, backups: "Backups | None" = None) -> dict | None:
    """After the components: a folder of component subfolders gets its model_index.json; a
    pipeline folder's model_index.json gets what its pipeline needs (boundary_ratio, transformer_2)."""
    from ..diagnose.pipeline_repair import fix_model_index, model_index_fixes, plan_model_index, write_model_index
    from ..diagnose.report import inspect_path

    found, diags, _ = inspect_path(path)  # as the component repairs left it
    fixes = model_index_fixes(found, diags)
    if fixes:
        what = ", ".join(f"{k} {have!r} -> {want!r}" for k, (have, want) in fixes.items())
        if dry_run:
            say(f"pipeline: would rewrite {MODEL_INDEX}: {what}")
            return {"left_as_is": None, "added": [], "fixed": {}}
        dest = backups.for_unit(path) if backups is not None else None
        fix_model_index(path, fixes, dest)
        say(f"pipeline: rewrote {MODEL_INDEX}: {what}")
        return {"left_as_is": None, "added": [], "fixed": {k: want for k, (_, want) in fixes.items()}}
    plan, reason = plan_model_index(found, diags)
    if plan is None and reason is None:
        return None
    if plan is None:  # a folder of some components is a fine result: say so, change nothing
        say(f"pipeline: left as is: {reason}")
        return {"left_as_is": reason, "added": []}
    if dry_run:
        say(f"pipeline: would write {', '.join(plan.extras + [MODEL_INDEX])} ({plan.spec.class_name})")
        return {"left_as_is": None, "added": []}
    added = write_model_index(plan, path)
    say(f"pipeline: wrote {', '.join(added)} ({plan.spec.class_name}, scheduler flow_shift {plan.flow_shift})")
    return {"left_as_is": None, "added": added}
