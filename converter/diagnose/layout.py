"""Recognise what a path holds, from headers only: a pipeline folder, a folder of component
subfolders, a component folder, an original repo folder, or a single file; in each folder the
candidate weight sets (a single file, a shard group with or without its index, a .pth), which
one is the component's weights, and which files are leftovers that would confuse
`from_pretrained`.  File names come from the tables (their source and output sections)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConversionError
from ..mapping.tables import load_table, table_names
from ..plan.target import class_signature
from ..read.pth_file import read_pth_index
from ..read.safetensors_file import TensorRef, read_header
from ..read.files import config_class, load_json
from ..read.source import SourceCheckpoint, common_prefix, load_index
from .. import fp8
from ..write.naming import MODEL_INDEX, SHARD, index_name, shard_name
from ..quantization.keyformats import KeyFormat, fold_quantized
from ..layouts import Located, locate
from ..layouts import comfyui as comfy_layout, diffusers as diffusers_layout
from ..layouts.names import output_folders, pth_names, weight_stems
from .keys import Sides, best_component, classify


@dataclass
class WeightSet:
    kind: str  # "single file", "sharded", "pth file"
    name: str  # the weights name (diffusion_pytorch_model.safetensors) or the file name
    files: list[Path]
    tensors: dict[str, TensorRef]  # prefix removed
    index: Path | None = None  # the index file beside a shard group (or a stray one)
    prefix: str = ""
    problems: list[str] = field(default_factory=list)  # shard/index health; empty = healthy
    rebuildable: bool = False  # every problem is in the index: a fresh one from the headers fixes it
    fatal: bool = False  # unreadable: a shard missing or corrupt

    @property
    def all_files(self) -> list[Path]:
        return self.files + ([self.index] if self.index is not None and self.index.exists() else [])

    @property
    def total_bytes(self) -> int:
        return sum(r.nbytes for r in self.tensors.values())


@dataclass
class Unit:
    """One component as found on disk."""

    component: str
    path: Path  # the component folder, or the single file
    where: str  # "component folder", "original repo folder", "single file"
    weights: WeightSet | None
    candidates: list[WeightSet] = field(default_factory=list)
    leftovers: list[Path] = field(default_factory=list)
    config: dict | None = None
    config_kind: str = "absent"  # "diffusers", "transformers", "original", "unknown", "unreadable", "absent"
    config_error: str = ""
    sides: Sides | None = None
    quantized: dict[str, list[str]] = field(default_factory=dict)  # base key -> its stored quantized keys
    key_format: KeyFormat | None = None  # the backend's key format of `quantized`
    instance: str = ""  # the pipeline folder it sits in (transformer_2), when not the component's own name
    keys: dict[str, TensorRef] = field(default_factory=dict)  # quantized keys folded onto base keys
    loads: str = ""  # which weight files from_pretrained would pick
    comfy: str = ""  # a ComfyUI file: the key layout ComfyUI's loader reads (original, diffusers)
    fp8: object = None  # a converter.fp8.Fp8Source: the file stores fp8 weights (scales folded in)

    @property
    def folder(self) -> Path | None:
        return self.path if self.path.is_dir() else None

    @property
    def table(self):
        return load_table(self.component)

    @property
    def name(self) -> str:
        """What the unit is called in reports: its instance (transformer_2) or its component."""
        return self.instance or self.component

    @property
    def layout(self) -> str:
        return self.sides.layout if self.sides else "unknown"


@dataclass
class Found:
    path: Path
    kind: str  # "pipeline folder", "folder of component subfolders", "component folder", "original repo folder", "single file"
    units: list[Unit]
    model_index: dict | None = None
    stray: list[str] = field(default_factory=list)  # notes about the root of a pipeline folder


def find(path: Path) -> Found:
    """What `locate` says PATH is, opened for diagnosis: every weight set read from its headers."""
    located = locate(path)
    if located.what == "missing":
        raise ConversionError(f"{path}: no such file or folder")
    if located.what not in ("a regular file", "a folder"):
        raise ConversionError(f"{path}: is {located.what}; expected a checkpoint file or folder")
    return OPENERS.get(located.layout, _plain)(located)


def _comfy_found(located: Located) -> Found:
    """`convert --to comfyui` output (or a ComfyUI models/ folder): one file per component."""
    by_folder = comfy_layout.key_layouts()
    units = []
    for f in located.files:
        u = single_file_unit(f)
        u.instance = f.relative_to(located.path).as_posix()
        u.comfy = by_folder[f.parent.name]
        units.append(u)
    return Found(located.path, located.kind, units)


def _diffusers_found(located: Located) -> Found:
    path = located.path
    if located.kind == diffusers_layout.COMPONENT:
        return _folder_found(located)
    subs = diffusers_layout.subfolders(path)
    index = path / MODEL_INDEX
    model_index = None
    if index.exists():
        data = load_json(index, "model_index.json")
        model_index = data if isinstance(data, dict) else None
    units = [u for sub, c in subs.items() for u in folder_units(sub, c)]
    for u in units:
        u.instance = u.path.name
    found = Found(path, located.kind, units, model_index)
    root = [u for u in folder_units(path, None)] if _has_weights(path) else []
    for u in root:
        found.stray.append(f"{', '.join(p.name for p in u.weights.files)} at the root ({u.layout} {u.component} "
                           f"weights): DiffusionPipeline.from_pretrained does not read them")
    return found


def _folder_found(located: Located) -> Found:
    """A folder of weights: an original repo folder (several components, or original keys) or one component's."""
    path = located.path
    units = folder_units(path, output_folders().get(path.name))
    if not units:
        from ..write.workfiles import work_folders

        left = [w.describe for w in work_folders(path)]
        raise ConversionError(f"{path}: no weights here (no .safetensors or Wan .pth file, no component subfolders)"
                              + (f"; only {left[0]}" if left else ""), left)
    kind = "original repo folder" if len(units) > 1 or units[0].where == "original repo folder" else "component folder"
    return Found(path, kind, units)


