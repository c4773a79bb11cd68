#!/usr/bin/env python
"""Benchmark peak memory of converting the umT5-XXL text encoder .pth (a benchmark, not a test).

Target: converting a real-size umT5-XXL `models_t5_umt5-xxl-enc-bf16.pth` (24 layers, d_model 4096,
bf16, ~11.4 GB) keeps the peak RSS of `wan2diffusers convert`, as `/usr/bin/time -v` reports it
("Maximum resident set size"), under 1.5 GB (1.5 * 10^9 bytes).  The token embedding alone
(256384 x 4096 bf16 = 2.1 GB) is larger than that, so the converter must never read it into memory.

What it does, for each layer count L given with --layers (default: 2 and 4, to show flatness):

1. Writes a synthetic ORIGINAL-layout `models_t5_umt5-xxl-enc-bf16.pth` at the real umT5-XXL
   encoder shapes (vocab 256384, d_model 4096, 64 heads x d_kv 64, d_ff 10240 gated-gelu, 32
   relative-attention buckets in every layer), bfloat16, with only L layers.  The key names and
   structure come from the tiny fixture (tests/fixtures/t5, read with wan2diffusers.read.pth_file
   read_pth_index) with every dimension scaled.  The file is written with torch's own serializer
   without holding it: the state dict is made of FakeTensors (no storage) and saved under
   `torch.serialization.skip_data(materialize_fake_tensors=True)`, which writes the real zip
   archive (data.pkl, byteorder, version, data/<storage key>, 64-byte aligned, stored) but leaves
   each storage's bytes as a hole; each storage is then filled with positioned writes, 64 MiB at a
   time, from a 128 MiB pool of random bf16 values (a different slice per tensor and chunk), and
   the zip CRC-32 of each storage is patched in (local header and central directory) so that
   strict zip readers accept it.  The file is then checked with
   `torch.load(path, weights_only=True, mmap=True)` (keys, shapes, dtypes, sampled bytes) and with
   Python's zipfile CRC check of the small members.
2. Runs, each under `/usr/bin/time -v`:
   - "ours":        `wan2diffusers convert FILE OUT --overwrite`
   - "ours dry":    `wan2diffusers convert FILE OUT --dry-run` (imports + headers + plan: the runtime
                    floor of ours, to see what the write stage adds)
   - "back":        `wan2diffusers convert OUT BACK --to original` (the way back: the .pth written
                    again, streamed; compared with the source tensor by tensor, byte for byte)
   - "whole-file":  a Python subprocess doing `sd = torch.load(path, weights_only=True)` (no mmap),
                    renaming the keys (the rename map is taken from our planner), building
                    transformers' UMT5EncoderModel on the meta device from OUR output config.json,
                    `load_state_dict(sd, assign=True)` and `save_pretrained(..., max_shard_size="5GB")`.
3. Checks our output against the source (shared.weight rows, and a few block tensors, read with
   wan2diffusers.read.safetensors_file read_tensor from both files; rows are read as row slices so
   the 2.1 GB embedding is never loaded here either) and against the whole-file output (same
   keys/shapes/dtypes, sampled tensors byte-identical).

Byte figures are decimal (GB = 10^9 B); RSS is also shown in MiB.  Wall times are noisy on a shared
machine (page cache not dropped); peak RSS is not: it depends only on what each process holds.

Usage (from the repository root):
    .venv/bin/python scripts/bench_text_encoder.py [--layers 2 4] [--workdir DIR] [--keep] [--json]
        [--skip-whole-file]
`--layers 24` writes the full-size ~11.4 GB file (and needs ~3x that on disk, and ~17 GB of RAM for
the whole-file method: use --skip-whole-file on a small machine).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
import bench_convert as bc  # noqa: E402  (the shared end-of-run cleanup)
FIXTURE = REPO / "tests" / "fixtures" / "t5"
FILE_NAME = "models_t5_umt5-xxl-enc-bf16.pth"
GB = 10**9
MiB = 2**20
RSS_TARGET = int(1.5 * GB)
TIME = "/usr/bin/time"
CHUNK = 64 * MiB  # bytes per positioned write
POOL = 2 * CHUNK  # random bf16 bytes every chunk is sliced from

# the real umT5-XXL encoder (Wan's umt5_xxl(encoder_only=True)); fixture.json holds the tiny one
REAL = {"vocab_size": 256384, "dim": 4096, "dim_attn": 4096, "dim_ffn": 10240, "num_heads": 64, "num_buckets": 32}
EXPECTED = {  # a few known real shapes, to catch a wrong scaling
    "token_embedding.weight": (256384, 4096),
    "blocks.0.norm1.weight": (4096,),
    "blocks.0.attn.q.weight": (4096, 4096),
    "blocks.0.attn.o.weight": (4096, 4096),
    "blocks.0.ffn.gate.0.weight": (10240, 4096),
    "blocks.0.ffn.fc1.weight": (10240, 4096),
    "blocks.0.ffn.fc2.weight": (4096, 10240),
    "blocks.0.pos_embedding.embedding.weight": (32, 64),
    "norm.weight": (4096,),
}

WHOLE_FILE_METHOD = r'''
import json, sys
from pathlib import Path
import torch
from transformers import UMT5Config, UMT5EncoderModel

src, config_path, rename_path, out = sys.argv[1:5]
rename = json.loads(Path(rename_path).read_text())
sd = torch.load(src, weights_only=True)
sd = {rename[k]: v for k, v in sd.items()}
config = UMT5Config.from_json_file(config_path)
with torch.device("meta"):
    model = UMT5EncoderModel(config)
want = set(model.state_dict())
if "encoder.embed_tokens.weight" in want and "encoder.embed_tokens.weight" not in sd:
    sd["encoder.embed_tokens.weight"] = sd["shared.weight"]  # tied to shared.weight
model.load_state_dict(sd, strict=True, assign=True)
model.tie_weights()
del sd
model.save_pretrained(out, safe_serialization=True, max_shard_size="5GB")
'''


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def human(n: float) -> str:
    return f"{n / GB:.2f} GB"


# ---------------------------------------------------------------------------- synthetic checkpoint

def fixture_template() -> list[tuple[str, tuple[int, ...], str]]:
    """(key, real shape, dtype tag) for the non-block keys and block 0, in the fixture's order."""
    from wan2diffusers.read.pth_file import read_pth_index

    tiny = json.loads((FIXTURE / "fixture.json").read_text())["official_init_kwargs"]
    # tiny dim == tiny num_buckets (32): the relative position table [buckets, heads] is recognised
    # by its heads column, every other dimension is scaled by its value
    by_value = {tiny[k]: REAL[k] for k in ("vocab_size", "dim", "dim_attn", "dim_ffn")}
    if len(by_value) != 3 or tiny["num_heads"] in by_value:
        raise SystemExit(f"fixture.json sizes are ambiguous, cannot scale: {tiny}")
    out = []
    for key, ref in read_pth_index(FIXTURE / FILE_NAME).items():
        if key.startswith("blocks.") and not key.startswith("blocks.0."):
            continue
        if ref.dtype != "BF16":
            raise SystemExit(f"fixture: {key} is {ref.dtype}, expected BF16")
        if ref.shape == (tiny["num_buckets"], tiny["num_heads"]):
            shape = (REAL["num_buckets"], REAL["num_heads"])
        else:
            shape = tuple(by_value[d] for d in ref.shape)
        out.append((key, shape, ref.dtype))
    got = {k: s for k, s, _ in out}
    for key, shape in EXPECTED.items():
        if got.get(key) != shape:
            raise SystemExit(f"scaling the fixture gave {key} {got.get(key)}, expected {shape}")
    return out


