"""`convert SRC OUT.gguf --to gguf --quantize TYPE`: the transformer of SRC as one GGUF file in its
original key names (converter/gguf_out.py), checked, written atomically."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from ..errors import ConversionError
from .common import human_size, silent


def run_gguf(src: Path, out: Path, qtype: str | None, overwrite: bool, dry_run: bool, overrides: dict,
             say=silent, progress: bool = True) -> dict:
    from ..gguf_out import plan_gguf, write_gguf
    from ..write.atomic import check_output
    from .convert import plan_components

    src, out = Path(src), Path(out)
    if out.suffix != ".gguf":
        raise ConversionError(f"{out}: --to gguf writes one file: give OUT a .gguf name")
    if qtype is None:
        raise ConversionError("--to gguf needs --quantize TYPE (Q8_0, Q5_1, Q5_0, Q4_1, Q4_0, BF16, F16, F32)")
    check_output(src, out, overwrite or dry_run, kind="file")
    started = time.perf_counter()
    plans = plan_components(src, ["transformer"], "keep", overrides, None, False, say)
    if len(plans) != 1:
        raise ConversionError(f"{src}: holds {len(plans)} transformers (Wan 2.2 A14B experts): convert each expert "
                              f"folder to its own .gguf ({', '.join(str(cp.source.path) for cp in plans)})")
    (cp,) = plans  # its coverage is proven: a complete, known transformer (its keys are written as they are)
    tensors = plan_gguf(cp, qtype)
    types = dict(Counter(t.qtype for t in tensors))
    total = sum(t.nbytes for t in tensors)
    say(f"gguf: {len(tensors)} tensors in the original key names, {human_size(total)}: "
        + ", ".join(f"{k} x{v}" for k, v in sorted(types.items())))
    report = {"ok": True, "dry_run": dry_run, "to": "gguf", "source": str(src), "variant": cp.plan.detection.variant,
              "type": qtype, "tensors": len(tensors), "types": types, "bytes": total}
    if dry_run:
        say(f"dry run: would write {out}; nothing written")
        return report
    write_gguf(tensors, out, qtype, progress)
    report["output"] = str(out.resolve())
    report["seconds"] = round(time.perf_counter() - started, 3)
    say(f"wrote {out} ({human_size(out.stat().st_size)}) in {report['seconds']:.1f} s")
    say(f"result: {out.resolve()}")
    return report
