"""`wan2diffusers convert`: original Wan 2.1 weights -> a Diffusers folder."""

from __future__ import annotations

import time
from pathlib import Path

import click

from ..errors import ConversionError
from .common import check_size, human_size, parse_settings, run_reporting


@click.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--only", default=None, metavar="LIST",
              help="Comma-separated components to convert: transformer,vae,text_encoder,image_encoder.")
@click.option("--max-shard-size", default="5GB", show_default=True,
              help="Largest output shard (e.g. 5GB, 500MB), as save_pretrained splits.")
@click.option("--dtype", type=click.Choice(["keep", "fp32", "bf16", "fp16"]), default="keep", show_default=True,
              help="Output dtype of floating tensors. In bf16/fp16 the modules diffusers keeps in "
                   "float32 (_keep_in_fp32_modules) stay float32.")
@click.option("--clip-heads", type=int, default=None,
              help="Attention heads of the CLIP vision tower, which the weights cannot tell "
                   "(default: from the table of known towers; ViT-H/14: 16).")
@click.option("--flow-shift", type=float, default=None,
              help="The scheduler's flow_shift (default per variant, see README: 3.0; FLF2V 16.0).")
@click.option("--set", "settings", multiple=True, metavar="COMPONENT.FACT=VALUE",
              help="Give a fact the weights cannot tell, e.g. transformer.num_heads=12 for a single "
                   "file of an unknown size (value parsed as YAML). Repeatable.")
@click.option("--quantize", type=click.Choice(["int8", "float8", "int4"]), default=None,
              help="Write the transformer quantized (optimum-quanto, diffusers' QuantoConfig format: "
                   "from_pretrained loads it with no extra argument); the other components stay float. "
                   "Which modules stay float: mappings/quantization.yaml.")
@click.option("--check-finite", is_flag=True,
              help="Read every floating source tensor once more and warn, naming the keys, about NaN or Inf "
                   "values (without it, the values are not checked and the report says so).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (atomically, when the new one is complete).")
@click.option("--dry-run", is_flag=True, help="Read headers, detect, plan and prove coverage; write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable report on stdout.")
def convert(src: Path, out: Path, only: str | None, max_shard_size: str, dtype: str, clip_heads: int | None,
            flow_shift: float | None, settings: tuple[str, ...], quantize: str | None, check_finite: bool,
            overwrite: bool, dry_run: bool, as_json: bool):
    """Convert the original-layout Wan 2.1 weights in SRC into a Diffusers folder OUT.

    SRC is a Hub repo id (e.g. Wan-AI/Wan2.1-T2V-14B: only the needed files are downloaded),
    a folder in the original repo layout (config.json with diffusion_pytorch_model.safetensors
    or its shards and index; Wan2.1_VAE.pth; models_t5_umt5-xxl-enc-bf16.pth;
    models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth), or one such file. A single
    .safetensors file may carry a `model.diffusion_model.` or `model.` key prefix.
    Each component goes to OUT/<component>/."""
    components = [c.strip() for c in only.split(",") if c.strip()] if only else None
    def action():
        overrides = parse_settings(settings)
        check_size(max_shard_size)
        return run_convert(src, out, components, max_shard_size, dtype, overrides, clip_heads, flow_shift,
                           overwrite, dry_run, as_json, quantize=quantize, check_finite=check_finite)

    run_reporting(action, as_json, out, "nothing was written", "; nothing was written")