def synthetic_keys(layers: int) -> list[tuple[str, tuple[int, ...], int]]:
    """(key, shape, nbytes) in the original state-dict order: embedding, blocks 0..L-1, final norm."""
    tmpl = fixture_template()
    block = [(k[len("blocks.0."):], s) for k, s, _ in tmpl if k.startswith("blocks.0.")]
    first = [i for i, (k, _, _) in enumerate(tmpl) if k.startswith("blocks.0.")]
    head = [(k, s) for k, s, _ in tmpl[:first[0]]]
    tail = [(k, s) for k, s, _ in tmpl[first[-1] + 1:]]
    keys = head + [(f"blocks.{n}.{k}", s) for n in range(layers) for k, s in block] + tail
    return [(k, s, 2 * math.prod(s)) for k, s in keys]


def checkpoint_bytes(layers: int) -> int:
    return sum(n for _, _, n in synthetic_keys(layers))


def make_pool() -> bytes:
    import torch

    g = torch.Generator().manual_seed(7600)
    return torch.randn(POOL // 2, generator=g).to(torch.bfloat16).view(torch.uint8).numpy().tobytes()


def chunk_offset(key: str, i: int, n: int) -> int:
    """Where in the pool chunk i (n bytes) of `key` comes from: differs per tensor and chunk."""
    return (zlib.crc32(f"{key}:{i}".encode()) % (POOL - n + 1)) & ~1


def expected_bytes(pool: bytes, key: str, start: int, n: int) -> bytes:
    """Bytes [start, start+n) of `key` as written (for checks)."""
    out = bytearray()
    pos = start
    while pos < start + n:
        i, within = divmod(pos, CHUNK)
        take = min(CHUNK - within, start + n - pos)
        off = chunk_offset(key, i, CHUNK) + within
        out += pool[off:off + take]
        pos += take
    return bytes(out)


def pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data)
    while view:
        k = os.pwrite(fd, view, offset)
        view, offset = view[k:], offset + k


