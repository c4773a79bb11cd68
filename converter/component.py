"""One component through the stages: read headers -> detect + derive config -> plan + coverage
proof -> write (streamed, one tensor at a time) -> verify the written headers against the plan."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from . import fp8
from .errors import ConversionError
from .progress import file_done
from .mapping import transforms
from .mapping.tables import load_table
from .plan.detect import detect
from .plan.plan import Plan, PlannedTensor, build_plan
from .plan.target import build_target
from .read import safetensors_file
from .read.safetensors_file import iter_cast, read_header, read_tensor
from .read.source import SourceCheckpoint, open_pth_source, open_safetensors_source
from .write.naming import ShardLayout, plan_shards
from .write.safetensors_writer import data_order, write_safetensors


@dataclass
class ComponentPlan:
    component: str
    source: SourceCheckpoint
    plan: Plan
    weights_name: str  # output file name (sharded: <stem>-0000i-of-0000n.safetensors)
    folder: str  # output subfolder
    quantized: Any = None  # a wan2diffusers.quantization.plan.QuantizedPlan: write its entries instead
    metadata: dict = field(default_factory=dict)  # more safetensors metadata for the files written


def open_source(component: str, src_path: Path) -> SourceCheckpoint:
    table = load_table(component)
    if table.source.weights_name:
        src = open_safetensors_source(src_path, table.source.weights_name, table.source.strip_prefixes)
        return fp8.resolve(src, table.source.strip_prefixes)
    return open_pth_source(src_path, table.source.file_names, table.source.strip_prefixes)


def plan_component(component: str, src_path: Path, dtype: str = "keep",
                   overrides: dict | None = None, override_config: bool = False,
                   variant: str | None = None) -> ComponentPlan:
    """`variant`: the table variant the pipeline needs (detect); None: the one the keys tell."""
    table = load_table(component)
    src = open_source(component, src_path)
    det = detect(table, src, overrides, override_config, variant)
    target = build_target(det.target_class, det.config)
    plan = build_plan(table, src, det, target, dtype)
    return ComponentPlan(component, src, plan, table.output.weights_name, table.output.folder)


def require_coverage(cp: ComponentPlan) -> None:
    if not cp.plan.ok:
        n = len(cp.plan.problems)
        raise ConversionError(
            f"{cp.source.path}: {cp.component}: coverage check failed ({n} problem{'s' * (n != 1)}); "
            f"nothing was written", cp.plan.problems)


def produce(pt: PlannedTensor):
    """The output tensor; the source TensorRef when its bytes can be copied unchanged; or a
    chunked cast when only the dtype changes."""
    if pt.is_byte_copy:
        return pt.sources[0]
    if pt.is_elementwise:
        return iter_cast(pt.sources[0], safetensors_file.DTYPES[pt.dtype])
    inputs = [read_tensor(r) for r in pt.sources]
    out = transforms.apply(pt.rule, inputs)[pt.part]
    return safetensors_file.cast_checked(out, safetensors_file.DTYPES[pt.dtype], f"{pt.sources[0].file}: {pt.key}")


def written_tensors(cp: ComponentPlan) -> list:
    """What is written: the plan's tensors, or the entries of its quantized variant."""
    return cp.quantized.tensors if cp.quantized is not None else cp.plan.tensors


def _source_position(pt) -> tuple:
    src = getattr(pt, "sources", None)
    return (str(src[0].file), src[0].offset) if src else ("", 0)


def write_component(cp: ComponentPlan, folder: Path, max_shard_size, progress: bool = True) -> ShardLayout:
    """The Diffusers folder of `cp`: its weights (write_weights) and its config.json."""
    layout = write_weights(cp, folder, cp.weights_name, max_shard_size, progress)
    cp.plan.target.save_config(folder)
    if cp.quantized is not None:
        cp.quantized.write_config(folder)  # adds quantization_config
    return layout


