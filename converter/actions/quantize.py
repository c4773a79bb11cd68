"""What `quantize` does: an already-converted Diffusers folder -> its quantized variant."""

from __future__ import annotations

import time
from pathlib import Path

from ..sizes import human_size
from .common import silent


def run_quantize(src, out, weights, max_shard_size, overwrite, dry_run, say=silent, backend=None,
                 progress: bool = True, loras=()) -> dict:
    """Every quantizable component of SRC (both experts of a Wan 2.2 A14B pipeline) planned,
    proven, quantized; the rest of a pipeline folder hard-linked unchanged. `loras` (merge of a
    Diffusers base): folded into the transformers as they are read (actions/merge.py); `weights`
    None then writes them float, as they are stored."""
    from ..component import require_coverage
    from ..quantization.diffusers_folder import locate_all, pipeline_members, plan_folder
    from ..quantization.plan import attach
    from ..write.atomic import check_output

    src, out = Path(src), Path(out)
    check_output(src, out, overwrite or dry_run)
    started = time.perf_counter()
    wheres = locate_all(src)
    plans, infos = [], []
    for where in wheres:
        cp = plan_folder(where)
        require_coverage(cp)
        say(f"{cp.folder}: {where.folder} ({cp.plan.target.class_name}, {len(cp.plan.tensors)} tensors, "
            f"{human_size(cp.source.total_bytes)}): keys and shapes match")
        if weights is None:
            info = {"bytes": sum(pt.nbytes for pt in cp.plan.tensors), "dtypes": sorted({pt.dtype for pt in cp.plan.tensors})}
        else:
            qp = attach(cp, weights, backend)
            info = qp.describe()
            say(f"  quantized: {info['quantized_modules']} Linear weights to {weights} ({qp.backend.name}); kept float: "
                f"{', '.join(qp.keep_float)} (+ the class's _keep_in_fp32_modules)")
            say(f"  size:      {human_size(info['float_bytes'])} -> {human_size(info['bytes'])}")
        plans.append(cp)
        infos.append({"instance": cp.folder, "component": cp.component, "class": cp.plan.target.class_name,
                      "quantization": info})
    merged = None
    if loras:
        from .merge import plan_merges

        merged = plan_merges(plans, list(loras), say)
    first, pipeline = infos[0], wheres[0].pipeline
    report = {"ok": True, "dry_run": dry_run, "source": str(src), "component": first["component"],
              "class": first["class"], "pipeline": pipeline, "quantization": first["quantization"],
              "components": infos, **({"loras": merged} if merged else {})}
    keep, left = pipeline_members(src, [cp.folder for cp in plans]) if pipeline else ([], [])
    report["unchanged"], report["left_out"] = keep, left
    if dry_run:
        say(f"dry run: would write {out}; nothing written")
        return report
    write_quantized(plans, infos, src, out, weights or "float (merged)", max_shard_size, overwrite, pipeline, report, say,
                    progress)
    elapsed = time.perf_counter() - started
    report["output"] = str(out.resolve())
    report["seconds"] = round(elapsed, 3)
    if report.get("record"):
        say(f"record:  {record_name()} carried over, noting the {'merge' if loras else 'quantization'} (publish reads it)")
    say(f"done in {elapsed:.1f} s")
    say(f"result: {out.resolve()}")
    return report


def write_quantized(plans, infos, src: Path, out: Path, weights, max_shard_size, overwrite, pipeline, report, say,
                    progress: bool = True):
    from ..component import verify_written, write_component
    from ..publishing.provenance import RECORD_NAME, read_record
    from ..quantization.diffusers_folder import link_or_copy
    from ..write.atomic import atomic_output_dir, clean_stale

    record_folder = src if pipeline else src.parent
    if (record_folder / RECORD_NAME).is_file():
        read_record(record_folder / RECORD_NAME)  # a broken record is refused before anything is written
    report["notes"] = clean_stale(out, say)
    keep, left = report["unchanged"], report["left_out"]
    with atomic_output_dir(out, overwrite) as work:
        for cp, info in zip(plans, infos):
            folder = work / cp.folder if pipeline else work
            t0 = time.perf_counter()
            layout = write_component(cp, folder, max_shard_size, progress)
            verify_written(cp, folder, layout)
            info["write_seconds"] = round(time.perf_counter() - t0, 3)
            info["files"] = sorted(p.name for p in folder.iterdir())
            q, t = info["quantization"], info["write_seconds"]
            say(f"wrote {cp.folder}: {len(info['files'])} file(s), {human_size(q['bytes'])} in {t:.1f} s "
                f"({human_size(cp.source.total_bytes / max(t, 1e-3))}/s read), {', '.join(q['dtypes'])}")
        report["files"], report["write_seconds"] = infos[0]["files"], infos[0]["write_seconds"]
        if pipeline:
            report["links"] = link_or_copy(src, work, keep)
            report["record"] = carry_record(src, work, weights, report.get("loras"))
            if report["record"]:
                left = report["left_out"] = [n for n in left if n != record_name()]
            if keep:
                say(f"unchanged: {', '.join(keep)} ({report['links']['linked']} file(s) hard-linked, "
                    f"{report['links']['copied']} copied)" + (f"; left out: {', '.join(left)}" if left else ""))
        else:  # a component folder of a converted folder: its record comes along (publish needs no --record)
            report["record"] = carry_record(src.parent, work, weights, report.get("loras"))


def carry_record(float_folder: Path, work: Path, weights: str, loras=None) -> bool:
    """The float folder's conversion record, carried into the quantized copy with a note of what
    was derived from it (publish then needs no --record); False when there is none to carry."""
    from ..publishing.provenance import RECORD_NAME, read_record, write_record

    if not (float_folder / RECORD_NAME).is_file():
        return False
    record = read_record(float_folder / RECORD_NAME)
    record["derived_from"] = {"folder": float_folder.name, "by": f"wan2diffusers {'merge' if loras else 'quantize'}",
                              "weights": weights}
    if loras:
        record["merged_loras"] = list(record.get("merged_loras") or []) + list(loras)
    write_record(work, record)
    return True


def record_name() -> str:
    from ..publishing.provenance import RECORD_NAME

    return RECORD_NAME
