#!/usr/bin/env python
"""The compute floor of GGUF quantization on this machine: ggml's own ggml_quantize_chunk (the
libggml-python build that `--to gguf` calls) on one 1 GiB float32 tensor of a real Wan 14B shape
(5120 x 52428 rows ~ 1 GiB), with the threads `--to gguf` uses, for each type; and gguf-py's numpy
gguf.quants.quantize for the legacy types it has. Prints GB/s of float32 input (a benchmark, not a test).

Usage: .venv/bin/python scripts/bench_ggml_floor.py [--mib 1024] [--types Q8_0 Q4_0 Q6_K Q4_K Q2_K] [--json]
"""

from __future__ import annotations

import argparse
import json
import time

import gguf
import numpy as np

from wan2diffusers.quantization import ggml_lib


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--types", nargs="+", default=["Q8_0", "Q4_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K"])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    cols = 5120
    rows = args.mib * (1 << 20) // (4 * cols)
    values = np.random.default_rng(0).standard_normal((rows, cols), dtype=np.float32) * 0.02
    out = []
    for name in args.types:
        qt = gguf.GGMLQuantizationType[name]
        block, size = gguf.GGML_QUANT_SIZES[qt]
        t = time.perf_counter()
        ggml_lib.quantize(values, int(qt), block, size)
        ggml_s = time.perf_counter() - t
        row = {"type": name, "threads": ggml_lib.THREADS, "ggml_s": round(ggml_s, 2),
               "ggml_gb_s": round(values.nbytes / ggml_s / 1e9, 3)}
        try:
            t = time.perf_counter()
            gguf.quants.quantize(values, qt)
            row["gguf_py_gb_s"] = round(values.nbytes / (time.perf_counter() - t) / 1e9, 3)
        except NotImplementedError:
            row["gguf_py_gb_s"] = None  # gguf-py has no quantizer for this type
        out.append(row)
        if not args.json:
            print(f"{name:5s} ggml {row['ggml_gb_s']:.3f} GB/s ({ggml_lib.THREADS} threads)   gguf-py "
                  + (f"{row['gguf_py_gb_s']:.3f} GB/s" if row["gguf_py_gb_s"] else "-"), flush=True)
    if args.json:
        print(json.dumps({"mib": args.mib, "rows": out}, indent=2))


if __name__ == "__main__":
    main()
