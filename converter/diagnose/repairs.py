"""Repair a component folder in place: the new content is built in a hidden work folder beside
it (unchanged files hard-linked, never rewritten), checked like `inspect` checks (it must come
out healthy), then swapped in with one rename (an atomic exchange where the OS has one).  What
was replaced or removed goes into the backup folder; nothing else changes.

Repairs (the names examine.py gives its findings):
  convert-in-place     original-layout weights (and config) -> converted, as `convert` does
  restore-from-source  keys the class needs that the folder lacks -> produced from --source
  rebuild-index        a lost or wrong index -> rebuilt from the shard headers
  complete-config      config.json missing or missing fields -> derived from the weights
  remove-leftovers     weight files from_pretrained would trip over -> moved into the backup"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..component import (
    plan_component,
    produce,
    require_coverage,
    verify_written,
    write_component,
)
from ..errors import ConversionError
from ..read.safetensors_file import read_header
from ..write import naming
from ..write.safetensors_writer import write_safetensors
from ..read.files import load_json
from ..write.workfiles import OLD, REPAIR, make_work_dir
from .examine import (
    COMPLETE_CONFIG,
    CONVERT_IN_PLACE,
    REBUILD_INDEX,
    REMOVE_LEFTOVERS,
    RESTORE,
    Diagnosis,
    diagnose,
)
from .layout import folder_units
from .sourceplan import dtype_choice, plan_from_source

ORDER = [CONVERT_IN_PLACE, REMOVE_LEFTOVERS, RESTORE, REBUILD_INDEX, COMPLETE_CONFIG]


@dataclass
class RepairPlan:
    diagnosis: Diagnosis
    repairs: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # why this component is left as it is
    done: list[str] = field(default_factory=list)  # what was done, for the report
    backed_up: list[str] = field(default_factory=list)

    @property
    def component(self) -> str:
        """Its name in reports: the instance (transformer_2) or the component."""
        return self.diagnosis.unit.name


def plan_repairs(diags: list[Diagnosis], source: Path | None) -> list[RepairPlan]:
    plans = []
    for d in diags:
        rp = RepairPlan(d)
        u = d.unit
        if d.healthy:
            plans.append(rp)
            continue
        if u.where != "component folder":
            rp.refused.append(f"{u.path} is {'a single file' if u.where == 'single file' else 'an original repo folder'} "
                              f"({d.layout_label}); repair works on component folders: wan2diffusers convert {u.path} OUT")
            plans.append(rp)
            continue
        for f in d.findings:
            if f.repair is None:
                rp.refused.append(f"{f.message} (fix: {f.fix})")
            elif f.needs_source and source is None:
                rp.refused.append(f"{f.message}: the weights cannot tell their values; give the original "
                                  f"checkpoint with --source SRC")
        if not rp.refused:
            rp.repairs = [r for r in ORDER if any(f.repair == r for f in d.findings)]
            if CONVERT_IN_PLACE in rp.repairs:  # a fresh conversion makes everything else moot
                rp.repairs = [CONVERT_IN_PLACE]
        plans.append(rp)
    return plans


def apply(rp: RepairPlan, backup: Callable[[], Path] | None, source: Path | None, overrides: dict | None = None,
          max_shard_size: str = "5GB", progress: bool = True) -> None:
    """`backup()`: the folder (made on first use) where what the repair replaces goes; None: deleted."""
    d = rp.diagnosis
    unit = d.unit
    folder = unit.path
    work = make_work_dir(folder, REPAIR)
    try:
        if CONVERT_IN_PLACE in rp.repairs:
            _convert(rp, work, overrides, max_shard_size, progress)
        else:
            _patch(rp, work, source)
        check = folder_units(work, unit.component)
        after = [diagnose(u) for u in check]
        problems = [f.message for a in after for f in a.findings]
        if problems:
            raise ConversionError(f"{folder}: {unit.component}: the repaired folder is still not right "
                                  f"({problems[0]}); nothing was changed", problems)
        os.chmod(work, os.stat(folder).st_mode & 0o7777)
        old = _swap(folder, work)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    rp.backed_up = set_aside(old, folder, backup)


def set_aside(old: Path, new: Path, backup: Callable[[], Path] | None) -> list[str]:
    """What of `old` (the folder's previous content, or the symlink that stood at its place) is
    not in `new` goes into the backup (symlinks as symlinks: their targets are never touched);
    returns those paths. Files hard-linked into `new` are kept, not backed up."""
    if old.is_symlink():  # the folder was a link: the link itself is what was replaced, its target stays
        text = os.readlink(old)
        if backup is not None:
            os.rename(old, backup() / new.name)
        else:
            old.unlink()
        return [f"{new.name} (a symlink to {text})"]
    kept_files, kept_links = set(), {}
    for p in _entries(new):
        st = os.lstat(p)
        if p.is_symlink():
            kept_links[p.relative_to(new)] = os.readlink(p)
        else:
            kept_files.add((st.st_dev, st.st_ino))
    moved = []
    for p in _entries(old):
        rel = p.relative_to(old)
        if p.is_symlink():
            if kept_links.get(rel) == os.readlink(p):
                continue
        else:
            st = os.lstat(p)
            if (st.st_dev, st.st_ino) in kept_files:
                continue
        moved.append(str(rel))
        if backup is not None:
            dest = backup() / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.rename(p, dest) if _same_device(p, dest.parent) else shutil.move(str(p), str(dest))
    shutil.rmtree(old, ignore_errors=True)
    return moved


def _entries(root: Path) -> list[Path]:
    """Files and symlinks under `root`, without following links."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p.is_symlink() or name in filenames:
                out.append(p)
    return sorted(out)


def _same_device(a: Path, b: Path) -> bool:
    return os.lstat(a).st_dev == os.stat(b).st_dev


def _convert(rp: RepairPlan, work: Path, overrides: dict | None, max_shard_size: str, progress: bool = True) -> None:
    unit = rp.diagnosis.unit
    cp = plan_component(unit.component, unit.path, "keep", overrides)
    require_coverage(cp)
    layout = write_component(cp, work, max_shard_size, progress)
    verify_written(cp, work, layout)
    weights = {p for ws in unit.candidates for p in ws.all_files} | {unit.path / "config.json"}
    _link_rest(unit.path, work, weights | set(unit.leftovers))
    rp.done.append(f"converted the original-layout weights in place -> {cp.plan.target.class_name} "
                   f"({len(cp.plan.tensors)} tensors, {', '.join(sorted(layout.files))})")


def _link_rest(folder: Path, work: Path, skip: set[Path]) -> None:
    """Everything in `folder` but `skip` appears unchanged in `work`: files as hard links (no copy),
    symlinks as the same symlinks (never replaced by the file they point to)."""
    for p in _entries(folder) + [Path(d) for d, _, _ in os.walk(folder) if Path(d) != folder]:
        rel = p.relative_to(folder)
        if p in skip or os.path.lexists(work / rel):
            continue
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        if p.is_symlink():
            os.symlink(_link_text(p, work / rel), work / rel)
        elif p.is_dir():
            (work / rel).mkdir(parents=True, exist_ok=True)
        else:
            try:
                os.link(p, work / rel, follow_symlinks=False)
            except OSError:
                shutil.copy2(p, work / rel)


def _link_text(link: Path, at: Path) -> str:
    """The target text for a copy of `link` placed at `at`: the same text when it leads to the
    same place from there (relative links in a Hub cache snapshot), else the absolute target."""
    text = os.readlink(link)
    if os.path.isabs(text) or (at.parent / text).resolve() == (link.parent / text).resolve():
        return text
    return str((link.parent / text).resolve())


def _patch(rp: RepairPlan, work: Path, source: Path | None) -> None:
    d = rp.diagnosis
    unit = d.unit
    ws = unit.weights
    rewrite: set[Path] = set()
    if REMOVE_LEFTOVERS in rp.repairs:
        rp.done.append(f"moved {', '.join(p.name for p in unit.leftovers)} out of the folder")
    skip = set(unit.leftovers)
    index_name = naming.index_name(ws.name)
    restored = None
    if RESTORE in rp.repairs:
        restored = _restore_plan(d, source)
        shard = _shard_for(d, restored)
        rewrite.add(shard)
    if COMPLETE_CONFIG in rp.repairs:
        rewrite.add(unit.path / "config.json")
    if REBUILD_INDEX in rp.repairs or (restored and ws.kind == "sharded"):
        rewrite.add(unit.path / index_name)
    _link_rest(unit.path, work, skip | rewrite)
    if restored:
        _write_restored(d, restored, shard, work)
        rp.done.append(f"restored {', '.join(restored)} from {source} into {shard.name}")
    if ws.kind == "sharded" and (unit.path / index_name in rewrite):
        _write_index(work, ws, index_name)
        rp.done.append(f"{'rebuilt' if REBUILD_INDEX in rp.repairs else 'updated'} {index_name} from the shard headers")
    if COMPLETE_CONFIG in rp.repairs:
        _write_config(d, work)
        what = d.config_missing + list(d.config_wrong)
        rp.done.append("wrote config.json derived from the weights" + (f" ({', '.join(what)})" if what else ""))


def _restore_plan(d: Diagnosis, source: Path) -> dict:
    """missing key -> the PlannedTensor that makes it from the source."""
    unit = d.unit
    missing = next(f.keys for f in d.findings if f.repair == RESTORE)
    dtype = dtype_choice([r.dtype for r in unit.weights.tensors.values()])
    cfg = unit.config or {}
    cp = plan_from_source(unit.component, source, {**cfg, **d.derived_config}, dtype, instance=unit.instance or None,
                          variant=d.detection.variant if d.detection is not None else None)
    planned = {pt.key: pt for pt in cp.plan.tensors}
    out = {}
    for key in missing:
        pt = planned.get(key)
        if pt is None:
            raise ConversionError(f"{source}: the source does not make {key} either; nothing was changed")
        want = tuple(d.derived_target.shapes[key])
        if tuple(pt.shape) != want:
            raise ConversionError(f"{source}: {key} from the source has shape {list(pt.shape)}, the folder's "
                                  f"model needs {list(want)}: not the checkpoint it came from; nothing was changed")
        out[key] = pt
    for key, ref in unit.keys.items():  # the source must be the checkpoint the folder came from
        pt = planned.get(key)
        if key in unit.quantized:
            continue
        if pt is None or tuple(pt.shape) != tuple(ref.shape):
            raise ConversionError(f"{source}: does not match {unit.path}: {key} "
                                  + ("is not made by the source" if pt is None else
                                     f"is {list(ref.shape)} here, {list(pt.shape)} from the source")
                                  + "; nothing was changed")
    return out


def _shard_for(d: Diagnosis, restored: dict) -> Path:
    """The file the restored keys go into: the single file, or the shard holding the key that
    precedes the first of them in the model's state-dict order."""
    ws = d.unit.weights
    if ws.kind != "sharded":
        return ws.files[0]
    order = list(d.derived_target.shapes)
    first = min(order.index(k) for k in restored)
    before = next((k for k in reversed(order[:first]) if k in ws.tensors), None)
    return ws.tensors[before].file if before else ws.files[0]


def _write_restored(d: Diagnosis, restored: dict, shard: Path, work: Path) -> None:
    header = read_header(shard)
    order = {k: i for i, k in enumerate(d.derived_target.shapes)}
    items = list(header.tensors.values()) + list(restored.values())
    items.sort(key=lambda x: (order.get(x.key, len(order)),))
    entries = [(x.key, x.dtype, tuple(x.shape), x.nbytes) for x in items]

    def make(i):
        x = items[i]
        return produce(x) if x.key in restored else x

    write_safetensors(work / shard.name, entries, make, header.metadata or {"format": "pt"})


def _write_index(work: Path, ws, index_name: str) -> None:
    weight_map, total = {}, 0
    for p in ws.files:
        for key, ref in read_header(work / p.name).tensors.items():
            weight_map[key] = p.name
            total += ref.nbytes
    metadata = {}
    if ws.index is not None and ws.index.exists():
        try:  # a broken old index is what is being replaced: keep its metadata only when it is sound
            old = load_json(ws.index, "index")
            metadata = {k: v for k, v in (old.get("metadata") or {}).items() if k != "total_size"}
        except (ConversionError, AttributeError):
            metadata = {}
    index = {"metadata": {**metadata, "total_size": total}, "weight_map": weight_map}
    (work / index_name).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _write_config(d: Diagnosis, work: Path) -> None:
    """The class's own config file from the derived config, keeping what the old one had that
    the class does not take (e.g. quantization_config)."""
    target = d.derived_target
    path = work / "config.json"
    if path.exists():
        path.unlink()  # never write through a hard link to the original
    target.save_config(work)
    new = json.loads(path.read_text())
    for k, v in (d.unit.config or {}).items():
        if k not in new:
            new[k] = v
    path.write_text(json.dumps(new, indent=2, sort_keys=True) + "\n")


def _swap(folder: Path, work: Path) -> Path:
    """Put `work` at `folder`; return where the old content now is."""
    if _exchange(work, folder):
        return work
    old = make_work_dir(folder, OLD)
    os.rmdir(old)
    os.rename(folder, old)
    os.rename(work, folder)
    return old


def _exchange(a: Path, b: Path) -> bool:
    """Linux renameat2(RENAME_EXCHANGE): swap two paths in one step."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0
