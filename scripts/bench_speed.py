#!/usr/bin/env python
"""How close to disk speed each write path is: wall time of `wan2diffusers convert` against `cp -r`
of the same files, in one run (a benchmark, not a test).

The issue-13 benchmark: a synthetic ORIGINAL-layout Wan 2.1 T2V-14B checkpoint with the real
shapes and --layers blocks (default 4: 6.1 GB float32; written by scripts/bench_convert.py's
generator), the source in the page cache (read once before every run), each run timed from start
to the end of a `sync` after it (what it wrote is on disk), the runs alternating with `cp -r` round
by round, --repeat rounds (default 3), medians reported.  Paths (default all five):

    copy    convert (dtype keep: a byte copy with the keys renamed)
    bf16    convert --dtype bf16
    int8    convert --quantize int8   (the default backend, torchao)
    quanto8 convert --quantize int8 --backend quanto
    Q8_0    convert --to gguf --quantize Q8_0   (Q4_0, and the K-quants Q6_K, Q4_K_M, Q2_K likewise)
    verify    verify DIFFUSERS --source SRC (the folder convert made, untimed; every tensor compared)
    original  convert DIFFUSERS --to original (the transformer folder convert made, untimed, back)
    comfyui   convert DIFFUSERS --to comfyui
    fp8_out   convert DIFFUSERS --to comfyui --quantize fp8_scaled
    fp8_in    convert FP8_SCALED_FILE --dtype bf16 (the file fp8_out writes, made once, untimed)
    merge     merge SRC OUT --lora LORA (a rank-64 bf16 LoRA on every Linear of every block, made once)
    pth_in    convert T5.pth OUT --only text_encoder (a synthetic umT5-XXL encoder in bf16: the real widths
              and vocabulary, --layers blocks; written by torch.save, made once)
    pth_back  convert DIFFUSERS --to original (that encoder converted once, untimed): the .pth writer

For each: median wall (s), median of the matching cp runs, the ratio (and the median of each round's
own ratio, "paired"), peak RSS (/usr/bin/time -v,
mapped pages count), user+sys CPU seconds, and GB/s of float input for the whole process (compare
with the kernel alone: scripts/bench_cast_floor.py, bench_ggml_floor.py, bench_fp8_floor.py).
Targets: TARGETS (issue 23 for the casts, torchao, legacy GGUF, the way back and verify).  Every
output is removed (and synced) before the next run, and every timed command, cp's included, starts
--settle seconds (default 1) after that: on a VM that hands freed pages back to its host (virtio
free page reporting) a new page costs more the longer ago the last output was freed (cp of 2.5 GB into
tmpfs, medians of 6: 1.35 s at once, 3.6 s after 0.3 s, 2.7 s after 1 or 3 s), which favoured cp's
1 ms start over our 0.2 s one; --settle 0 measures as before.  Our modules' bytecode is written
first, as pip writes it on install (compile_bytecode).  The layout of the transformer class (and, for
--quantize, what the quantizing loader expects) is cached
before the first timed run (a repeat conversion of a family, as scripts/bench_convert.py documents).

`--before CHECKOUT` (a checkout of an earlier commit, e.g. `git worktree add /tmp/before REV`)
runs that commit's converter/ too, in the same rounds (cp, this checkout, that one), and reports its
median, peak RSS and the ratio between the two: a before/after of a change that the disk's
drift between two separate runs cannot blur.

Usage (repository root):
    .venv/bin/python scripts/bench_speed.py [--layers 4] [--repeat 3] [--paths copy bf16 int8 Q8_0]
        [--workdir DIR] [--before CHECKOUT] [--keep] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_convert import (CLI, TIME, checkpoint_bytes, human, log, make_pool,  # noqa: E402
                           parse_time_v, write_checkpoint)

PATHS = {
    "copy": [],
    "bf16": ["--dtype", "bf16"],
    "fp16": ["--dtype", "fp16"],
    "int8": ["--quantize", "int8"],
    "float8": ["--quantize", "float8"],
    "quanto8": ["--quantize", "int8", "--backend", "quanto"],
    "Q8_0": ["--to", "gguf", "--quantize", "Q8_0"],
    "Q4_0": ["--to", "gguf", "--quantize", "Q4_0"],
    "Q4_1": ["--to", "gguf", "--quantize", "Q4_1"],
    "Q5_0": ["--to", "gguf", "--quantize", "Q5_0"],
    "Q5_1": ["--to", "gguf", "--quantize", "Q5_1"],
    "Q6_K": ["--to", "gguf", "--quantize", "Q6_K"],
    "Q4_K_M": ["--to", "gguf", "--quantize", "Q4_K_M"],
    "Q2_K": ["--to", "gguf", "--quantize", "Q2_K"],
    "verify": ["--source"],  # verify DIFFUSERS --source SRC: every tensor compared (its cp copies SRC)
    "original": ["--to", "original"],  # the way back: from the Diffusers folder convert made (untimed)
    "comfyui": ["--to", "comfyui"],
    "fp8_out": ["--to", "comfyui", "--quantize", "fp8_scaled"],  # ComfyUI's fp8_scaled file from the Diffusers folder
    "fp8_in": ["--dtype", "bf16"],  # that fp8_scaled file (made once, untimed) -> Diffusers bf16
    "merge": ["--lora"],  # merge SRC OUT --lora LORA: a rank-64 bf16 LoRA on every block Linear (made once)
    "pth_in": ["--only", "text_encoder"],  # a synthetic umT5-XXL .pth (real widths, --layers blocks) -> Diffusers
    "pth_back": ["--to", "original"],  # that Diffusers text_encoder (made once, untimed) -> the .pth again
}
BACKWARDS = ("original", "comfyui", "fp8_out")  # these read the Diffusers folder; their cp copies that folder
FP8_SOURCE = ("fp8_in",)  # reads the fp8_scaled file fp8_out writes; its cp copies that file
# issue 23's targets (against cp -r into the same tmpfs); K-quants, fp8 and merge: their issues' own
TARGETS = {"pth_back": 1.2, "merge": 1.5, "fp8_out": 1.5, "fp8_in": 1.5, "verify": 1.5, "bf16": 1.1, "fp16": 1.1, "int8": 1.3,
           "float8": 1.3, "Q8_0": 1.5, "Q4_0": 1.5, "Q4_1": 1.5, "Q5_0": 1.5, "Q5_1": 1.5, "original": 1.2,
           "Q6_K": 3.0, "Q4_K_M": 3.0, "Q2_K": 3.0}


def write_lora(path: Path, layers: int, rank: int = 64) -> None:
    """A LoRA like lightx2v's (original names, bf16, alpha = rank) on every Linear of every block of
    the synthetic T2V-14B."""
    import torch
    from safetensors.torch import save_file

    dims = {"self_attn.q": (5120, 5120), "self_attn.k": (5120, 5120), "self_attn.v": (5120, 5120),
            "self_attn.o": (5120, 5120), "cross_attn.q": (5120, 5120), "cross_attn.k": (5120, 5120),
            "cross_attn.v": (5120, 5120), "cross_attn.o": (5120, 5120), "ffn.0": (13824, 5120), "ffn.2": (5120, 13824)}
    sd = {}
    for n in range(layers):
        for m, (out_f, in_f) in dims.items():
            name = f"diffusion_model.blocks.{n}.{m}"
            sd[f"{name}.lora_down.weight"] = (torch.randn(rank, in_f) * 0.01).bfloat16()
            sd[f"{name}.lora_up.weight"] = (torch.randn(out_f, rank) * 0.01).bfloat16()
            sd[f"{name}.alpha"] = torch.tensor(float(rank))
    save_file(sd, str(path))


def write_t5_pth(path: Path, layers: int, pool: Path) -> int:
    """The official umT5-XXL encoder's state dict (models_t5_umt5-xxl-enc-bf16.pth: dim 4096, ffn 10240,
    64 heads, 32 buckets, vocabulary 256384) with `layers` blocks, bf16 values taken from the pool,
    written by torch.save as the Wan repos ship it. Returns its bytes."""
    import numpy as np
    import torch

    dim, ffn, buckets, heads, vocab = 4096, 10240, 32, 64, 256384
    shapes = {"token_embedding.weight": (vocab, dim)}
    for i in range(layers):
        b = f"blocks.{i}."
        shapes.update({b + "norm1.weight": (dim,), **{b + f"attn.{x}.weight": (dim, dim) for x in "qkvo"},
                       b + "norm2.weight": (dim,), b + "ffn.gate.0.weight": (ffn, dim), b + "ffn.fc1.weight": (ffn, dim),
                       b + "ffn.fc2.weight": (dim, ffn), b + "pos_embedding.embedding.weight": (buckets, heads)})
    shapes["norm.weight"] = (dim,)
    values = np.memmap(pool, dtype=np.float32, mode="r")
    sd, at = {}, 0
    for key, shape in shapes.items():
        n = int(np.prod(shape))
        start = at % max(1, len(values) - n)
        part = np.resize(values[start:start + n], n)  # repeated when larger than the pool (the embedding)
        sd[key] = torch.from_numpy(part).to(torch.bfloat16).reshape(shape)
        at += 1_048_573
    torch.save(sd, path)
    return sum(t.numel() * 2 for t in sd.values())


def compile_bytecode(checkout: Path | None) -> None:
    """Our modules' bytecode written once, as `pip install` writes it for a wheel: an editable install
    under PYTHONDONTWRITEBYTECODE=1 (this machine's environment) compiled every module of ours on every
    start (0.1 s of each run; none of cp's).  `checkout` None: the package the CLI imports."""
    py = CLI.parent / "python"
    if checkout is None:
        where = "import os, wan2diffusers, wan2diffusers.mappings as m; print(os.path.dirname(wan2diffusers.__file__)); print(os.path.dirname(m.__file__))"
        folders = subprocess.run([str(py), "-c", where], check=True, capture_output=True, text=True).stdout.split()
    else:
        folders = [str(checkout / d) for d in ("converter", "mappings") if (checkout / d).is_dir()]
    subprocess.run([str(py), "-m", "compileall", "-q", *folders], check=True, stdout=subprocess.DEVNULL)


def read_through(folder: Path) -> None:
    """The source (a folder, or one file) into the page cache."""
    for f in [folder] if folder.is_file() else sorted(p for p in folder.rglob("*") if p.is_file()):
        with open(f, "rb", buffering=0) as fh:
            while fh.read(64 << 20):
                pass


def timed(argv: list[str], logs: Path, label: str, settle: float, env: dict | None = None) -> dict:
    subprocess.run(["sync"], check=True)
    time.sleep(settle)  # every command, cp's included, starts as long after the last output was freed
    tfile, ofile = logs / f"{label}.time", logs / f"{label}.log"
    t0 = time.perf_counter()
    with open(ofile, "wb") as out:
        rc = subprocess.run([TIME, "-v", "-o", str(tfile), *argv], stdout=out, stderr=subprocess.STDOUT,
                            env=env).returncode
    subprocess.run(["sync"], check=True)
    wall = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"{label} failed (exit {rc}); log {ofile}:\n{ofile.read_text(errors='replace')[-3000:]}")
    r = parse_time_v(tfile.read_text())
    return {"wall_s": round(wall, 2), "rss_mib": round(r["rss_kib"] / 1024), "cpu_s": round(r["user_s"] + r["sys_s"], 1)}


def remove(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p)
    elif p.exists():
        p.unlink()
    subprocess.run(["sync"], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--before", type=Path, default=None, help="a checkout of an earlier commit, run in the same rounds")
    ap.add_argument("--settle", type=float, default=1.0,
                    help="seconds between the previous output's removal and every timed command (cp's too)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    kinds = ("cp", "ours") + (("before",) if args.before else ())

    need = checkpoint_bytes(args.layers)
    work = Path(tempfile.mkdtemp(prefix="bench-speed-", dir=args.workdir))
    logs = work / "logs"
    logs.mkdir()
    free = shutil.disk_usage(work).free
    log(f"source {human(need)}; needs about {human(2.2 * need)} free under {work} ({human(free)} free)")
    if free < 2.2 * need:
        raise SystemExit("not enough free disk")
    compile_bytecode(None)  # as pip leaves an install: a start does not compile our modules (see compile_bytecode)
    before_env = None
    if args.before:  # its converter/ imported as wan2diffusers ahead of the installed one
        compile_bytecode(args.before)
        shim = work / "before-shim"
        shim.mkdir()
        (shim / "wan2diffusers").symlink_to((args.before / "converter").resolve())
        before_env = {**os.environ, "PYTHONPATH": str(shim)}
    try:
        src = work / "src"
        pool = work / "pool.bin"
        make_pool(pool, 1 << 30)
        made = write_checkpoint(src, args.layers, 5 * 10**9, pool)
        t5_pth = work / "t5" / "models_t5_umt5-xxl-enc-bf16.pth"
        if any(p.startswith("pth_") for p in args.paths):
            t5_pth.parent.mkdir()
            made["t5_bytes"] = write_t5_pth(t5_pth, args.layers, pool)
            subprocess.run([str(CLI), "convert", str(t5_pth), str(work / "t5d"), *PATHS["pth_in"]],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for env in [None] + ([before_env] if before_env else []):  # the way back's layout cached too
                subprocess.run([str(CLI), "convert", str(work / "t5d"), str(work / "dry-t5"), "--to", "original",
                                "--dry-run"], check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        pool.unlink()
        log(f"wrote {made['files']} shards, {made['tensors']} tensors, {human(made['bytes'])}")
        # the transformer class's layout cached (a repeat conversion of the family)
        subprocess.run([str(CLI), "convert", str(src), str(work / "dry"), "--only", "transformer", "--dry-run"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for path in args.paths:  # and what a quantizing loader expects (a repeat quantization of the family)
            if "--quantize" in PATHS[path] and "--to" not in PATHS[path]:
                for env in [None] + ([before_env] if before_env else []):
                    subprocess.run([str(CLI), "convert", str(src), str(work / "dry"), "--only", "transformer",
                                    *PATHS[path], "--dry-run"], check=True, env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        diffusers = work / "diffusers"
        if any(p in BACKWARDS or p in FP8_SOURCE or p == "verify" for p in args.paths):
            subprocess.run([str(CLI), "convert", str(src), str(diffusers), "--only", "transformer"],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            subprocess.run([str(CLI), "convert", str(diffusers / "transformer"), str(work / "dry-back"), "--to",
                            "original", "--dry-run"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        fp8_file = None
        if any(p in FP8_SOURCE for p in args.paths):
            subprocess.run([str(CLI), "convert", str(diffusers / "transformer"), str(work / "fp8"), *PATHS["fp8_out"]],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            (fp8_file,) = (work / "fp8" / "diffusion_models").glob("*.safetensors")

        lora_file = work / "lora.safetensors"
        if "merge" in args.paths:
            write_lora(lora_file, args.layers)
        runs: dict[str, list[dict]] = {p: [] for p in args.paths}
        cps: dict[str, list[dict]] = {p: [] for p in args.paths}
        befores: dict[str, list[dict]] = {p: [] for p in args.paths}
        for rnd in range(1, args.repeat + 1):
            for path in args.paths:
                out = work / ("out.gguf" if "gguf" in PATHS[path] else "out")
                source = diffusers / "transformer" if path in BACKWARDS else fp8_file if path in FP8_SOURCE else src
                if path.startswith("pth_"):  # the .pth and the Diffusers folder made of it (the cp copies it)
                    source = t5_pth if path == "pth_in" else work / "t5d"
                for kind in kinds:  # alternating: cp, then the path (then the earlier commit's), every round
                    read_through(source)
                    env = before_env if kind == "before" else None
                    into = befores if kind == "before" else runs
                    label = f"{rnd}-{path}" + ("-before" if kind == "before" else "")
                    if kind == "cp":
                        r = timed(["cp", "-r", str(source), str(work / "copy")], logs, f"{rnd}-{path}-cp", args.settle)
                        remove(work / "copy")
                        cps[path].append(r)
                    elif path == "merge":
                        r = timed([str(CLI), "merge", str(src), str(out), "--only", "transformer", "--lora",
                                   str(lora_file)], logs, label, args.settle, env)
                        remove(out)
                        into[path].append(r)
                    elif path == "verify":
                        r = timed([str(CLI), "verify", str(diffusers), "--source", str(src)], logs, label, args.settle, env)
                        into[path].append(r)
                    else:
                        only = [] if path in BACKWARDS or path in FP8_SOURCE or path.startswith("pth_") else ["--only", "transformer"]
                        r = timed([str(CLI), "convert", str(source), str(out), *only, *PATHS[path]], logs, label, args.settle, env)
                        remove(out)
                        into[path].append(r)
                    log(f"  round {rnd} {path if kind == 'ours' else kind:8s} wall {r['wall_s']:6.2f} s  RSS {r['rss_mib']:5d} MiB  "
                        f"cpu {r['cpu_s']:6.1f} s")
        rows = []
        for path in args.paths:
            ours = statistics.median(r["wall_s"] for r in runs[path])
            cp = statistics.median(r["wall_s"] for r in cps[path])
            rows.append({"path": path, "args": " ".join(PATHS[path]) or "(dtype keep)", "wall_s": ours, "cp_s": cp,
                         "input_gb_s": round(made["t5_bytes" if path.startswith("pth_") else "bytes"] / ours / 1e9, 2),
                         "ratio": round(ours / cp, 2), "target": TARGETS.get(path),
                         # each round's own ratio (ours / the cp just before it), their median: the host's
                         # state drifts between rounds more than within one
                         "paired_ratio": round(statistics.median(r["wall_s"] / c["wall_s"]
                                                                 for r, c in zip(runs[path], cps[path])), 2),
                         "rss_mib": max(r["rss_mib"] for r in runs[path]),
                         "cpu_s": statistics.median(r["cpu_s"] for r in runs[path]),
                         "runs": [r["wall_s"] for r in runs[path]], "cp_runs": [r["wall_s"] for r in cps[path]]})
            if args.before:
                was = statistics.median(r["wall_s"] for r in befores[path])
                rows[-1].update({"before_s": was, "before_runs": [r["wall_s"] for r in befores[path]],
                                 "vs_before": round(ours / was, 2), "before_rss_mib": max(r["rss_mib"] for r in befores[path]),
                                 "before_cpu_s": statistics.median(r["cpu_s"] for r in befores[path])})
        result = {"layers": args.layers, "source_bytes": made["bytes"], "repeat": args.repeat, "cpus": os.cpu_count(),
                  "rows": rows}
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print(f"\nsynthetic T2V-14B, {args.layers} layers, {human(made['bytes'])} float32, source in page cache, "
                  f"timed to a final sync, alternating with cp -r, median of {args.repeat}, {os.cpu_count()} CPUs")
            print(f"{'path':8s} {'ours s':>8s} {'cp s':>7s} {'ratio':>6s} {'paired':>6s} {'target':>7s} {'peak RSS':>9s} "
                  f"{'cpu s':>7s} {'GB/s in':>8s}")
            for r in rows:
                t = f"<= {r['target']}" if r["target"] else ""
                print(f"{r['path']:8s} {r['wall_s']:8.2f} {r['cp_s']:7.2f} {r['ratio']:5.2f}x {r['paired_ratio']:5.2f}x {t:>7s} "
                      f"{r['rss_mib']:6d} MiB {r['cpu_s']:7.1f} {r['input_gb_s']:8.2f}" + (
                          f"   before {r['before_s']:6.2f} s ({r['vs_before']:.2f}x) {r['before_rss_mib']:5d} MiB "
                          f"{r['before_cpu_s']:6.1f} cpu s" if args.before else ""))
    finally:
        if args.keep:
            log(f"kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
