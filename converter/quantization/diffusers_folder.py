"""An already-converted Diffusers folder as a float plan, so the same writer can quantize it:
a transformer folder (config.json + diffusion_pytorch_model*.safetensors), or a pipeline folder
(model_index.json) holding one.  Its keys and shapes are proven against the class named in
config.json, built on the meta device, before anything is written (as the float conversion's
coverage proof); each tensor then maps to itself."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..component import ComponentPlan
from ..errors import ConversionError
from ..layouts import diffusers, locate
from ..mapping.schema import Rule
from ..mapping.tables import load_table, table_names
from ..plan.detect import Detection, within_limits
from ..plan.plan import FLOAT_TAGS, Plan, PlannedTensor
from ..plan.target import build_target
from ..read.files import load_json
from ..read.source import open_safetensors_source
from ..write.naming import MODEL_INDEX as PIPELINE_INDEX
from ..write.copying import copy_file
from .policy import load_policy

SAME_KEY = Rule.model_validate({"from": "{key}", "to": "{key}"})  # a tensor written under its own name


@dataclass
class DiffusersSource:
    root: Path  # what was given
    folder: Path  # the component folder inside it (root itself when not a pipeline)
    component: str
    pipeline: bool


def quantizable_folders() -> list[tuple[str, str]]:
    """(folder in a pipeline, component) of everything the policy quantizes: each component's own
    folder and its extra instances (transformer_2, Wan 2.2 A14B's second expert)."""
    from ..pipeline import transformer_instances

    out = []
    for c in load_policy().components:
        names = [load_table(c).output.folder] + [i for i, comp in transformer_instances().items() if comp == c]
        out += [(n, c) for n in dict.fromkeys(names)]
    return out


def locate_all(root: Path) -> list[DiffusersSource]:
    """The quantizable components of a pipeline folder (every instance its model_index.json lists),
    of a folder of component subfolders, or the component folder itself."""
    root = Path(root)
    located = locate(root)
    if located.what != "a folder":
        raise ConversionError(f"{root}: no such folder (expected a Diffusers transformer or pipeline folder)")
    if located.kind == diffusers.PIPELINE:
        index = load_json(root / PIPELINE_INDEX, "model index")
        found = [DiffusersSource(root, root / f, c, True) for f, c in quantizable_folders()
                 if isinstance(index, dict) and index.get(f) not in (None, [None, None]) and (root / f).is_dir()]
        if not found:
            raise ConversionError(f"{root}: a pipeline folder with no quantizable component "
                                  f"({', '.join(f + '/' for f, _ in quantizable_folders())})")
        return found
    if located.kind == diffusers.SUBFOLDERS and not (root / "config.json").exists():  # convert --only ...
        found = [DiffusersSource(root, root / f, c, True) for f, c in quantizable_folders()
                 if (root / f / "config.json").is_file()]
        if found:
            return found
    return [DiffusersSource(root, root, _component_of(root), False)]


def _component_of(folder: Path) -> str:
    config = _config(folder)
    for name, spec in load_policy().components.items():
        if config.get("_class_name") in spec.classes:
            return name
    raise ConversionError(f"{folder / 'config.json'}: _class_name {config.get('_class_name')!r} is not a "
                          f"class that can be quantized (known: "
                          f"{', '.join(c for p in load_policy().components.values() for c in p.classes)}); "
                          f"an original-layout Wan folder: wan2diffusers convert SRC OUT --quantize W")


def _config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise ConversionError(f"{folder}: no config.json (expected a Diffusers model or pipeline folder)")
    config = load_json(path, "config")
    if not isinstance(config, dict) or "_class_name" not in config:
        raise ConversionError(f"{path}: not a Diffusers model config (no _class_name)")
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "?") if isinstance(
            config["quantization_config"], dict) else "?"
        raise ConversionError(f"{path}: already quantized ({method}); quantize the float folder")
    return config


def plan_folder(src: DiffusersSource) -> ComponentPlan:
    """The float plan of the component folder: every tensor to itself, with the coverage proof
    (every key of the class present once with its shape and a float dtype, nothing else)."""
    table = load_table(src.component)
    config = _config(src.folder)
    class_name = config["_class_name"]
    init = {k: v for k, v in config.items() if not k.startswith("_")}
    source = open_safetensors_source(src.folder, table.output.weights_name, [])
    within_limits(table, config, src.folder / "config.json")
    target = build_target(class_name, init)
    problems = []
    for key, ref in source.tensors.items():
        if key not in target.shapes:
            problems.append(f"{ref.file}: {key} is not a parameter or buffer of {class_name}")
        elif tuple(ref.shape) != tuple(target.shapes[key]):
            problems.append(f"{ref.file}: {key} has shape {list(ref.shape)}, {class_name} needs "
                            f"{list(target.shapes[key])}")
        elif ref.dtype not in FLOAT_TAGS:
            problems.append(f"{ref.file}: {key} is {ref.dtype}, not a float tensor")
    for key in target.shapes:
        if key not in source.tensors:
            problems.append(f"{src.folder}: missing key {key}")
    tensors = [PlannedTensor(k, tuple(target.shapes[k]), source.tensors[k].dtype, [source.tensors[k]], SAME_KEY, 0)
               for k in target.shapes if k in source.tensors]
    det = Detection(src.component, "diffusers", "", class_name, {}, init, [])
    plan = Plan(det, target, tensors, [], problems)
    folder = src.folder.name if src.pipeline else table.output.folder  # transformer_2 keeps its folder
    return ComponentPlan(src.component, source, plan, table.output.weights_name, folder)


def pipeline_members(root: Path, skip) -> tuple[list[str], list[str]]:
    """What a pipeline folder holds besides `skip`: model_index.json and the component folders it
    names (kept), and the other top-level entries (left out: e.g. a README or a conversion
    record, which describe the float folder)."""
    if (root / PIPELINE_INDEX).is_file():
        index = load_json(root / PIPELINE_INDEX, "model index")
        named = {k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v and v[0]}
        keep = [PIPELINE_INDEX]
    else:  # a folder of component subfolders: each known component folder is a member
        from ..pipeline import transformer_instances

        named = {load_table(c).output.folder for c in table_names()} | set(transformer_instances())
        keep = []
    left = []
    for p in sorted(root.iterdir()):
        if p.name in ({skip} if isinstance(skip, str) else set(skip)) or p.name == PIPELINE_INDEX \
                or p.name.startswith("."):
            continue
        (keep if p.name in named and p.is_dir() else left).append(p.name)
    return keep, left


def link_or_copy(src: Path, dst: Path, names: list[str]) -> dict[str, int]:
    """The `names` in `src` (files or folders), hard-linked file by file into `dst` (a copy where
    a link is refused: another filesystem, or a file not ours).  Returns the counts."""
    counts = {"linked": 0, "copied": 0}
    paths = []
    for name in names:
        top = src / name
        paths += [top] + (sorted(top.rglob("*")) if top.is_dir() and not top.is_symlink() else [])
    for path in paths:
        target = dst / path.relative_to(src)
        if path.is_dir() and not path.is_symlink():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if not path.is_symlink():
            try:
                os.link(path, target)
                counts["linked"] += 1
                continue
            except OSError:
                pass
        copy_file(path, target)  # a symlink: what it points to (a regular file), not a link that may dangle
        counts["copied"] += 1
    return counts