def _file_found(located: Located) -> Found:
    return Found(located.path, "single file", [single_file_unit(located.path)])


def _plain(located: Located) -> Found:
    """A layout not read for diagnosis (a LoRA, GGUF): read as a file or folder of weights, which says what it is not."""
    return _file_found(located) if located.what == "a regular file" else _folder_found(located)


# layout (converter/layouts) -> how it is opened for diagnosis
OPENERS = {"comfyui": _comfy_found, "diffusers": _diffusers_found, "original": _folder_found, "file": _file_found}


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any((folder / n).is_file() for n in pth_names())


def single_file_unit(path: Path) -> Unit:
    metadata: dict = {}
    if path.suffix == ".safetensors":
        header = read_header(path)  # corrupt: one line
        ws, metadata = WeightSet("single file", path.name, [path], dict(header.tensors)), header.metadata
    elif path.suffix in (".pth", ".pt", ".bin"):
        ws = WeightSet("pth file", path.name, [path], read_pth_index(path))
    else:
        raise ConversionError(f"{path}: expected a .safetensors or .pth file, or a folder")
    prefixes = sorted({p for c in table_names() for p in load_table(c).source.strip_prefixes})
    ws.prefix = common_prefix(ws.tensors, prefixes)
    ws.tensors = {k[len(ws.prefix):]: r for k, r in ws.tensors.items()}
    found = fp8.resolve(SourceCheckpoint(path, ws.kind, [path], ws.tensors, None, ws.prefix, metadata), prefixes)
    ws.tensors, ws.prefix = found.tensors, found.prefix  # ComfyUI's fp8 scales folded into their weights
    keys, quantized, fmt = fold_quantized(ws.tensors)
    sides = best_component(keys)
    if sides is None:
        raise ConversionError(f"{path}: not a Wan checkpoint: its keys match no table "
                              f"(e.g. {', '.join(sorted(ws.tensors)[:3]) or 'no tensors'})")
    return Unit(sides.component, path, "single file", ws, [ws], sides=sides, quantized=quantized, key_format=fmt, keys=keys,
                loads=path.name, fp8=found.fp8)


def _single(path: Path, name: str) -> WeightSet:
    try:
        header = read_header(path)
    except ConversionError as e:
        return WeightSet("single file", name, [path], {}, problems=[str(e)], fatal=True)
    return WeightSet("single file", name, [path], dict(header.tensors))