def write_checkpoint(path: Path, layers: int, pool: bytes) -> dict:
    import torch
    from collections import OrderedDict
    from torch._subclasses.fake_tensor import FakeTensorMode

    from wan2diffusers.read.pth_file import read_pth_index

    keys = synthetic_keys(layers)
    if not hasattr(torch.serialization, "skip_data"):
        raise SystemExit(f"torch {torch.__version__} lacks torch.serialization.skip_data (needs >= 2.5)")
    with FakeTensorMode():  # shapes and dtypes only: no storage is allocated
        sd = OrderedDict((k, torch.empty(s, dtype=torch.bfloat16)) for k, s, _ in keys)
    with torch.serialization.skip_data(materialize_fake_tensors=True):
        torch.save(sd, path)  # the archive with every storage's space left as a hole
    del sd
    refs = read_pth_index(path)
    if list(refs) != [k for k, _, _ in keys]:
        raise SystemExit(f"{path}: torch.save wrote other keys than asked")
    crcs = {}
    fd = os.open(path, os.O_WRONLY)
    try:
        from tqdm import tqdm

        with tqdm(total=sum(n for _, _, n in keys), unit="B", unit_scale=True, desc=f"filling {path.name}",
                  leave=False, disable=None) as bar:
            for key, shape, nbytes in keys:
                ref = refs[key]
                if ref.shape != shape or ref.nbytes != nbytes or ref.stride is not None or ref.dtype != "BF16":
                    raise SystemExit(f"{path}: {key}: written as {ref}, expected {shape} BF16")
                crc = 0
                for i in range(math.ceil(nbytes / CHUNK)):
                    n = min(CHUNK, nbytes - i * CHUNK)
                    off = chunk_offset(key, i, CHUNK)
                    piece = memoryview(pool)[off:off + n]
                    pwrite_all(fd, piece, ref.offset + i * CHUNK)
                    crc = zlib.crc32(piece, crc)
                    bar.update(n)
                crcs[key] = crc
    finally:
        os.close(fd)
    patch_crcs(path, {key: (refs[key].offset, crc) for key, crc in crcs.items()})
    return {"tensors": len(keys), "bytes": sum(n for _, _, n in keys), "file_bytes": path.stat().st_size}


def patch_crcs(path: Path, by_key: dict[str, tuple[int, int]]) -> None:
    """Put each storage member's CRC-32 in its local header and its central directory entry
    (torch's skip_data wrote the CRC of bytes it did not write).  by_key: key -> (data start, crc)."""
    with zipfile.ZipFile(path) as zf:
        infos, cd_start = zf.infolist(), zf.start_dir
    with open(path, "r+b") as f:
        by_start, cd_pos, pos = {}, {}, cd_start
        for info in infos:  # central directory entries are in infolist() order
            f.seek(pos)
            entry = f.read(46)
            if entry[:4] != b"PK\x01\x02":
                raise SystemExit(f"{path}: unexpected central directory layout at {pos}")
            name_len, extra_len, comment_len = struct.unpack("<HHH", entry[28:34])
            cd_pos[info.filename] = pos
            pos += 46 + name_len + extra_len + comment_len
            f.seek(info.header_offset)
            local = f.read(30)
            n, e = struct.unpack("<HH", local[26:30])
            by_start[info.header_offset + 30 + n + e] = info
        for key, (data_start, crc) in by_key.items():
            info = by_start[data_start]
            for at in (info.header_offset + 14, cd_pos[info.filename] + 16):
                f.seek(at)
                f.write(struct.pack("<I", crc))