def run_convert(src, out, only, max_shard_size, dtype, overrides, clip_heads, flow_shift, overwrite, dry_run,
                as_json, quantize=None, check_finite=False) -> dict:
    from ..convert import (describe, nonfinite_values, plan_component, require_coverage, verify_written,
                           write_component)
    from ..discover import discover
    from ..hub import download, looks_like_repo_id
    from ..pipeline import plan_pipeline, write_pipeline_extras
    from ..publish.provenance import RECORD_NAME, build_record, write_record
    from ..write.atomic import atomic_output_dir, check_output, clean_stale

    say = (lambda *a, **k: None) if as_json else click.echo
    src, out = Path(src), Path(out)
    check_output(src, out, overwrite or dry_run)
    started = time.perf_counter()
    plans = []
    hub_repo = None
    if looks_like_repo_id(str(src)):
        say(f"downloading from the Hub: {src} (only what the components need)")
        hub_repo, src = str(src), download(str(src), only)
    found = discover(src, only)
    stray = set(overrides) - set(found)
    if stray:
        raise ConversionError(f"--set: {', '.join(sorted(stray))} is not among the components found in {src} "
                              f"({', '.join(found)})")
    if clip_heads and "image_encoder" in found:  # a shorthand: harmless where there is no CLIP
        overrides.setdefault("image_encoder", {}).setdefault("num_heads", clip_heads)
    for component, path in found.items():
        cp = plan_component(component, path, dtype, overrides.get(component))
        det = cp.plan.detection
        say(f"{component}:")
        say(f"  source:   {cp.source.path} ({describe(cp)['source_layout']}, {len(cp.source.files)} file(s), "
            f"{len(cp.source.tensors)} tensors, {human_size(cp.source.total_bytes)})")
        say(f"  detected: {det.variant}{', size ' + det.size if det.size else ''} -> {cp.plan.target.class_name}")
        for note in det.notes:
            say(f"  note:     {note}")
        require_coverage(cp)
        say(f"  coverage: {len(cp.source.tensors)}/{len(cp.source.tensors)} source tensors used "
            f"({len(cp.plan.dropped)} dropped by rule), {len(cp.plan.tensors)}/{len(cp.plan.target.shapes)} "
            f"target tensors produced, shapes match")
        plans.append(cp)
    report = {"ok": True, "dry_run": dry_run, "components": [describe(cp) for cp in plans]}
    report["finite_check"] = "done" if check_finite else "skipped"
    for cp, info in zip(plans, report["components"]):
        info["nonfinite"] = nonfinite_values(cp, progress=not as_json) if check_finite else None
        if info["nonfinite"]:
            bad = info["nonfinite"]
            click.echo(f"warning: {cp.component}: {len(bad)} source tensor(s) hold NaN or Inf values: "
                       + ", ".join(f"{k} ({n})" for k, n in list(bad.items())[:8])
                       + (f" and {len(bad) - 8} more" if len(bad) > 8 else "") + "; converted as they are", err=True)
    if not check_finite:
        say("values: not checked for NaN/Inf (--check-finite reads the source once more)")
    if quantize:  # the transformer written quantized (converter/quantize)
        from ..quantize.plan import quantize_plans

        quantize_plans(plans, report["components"], quantize, say)
    pipe = None
    transformer = next((cp for cp in plans if cp.component == "transformer"), None)
    if transformer is not None:
        weights = {cp.folder: (cp.plan.target.library, cp.plan.target.class_name) for cp in plans}
        pipe = plan_pipeline(transformer.plan.detection.variant, weights, src, flow_shift, only)
        report["pipeline"] = {"class": pipe.spec.class_name, "complete": pipe.complete, "missing": pipe.missing,
                              "extras": pipe.extras, "flow_shift": pipe.flow_shift}
        if pipe.complete:
            say(f"pipeline: {pipe.spec.class_name} (scheduler flow_shift {pipe.flow_shift})")
        else:
            say(f"pipeline: incomplete for {pipe.spec.class_name}: no {', '.join(pipe.missing)} in {src}; "
                f"model_index.json is not written (load the components one by one)")
    if dry_run:
        total = sum(c["bytes"] for c in report["components"])
        say(f"dry run: would write {out} ({human_size(total)}); nothing written")
        return report

    report["notes"] = clean_stale(out)
    for note in report["notes"]:
        say(f"note: {note}")
    with atomic_output_dir(out, overwrite) as work:
        for cp, info in zip(plans, report["components"]):
            folder = work / cp.folder
            layout = write_component(cp, folder, max_shard_size)
            verify_written(cp, folder, layout)
            info["output"] = str((out / cp.folder).resolve())
            info["files"] = sorted(p.name for p in folder.iterdir())
        if pipe is not None:
            write_pipeline_extras(pipe, work)
        written = sorted(p.name for p in work.iterdir())
        # the conversion record publish reads (from_pretrained never looks at it)
        write_record(work, build_record(src, hub_repo, dtype, plans, report))
    elapsed = time.perf_counter() - started
    report["output"] = str(out.resolve())
    report["seconds"] = round(elapsed, 3)
    for info in report["components"]:
        say(f"wrote {info['component']}: {len(info['files'])} file(s), {human_size(info['bytes'])}, "
            f"{', '.join(info['dtypes'])}")
    if pipe is not None and pipe.extras:
        say(f"wrote {', '.join(pipe.extras)}{' and model_index.json' if pipe.complete else ''}")
    report["written"] = written
    report["record"] = RECORD_NAME
    say(f"done in {elapsed:.1f} s")
    say(f"result: {out.resolve()}")
    return report
