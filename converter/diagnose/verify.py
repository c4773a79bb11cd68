"""`verify`: a strict key and shape check of every component against its class built on the meta
device from its config.json; with a source, every output tensor compared with what the mapping
makes of the source tensors (one tensor at a time); the sha256 of every output file (streamed)."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from ..discover import component_of, discover
from ..errors import ConversionError
from ..mapping import transforms
from ..read.files import file_sha256
from ..read.safetensors_file import read_tensor
from .examine import Diagnosis, diagnose
from ..quantization.formats import describe_config
from ..write.workfiles import excluded, leftovers_of
from ..layouts.names import model_root
from .layout import Unit, find
from .sourceplan import plan_from_source

# what inspect finds about loading a folder as Diffusers: beside the point for the original-layout
# or ComfyUI files the way back writes, whose keys compare_backwards checks one by one
AS_DIFFUSERS = ("original-layout", "config", "missing-keys", "unexpected-keys", "mismatched-shapes")



def verify_path(out: Path, source: Path | None = None, progress: bool = True, plan_reversed=None) -> dict:
    """`plan_reversed`: the way back's planner (actions/to_original.py), handed down by the caller
    so that verify can compare original-layout or ComfyUI files with a Diffusers SRC run backwards
    (this layer does not import the commands' actions)."""
    out = Path(out)
    found = find(out)
    files = [p for p in sorted(out.rglob("*") if out.is_dir() else [out]) if p.is_file()
             and not (out.is_dir() and any(excluded(x) for x in p.relative_to(out).parts))]
    hashing = _Hashes(out, files)  # on another thread while the model is built and the tensors compared
    try:
        return _verify(out, found, source, progress, plan_reversed, hashing)
    finally:
        hashing.stop()


def _verify(out: Path, found, source: Path | None, progress: bool, plan_reversed, hashing: "_Hashes") -> dict:
    components, differences = [], []
    backwards = _reversed_source(found, source, plan_reversed)  # OUT written by --to original/comfyui from a Diffusers SRC
    units = list(found.units) + (_unlisted(out, found, backwards) if backwards else [])
    diags = []
    for unit in units:
        d = diagnose(unit)
        diags.append(d)
        diffs = structural(d) if not backwards else [
            {"key": None, "problem": f"{f.message} (fix: {f.fix})"} for f in d.findings if f.code not in AS_DIFFUSERS]
        if backwards:
            info = {"component": unit.name, "path": str(unit.path), "layout": d.layout_label, "class": "the source run backwards",
                    "tensors": len(unit.keys), "compared": 0, "differences": diffs}
            compared, tdiffs = compare_backwards(unit, found, backwards, progress)
            info["compared"] = compared
            diffs.extend(tdiffs)
            components.append(info)
            differences += [{**x, "component": unit.name} for x in diffs]
            continue
        info = {"component": unit.name, "path": str(unit.path), "layout": d.layout_label,
                "class": d.target.class_name if d.target else None, "tensors": len(unit.keys),
                "compared": 0, "differences": diffs}
        if source is not None and unit.layout == "diffusers" and d.target is not None:
            if unit.component not in {component_of(i) for i in discover(Path(source))}:
                info["not_compared"] = f"the source holds no {unit.component}"
            else:
                try:
                    compared, tdiffs = compare_with_source(unit, d, Path(source), progress)
                except ConversionError as e:
                    compared, tdiffs = 0, [{"key": None, "problem": f"cannot compare with the source: {e}"}]
                info["compared"] = compared
                diffs.extend(tdiffs)
        components.append(info)
        differences += [{**x, "component": unit.name} for x in diffs]
    if not backwards:  # what DiffusionPipeline.from_pretrained reads first
        from .pipeline_repair import model_index_fixes

        for k, (have, want) in model_index_fixes(found, diags).items():
            differences.append({"component": "model_index.json", "key": k,
                                "problem": f"is {have!r}, the pipeline needs {want!r} (repair rewrites it)"})
    for item in leftovers_of(out, model_root(out)):
        differences.append({"component": "folder", "key": None, "problem": item})
    return {"ok": not differences, "path": str(out), "kind": found.kind, "source": str(source) if source else None,
            "components": components, "differences": differences, "files": hashing.result(progress)}


class _Hashes:
    """The sha256 of every output file, streamed on one thread of its own from the start of verify
    (hashlib and file reads release the GIL): it overlaps the imports, the model build and the
    comparison, which need the other core.  result() waits for it under a progress bar."""

    def __init__(self, out: Path, files: list[Path]):
        import threading
        from concurrent.futures import ThreadPoolExecutor

        self.out, self.files, self.total = out, files, sum(p.stat().st_size for p in files)
        self.lock, self.done, self.bar, self.stopped = threading.Lock(), 0, None, False
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="verify-sha256")
        self.future = self.pool.submit(self._run)

    def _count(self, n: int) -> None:
        with self.lock:
            self.done += n
            if self.bar is not None:
                self.bar.update(n)
        if self.stopped:
            raise ConversionError("verify stopped")  # the comparison failed: no need to finish hashing

    def _run(self) -> list[dict]:
        return [{"file": str(p.relative_to(self.out)) if p != self.out else p.name, "bytes": p.stat().st_size,
                 "sha256": file_sha256(p, self._count)} for p in self.files]

    def result(self, progress: bool) -> list[dict]:
        with tqdm(total=self.total, unit="B", unit_scale=True, desc="sha256",
                  disable=None if progress else True, leave=False) as bar:
            with self.lock:
                bar.update(self.done)
                self.bar = bar
            try:
                return self.future.result()
            finally:
                with self.lock:
                    self.bar = None

    def stop(self) -> None:
        self.stopped = True
        self.pool.shutdown(wait=True)