def check_checkpoint(path: Path, layers: int, pool: bytes) -> str:
    """torch.load(mmap=True) must accept the file and see what was meant; zip CRCs must hold."""
    import torch

    keys = synthetic_keys(layers)
    sd = torch.load(path, weights_only=True, mmap=True)
    got = [(k, tuple(v.shape), v.dtype) for k, v in sd.items()]
    want = [(k, s, torch.bfloat16) for k, s, _ in keys]
    if got != want:
        raise SystemExit(f"{path}: torch.load sees {len(got)} tensors that differ from the plan")
    emb = sd["token_embedding.weight"]
    row = 2 * emb.shape[1]
    for r in (0, 1, 12345, emb.shape[0] - 1):
        if emb[r].contiguous().view(torch.uint8).numpy().tobytes() != expected_bytes(
                pool, "token_embedding.weight", r * row, row):
            raise SystemExit(f"{path}: token_embedding.weight row {r} holds other bytes than written")
    for k in ("norm.weight", f"blocks.{layers - 1}.pos_embedding.embedding.weight"):
        if sd[k].contiguous().view(torch.uint8).numpy().tobytes() != expected_bytes(pool, k, 0, sd[k].nbytes):
            raise SystemExit(f"{path}: {k} holds other bytes than written")
    del sd, emb
    with zipfile.ZipFile(path) as zf:  # CRC of the small members and of the small storages
        for info in zf.infolist():
            if info.file_size <= 64 * 1024:
                zf.read(info.filename)  # raises BadZipFile on a CRC mismatch
    return "torch.load(weights_only=True, mmap=True): keys, shapes, dtypes and sampled bytes as written; zip CRCs ok"


# ---------------------------------------------------------------------------- measuring

def parse_time_v(text: str) -> dict:
    def field(label):
        m = re.search(rf"^\s*{re.escape(label)}: (.*)$", text, re.M)
        return m.group(1).strip() if m else None

    secs = 0.0
    for part in field("Elapsed (wall clock) time (h:mm:ss or m:ss)").split(":"):
        secs = secs * 60 + float(part)
    rss_kib = int(field("Maximum resident set size (kbytes)"))
    return {"wall_s": round(secs, 2), "rss_kib": rss_kib, "rss_bytes": rss_kib * 1024,
            "rss_mib": round(rss_kib / 1024, 1),
            "user_s": float(field("User time (seconds)")), "sys_s": float(field("System time (seconds)"))}


def timed(logs: Path, label: str, argv: list[str], shown: str | None = None) -> dict:
    tfile, ofile = logs / f"{label}.time", logs / f"{label}.log"
    log(f"  running {label}: {shown or ' '.join(argv)}")
    with open(ofile, "wb") as out:
        rc = subprocess.run([TIME, "-v", "-o", str(tfile), *argv], stdout=out, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"{label} failed (exit {rc}); log {ofile}:\n{ofile.read_text(errors='replace')[-3000:]}")
    r = parse_time_v(tfile.read_text())
    log(f"    wall {r['wall_s']:.2f} s, peak RSS {r['rss_mib']:.0f} MiB ({r['rss_bytes'] / GB:.3f} GB), "
        f"user {r['user_s']:.1f} s, sys {r['sys_s']:.1f} s")
    return r


def rename_map(src: Path) -> dict[str, str]:
    from wan2diffusers.component import plan_component, require_coverage

    cp = plan_component("text_encoder", src)
    require_coverage(cp)
    return {pt.sources[0].key: pt.key for pt in cp.plan.tensors}