def candidates(folder: Path) -> list[WeightSet]:
    """Every weight set in a folder: single files, shard groups (with their index), .pth files."""
    out: list[WeightSet] = []
    groups: dict[tuple[str, int], dict[int, Path]] = {}
    stems = weight_stems()
    for p in sorted(folder.glob("*.safetensors")):
        m = SHARD.match(p.name)
        if m and m.group("stem") + ".safetensors" in stems:  # not variant files (<name>.fp16-0000i-...)
            groups.setdefault((m.group("stem"), int(m.group("n"))), {})[int(m.group("i"))] = p
    for name in stems:
        if os.path.lexists(folder / name):  # a folder or FIFO under that name is reported, not skipped
            out.append(_single(folder / name, name))
    indexes = {name: folder / index_name(name) for name in stems if (folder / index_name(name)).is_file()}
    attached: set[str] = set()
    for (stem, n), files in sorted(groups.items()):
        name = stem + ".safetensors"
        ws = _group(folder, name, n, files)
        idx = indexes.get(name)
        if idx is not None and _index_names_group(idx, files):
            ws.index = idx
            attached.add(name)
        _check_index(ws)
        out.append(ws)
    for name, idx in indexes.items():
        if name in attached:
            continue
        same_stem = [ws for ws in out if ws.kind == "sharded" and ws.name == name and ws.index is None]
        if len(same_stem) == 1:  # a wrong index (naming files that are not there) beside the only group
            same_stem[0].index = idx
            _check_index(same_stem[0])
        else:  # an index with no shards of its own
            out.append(WeightSet("stray index", name, [], {}, idx, problems=[f"{idx.name} names shards that are not here"],
                                 fatal=True))
    for n, component in pth_names().items():
        if os.path.lexists(folder / n):
            try:
                out.append(WeightSet("pth file", n, [folder / n], read_pth_index(folder / n)))
            except ConversionError as e:
                out.append(WeightSet("pth file", n, [folder / n], {}, problems=[str(e)], fatal=True))
    return out


def _group(folder: Path, name: str, n: int, files: dict[int, Path]) -> WeightSet:
    ws = WeightSet("sharded", name, [files[i] for i in sorted(files)], {})
    gone = [i for i in range(1, n + 1) if i not in files]
    if gone:
        stem = name.removesuffix(".safetensors")
        ws.problems.append(f"shard {shard_name(stem, gone[0], n)} is missing"
                           + (f" (and {len(gone) - 1} more)" if len(gone) > 1 else ""))
        ws.fatal = True
    owner: dict[str, str] = {}
    for p in ws.files:
        try:
            header = read_header(p)
        except ConversionError as e:
            ws.problems.append(str(e))
            ws.fatal = True
            continue
        for key, ref in header.tensors.items():
            if key in owner:
                ws.problems.append(f"{key} is in both {owner[key]} and {p.name}")
                ws.fatal = True
            owner[key] = p.name
            ws.tensors[key] = ref
    return ws


def _index_names_group(idx: Path, files: dict[int, Path]) -> bool:
    try:
        named = set(load_index(idx)[0].values())
    except (ConversionError, TypeError):  # unreadable, or names that are not strings
        return False
    return bool(named & {p.name for p in files.values()})


def _check_index(ws: WeightSet) -> None:
    """Compare the index with the shard headers; problems there are fixed by rebuilding it."""
    before = len(ws.problems)
    if ws.index is None:
        ws.problems.append(f"no {index_name(ws.name)}: from_pretrained cannot find the {len(ws.files)} shards")
    else:
        try:
            weight_map, metadata = load_index(ws.index)
        except ConversionError as e:
            ws.problems.append(f"{ws.index.name} is unreadable: {e}")
        else:
            actual = {k: r.file.name for k, r in ws.tensors.items()}
            here = {p.name for p in ws.files}
            gone = sorted({f for f in weight_map.values() if isinstance(f, str) and f not in here})
            if gone:  # the file it names is not there: say so, not "the wrong shard"
                keys = sorted(k for k, f in weight_map.items() if f in gone)
                ws.problems.append(f"{ws.index.name} names {gone[0]}" + (f" (and {len(gone) - 1} more files)" if
                                   len(gone) > 1 else "") + f", which does not exist here, for {keys[0]}"
                                   + (f" (and {len(keys) - 1} more keys)" if len(keys) > 1 else ""))
            wrong = sorted(k for k, f in weight_map.items() if k in actual and actual[k] != f and f not in gone)
            absent = sorted(k for k in weight_map if k not in actual)
            unlisted = sorted(k for k in actual if k not in weight_map)
            for what, keys in (("points to the wrong shard for", wrong), ("names keys no shard holds:", absent),
                               ("does not list", unlisted)):
                if keys:
                    ws.problems.append(f"{ws.index.name} {what} {keys[0]}" + (f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""))
            total = metadata.get("total_size")
            if total is not None and total != ws.total_bytes:
                ws.problems.append(f"{ws.index.name} says total_size {total}, the shards hold {ws.total_bytes} bytes")
    ws.rebuildable = len(ws.problems) > before and not ws.fatal


