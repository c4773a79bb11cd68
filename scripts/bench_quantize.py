#!/usr/bin/env python
"""Benchmark the quantized variants on a synthetic Wan 2.1 T2V-14B checkpoint (a benchmark, not a test).

For each layer count L given with --layers (default: 1 and 2):

1. Writes the synthetic ORIGINAL-layout checkpoint of scripts/bench_convert.py (real 14B shapes:
   dim 5120, ffn_dim 13824, 40 heads, text_dim 4096; float32; only L blocks; ~0.93 GB of
   embeddings and head plus ~1.4 GB per block), with that script's own helpers.
2. Runs, each under `/usr/bin/time -v` (wall time and peak RSS of the process):
   - ours, from the original layout: `wan2diffusers convert SRC OUT --quantize W --only transformer`;
   - the float Diffusers folder, made once by `wan2diffusers convert SRC FLOAT` (untimed setup);
   - ours, from that folder: `wan2diffusers quantize FLOAT/transformer OUT2 --weights W`;
   - diffusers' path: `WanTransformer3DModel.from_pretrained(FLOAT/transformer,
     quantization_config=QuantoConfig(weights_dtype=W, modules_to_not_convert=<our policy>))`
     then `save_pretrained`.  With our policy's list so that the outputs can be compared tensor
     for tensor (--diffusers-default: the bare `QuantoConfig(W)`, which quantizes the policy's
     modules too; it needs the same memory).
3. Compares the outputs: the same keys, dtypes and shapes, and every tensor byte-identical (read
   one at a time), ours from both commands against diffusers'.

Targets: ours peak RSS < 1 GB (10^9 bytes) at every layer count, and about the same at every
layer count, while diffusers' path grows with the model.  The page cache is not controlled (the
source is usually warm from being written), and other work on the machine makes wall times
noisy: compare RSS first, wall times only roughly.  RSS is in MiB, sizes in decimal GB.

Usage (from the repository root):
    .venv/bin/python scripts/bench_quantize.py [--layers 1 2] [--weights int8] [--workdir DIR]
        [--keep] [--json] [--diffusers-default] [--skip-diffusers]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import bench_convert as bc  # noqa: E402  (the synthetic checkpoint and the /usr/bin/time parsing)

CLI = Path(sys.executable).parent / "wan2diffusers"
GB = 10**9
RSS_TARGET = 1 * GB

DIFFUSERS_METHOD = r'''
import json, sys, warnings
warnings.simplefilter("ignore", FutureWarning)
from diffusers import QuantoConfig, WanTransformer3DModel
src, out, weights, keep = sys.argv[1:5]
keep = json.loads(keep)
config = QuantoConfig(weights_dtype=weights, modules_to_not_convert=keep)
model = WanTransformer3DModel.from_pretrained(src, quantization_config=config)
model.save_pretrained(out)
'''


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def timed(label: str, argv: list[str], logs: Path) -> dict:
    tfile, ofile = logs / f"{label}.time", logs / f"{label}.log"
    log(f"  running {label}")
    with open(ofile, "wb") as out:
        rc = subprocess.run([bc.TIME, "-v", "-o", str(tfile), *argv], stdout=out, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"{label} failed (exit {rc}); log {ofile}:\n{ofile.read_text(errors='replace')[-3000:]}")
    r = bc.parse_time_v(tfile.read_text())
    r["rss_mib"] = round(r["rss_kib"] / 1024, 1)
    log(f"    wall {r['wall_s']:.2f} s, peak RSS {r['rss_mib']:.0f} MiB, user {r['user_s']:.1f} s, sys {r['sys_s']:.1f} s")
    return r


def compare(a: Path, b: Path) -> str:
    """Every tensor of the two folders, one at a time: keys, dtypes, shapes, bytes."""
    return bc.compare_outputs(a, b, keys=None)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--weights", choices=["int8", "float8", "int4"], default="int8")
    ap.add_argument("--diffusers-default", action="store_true",
                    help="diffusers' path with the bare QuantoConfig(W) (outputs then differ by the policy's modules)")
    ap.add_argument("--skip-diffusers", action="store_true", help="do not run diffusers' path")
    ap.add_argument("--workdir", type=Path, default=None, help="parent folder for the work folder (default $TMPDIR)")
    ap.add_argument("--keep", action="store_true", help="keep everything written")
    ap.add_argument("--json", action="store_true", help="print machine-readable results on stdout")
    args = ap.parse_args()
    if not CLI.exists():
        raise SystemExit(f"{CLI} not found: run with the project's virtualenv python")
    from wan2diffusers.quantization.policy import load_policy

    keep = [] if args.diffusers_default else list(load_policy().components["transformer"].modules_to_not_convert)
    parent = args.workdir or Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    sizes = {L: bc.checkpoint_bytes(L) for L in args.layers}
    pool_bytes = max(n for L in args.layers for _, _, n in bc.synthetic_keys(L)) + (1 << 20)
    need = pool_bytes + max(sizes.values()) * 2.8  # source + float folder + three quantized outputs
    free = shutil.disk_usage(parent).free
    log("checkpoints: " + ", ".join(f"{L} layer(s) = {bc.human(sizes[L])}" for L in args.layers)
        + f"; disk needed {need / GB:.1f} GB under {parent} ({free / GB:.1f} GB free)")
    if need + GB > free:
        raise SystemExit("not enough free disk")
    work = Path(tempfile.mkdtemp(prefix="wan2diffusers-bench-quantize-", dir=parent))
    logs = work / "logs"
    logs.mkdir()
    results = {"weights": args.weights, "diffusers_modules_to_not_convert": keep or None, "runs": []}
    try:
        pool = work / "random-pool.f32"
        bc.make_pool(pool, pool_bytes)
        for L in args.layers:
            src, flt = work / f"src-{L}L", work / f"float-{L}L"
            ours, ours2, theirs = work / f"ours-{L}L", work / f"ours-quantize-{L}L", work / f"diffusers-{L}L"
            log(f"\n== {L} layer(s): writing {src} ({bc.human(sizes[L])})")
            bc.write_checkpoint(src, L, min(10 * GB, math.ceil(sizes[L] / 2)), pool)
            run = {"layers": L, "source_bytes": sizes[L]}
            run["convert_quantize"] = timed(f"convert-quantize-{L}L", [str(CLI), "convert", str(src), str(ours),
                                            "--quantize", args.weights, "--only", "transformer"], logs)
            log("  making the float Diffusers folder (setup, untimed)")
            subprocess.run([str(CLI), "convert", str(src), str(flt), "--only", "transformer"], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            shutil.rmtree(src)
            run["quantize"] = timed(f"quantize-{L}L", [str(CLI), "quantize", str(flt / "transformer"), str(ours2),
                                    "--weights", args.weights], logs)
            run["output_bytes"] = folder_bytes(ours / "transformer")
            run["ours_outputs_match"] = compare(ours / "transformer", ours2)
            if not args.skip_diffusers:
                run["diffusers"] = timed(f"diffusers-{L}L", [sys.executable, "-c", DIFFUSERS_METHOD,
                                         str(flt / "transformer"), str(theirs), args.weights, json.dumps(keep)], logs)
                run["diffusers_output_bytes"] = folder_bytes(theirs)
                run["vs_diffusers"] = compare(ours / "transformer", theirs) if keep else "not compared (default policy)"
                log(f"  ours vs diffusers: {run['vs_diffusers']}")
            if not args.keep:
                for p in (flt, ours, ours2, theirs):
                    shutil.rmtree(p, ignore_errors=True)
            results["runs"].append(run)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"kept: {work}")
    rss = [max(r["convert_quantize"]["rss_kib"], r["quantize"]["rss_kib"]) * 1024 for r in results["runs"]]
    results["ours_rss_max_bytes"] = max(rss)
    results["rss_target_ok"] = max(rss) < RSS_TARGET
    if args.json:
        print(json.dumps(results, indent=2))
        return
    mib = lambda kib: f"{kib / 1024:.0f} MiB"
    print(f"\nquantized ({args.weights}) variants of a synthetic T2V-14B (float32), ours vs diffusers' path "
          f"(wall times are noisy: shared 2-core machine, page cache not controlled)")
    hdr = (f"{'layers':>6} {'source':>9} {'output':>9} {'convert --quantize':>22} {'quantize':>20} "
           f"{'diffusers from_pretrained+save':>32}")
    print(hdr)
    print("-" * len(hdr))
    for r in results["runs"]:
        c, q, d = r["convert_quantize"], r["quantize"], r.get("diffusers")
        print(f"{r['layers']:>6} {bc.human(r['source_bytes']):>9} {bc.human(r['output_bytes']):>9} "
              f"{c['wall_s']:>7.1f} s {mib(c['rss_kib']):>10} {q['wall_s']:>6.1f} s {mib(q['rss_kib']):>10} "
              + (f"{d['wall_s']:>12.1f} s {mib(d['rss_kib']):>14}" if d else f"{'-':>32}"))
    print()
    for r in results["runs"]:
        print(f"{r['layers']} layer(s): convert --quantize vs quantize outputs: {r['ours_outputs_match']}"
              + (f"; vs diffusers: {r['vs_diffusers']}" if "vs_diffusers" in r else ""))
    for r, b in zip(results["runs"], rss):
        print(f"target ours peak RSS < 1 GB at {r['layers']} layer(s): {'OK' if b < RSS_TARGET else 'MISSED'} "
              f"({b / GB:.2f} GB)")


if __name__ == "__main__":
    main()