def headers(folder: Path) -> dict:
    from wan2diffusers.read.safetensors_file import read_header

    refs = {}
    for f in sorted(folder.glob("*.safetensors")):
        refs.update(read_header(f).tensors)
    return refs


def row_slice(ref, rows: range):
    """A TensorRef for rows [start, stop) of a contiguous 2-D tensor (reads only those bytes)."""
    from dataclasses import replace

    row = ref.nbytes // ref.shape[0]
    return replace(ref, shape=(len(rows), *ref.shape[1:]), offset=ref.offset + rows.start * row,
                   nbytes=len(rows) * row)


def same_bytes(a, b) -> bool:
    """The two TensorRefs hold the same bytes (each read with read_tensor: positioned reads)."""
    import torch

    from wan2diffusers.read.safetensors_file import read_tensor

    def raw(ref):
        return read_tensor(ref).reshape(-1).view(torch.uint8).numpy().tobytes()

    return raw(a) == raw(b)


def check_against_source(src: Path, out: Path, layers: int) -> str:
    from wan2diffusers.read.pth_file import read_pth_index

    s, o = read_pth_index(src), headers(out / "text_encoder")
    ren = rename_map(src)
    missing = sorted(set(ren.values()) ^ set(o))
    if missing:
        return f"DIFFERENT key set: {missing[:5]}"
    for k, t in ren.items():
        if (o[t].dtype, o[t].shape) != (s[k].dtype, s[k].shape):
            return f"DIFFERENT {t}: {o[t].dtype} {o[t].shape} vs source {s[k].dtype} {s[k].shape}"
    vocab = s["token_embedding.weight"].shape[0]
    rows = [range(0, 4), range(12345, 12346), range(vocab // 2, vocab // 2 + 2), range(vocab - 3, vocab)]
    for r in rows:
        if not same_bytes(row_slice(s["token_embedding.weight"], r), row_slice(o["shared.weight"], r)):
            return f"DIFFERENT bytes: shared.weight rows {r.start}..{r.stop - 1}"
    sample = ["blocks.0.attn.q.weight", f"blocks.{layers - 1}.attn.o.weight", "blocks.0.ffn.gate.0.weight",
              f"blocks.{layers - 1}.ffn.fc1.weight", f"blocks.{layers - 1}.ffn.fc2.weight",
              f"blocks.{layers - 1}.pos_embedding.embedding.weight", "norm.weight"]
    for k in sample:
        if not same_bytes(s[k], o[ren[k]]):
            return f"DIFFERENT bytes: {ren[k]} vs source {k}"
    return (f"{len(o)} keys/shapes/dtypes as the source; shared.weight {sum(len(r) for r in rows)} rows and "
            f"{len(sample)} other tensors byte-identical to the source")


def compare_outputs(ours: Path, theirs: Path, layers: int) -> str:
    a, b = headers(ours), headers(theirs)
    sa = {k: (r.dtype, r.shape) for k, r in a.items()}
    sb = {k: (r.dtype, r.shape) for k, r in b.items()}
    if sa != sb:
        return f"DIFFERENT headers: {sorted(set(sa.items()) ^ set(sb.items()))[:5]}"
    vocab = a["shared.weight"].shape[0]
    for r in (range(0, 2), range(vocab - 2, vocab)):
        if not same_bytes(row_slice(a["shared.weight"], r), row_slice(b["shared.weight"], r)):
            return f"DIFFERENT bytes: shared.weight rows {r.start}..{r.stop - 1}"
    sample = [f"encoder.block.{layers - 1}.layer.0.SelfAttention.v.weight",
              "encoder.block.0.layer.1.DenseReluDense.wi_1.weight",
              f"encoder.block.{layers - 1}.layer.0.SelfAttention.relative_attention_bias.weight",
              "encoder.final_layer_norm.weight"]
    for k in sample:
        if not same_bytes(a[k], b[k]):
            return f"DIFFERENT bytes in {k}"
    return f"same {len(sa)} keys/shapes/dtypes; shared.weight 4 rows and {len(sample)} tensors byte-identical"


def rmtree(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists():
        p.unlink()


# ---------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4],
                    help="encoder layer counts to run (default: 2 4; the real model has 24)")
    ap.add_argument("--skip-whole-file", action="store_true", help="do not run the torch.load whole-file method")
    ap.add_argument("--workdir", type=Path, default=None, help="parent folder for the work folder (default $TMPDIR)")
    ap.add_argument("--keep", action="store_true", help="keep everything written (default: remove it all)")
    ap.add_argument("--json", action="store_true", help="print machine-readable results on stdout")
    args = ap.parse_args()
    if any(L < 1 for L in args.layers):
        raise SystemExit("--layers: each count must be >= 1")
    if not os.access(TIME, os.X_OK):
        raise SystemExit(f"{TIME} is needed (apt-get install time)")
    cli = Path(sys.executable).parent / "wan2diffusers"
    if not cli.exists():
        raise SystemExit(f"{cli} not found: run with the project's virtualenv python")

    parent = args.workdir
    if parent is None:
        parent = Path(tempfile.gettempdir())
        fstype = subprocess.run(["findmnt", "-T", str(parent), "-no", "FSTYPE"], capture_output=True,
                                text=True).stdout.strip()
        if fstype in ("tmpfs", "ramfs"):
            parent = REPO / ".bench"
    parent.mkdir(parents=True, exist_ok=True)
    sizes = {L: checkpoint_bytes(L) for L in args.layers}
    copies = 2 if args.skip_whole_file else 3  # source + ours + whole-file output
    need = sum(sizes.values()) * copies if args.keep else max(sizes.values()) * copies
    free = shutil.disk_usage(parent).free
    log("checkpoints: " + ", ".join(f"{L} layer(s) = {human(sizes[L])}" for L in args.layers)
        + f" (24 layers = {human(checkpoint_bytes(24))})")
    log(f"disk needed: {human(need)} at peak under {parent} ({human(free)} free)"
        + (" [--keep: everything stays]" if args.keep else " [each layer count's files are removed before the next]"))
    if need + GB > free:
        raise SystemExit("not enough free disk")
    work = Path(tempfile.mkdtemp(prefix="wan2diffusers-bench-t5-", dir=parent))
    logs = work / "logs"
    logs.mkdir()
    log(f"work dir:    {work}")

    results = {"rss_target_bytes": RSS_TARGET, "workdir": str(work), "runs": []}
    try:
        pool = make_pool()
        for L in args.layers:
            src_dir = work / f"src-{L}L"
            src_dir.mkdir()
            src = src_dir / FILE_NAME
            log(f"\n== {L} layer(s): writing {src} ({human(sizes[L])})")
            t = time.perf_counter()
            info = write_checkpoint(src, L, pool)
            log(f"  wrote {info['tensors']} tensors, {human(info['file_bytes'])} in {time.perf_counter() - t:.1f} s")
            valid = check_checkpoint(src, L, pool)
            log(f"  {valid}")
            run = {"layers": L, "source_bytes": info["bytes"], "source_file_bytes": info["file_bytes"],
                   "source_tensors": info["tensors"], "source_check": valid}
            out = work / f"ours-{L}L"
            run["ours"] = timed(logs, f"ours-{L}L", [str(cli), "convert", str(src), str(out), "--overwrite"])
            run["ours_dry_run"] = timed(logs, f"ours-dry-{L}L",
                                        [str(cli), "convert", str(src), str(work / "dry"), "--dry-run"])
            run["ours_vs_source"] = check_against_source(src, out, L)
            log(f"  ours vs source: {run['ours_vs_source']}")
            # the way back: the converted folder -> the original .pth again, streamed (torch.save's format)
            back = work / f"back-{L}L"
            run["back"] = timed(logs, f"back-{L}L", [str(cli), "convert", str(out), str(back), "--to", "original"])
            run["back_vs_source"] = same_file_tensors(src, back / FILE_NAME)
            log(f"  way back vs source: {run['back_vs_source']}")
            if not args.keep:
                rmtree(back)
            if not args.skip_whole_file:
                ren = work / f"rename-{L}L.json"
                ren.write_text(json.dumps(rename_map(src)))
                wout = work / f"whole-file-{L}L"
                run["whole_file"] = timed(
                    logs, f"whole-file-{L}L",
                    [sys.executable, "-c", WHOLE_FILE_METHOD, str(src), str(out / "text_encoder" / "config.json"),
                     str(ren), str(wout)], shown=f"python -c <torch.load whole-file method> {src} ... {wout}")
                run["ours_vs_whole_file"] = compare_outputs(out / "text_encoder", wout, L)
                log(f"  ours vs whole-file output: {run['ours_vs_whole_file']}")
                if not args.keep:
                    rmtree(wout)
            run["ours_rss_ok"] = run["ours"]["rss_bytes"] < RSS_TARGET
            results["runs"].append(run)
            if not args.keep:
                rmtree(out)
                rmtree(src_dir)
    finally:
        bc.remove_work(work, parent, args.keep)

    rss = [r["ours"]["rss_bytes"] for r in results["runs"]]
    results["ours_rss_spread_bytes"] = max(rss) - min(rss)
    results["all_ok"] = all(r["ours_rss_ok"] for r in results["runs"]) and all(
        not r[k].startswith("DIFFERENT") for r in results["runs"]
        for k in ("ours_vs_source", "ours_vs_whole_file", "back_vs_source")
        if k in r)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print_table(results)


def same_file_tensors(a: Path, b: Path) -> str:
    """Every tensor of two .pth files compared byte for byte, 64 MiB at a time (nothing held)."""
    from wan2diffusers.read.pth_file import read_pth_index
    from wan2diffusers.read.safetensors_file import iter_chunks

    ra, rb = read_pth_index(a), read_pth_index(b)
    if sorted(ra) != sorted(rb):
        return f"DIFFERENT keys: {sorted(set(ra) ^ set(rb))[:3]}"
    for k in ra:
        if (ra[k].dtype, tuple(ra[k].shape)) != (rb[k].dtype, tuple(rb[k].shape)):
            return f"DIFFERENT {k}: {ra[k].dtype} {ra[k].shape} vs {rb[k].dtype} {rb[k].shape}"
        for x, y in zip(iter_chunks(ra[k]), iter_chunks(rb[k])):
            if not x.view(-1).view(__import__("torch").uint8).equal(y.view(-1).view(__import__("torch").uint8)):
                return f"DIFFERENT values in {k}"
    return f"identical: {len(ra)} tensors byte for byte"


def print_table(results: dict) -> None:
    mib = lambda b: f"{b / MiB:.0f} MiB"
    print("\numT5-XXL text encoder .pth -> text_encoder/: peak RSS (/usr/bin/time -v) and wall time")
    hdr = (f"{'layers':>6} {'source':>9} {'ours RSS':>9} {'ours wall':>10} {'dry-run RSS':>12} "
           f"{'whole-file RSS':>15} {'whole-file wall':>16}")
    print(hdr)
    print("-" * len(hdr))
    for run in results["runs"]:
        w = run.get("whole_file")
        w_rss, w_wall = (mib(w["rss_bytes"]), f"{w['wall_s']:.2f}s") if w else ("-", "-")
        print(f"{run['layers']:>6} {human(run['source_bytes']):>9} {mib(run['ours']['rss_bytes']):>9} "
              f"{run['ours']['wall_s']:>9.2f}s {mib(run['ours_dry_run']['rss_bytes']):>12} "
              f"{w_rss:>15} {w_wall:>16}")
    print()
    for run in results["runs"]:
        print(f"{run['layers']} layer(s): ours vs source: {run['ours_vs_source']}")
        if "ours_vs_whole_file" in run:
            print(f"{run['layers']} layer(s): ours vs whole-file output: {run['ours_vs_whole_file']}")
        if "back" in run:
            print(f"{run['layers']} layer(s): way back (--to original): wall {run['back']['wall_s']:.2f} s, "
                  f"peak RSS {mib(run['back']['rss_bytes'])}; vs source: {run['back_vs_source']}")
    print(f"ours peak RSS spread across layer counts: {results['ours_rss_spread_bytes'] / MiB:.0f} MiB (flat = small)")
    for run in results["runs"]:
        b = run["ours"]["rss_bytes"]
        print(f"target ours peak RSS < 1.5 GB at {run['layers']} layer(s): {'OK' if run['ours_rss_ok'] else 'MISSED'} "
              f"({b / GB:.3f} GB = {b / MiB:.0f} MiB)")


if __name__ == "__main__":
    main()
