"""The `wan2diffusers` command."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from . import __version__
from .errors import ConversionError

MAX_DETAILS = 25


def fail(e: ConversionError, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({"ok": False, "error": str(e), "details": e.details}, indent=2))
    click.echo(f"error: {e}", err=True)
    for line in e.details[:MAX_DETAILS]:
        click.echo(f"  {line}", err=True)
    if len(e.details) > MAX_DETAILS:
        click.echo(f"  ... and {len(e.details) - MAX_DETAILS} more", err=True)
    sys.exit(1)


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="wan2diffusers")
def main():
    """Convert original Wan 2.1 checkpoints to the Diffusers layout, offline and streamed."""


@main.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--max-shard-size", default="5GB", show_default=True,
              help="Largest output shard (e.g. 5GB, 500MB), as save_pretrained splits.")
@click.option("--dtype", type=click.Choice(["keep", "fp32", "bf16", "fp16"]), default="keep", show_default=True,
              help="Output dtype of floating tensors. In bf16/fp16 the modules diffusers keeps in "
                   "float32 (_keep_in_fp32_modules) stay float32.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (atomically, when the new one is complete).")
@click.option("--dry-run", is_flag=True, help="Read headers, detect, plan and prove coverage; write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable report on stdout.")
def convert(src: Path, out: Path, max_shard_size: str, dtype: str, overwrite: bool, dry_run: bool, as_json: bool):
    """Convert the original-layout Wan 2.1 transformer in SRC into OUT/transformer/.

    SRC is a folder with config.json and diffusion_pytorch_model.safetensors (or its shards and
    diffusion_pytorch_model.safetensors.index.json), or a single original-layout .safetensors
    file, whose keys may carry a `model.diffusion_model.` or `model.` prefix."""
    try:
        report = run_convert(src, out, max_shard_size, dtype, overwrite, dry_run, as_json)
    except ConversionError as e:
        fail(e, as_json)
    except KeyboardInterrupt:
        click.echo("error: interrupted; nothing was written", err=True)
        sys.exit(130)
    if as_json:
        click.echo(json.dumps(report, indent=2))


def run_convert(src, out, max_shard_size, dtype, overwrite, dry_run, as_json) -> dict:
    from .convert import describe, plan_component, require_coverage, verify_written, write_component
    from .write.atomic import atomic_output_dir, check_destination

    say = (lambda *a, **k: None) if as_json else click.echo
    src, out = Path(src), Path(out)
    if not dry_run:
        check_destination(out, overwrite)
        s, o = src.resolve(), out.resolve()
        if o == s or o in s.parents:
            raise ConversionError(f"{out}: would replace the source {src}; choose another OUT")
    started = time.perf_counter()
    cp = plan_component("transformer", src, dtype)
    info = describe(cp)
    det = cp.plan.detection
    say(f"source:   {src} ({info['source_layout']}, {len(cp.source.files)} file(s), "
        f"{info['source_tensors']} tensors, {human_size(cp.source.total_bytes)})")
    say(f"detected: Wan 2.1 {det.variant.upper()}, size {det.size} -> {cp.plan.target.class_name}")
    for note in det.notes:
        say(f"note:     {note}")
    require_coverage(cp)
    say(f"coverage: {len(cp.source.tensors)}/{len(cp.source.tensors)} source tensors used "
        f"({len(cp.plan.dropped)} dropped by rule), {info['converted']}/{info['target_tensors']} "
        f"target tensors produced, shapes match")
    report = {"ok": True, "dry_run": dry_run, "components": [info]}
    if dry_run:
        say(f"dry run:  would write {out / 'transformer'} ({human_size(info['bytes'])}, {', '.join(info['dtypes'])})")
        return report

    with atomic_output_dir(out, overwrite) as work:
        folder = work / "transformer"
        layout = write_component(cp, folder, max_shard_size)
        verify_written(cp, folder, layout)
        files = sorted(p.name for p in folder.iterdir())
    elapsed = time.perf_counter() - started
    info["output"] = str((out / "transformer").resolve())
    info["files"] = files
    report["output"] = str(out.resolve())
    report["seconds"] = round(elapsed, 3)
    say(f"wrote:    {len(layout.files)} weight file(s), {human_size(info['bytes'])}, "
        f"{', '.join(info['dtypes'])}, in {elapsed:.1f} s")
    say(f"result:   {out.resolve() / 'transformer'}")
    return report


if __name__ == "__main__":
    main()
