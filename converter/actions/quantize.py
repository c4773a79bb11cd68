"""What `quantize` does: an already-converted Diffusers folder -> its quantized variant."""

from __future__ import annotations

import time
from pathlib import Path

from .common import human_size, silent


def run_quantize(src, out, weights, max_shard_size, overwrite, dry_run, say=silent) -> dict:
    from ..component import require_coverage, verify_written, write_component
    from ..quantization.diffusers_folder import link_or_copy, locate, pipeline_members, plan_folder
    from ..quantization.plan import attach
    from ..write.atomic import atomic_output_dir, check_output, clean_stale

    src, out = Path(src), Path(out)
    check_output(src, out, overwrite or dry_run)
    started = time.perf_counter()
    where = locate(src)
    cp = plan_folder(where)
    require_coverage(cp)
    say(f"{cp.component}: {where.folder} ({cp.plan.target.class_name}, {len(cp.plan.tensors)} tensors, "
        f"{human_size(cp.source.total_bytes)}): keys and shapes match")
    qp = attach(cp, weights)
    info = qp.describe()
    say(f"  quantized: {info['quantized_modules']} Linear weights to {weights} ({qp.backend.name}); kept float: "
        f"{', '.join(qp.keep_float)} (+ the class's _keep_in_fp32_modules)")
    say(f"  size:      {human_size(info['float_bytes'])} -> {human_size(info['bytes'])}")
    report = {"ok": True, "dry_run": dry_run, "source": str(src), "component": cp.component,
              "class": cp.plan.target.class_name, "pipeline": where.pipeline, "quantization": info}
    keep, left = pipeline_members(where.root, cp.folder) if where.pipeline else ([], [])
    report["unchanged"], report["left_out"] = keep, left
    if dry_run:
        say(f"dry run: would write {out}; nothing written")
        return report
    report["notes"] = clean_stale(out, say)
    with atomic_output_dir(out, overwrite) as work:
        folder = work / cp.folder if where.pipeline else work
        t0 = time.perf_counter()
        layout = write_component(cp, folder, max_shard_size)
        verify_written(cp, folder, layout)
        report["write_seconds"] = round(time.perf_counter() - t0, 3)
        report["files"] = sorted(p.name for p in folder.iterdir())
        if where.pipeline:
            report["links"] = link_or_copy(where.root, work, keep)
            report["record"] = carry_record(where.root, work, weights)
            if report["record"]:
                left = report["left_out"] = [n for n in left if n != record_name()]
        else:  # a component folder of a converted folder: its record comes along (publish needs no --record)
            report["record"] = carry_record(where.root.parent, work, weights)
    elapsed = time.perf_counter() - started
    report["output"] = str(out.resolve())
    report["seconds"] = round(elapsed, 3)
    t = report["write_seconds"]
    say(f"wrote {cp.component}: {len(report['files'])} file(s), {human_size(info['bytes'])} in {t:.1f} s "
        f"({human_size(cp.source.total_bytes / max(t, 1e-3))}/s read), {', '.join(info['dtypes'])}")
    if where.pipeline and keep:
        say(f"unchanged: {', '.join(keep)} ({report['links']['linked']} file(s) hard-linked, "
            f"{report['links']['copied']} copied)" + (f"; left out: {', '.join(left)}" if left else ""))
    if report.get("record"):
        say(f"record:  {record_name()} carried over, noting the quantization (publish reads it)")
    say(f"done in {elapsed:.1f} s")
    say(f"result: {out.resolve()}")
    return report


def carry_record(float_folder: Path, work: Path, weights: str) -> bool:
    """The float folder's conversion record, carried into the quantized copy with a note of what
    was derived from it (publish then needs no --record); False when there is none to carry."""
    from ..publishing.provenance import RECORD_NAME, read_record, write_record

    if not (float_folder / RECORD_NAME).is_file():
        return False
    record = read_record(float_folder / RECORD_NAME)
    record["derived_from"] = {"folder": float_folder.name, "by": "wan2diffusers quantize", "weights": weights}
    write_record(work, record)
    return True


def record_name() -> str:
    from ..publishing.provenance import RECORD_NAME

    return RECORD_NAME
