"""`wan2diffusers quantize`: an already-converted Diffusers folder -> its quantized variant."""

from __future__ import annotations

import time
from pathlib import Path

import click

from ..errors import ConversionError
from .common import check_size, human_size, run_reporting

WEIGHTS = ("int8", "float8", "int4")  # checked against mappings/quantization.yaml when run


@click.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--weights", type=click.Choice(WEIGHTS), required=True,
              help="Weight dtype of the quantized Linear layers (optimum-quanto, diffusers' QuantoConfig format).")
@click.option("--max-shard-size", default="5GB", show_default=True,
              help="Largest output shard (e.g. 5GB, 500MB), as save_pretrained splits.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (atomically, when the new one is complete).")
@click.option("--dry-run", is_flag=True, help="Read headers, prove the keys and plan the quantized layout; write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable report on stdout.")
def quantize(src: Path, out: Path, weights: str, max_shard_size: str, overwrite: bool, dry_run: bool, as_json: bool):
    """Quantize the transformer of the Diffusers folder SRC into OUT, one weight at a time.

    SRC is a transformer folder (config.json + diffusion_pytorch_model*.safetensors, e.g. the
    transformer/ that `wan2diffusers convert` writes) or a pipeline folder holding one; OUT is
    the same kind of folder. In a pipeline folder the other components are hard-linked (copied
    where a link is refused) unchanged. The Linear layers the policy (mappings/quantization.yaml)
    does not keep float are written as diffusers' quanto backend writes them, so
    `from_pretrained(OUT)` loads them quantized with no extra argument."""
    def action():
        check_size(max_shard_size)
        return run_quantize(src, out, weights, max_shard_size, overwrite, dry_run, as_json)

    run_reporting(action, as_json, out, "nothing was written", "; nothing was written")


def run_quantize(src, out, weights, max_shard_size, overwrite, dry_run, as_json) -> dict:
    from ..convert import require_coverage, verify_written, write_component
    from ..quantize.diffusers_folder import link_or_copy, locate, pipeline_members, plan_folder
    from ..quantize.plan import attach
    from ..write.atomic import atomic_output_dir, check_output, clean_stale

    say = (lambda *a, **k: None) if as_json else click.echo
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
    report["notes"] = clean_stale(out)
    for note in report["notes"]:
        say(f"note: {note}")
    with atomic_output_dir(out, overwrite) as work:
        folder = work / cp.folder if where.pipeline else work
        layout = write_component(cp, folder, max_shard_size)
        verify_written(cp, folder, layout)
        report["files"] = sorted(p.name for p in folder.iterdir())
        if where.pipeline:
            report["links"] = link_or_copy(where.root, work, keep)
            report["record"] = carry_record(where.root, work, weights)
            if report["record"]:
                left = report["left_out"] = [n for n in left if n != record_name()]
    elapsed = time.perf_counter() - started
    report["output"] = str(out.resolve())
    report["seconds"] = round(elapsed, 3)
    say(f"wrote {cp.component}: {len(report['files'])} file(s), {human_size(info['bytes'])}, "
        f"{', '.join(info['dtypes'])}")
    if where.pipeline:
        say(f"unchanged: {', '.join(keep)} ({report['links']['linked']} file(s) hard-linked, "
            f"{report['links']['copied']} copied)" + (f"; left out: {', '.join(left)}" if left else ""))
        if report["record"]:
            say(f"record:  {record_name()} carried over, noting the quantization (publish reads it)")
    say(f"done in {elapsed:.1f} s")
    say(f"result: {out.resolve()}")
    return report


def carry_record(float_folder: Path, work: Path, weights: str) -> bool:
    """The float folder's conversion record, carried into the quantized copy with a note of what
    was derived from it (publish then needs no --record); False when there is none to carry."""
    from ..publish.provenance import RECORD_NAME, read_record, write_record

    if not (float_folder / RECORD_NAME).is_file():
        return False
    record = read_record(float_folder / RECORD_NAME)
    record["derived_from"] = {"folder": float_folder.name, "by": "wan2diffusers quantize", "weights": weights}
    write_record(work, record)
    return True


def record_name() -> str:
    from ..publish.provenance import RECORD_NAME

    return RECORD_NAME
