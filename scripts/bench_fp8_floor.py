#!/usr/bin/env python
"""The compute floor of the fp8 paths on this machine (a benchmark, not a test), on one tensor of
--mib MiB of input, in the chunks the conversion uses:

  read    fp8 (x scale) -> bf16 / fp32 through read/safetensors_file.fp8_lookup (what `convert
          FP8FILE --dtype bf16` runs per chunk), and torch's own cast for comparison
  write   float32 -> fp8_scaled as quantization/fp8_scaled.py does it (amax pass, then
          (w * (1 / scale)).to(fp8), 16 MB slices)

Prints GB/s of input and G values/s.

Usage: .venv/bin/python scripts/bench_fp8_floor.py [--mib 1024] [--json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from wan2diffusers.read.safetensors_file import CAST_CHUNK, fp8_lookup


def timed(fn) -> float:
    fn()  # warm: buffers allocated, pages touched
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    n = args.mib << 20
    torch.manual_seed(0)
    q = (torch.randn(n // 4).repeat(4) * 100).to(torch.float8_e4m3fn)  # n fp8 values
    scale = 0.0123
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        out = torch.empty(CAST_CHUNK, dtype=dtype)

        def lookup():
            for a in range(0, n, CAST_CHUNK):
                part = q[a:a + CAST_CHUNK]
                fp8_lookup(part, scale, dtype, out[:part.numel()])

        def cast():
            s = torch.tensor(scale, dtype=torch.float32)
            for a in range(0, n, CAST_CHUNK):
                part = q[a:a + CAST_CHUNK]
                out[:part.numel()].copy_(part.to(torch.float32) * s)

        for name, fn in (("fp8_lookup", lookup), ("torch cast", cast)):
            s = timed(fn)
            rows.append({"path": f"read {name} -> {str(dtype).removeprefix('torch.')}", "seconds": round(s, 3),
                         "input_gb_s": round(n / s / 1e9, 3), "gvalues_s": round(n / s / 1e9, 3)})
    w = torch.randn(n // 4 // 5120 * 5120).reshape(-1, 5120) * 0.02  # float32, n bytes
    per = 4 * 1024 * 1024 // 5120

    def quantize():
        amax = torch.zeros(())
        for a in range(0, w.shape[0], per):
            amax = torch.maximum(amax, w[a:a + per].abs().amax())
        inverse = 1.0 / (amax / 448)
        q8 = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
        for a in range(0, w.shape[0], per):
            q8[a:a + per] = (w[a:a + per] * inverse).to(torch.float8_e4m3fn)

    s = timed(quantize)
    rows.append({"path": "write float32 -> fp8_scaled", "seconds": round(s, 3), "input_gb_s": round(w.numel() * 4 / s / 1e9, 3),
                 "gvalues_s": round(w.numel() / s / 1e9, 3)})
    if args.json:
        print(json.dumps({"mib": args.mib, "threads": torch.get_num_threads(), "rows": rows}, indent=2))
        return
    print(f"{args.mib} MiB of input, {torch.get_num_threads()} torch threads")
    for r in rows:
        print(f"{r['path']:34s} {r['seconds']:7.3f} s  {r['input_gb_s']:6.3f} GB/s of input  {r['gvalues_s']:6.3f} G values/s")


if __name__ == "__main__":
    main()