def _reversed_source(found, source: Path | None, plan_reversed):
    """When OUT holds original-layout or ComfyUI files and SRC is a Diffusers folder (or an original
    repo whose transformer diffusers has no class for, Wan 2.2 S2V): SRC's components planned as
    --to wrote them (backwards; the S2V transformer key for key)."""
    if source is None or plan_reversed is None or not found.units or any(u.layout == "diffusers" and not u.comfy for u in found.units):
        return None
    to = "comfyui" if any(u.comfy for u in found.units) else "original"
    for only in (None, sorted({u.component for u in found.units})):  # all, else the components OUT holds
        try:  # (an S2V repo: its transformer goes to ComfyUI from the original layout, its VAE does not)
            parts, _ = plan_reversed(Path(source), only, "keep", to=to)
            return parts
        except ConversionError:
            continue
    return None  # not a source the way back starts from: nothing to compare backwards


def _unlisted(out: Path, found, parts: list) -> list[Unit]:
    """Files the way back writes that are not a component of the original layout (the CLIP vision
    tower as ComfyUI's clip_vision file, at the root): verified as single files."""
    from .layout import single_file_unit

    listed = {Path(f).resolve() for u in found.units if u.weights for f in u.weights.files}
    extra = []
    for r in parts:
        path = out / r.dest / r.file_name if r.dest else out / r.file_name
        if path.is_file() and path.resolve() not in listed:
            extra.append(single_file_unit(path))
    return extra


def compare_backwards(unit: Unit, found, parts: list, progress: bool) -> tuple[int, list[dict]]:
    """Every tensor of an original-layout or ComfyUI file against the Diffusers source run
    backwards through the table (cast once to the stored dtype, when --dtype changed it)."""
    root = Path(found.path)
    first = Path(unit.weights.files[0]) if unit.weights and unit.weights.files else Path(unit.path)
    if root.is_file():  # one file given (a ComfyUI file): its component's, by name when there are two experts
        same = [r for r in parts if r.cp.component == unit.component]
        match = [r for r in same if r.file_name == first.name] or same
        where = first.parent.name
    else:
        where = first.parent.relative_to(root).as_posix() if first.parent != root else ""
        match = [r for r in parts if r.cp.component == unit.component and r.dest == where]
    if len(match) != 1:
        return 0, [{"key": None, "problem": f"the source has no {unit.component} written to "
                    f"{where or 'the top folder'}"}]
    return compare_planned(unit, match[0].cp.plan.tensors, (), progress)