def write_weights(cp: ComponentPlan, folder: Path, weights_name: str, max_shard_size,
                  progress: bool = True) -> ShardLayout:
    """What `cp` plans (its quantized entries when it has them) as `weights_name`, sharded as
    save_pretrained shards, with its index; streamed, one tensor at a time."""
    folder.mkdir(parents=True, exist_ok=True)
    by_key = {pt.key: pt for pt in written_tensors(cp)}
    make = cp.quantized.produce if cp.quantized is not None else produce
    layout = plan_shards({k: pt.nbytes for k, pt in by_key.items()}, weights_name, max_shard_size)
    total = sum(pt.nbytes for pt in by_key.values())
    metadata = {"format": "pt", **cp.metadata, **(cp.quantized.file_metadata() if cp.quantized is not None else {})}
    shards = {name: sorted((by_key[k] for k in keys), key=lambda pt: (data_order(pt.nbytes), _source_position(pt)))
              for name, keys in layout.files.items()}
    if cp.quantized is not None:  # its next weight is quantized while one is written
        cp.quantized.expect([pt for pts in shards.values() for pt in pts])
    try:
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"writing {cp.component}",
                  disable=None if progress else True, leave=False) as bar:
            for name, pts in shards.items():
                # which shard a key goes to is save_pretrained's (state-dict order); inside a shard the
                # data is written in source order, so the source files are read front to back (the
                # tensors whose size keeps the next one aligned first: safetensors_writer.ALIGN)
                entries = [(pt.key, pt.dtype, pt.shape, pt.nbytes) for pt in pts]
                write_safetensors(folder / name, entries, lambda i, pts=pts: make(pts[i]), metadata, bar.update)
                file_done(f"writing {cp.folder or cp.component}", name, sum(e[3] for e in entries), progress)
    finally:
        if cp.quantized is not None:
            cp.quantized.close()
    if layout.index_name:
        (folder / layout.index_name).write_text(json.dumps(layout.index, indent=2, sort_keys=True) + "\n")
    return layout


def verify_written(cp: ComponentPlan, folder: Path, layout: ShardLayout) -> None:
    """Read back the written headers: every planned key, with its shape and dtype, and nothing else."""
    seen = {}
    for name in layout.files:
        for key, ref in read_header(folder / name).tensors.items():
            seen[key] = (ref.dtype, tuple(ref.shape))
    check_written(cp, folder, seen)


def check_written(cp: ComponentPlan, where: Path, seen: dict) -> None:
    """`seen` (key -> (dtype tag, shape) as read back from what was written) must be the plan."""
    want = {pt.key: (pt.dtype, tuple(pt.shape)) for pt in written_tensors(cp)}
    if seen != want:
        diff = sorted(set(seen.items()) ^ set(want.items()))[:5]
        raise ConversionError(f"{where}: written headers differ from the plan: {diff}")


def nonfinite_values(cp: ComponentPlan, progress: bool = True) -> dict[str, int]:
    """Source key -> how many NaN/Inf values it holds (keys with none left out): one extra read
    of every floating source tensor, a chunk at a time."""
    refs = sorted(cp.source.tensors.items(), key=lambda kv: (str(kv[1].file), kv[1].offset))
    found = {}
    with tqdm(total=sum(r.nbytes for _, r in refs), unit="B", unit_scale=True, desc=f"checking {cp.component}",
              disable=None if progress else True, leave=False) as bar:
        for key, ref in refs:
            n = safetensors_file.count_nonfinite(ref)
            if n:
                found[key] = n
            bar.update(ref.nbytes)
    return found


def describe(cp: ComponentPlan) -> dict:
    p, src = cp.plan, cp.source
    return {
        "component": cp.component,
        "instance": cp.folder,  # the output folder: transformer_2 is the second transformer instance
        "source": str(src.path),
        "source_layout": src.layout + (f" (prefix {src.prefix!r} removed)" if src.prefix else "")
        + (f", {src.fp8.says()}" if src.fp8 else ""),
        "source_files": [str(f) for f in src.files],
        "variant": p.detection.variant,
        "detected": p.detection.says,
        "size": p.detection.size,
        "class": p.target.class_name,
        "config": p.detection.config,
        "notes": p.detection.notes,
        "source_tensors": len(src.tensors),
        "target_tensors": len(p.target.shapes),
        "converted": len(p.tensors),
        "dropped": [{"key": d.key, "reason": d.reason} for d in p.dropped],
        "bytes": sum(pt.nbytes for pt in p.tensors),
        "dtypes": sorted({pt.dtype for pt in p.tensors}),
        "coverage": "ok" if p.ok else "failed",
        "problems": p.problems,
    }
