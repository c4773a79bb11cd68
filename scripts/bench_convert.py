#!/usr/bin/env python
"""Benchmark `wan2diffusers convert` on a synthetic Wan 2.1 T2V-14B checkpoint (a benchmark, not a test).

What it does, for each layer count L given with --layers (default: 1 and 3):

1. Writes a synthetic ORIGINAL-layout checkpoint with the real 14B shapes (dim 5120, ffn_dim 13824,
   40 heads, text_dim 4096, freq_dim 256, in/out_dim 16, patch (1,2,2), float32) but only L blocks,
   with the real key names (taken from tests/fixtures/t2v and scaled), sharded like the real repo
   (diffusion_pytorch_model-0000i-of-0000n.safetensors + .index.json + config.json).  Shards are
   streamed tensor by tensor with the project's own writer; every tensor's bytes are a slice of one
   random float32 pool file, so nothing large is ever held in memory.  One 14B block is ~1.4 GB,
   the embeddings and head ~0.93 GB.
2. Times `cp -r SRC DST` and `wan2diffusers convert SRC OUT --overwrite`, each under
   `/usr/bin/time -v`.  Page cache (--cache): "cold" (default when we may write
   /proc/sys/vm/drop_caches) drops it before each timed run (`sync; echo 3 > ...`) and then warms
   only the programs (python, torch, diffusers, our package, cp) with an untimed import, so the
   checkpoint is read from disk but the program start is that of a machine where Python was used
   recently; "cold-all" drops it and warms nothing (startup then includes reading torch/diffusers from
   disk); "warm" reads the source once before each run.  `sync` runs before each run, and the time
   of the `sync` right after a run (the writeback of what it left dirty) is reported as "+sync".
3. Runs `wan2diffusers convert --dry-run` (headers, detection, plan; no writing) to split ours into
   "startup + plan" and "write + verify".
4. Runs "the diffusers-script method" (what diffusers' scripts/convert_wan_to_diffusers.py does): load
   every shard with safetensors.torch.load_file into one dict, rename the keys (the rename map is
   taken from our planner), build WanTransformer3DModel under accelerate's init_empty_weights from
   our OUT/transformer/config.json, load_state_dict(assign=True), save_pretrained(safe_serialization,
   max_shard_size as ours).  Its output is checked against ours (same keys, shapes, dtypes; a few
   tensors compared byte for byte).

How to read the table: "wall" is the process's elapsed time from /usr/bin/time; "peak RSS" its
"Maximum resident set size".  Targets: ours/cp wall ratio <= 1.25 at every layer count; ours peak
RSS < 1 GB (10^9 bytes) at every layer count, and roughly the same at every layer count (flat),
while the diffusers-script method grows with the model.  Byte figures are decimal (GB = 10^9 B),
RSS is in MiB.

Usage (from the repository root):
    .venv/bin/python scripts/bench_convert.py [--layers 1 3] [--repeat 1] [--shard-gb auto]
        [--workdir DIR] [--keep] [--json] [--cache auto|cold|cold-all|warm] [--skip-diffusers]

Everything is written under a fresh temporary folder (default under $TMPDIR, or ./.bench when that is
a tmpfs) and removed at the end unless --keep.  The disk needed is printed before anything is written.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests" / "fixtures" / "t2v"
WEIGHTS = "diffusion_pytorch_model.safetensors"
INDEX = WEIGHTS + ".index.json"

# fixture size -> 14B size, per dimension value (fixture: dim 128, ffn 256, text_dim 32, freq_dim 40)
SCALE = {128: 5120, 256: 13824, 32: 4096, 40: 256, 768: 6 * 5120, 64: 64}
EXPECTED = {  # a few known 14B shapes, to catch a wrong scaling
    "patch_embedding.weight": (5120, 16, 1, 2, 2),
    "text_embedding.0.weight": (5120, 4096),
    "time_embedding.0.weight": (5120, 256),
    "time_projection.1.weight": (30720, 5120),
    "blocks.0.ffn.0.weight": (13824, 5120),
    "blocks.0.modulation": (1, 6, 5120),
    "head.head.weight": (64, 5120),
    "head.modulation": (1, 2, 5120),
}
ORDER = ("patch_embedding", "text_embedding", "time_embedding", "time_projection", "blocks", "head")
GB = 10**9
RSS_TARGET = 1 * GB
RATIO_TARGET = 1.25
TIME = "/usr/bin/time"
CLI = Path(sys.executable).parent / "wan2diffusers"

DIFFUSERS_METHOD = r'''
import json, sys
from pathlib import Path
import torch
from accelerate import init_empty_weights
from diffusers import WanTransformer3DModel
from safetensors.torch import load_file

src, config_path, rename_path, out, max_shard = sys.argv[1:6]
src = Path(src)
rename = json.loads(Path(rename_path).read_text())
index = json.loads((src / "diffusion_pytorch_model.safetensors.index.json").read_text())
sd = {}
for name in sorted(set(index["weight_map"].values())):
    sd.update(load_file(src / name))
sd = {rename[k]: v for k, v in sd.items()}
config = json.loads(Path(config_path).read_text())
with init_empty_weights():
    model = WanTransformer3DModel.from_config(config)
model.load_state_dict(sd, strict=True, assign=True)
model.save_pretrained(out, safe_serialization=True, max_shard_size=max_shard)
'''


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def human(n: float) -> str:
    return f"{n / GB:.2f} GB"


# ---------------------------------------------------------------------------- synthetic checkpoint

def fixture_template() -> list[tuple[str, tuple[int, ...]]]:
    """(key, 14B shape) for the non-block keys and for block 0, from the tiny fixture."""
    from safetensors import safe_open

    index = json.loads((FIXTURE / INDEX).read_text())
    out = {}
    for name in sorted(set(index["weight_map"].values())):
        with safe_open(str(FIXTURE / name), "pt") as f:
            for key in f.keys():
                if key.startswith("blocks.") and not key.startswith("blocks.0."):
                    continue
                shape = tuple(SCALE.get(d, d) for d in f.get_slice(key).get_shape())
                if f.get_slice(key).get_dtype() != "F32":
                    raise SystemExit(f"fixture {name}: {key} is not F32")
                out[key] = shape
    for key, shape in EXPECTED.items():
        if out.get(key) != shape:
            raise SystemExit(f"scaling the fixture gave {key} {out.get(key)}, expected {shape}")
    return list(out.items())


def synthetic_keys(layers: int) -> list[tuple[str, tuple[int, ...], int]]:
    """(key, shape, nbytes) in WanModel state-dict order: embeddings, blocks 0..L-1, head."""
    tmpl = fixture_template()
    block = [(k[len("blocks.0."):], s) for k, s in tmpl if k.startswith("blocks.0.")]
    rest = [(k, s) for k, s in tmpl if not k.startswith("blocks.")]
    keys = []
    for group in ORDER:
        if group == "blocks":
            for n in range(layers):
                keys += [(f"blocks.{n}.{k}", s) for k, s in block]
        else:
            keys += [(k, s) for k, s in rest if k.split(".")[0] == group]
    if len(keys) != len(tmpl) - len(block) + layers * len(block):
        raise SystemExit("fixture has keys outside the known groups")
    return [(k, s, 4 * math.prod(s)) for k, s in keys]


def checkpoint_bytes(layers: int) -> int:
    return sum(n for _, _, n in synthetic_keys(layers))


def split_shards(keys, shard_bytes: int) -> list[list[tuple[str, tuple[int, ...], int]]]:
    shards, cur, size = [], [], 0
    for item in keys:
        if cur and size + item[2] > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(item)
        size += item[2]
    if cur:
        shards.append(cur)
    return shards


def make_pool(path: Path, nbytes: int) -> None:
    """A file of random float32 values, written 64 MiB at a time."""
    import torch

    g = torch.Generator().manual_seed(0)
    chunk = 16 * 1024 * 1024  # floats
    with open(path, "wb") as f:
        left = nbytes // 4
        while left:
            n = min(chunk, left)
            f.write(torch.randn(n, generator=g).numpy().tobytes())
            left -= n


def write_checkpoint(folder: Path, layers: int, shard_bytes: int, pool: Path) -> dict:
    from wan2diffusers.read.safetensors_file import TensorRef
    from wan2diffusers.write.safetensors_writer import write_safetensors

    folder.mkdir(parents=True)
    keys = synthetic_keys(layers)
    shards = split_shards(keys, shard_bytes)
    n = len(shards)
    pool_size = pool.stat().st_size
    weight_map, total, i_global = {}, 0, 0
    for i, shard in enumerate(shards, 1):
        name = f"diffusion_pytorch_model-{i:05d}-of-{n:05d}.safetensors"
        shard = sorted(shard)  # safetensors stores a file's keys sorted
        entries = [(k, "F32", s, nb) for k, s, nb in shard]
        refs = []
        for k, s, nb in shard:
            slack = pool_size - nb
            off = ((i_global * 1_048_573) % (slack + 1)) // 4 * 4  # a different slice per tensor
            refs.append(TensorRef(pool, k, "F32", s, off, nb))
            i_global += 1
        write_safetensors(folder / name, entries, lambda j: refs[j], {"format": "pt"})
        for k, _, nb in shard:
            weight_map[k] = name
            total += nb
    (folder / INDEX).write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
    config = {"_class_name": "WanModel", "_diffusers_version": "0.30.0", "dim": 5120, "eps": 1e-06,
              "ffn_dim": 13824, "freq_dim": 256, "in_dim": 16, "model_type": "t2v", "num_heads": 40,
              "num_layers": layers, "out_dim": 16, "text_len": 512}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return {"files": n, "tensors": len(keys), "bytes": total}


# ---------------------------------------------------------------------------- measuring

def parse_time_v(text: str) -> dict:
    def field(label):
        m = re.search(rf"^\s*{re.escape(label)}: (.*)$", text, re.M)
        return m.group(1).strip() if m else None

    wall = field("Elapsed (wall clock) time (h:mm:ss or m:ss)")
    secs = 0.0
    for part in wall.split(":"):
        secs = secs * 60 + float(part)
    return {"wall_s": secs, "rss_kib": int(field("Maximum resident set size (kbytes)")),
            "user_s": float(field("User time (seconds)")), "sys_s": float(field("System time (seconds)"))}


WARM_PROGRAMS = "import safetensors.torch, accelerate; from diffusers import WanTransformer3DModel"


class Bench:
    def __init__(self, work: Path, cache: str):
        self.work, self.cache = work, cache
        self.logs = work / "logs"
        self.logs.mkdir(exist_ok=True)
        self.n = 0

    def prepare(self, src: Path) -> None:
        subprocess.run(["sync"], check=True)
        if self.cache in ("cold", "cold-all"):
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
            if self.cache == "cold":  # warm the programs (not the data): our CLI on the tiny fixture
                subprocess.run([str(CLI), "convert", str(FIXTURE), str(self.work / "warm"), "--dry-run"],
                               check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                subprocess.run([sys.executable, "-c", WARM_PROGRAMS], check=True)
                subprocess.run(["cp", "--version"], check=True, stdout=subprocess.DEVNULL)
        else:
            for f in sorted(src.iterdir()):
                with open(f, "rb", buffering=0) as fh:
                    while fh.read(64 << 20):
                        pass

    def run(self, label: str, argv: list[str], src: Path, shown: str | None = None, env: dict | None = None) -> dict:
        self.prepare(src)
        self.n += 1
        tfile, ofile = self.logs / f"{self.n:02d}-{label}.time", self.logs / f"{self.n:02d}-{label}.log"
        log(f"  running {label}: {shown or ' '.join(argv)}")
        t0 = time.perf_counter()
        with open(ofile, "wb") as out:
            rc = subprocess.run([TIME, "-v", "-o", str(tfile), *argv], stdout=out, stderr=subprocess.STDOUT,
                                env=env).returncode
        t1 = time.perf_counter()
        subprocess.run(["sync"], check=True)
        sync_s = time.perf_counter() - t1
        if rc != 0:
            tail = ofile.read_text(errors="replace")[-3000:]
            raise SystemExit(f"{label} failed (exit {rc}); log {ofile}:\n{tail}")
        r = parse_time_v(tfile.read_text())
        r.update(sync_s=round(sync_s, 2), wall_sync_s=round(r["wall_s"] + sync_s, 2),
                 perf_wall_s=round(t1 - t0, 2), rss_mib=round(r["rss_kib"] / 1024, 1),
                 output=ofile.read_text(errors="replace"))
        log(f"    wall {r['wall_s']:.2f} s (+sync {sync_s:.2f} s), peak RSS {r['rss_mib']:.0f} MiB, "
            f"user {r['user_s']:.1f} s, sys {r['sys_s']:.1f} s")
        return r


def rmtree(p: Path) -> None:
    shutil.rmtree(p, ignore_errors=True)


def remove_work(work: Path, parent: Path, keep: bool) -> None:
    """The end of a benchmark: its work folder removed (and ./.bench when it is left empty),
    unless --keep."""
    if keep:
        log(f"kept: {work}")
        return
    rmtree(work)
    if parent == REPO / ".bench" and not any(parent.iterdir()):
        parent.rmdir()


def rename_map(src: Path) -> dict[str, str]:
    from wan2diffusers.component import plan_component, require_coverage

    cp = plan_component("transformer", src)
    require_coverage(cp)
    return {pt.sources[0].key: pt.key for pt in cp.plan.tensors}


SAMPLED = ("patch_embedding.weight", "blocks.0.ffn.net.0.proj.weight", "proj_out.weight", "scale_shift_table")


def compare_outputs(ours: Path, theirs: Path, keys: tuple[str, ...] | None = SAMPLED) -> str:
    """Same keys, dtypes and shapes in both folders' safetensors headers, and the tensors named in
    `keys` (None: every tensor) byte-identical, read one at a time."""
    from wan2diffusers.read.safetensors_file import read_header, read_tensor

    def headers(folder):
        refs = {}
        for f in sorted(folder.glob("*.safetensors")):
            refs.update(read_header(f).tensors)
        return refs

    a, b = headers(ours), headers(theirs)
    sa = {k: (r.dtype, r.shape) for k, r in a.items()}
    sb = {k: (r.dtype, r.shape) for k, r in b.items()}
    if sa != sb:
        diff = sorted(set(sa.items()) ^ set(sb.items()))[:5]
        return f"DIFFERENT headers: {diff}"
    checked = [k for k in (keys if keys is not None else sorted(a)) if k in a]
    for k in checked:
        if read_tensor(a[k]).numpy().tobytes() != read_tensor(b[k]).numpy().tobytes():
            return f"DIFFERENT bytes in {k}"
    return f"same {len(sa)} keys/shapes/dtypes; {len(checked)} {'sampled ' if keys is not None else ''}tensors byte-identical"


# ---------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 3], help="layer counts to run (default: 1 3)")
    ap.add_argument("--shard-gb", type=float, default=None,
                    help="source shard size in GB (real repo: ~10; default: min(10, half the checkpoint), "
                         "so there are always at least 2 shards)")
    ap.add_argument("--max-shard-size", default="5GB", help="output shard size, ours and diffusers' (default 5GB)")
    ap.add_argument("--repeat", type=int, default=1, help="timed runs of cp and ours per layer count (order alternates)")
    ap.add_argument("--cache", choices=["auto", "cold", "cold-all", "warm"], default="auto",
                    help="cold: drop the page cache before each timed run (needs root), then warm the "
                         "programs only; cold-all: drop it, warm nothing; warm: read the source first; "
                         "auto (default): cold when possible, else warm")
    ap.add_argument("--skip-diffusers", action="store_true", help="do not run the diffusers-script method")
    ap.add_argument("--experts", type=int, choices=[1, 2], default=1,
                    help="2: a Wan 2.2 A14B repo layout, two experts of L layers each in high_noise_model/ and "
                         "low_noise_model/ (converted to transformer/ and transformer_2/); implies --skip-diffusers")
    ap.add_argument("--workdir", type=Path, default=None, help="parent folder for the work folder")
    ap.add_argument("--keep", action="store_true", help="keep everything written (default: remove it all)")
    ap.add_argument("--json", action="store_true", help="print machine-readable results on stdout")
    args = ap.parse_args()
    if not os.access(TIME, os.X_OK):
        raise SystemExit(f"{TIME} is needed (apt-get install time)")
    cli = CLI
    if not cli.exists():
        raise SystemExit(f"{cli} not found: run with the project's virtualenv python")

    cache = args.cache
    if cache in ("auto", "cold", "cold-all"):
        try:
            subprocess.run(["sync"], check=True)
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
            cache = "cold" if cache == "auto" else cache
        except OSError as e:
            if args.cache != "auto":
                raise SystemExit(f"cannot drop the page cache: {e}")
            cache = "warm"

    # where, and how much disk
    parent = args.workdir
    if parent is None:
        parent = Path(tempfile.gettempdir())
        fstype = subprocess.run(["findmnt", "-T", str(parent), "-no", "FSTYPE"], capture_output=True, text=True).stdout.strip()
        if fstype in ("tmpfs", "ramfs"):
            parent = REPO / ".bench"
    parent.mkdir(parents=True, exist_ok=True)
    if args.experts == 2:
        args.skip_diffusers = True  # the diffusers-script method is written for one transformer
    sizes = {L: checkpoint_bytes(L) * args.experts for L in args.layers}
    pool_bytes = max(n for L in args.layers for _, _, n in synthetic_keys(L)) + (1 << 20)
    copies = 3 if not args.skip_diffusers else 2  # source + ours (kept for the comparison) + cp or diffusers
    need = pool_bytes + (sum(sizes[L] * (copies + 1) for L in sizes) if args.keep else max(sizes.values()) * copies)
    free = shutil.disk_usage(parent).free
    log("checkpoints: " + ", ".join(f"{L} layer(s) = {human(sizes[L])}" for L in args.layers))
    log(f"disk needed: {human(need)} at peak under {parent} ({human(free)} free)"
        + (" [--keep: everything stays]" if args.keep else " [each run's files are removed before the next]"))
    if need + GB > free:
        raise SystemExit("not enough free disk")
    work = Path(tempfile.mkdtemp(prefix="wan2diffusers-bench-", dir=parent))
    # the target-layout cache (converter/plan/layout_cache.py) lives in the work folder: our timed
    # runs find the layout cached (a repeat conversion of a model family); one extra run per layer
    # count starts from an empty cache (the first conversion of a family) and is reported apart
    os.environ["WAN2DIFFUSERS_CACHE"] = str(work / "layout-cache")
    log(f"work dir:    {work}")
    log(f"page cache:  {cache}" + {
        "cold": " (sync; echo 3 > /proc/sys/vm/drop_caches before each timed run, then programs warmed)",
        "cold-all": " (sync; echo 3 > /proc/sys/vm/drop_caches before each timed run, nothing warmed)",
        "warm": " (source read once before each timed run)"}[cache])

    git = lambda *a: subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True).stdout.strip()
    start_diff = git("diff", "HEAD", "--stat")
    results = {"git_head": git("rev-parse", "--short", "HEAD"),
               "git_dirty": [l.split(maxsplit=1)[1] for l in git("status", "--porcelain").splitlines()],
               "loadavg_start": os.getloadavg()[0],
               "cache": cache, "repeat": args.repeat, "max_shard_size": args.max_shard_size, "experts": args.experts,
               "layout_cache": "timed runs: warm (primed by an untimed --dry-run); ours_first: empty",
               "workdir": str(work), "runs": []}
    try:
        pool = work / "random-pool.f32"
        t = time.perf_counter()
        make_pool(pool, pool_bytes)
        log(f"random pool: {human(pool_bytes)} in {time.perf_counter() - t:.1f} s")
        bench = Bench(work, cache)
        for L in args.layers:
            total = sizes[L]
            shard = int(args.shard_gb * GB) if args.shard_gb else min(10 * GB, math.ceil(total / args.experts / 2))
            src = work / f"src-{L}L"
            log(f"\n== {L} layer(s): writing {src} ({human(total)}, shards <= {human(shard)})")
            t = time.perf_counter()
            if args.experts == 2:  # Wan 2.2 A14B: each expert a complete transformer of its own
                parts = [write_checkpoint(src / e, L, shard, pool) for e in ("high_noise_model", "low_noise_model")]
                info = {k: sum(p[k] for p in parts) for k in parts[0]}
            else:
                info = write_checkpoint(src, L, shard, pool)
            log(f"  wrote {info['files']} shards, {info['tensors']} tensors in {time.perf_counter() - t:.1f} s")
            run = {"layers": L, "source_bytes": total, "source_files": info["files"],
                   "source_tensors": info["tensors"], "cp": [], "ours": []}
            cp_dst, out = work / f"cp-{L}L", work / f"ours-{L}L"
            first = bench.run(f"ours-first-{L}L", [str(cli), "convert", str(src), str(out), "--overwrite",
                                                   "--max-shard-size", args.max_shard_size], src,
                              env={**os.environ, "WAN2DIFFUSERS_CACHE": str(work / f"empty-cache-{L}L")})
            first.pop("output")
            run["ours_first"] = first
            rmtree(out)
            # prime the layout cache the timed runs use (untimed): every timed `ours` run is then a
            # repeat conversion of the family. Without this the first timed run paid the diffusers
            # import and meta build (~5 s here), and with --repeat 1 it was the only one: 2-4x cp.
            bench.run(f"prime-layout-cache-{L}L", [str(cli), "convert", str(src), str(work / "dry"), "--dry-run"],
                      src).pop("output")
            for r in range(args.repeat):
                order = ["cp", "ours"] if r % 2 == 0 else ["ours", "cp"]
                for what in order:
                    if what == "cp":
                        rmtree(cp_dst)
                        m = bench.run(f"cp-{L}L", ["cp", "-r", str(src), str(cp_dst)], src)
                        rmtree(cp_dst)
                    else:
                        rmtree(out)
                        m = bench.run(f"ours-{L}L", [str(cli), "convert", str(src), str(out), "--overwrite",
                                                     "--max-shard-size", args.max_shard_size], src)
                        w = re.search(r"in ([\d.]+) s", m["output"])
                        m["in_process_s"] = float(w.group(1)) if w else None
                        if r < args.repeat - 1:  # the last output is kept for the comparison
                            rmtree(out)  # deleted right after the run, like cp's copy
                    m.pop("output")
                    run[what].append(m)
            dry = bench.run(f"ours-dry-{L}L", [str(cli), "convert", str(src), str(work / "dry"), "--dry-run"], src)
            dry.pop("output")
            run["ours_dry_run"] = dry
            if not args.skip_diffusers:
                ren = work / f"rename-{L}L.json"
                ren.write_text(json.dumps(rename_map(src)))
                dout = work / f"diffusers-{L}L"
                m = bench.run(f"diffusers-{L}L", [sys.executable, "-c", DIFFUSERS_METHOD, str(src),
                                                  str(out / "transformer" / "config.json"), str(ren), str(dout),
                                                  args.max_shard_size], src,
                              shown=f"python -c <diffusers-script method> {src} ... {dout}")
                m.pop("output")
                run["diffusers"] = m
                run["outputs_match"] = compare_outputs(out / "transformer", dout)
                log(f"  ours vs diffusers output: {run['outputs_match']}")
                if not args.keep:
                    rmtree(dout)
            if not args.keep:
                rmtree(out)
                rmtree(src)
            results["runs"].append(run)
    finally:
        remove_work(work, parent, args.keep)

    end = (git("rev-parse", "--short", "HEAD"), git("diff", "HEAD", "--stat"))
    results["tree_changed_during_run"] = end != (results["git_head"], start_diff)
    results["loadavg_end"] = os.getloadavg()[0]
    summarize(results)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print_table(results)


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def summarize(results: dict) -> None:
    for run in results["runs"]:
        cp_w = median([m["wall_s"] for m in run["cp"]])
        ours_w = median([m["wall_s"] for m in run["ours"]])
        cp_ws = median([m["wall_sync_s"] for m in run["cp"]])
        ours_ws = median([m["wall_sync_s"] for m in run["ours"]])
        ours_rss = max(m["rss_kib"] for m in run["ours"] + [run["ours_first"]]) * 1024
        s = {"cp_wall_s": cp_w, "ours_wall_s": ours_w, "ratio": round(ours_w / cp_w, 3),
             "ours_first_wall_s": run["ours_first"]["wall_s"],
             "ratio_first": round(run["ours_first"]["wall_s"] / cp_w, 3),
             "ours_first_rss_bytes": run["ours_first"]["rss_kib"] * 1024,
             "ratio_incl_sync": round(ours_ws / cp_ws, 3),
             "ours_rss_bytes": ours_rss, "cp_rss_bytes": max(m["rss_kib"] for m in run["cp"]) * 1024,
             "ours_startup_plan_s": run["ours_dry_run"]["wall_s"],
             "ours_write_verify_s": round(ours_w - run["ours_dry_run"]["wall_s"], 2),
             "ratio_write_only": round((ours_w - run["ours_dry_run"]["wall_s"]) / cp_w, 3),
             "ratio_ok": ours_w / cp_w <= RATIO_TARGET, "rss_ok": ours_rss < RSS_TARGET}
        if "diffusers" in run:
            s["diffusers_rss_bytes"] = run["diffusers"]["rss_kib"] * 1024
            s["diffusers_wall_s"] = run["diffusers"]["wall_s"]
        run["summary"] = s
    rss = [r["summary"]["ours_rss_bytes"] for r in results["runs"]]
    results["ours_rss_spread_bytes"] = max(rss) - min(rss)
    results["targets"] = {"ratio_max": RATIO_TARGET, "rss_max_bytes": RSS_TARGET,
                          "all_ok": all(r["summary"]["ratio_ok"] and r["summary"]["rss_ok"] for r in results["runs"])}


def print_table(results: dict) -> None:
    mib = lambda b: f"{b / 2**20:.0f} MiB"
    print(f"\nwan2diffusers convert vs cp -r vs diffusers-script method "
          f"(page cache: {results['cache']}, {results['repeat']} run(s) each, median)")
    print(f"tree: {results['git_head']}" + (f" + uncommitted changes in {', '.join(results['git_dirty'])}"
                                           if results["git_dirty"] else " (clean)")
          + (" -- WARNING: the tree changed during the run" if results["tree_changed_during_run"] else ""))
    print(f"1-min load average: {results['loadavg_start']:.2f} at start, {results['loadavg_end']:.2f} at end "
          f"({os.cpu_count()} cores; other work on the machine makes the wall times noisy)")
    hdr = f"{'layers':>6} {'source':>9} {'cp wall':>9} {'ours wall':>10} {'ours/cp':>8} {'(+sync)':>8} " \
          f"{'ours RSS':>9} {'diffusers RSS':>14} {'diffusers wall':>15}"
    print(hdr)
    print("-" * len(hdr))
    for run in results["runs"]:
        s = run["summary"]
        print(f"{run['layers']:>6} {human(run['source_bytes']):>9} {s['cp_wall_s']:>8.2f}s {s['ours_wall_s']:>9.2f}s "
              f"{s['ratio']:>7.2f}x {s['ratio_incl_sync']:>7.2f}x {mib(s['ours_rss_bytes']):>9} "
              f"{mib(s['diffusers_rss_bytes']) if 'diffusers_rss_bytes' in s else '-':>14} "
              f"{(str(s['diffusers_wall_s']) + 's') if 'diffusers_wall_s' in s else '-':>15}")
    print()
    for run in results["runs"]:
        s = run["summary"]
        print(f"{run['layers']} layer(s): first conversion of the family (layout not cached: imports diffusers "
              f"and builds the model on meta): {s['ours_first_wall_s']:.2f} s = {s['ratio_first']:.2f}x cp, "
              f"RSS {mib(s['ours_first_rss_bytes'])}; the table's 'ours' runs found the layout cached")
    for run in results["runs"]:
        s = run["summary"]
        print(f"{run['layers']} layer(s): each run's wall: cp " + ", ".join(f"{m['wall_s']:.2f}" for m in run["cp"])
              + " s; ours " + ", ".join(f"{m['wall_s']:.2f}" for m in run["ours"]) + " s")
        print(f"{run['layers']} layer(s): ours = {s['ours_startup_plan_s']:.2f} s startup+plan (--dry-run, "
              f"RSS {run['ours_dry_run']['rss_mib']:.0f} MiB) + {s['ours_write_verify_s']:.2f} s write+verify "
              f"(= {s['ratio_write_only']:.2f}x cp); "
              f"ours user {median([m['user_s'] for m in run['ours']]):.1f} s / sys "
              f"{median([m['sys_s'] for m in run['ours']]):.1f} s, cp user "
              f"{median([m['user_s'] for m in run['cp']]):.1f} s / sys {median([m['sys_s'] for m in run['cp']]):.1f} s"
              + (f"; outputs: {run['outputs_match']}" if "outputs_match" in run else ""))
    print()
    for run in results["runs"]:
        s = run["summary"]
        print(f"target ours/cp <= {RATIO_TARGET}x at {run['layers']} layer(s): "
              f"{'OK' if s['ratio_ok'] else 'MISSED'} ({s['ratio']:.2f}x)")
        print(f"target ours RSS < 1 GB at {run['layers']} layer(s): "
              f"{'OK' if s['rss_ok'] else 'MISSED'} ({s['ours_rss_bytes'] / GB:.2f} GB)")
    print(f"ours RSS spread across layer counts: {results['ours_rss_spread_bytes'] / 2**20:.0f} MiB (flat = small)")


if __name__ == "__main__":
    main()
