"""`convert LORA.safetensors OUT.safetensors --to diffusers|original|kohya|comfyui`: a Wan LoRA file
in another format (converter/lora.py): read the header, place every key on a module and a role,
plan the keys of the target format (refusing what it cannot hold, or with --drop-unsupported leaving
it out and listing it), write one file atomically, read its header back against the plan."""

from __future__ import annotations

import time
from pathlib import Path

from ..errors import ConversionError
from ..sizes import human_size
from .common import silent


def run_convert_lora(src: Path, out: Path, to: str, overwrite: bool, dry_run: bool, drop: bool = False,
                     say=silent) -> dict:
    from ..lora import plan_lora, produce, read_lora
    from ..read.safetensors_file import read_header
    from ..write.atomic import atomic_output_file, check_output
    from ..write.safetensors_writer import write_safetensors

    src, out = Path(src), Path(out)
    started = time.perf_counter()
    check_output(src, out, overwrite or dry_run, "file")
    if out.suffix != ".safetensors":
        raise ConversionError(f"OUT {out}: a LoRA is written as one .safetensors file; name it *.safetensors")
    lora = read_lora(src)
    info = lora.describe()
    entries, left_out = plan_lora(lora, to, drop)
    say(f"LoRA: {src} ({info['format']} format, {info['modules']} modules, rank {'/'.join(map(str, info['ranks'])) or '-'}"
        f", blocks {_ranges(info['blocks'])}; for {info['fits']})")
    say(f"  -> {to}: {len(entries)} tensors" + (f"; left out (--drop-unsupported): {', '.join(left_out)}"
                                                 if left_out else "; every key carried"))
    report = {"ok": True, "dry_run": dry_run, "lora": info, "to": to, "tensors": len(entries),
              "left_out": left_out, "bytes": sum(e.nbytes for e in entries)}
    if dry_run:
        say(f"dry run: would write {out} ({human_size(report['bytes'])}); nothing written")
        return report
    meta = {"format": "pt"}
    with atomic_output_file(out, overwrite) as work:
        write_safetensors(work, [(e.key, e.dtype, e.shape, e.nbytes) for e in entries],
                          lambda i: produce(entries[i]), meta)
        seen = {k: (r.dtype, tuple(r.shape)) for k, r in read_header(work).tensors.items()}
        if seen != {e.key: (e.dtype, tuple(e.shape)) for e in entries}:
            raise ConversionError(f"{out}: the written header differs from the plan")
    report["output"] = str(out.resolve())
    report["seconds"] = round(time.perf_counter() - started, 3)
    say(f"result: {out.resolve()}")
    return report


def inspect_lora(path: Path) -> dict:
    """`inspect` of a LoRA file: its format, ranks, alphas, roles, blocks and modules, the models it
    fits, and into which formats it converts whole (the others name what they cannot hold)."""
    from ..lora import load_lora_spec, plan_lora, read_lora

    lora = read_lora(path)
    info = lora.describe()
    converts: dict[str, str] = {}
    for to in load_lora_spec().formats:
        try:
            plan_lora(lora, to)
            converts[to] = "whole"
        except ConversionError as e:
            converts[to] = str(e).split(": ", 1)[1].split(";")[0]
    return {"ok": True, "path": str(path), "kind": "LoRA file", "healthy": True, **info, "blocks_text": _ranges(info["blocks"]),
            "converts": converts}


def _ranges(blocks: list[int]) -> str:
    if not blocks:
        return "none"
    out, start = [], blocks[0]
    for a, b in zip(blocks, blocks[1:] + [None]):
        if b != a + 1:
            out.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ",".join(out)