def structural(d: Diagnosis) -> list[dict]:
    """Keys and shapes against the class from config.json, plus every problem inspect finds."""
    u = d.unit
    diffs = []
    if u.layout != "diffusers":
        diffs.append({"key": None, "problem": f"{d.layout_label} layout, not {d.derived_target.class_name if d.derived_target else 'Diffusers'} keys"})
    for k in d.missing:
        diffs.append({"key": k, "problem": "missing"})
    for k in d.unexpected:
        diffs.append({"key": k, "problem": "unexpected"})
    for k, a, b in d.mismatched:
        diffs.append({"key": k, "problem": f"shape {a}, the class needs {b}"})
    seen = {x["key"] for x in diffs}
    for f in d.findings:
        if f.code in ("missing-keys", "unexpected-keys", "mismatched-shapes") and set(f.keys) <= seen:
            continue
        if f.code == "original-layout":
            continue
        diffs.append({"key": None, "problem": f"{f.message} (fix: {f.fix})"})
    return diffs


def compare_with_source(unit: Unit, d: Diagnosis, source: Path, progress: bool) -> tuple[int, list[dict]]:
    cp = plan_from_source(unit.component, source, unit.config, instance=unit.instance or None,
                          variant=d.detection.variant if d.detection is not None else None)
    diffs = []
    for k, v in cp.plan.detection.config.items():
        have = (unit.config or {}).get(k)
        if k in (unit.config or {}) and _norm(have) != _norm(v):
            diffs.append({"key": None, "problem": f"config.json {k}={have!r}, the source gives {v!r}"})
    compared, tdiffs = compare_planned(unit, cp.plan.tensors, d.target.tied, progress)
    return compared, diffs + tdiffs


def compare_planned(unit: Unit, pts: list, ignore, progress: bool) -> tuple[int, list[dict]]:
    """Every planned tensor against what `unit` stores under its key, in either direction: keys
    the plan makes that the output lacks and keys it has that the plan does not make (but those in
    `ignore`: tied copies) named; each value made from the source by the plan's op and compared
    (cast once to the stored dtype; a quantized weight by its backend's rule)."""
    planned = {pt.key: pt for pt in pts}
    diffs = [{"key": key, "problem": "the source makes it; the output lacks it"} for key in planned
             if key not in unit.keys]
    diffs += [{"key": key, "problem": "in the output; the source does not make it"} for key in unit.keys
              if key not in planned and key not in ignore]
    tensors = unit.weights.tensors
    compared = 0
    todo = [pt for pt in pts if pt.key in unit.keys]
    with tqdm(total=sum(pt.nbytes for pt in todo), unit="B", unit_scale=True, desc=f"comparing {unit.name}",
              disable=None if progress else True, leave=False) as bar:
        for pt in todo:
            if pt.key not in unit.quantized and _streams_equal(pt, tensors.get(pt.key)):
                compared += 1  # the common case, compared a chunk at a time (memory: a few chunks)
                bar.update(pt.nbytes)
                continue
            expected = transforms.apply(pt.rule, [read_tensor(r) for r in pt.sources])[pt.part]
            if pt.key in unit.quantized:
                problem = _check_quantized(unit, pt.key, expected, pt)
            else:
                problem = _check_equal(read_tensor(tensors[pt.key]), expected)
            del expected
            if problem:
                diffs.append({"key": pt.key, "problem": problem})
            compared += 1
            bar.update(pt.nbytes)
    return compared, diffs


def _streams_equal(pt, out) -> bool:
    """Whether the stored tensor `out` holds exactly the bytes of the planned tensor's source cast
    once to the stored dtype, read a chunk at a time from both files (a view op: the values keep
    their order). False also when it cannot say this way (another op, strided data, a cast that
    would overflow): the whole-tensor comparison then says what differs."""
    from dataclasses import replace

    from ..read.safetensors_file import DTYPES, iter_cast, same_values

    if out is None or not pt.is_elementwise or out.stride is not None or tuple(out.shape) != tuple(pt.shape):
        return False
    src = pt.sources[0]
    if src.dtype == out.dtype and src.scale is None and not src.deltas and src.stride is None:
        try:  # a byte copy: the bytes compared as they are, no cast in between
            return same_values(replace(src, shape=tuple(out.shape)), out)
        except OSError:
            return False
    try:
        with open(out.file, "rb", buffering=0) as f:
            f.seek(out.offset)
            done = 0
            for chunk in iter_cast(src, DTYPES[out.dtype]):
                view = memoryview(chunk).cast("B")
                if f.read(len(view)) != view:
                    return False
                done += len(view)
        return done == out.nbytes
    except (ConversionError, OSError):
        return False