def read_config(folder: Path, unit: Unit) -> None:
    path = folder / "config.json"
    if not path.exists():
        return
    try:
        data = load_json(path, "config")
        if not isinstance(data, dict):
            raise ConversionError(f"{path}: not a JSON object")
    except ConversionError as e:
        unit.config_kind, unit.config_error = "unreadable", str(e)
        return
    unit.config = data
    unit.config_kind = config_kind(unit.table, data)


def table_library(table) -> str:
    """diffusers or transformers: the library of the classes the table converts to."""
    return class_signature(table.built_classes[0])[0]


def config_kind(table, cfg: dict) -> str:
    """diffusers / transformers (a class this table targets), original (fields the facts read), unknown."""
    name = config_class(cfg)
    if name in table.built_classes:
        return class_signature(name)[0]
    original_fields = {f.config or f.check for f in table.facts.values()} - {None}
    if original_fields & set(cfg):
        return "original"
    return "unknown"


def loader_pick(library: str, sets: list[WeightSet]) -> str:
    """Which files from_pretrained opens: diffusers prefers the index, transformers the single file."""
    single = next((ws for ws in sets if ws.kind == "single file"), None)
    indexed = next((ws for ws in sets if ws.index is not None and ws.index.exists()), None)
    order = [indexed, single] if library == "diffusers" else [single, indexed]
    pick = next((ws for ws in order if ws is not None), None)
    if pick is None:
        return "nothing (no weights file it knows)"
    return pick.index.name if pick is indexed else pick.name


def folder_units(folder: Path, component: str | None) -> list[Unit]:
    """The units of one folder. `component`: the folder is that component's subfolder (its name
    says so); otherwise every weight set is assigned by its keys (an original repo folder holds
    several components; a component folder one)."""
    sets = candidates(folder)
    pth = pth_names()
    assigned: dict[str, list[WeightSet]] = {}
    for ws in sets:
        if ws.kind == "pth file":
            c = pth[ws.name]
        elif component is not None:
            c = component
        else:
            keys, _, _ = fold_quantized(ws.tensors)
            sides = best_component(keys)
            c = sides.component if sides else component or "transformer"
        assigned.setdefault(component or c, []).append(ws)
    units = []
    for c, group in assigned.items():
        unit = Unit(c, folder, "component folder", None, group)
        if component is not None or len(assigned) == 1 or load_table(c).source.weights_name:
            read_config(folder, unit)  # in an original repo folder, config.json is the transformer's
        chosen = choose(unit, group)
        unit.weights = chosen
        unit.leftovers = [p for ws in group if ws is not chosen for p in ws.all_files]
        if chosen is not None:
            unit.keys, unit.quantized, unit.key_format = fold_quantized(chosen.tensors)
            unit.sides = classify(c, unit.keys)
        library = table_library(unit.table)
        unit.loads = loader_pick(library, [ws for ws in group if ws.kind != "pth file"])
        if component is None and (len(assigned) > 1 or (chosen is not None and chosen.kind == "pth file")
                                  or unit.layout == "original"):
            unit.where = "original repo folder"
        units.append(unit)
    return units


def choose(unit: Unit, group: list[WeightSet]) -> WeightSet | None:
    """The set that is (or, repaired, will be) the weights: a readable one whose keys are the
    Diffusers ones, preferring what from_pretrained would load; the rest are leftovers."""
    if not group:
        return None
    library = table_library(unit.table)

    def score(ws: WeightSet):
        keys, _, _ = fold_quantized(ws.tensors)
        sides = classify(unit.component, keys)
        preferred = (ws.kind == "sharded") == (library == "diffusers")
        return (not ws.fatal, sides.layout == "diffusers", ws.kind != "pth file", preferred, len(ws.tensors))

    return max(group, key=score)
