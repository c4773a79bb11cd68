#!/usr/bin/env python
"""The compute floor of the float paths on this machine (a benchmark, not a test): what the cast and
the torchao quantizer alone cost on one float32 tensor of --mib MiB (a real Wan 14B width, 5120),
with torch's intra-op threads as the conversion runs them, in the pieces the conversion uses:

  cast bf16 / fp16   read/safetensors_file iter_cast's step: `out.copy_(src)` into a reused buffer,
                     CAST_CHUNK bytes of input at a time, then check_overflow (the refusal of a cast
                     that would turn finite values into Inf), and without that check
  torchao int8/float8  quantization/ao.py TorchaoBackend.quantize (torchao's own Int8Tensor /
                     Float8Tensor.from_hp, PerRow, SLICE_ELEMENTS values at a time; float8 from bf16)

No file is read or written: the whole-process GB/s of `scripts/bench_speed.py` divided by these is
how close a path runs to this machine's limit, whatever the disk did.  Prints GB/s of float32 input.

Usage: .venv/bin/python scripts/bench_cast_floor.py [--mib 1024] [--repeat 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from wan2diffusers.read.safetensors_file import CAST_CHUNK, check_overflow


def timed(fn, repeat: int) -> float:
    fn()  # warm: buffers, kernels, imports
    runs = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t)
    return statistics.median(runs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    cols = 5120
    rows_n = (args.mib << 20) // (4 * cols)
    torch.manual_seed(0)
    w = torch.randn(rows_n, cols) * 0.02
    flat = w.reshape(-1)
    nbytes = flat.numel() * 4
    step = CAST_CHUNK // 4
    rows = []

    def cast(dtype, check: bool):
        out = torch.empty(step, dtype=dtype)

        def run():
            for a in range(0, flat.numel(), step):
                src = flat[a:a + step]
                o = out[:src.numel()]
                o.copy_(src)
                if check:
                    check_overflow(src, o, "floor")
        return run

    for dtype in (torch.bfloat16, torch.float16):
        for check in (True, False):
            s = timed(cast(dtype, check), args.repeat)
            rows.append({"kernel": f"cast fp32 -> {str(dtype).removeprefix('torch.')}"
                         + ("" if check else " (no overflow check)"), "seconds": round(s, 3),
                         "input_gb_s": round(nbytes / s / 1e9, 2)})
    from wan2diffusers.quantization.ao import TorchaoBackend

    backend = TorchaoBackend()
    for weights in ("int8", "float8"):
        s = timed(lambda: backend.quantize(weights, w), args.repeat)
        rows.append({"kernel": f"torchao {weights} (PerRow, {weights == 'float8' and 'from bf16' or 'from fp32'})",
                     "seconds": round(s, 3), "input_gb_s": round(nbytes / s / 1e9, 2)})
    result = {"mib": args.mib, "threads": torch.get_num_threads(), "rows": rows}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{args.mib} MiB of float32 input, {torch.get_num_threads()} torch threads, median of {args.repeat}")
    for r in rows:
        print(f"{r['kernel']:45s} {r['seconds']:7.3f} s  {r['input_gb_s']:6.2f} GB/s")


if __name__ == "__main__":
    main()