def _norm(v):
    import json

    return json.loads(json.dumps(v))


def _check_equal(got: torch.Tensor, expected: torch.Tensor) -> str:
    if tuple(got.shape) != tuple(expected.shape):
        return f"shape {list(got.shape)}, the source gives {list(expected.shape)}"
    exp = expected.to(got.dtype)  # an output written in bf16/fp16 is the source cast once
    if got.is_floating_point() and expected.is_floating_point():
        overflow = int((torch.isinf(got) & torch.isfinite(expected)).sum())
        if overflow:
            return (f"{overflow} value(s) are Inf where the source has finite values (beyond the "
                    f"{str(got.dtype).removeprefix('torch.')} range)")
    if torch.equal(got, exp):
        return ""
    if got.is_floating_point():
        diff = (got.float() - exp.float()).abs()
        n = int((diff > 0).sum())
        return f"differs from the source in {n} of {got.numel()} values (max |difference| {float(diff.max()):.3g})"
    return f"differs from the source in {int((got != exp).sum())} of {got.numel()} values"


def _check_quantized(unit: Unit, key: str, expected: torch.Tensor, pt=None) -> str:
    """quanto int8: data * scale must be the source within half a quantization step (any int8
    quantizer passes); float8, int4 and torchao: see _check_requantized."""
    fmt = unit.key_format
    roles = fmt.by_role(unit.quantized[key]) if fmt is not None else {}
    refs = unit.weights.tensors
    if fmt is None or fmt.backend != "quanto" or set(roles) != {"data", "scale"} or refs[roles["data"]].dtype != "I8":
        return _check_requantized(unit, key, expected, pt)
    data, scale = read_tensor(refs[roles["data"]]).float(), read_tensor(refs[roles["scale"]]).float()
    if tuple(data.shape) != tuple(expected.shape):
        return f"shape {list(data.shape)}, the source gives {list(expected.shape)}"
    err = (data * scale - expected.float()).abs()
    bound = scale.abs() * 0.5 * (1 + 1e-3) + 1e-12
    if bool((err <= bound).all()):
        return ""
    return f"quantized values are not the source's (max error {float(err.max()):.3g}, beyond half a step)"


def _check_requantized(unit: Unit, key: str, expected: torch.Tensor, pt=None) -> str:
    """The source weight quantized again by the backend that wrote the folder (exactly what
    diffusers' path writes; quanto float8/int4, torchao int8/float8) must give the very same
    stored tensors -- or, from a ComfyUI fp8_scaled source, the fp8 values as stored with their
    scale on every row, when the backend keeps them (QuantBackend.from_scaled_fp8)."""
    from ..quantization.backend import get_backend
    from ..read.safetensors_file import DTYPES

    backend, weights = describe_config((unit.config or {}).get("quantization_config")) or ("?", None)
    refs = unit.weights.tensors
    fmt = unit.key_format
    scale = (fmt.by_role(unit.quantized[key]) if fmt is not None and fmt.backend == backend else {}).get("scale")
    if (backend == "quanto" and weights not in ("float8", "int4")) or scale is None:
        return f"cannot check a {backend} {weights!r} weight against the source"
    ref = pt.sources[0] if pt is not None and len(pt.sources) == 1 else None
    parts = None
    if ref is not None and ref.scale is not None and transforms.is_view(pt.rule):
        parts = get_backend(backend).from_scaled_fp8(weights, ref, tuple(pt.shape))
    if parts is None:
        parts = get_backend(backend).quantize(weights, expected.to(DTYPES[refs[scale].dtype]))
    prefix = key.rsplit(".", 1)[0]
    for part, want in parts.items():
        out_key = f"{prefix}.{part}"
        if out_key in refs and not torch.equal(read_tensor(refs[out_key]), want):
            return f"{out_key} is not the source quantized to {weights}"
    return ""
