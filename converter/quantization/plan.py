"""The quantized variant of a planned component, from shapes alone: which Linear weights are
written quantized (the policy and the backend's rule), the entries each becomes (key, dtype,
shape: the safetensors headers are written from these before any data), the proof that they are
exactly what the loader expects, and, while writing, each weight read, quantized and handed out
part by part.  converter/component.py writes `ComponentPlan.quantized` when it is set."""

from __future__ import annotations

import ctypes
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ConversionError
from ..plan.plan import FLOAT_TAGS, PlannedTensor
from ..plan.target import build_target
from ..read.safetensors_file import DTYPES, TAGS, LazyRows, TensorRef, read_tensor
from .backend import QuantBackend, get_backend
from .policy import choose_backend, component_policy, load_policy, policy_path

FLOAT_DTYPES = {torch.float64, torch.float32, torch.float16, torch.bfloat16}


@dataclass
class QuantizedTensor:
    """One entry a quantized module stores that is not one of its float tensors."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    weight: PlannedTensor  # the float weight it is computed from
    part: str  # the entry's name relative to the module

    @property
    def nbytes(self) -> int:
        return torch.empty((), dtype=DTYPES[self.dtype]).element_size() * math.prod(self.shape)


@dataclass
class QuantizedPlan:
    backend: QuantBackend
    weights: str
    keep_float: list[str]
    modules: list[str]  # the modules written quantized
    tensors: list[PlannedTensor | QuantizedTensor]  # everything written, in the loader's state-dict order
    config: dict[str, Any]  # quantization_config
    float_bytes: int  # what the float output would take
    float_keys: list[str] = field(default_factory=list)  # the float model's state-dict keys, in order
    widths: dict[str, tuple[int, str]] = field(default_factory=dict)  # quantized module -> (in_features, dtype)
    _parts: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)
    _next: dict = field(default_factory=dict, repr=False)  # weight key -> the weight the writer asks for next
    _ahead: dict = field(default_factory=dict, repr=False)  # weight key -> Future of its quantized parts
    _pool: Any = field(default=None, repr=False)

    def file_metadata(self) -> dict[str, str]:
        """What every written file's metadata holds besides {"format": "pt"} (the backend's)."""
        return self.backend.file_metadata(self.weights, self.float_keys, self.widths)

    @property
    def bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def expect(self, entries: list) -> None:
        """The order the writer will ask for `entries` in: while the parts of one weight are written,
        the next weight is quantized on another thread (torch and file reads release the GIL), one
        weight ahead at most (memory: two quantized weights)."""
        weights = list({e.weight.key: e.weight for e in entries if isinstance(e, QuantizedTensor)}.values())
        self._next = {a.key: b for a, b in zip(weights, weights[1:])}  # weight key -> the weight after it

    def _quantize(self, weight: PlannedTensor) -> dict[str, torch.Tensor]:
        ref = weight.sources[0]
        if ref.scale is not None and not ref.deltas and weight.is_elementwise:  # a ComfyUI fp8_scaled weight: kept as stored?
            parts = self.backend.from_scaled_fp8(self.weights, ref, tuple(weight.shape))
            if parts is not None:
                return parts
        w = float_weight(weight)
        parts = self.backend.quantize(self.weights, w)
        del w
        release_freed_memory()
        return parts

    def _prefetch_after(self, key: str) -> None:
        from concurrent.futures import ThreadPoolExecutor

        following = self._next.get(key)
        if following is not None and following.key not in self._ahead and following.key not in self._parts:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1)
            self._ahead[following.key] = self._pool.submit(self._quantize, following)

    def close(self) -> None:
        """Stop quantizing ahead (after the last file, or a failure)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._ahead.clear()

    def produce(self, entry) -> TensorRef | torch.Tensor:
        """The value of a planned entry: a float one as the float conversion makes it; a quantized
        part from its weight, quantized once (ahead of time, see expect) and freed with its last part."""
        from ..component import produce

        if isinstance(entry, PlannedTensor):
            return produce(entry)
        module = entry.weight.key
        parts = self._parts.get(module)
        if parts is None:
            future = self._ahead.pop(module, None)
            parts = self._parts[module] = future.result() if future is not None else self._quantize(entry.weight)
            self._prefetch_after(module)
        value = parts.pop(entry.part)
        if not parts:
            del self._parts[module]
        return value

    def write_config(self, folder: Path) -> None:
        """Add `quantization_config` to the config.json the float plan wrote, formatted as
        diffusers' save_config writes it (sorted keys, indent 2)."""
        path = folder / "config.json"
        config = json.loads(path.read_text(encoding="utf-8"))
        config["quantization_config"] = self.config
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    def describe(self) -> dict:
        return {"backend": self.backend.name, "weights": self.weights, "policy": str(policy_path()),
                "modules_to_not_convert": self.config["modules_to_not_convert"],
                "quantized_modules": len(self.modules), "bytes": self.bytes, "float_bytes": self.float_bytes,
                "dtypes": sorted({t.dtype for t in self.tensors})}


_trim = None  # glibc's malloc_trim, once looked up


def release_freed_memory() -> None:
    """Give the heap's free pages back to the OS (glibc malloc_trim).  Quantizing leaves many
    freed temporaries of a few MB in the heap, which glibc keeps: without this the RSS creeps up
    by hundreds of MB over a 14B model.  A no-op where there is no glibc."""
    global _trim
    if _trim is None:
        try:
            _trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _trim = False
    if _trim:
        _trim(0)



def float_weight(pt: PlannedTensor):
    """A planned float weight as the float conversion would write it: read lazily, a slice of
    rows at a time, when only its name/dtype change (LazyRows); else in memory (produce() gives
    a TensorRef to copy, an iterator of cast chunks, or a tensor)."""
    from ..component import produce

    if pt.is_elementwise and len(pt.shape) == 2:
        return LazyRows(pt.sources[0], pt.shape, DTYPES[pt.dtype])

    item = produce(pt)
    if isinstance(item, TensorRef):
        return read_tensor(item).reshape(pt.shape)
    if isinstance(item, torch.Tensor):
        return item.reshape(pt.shape)
    buf, done = bytearray(pt.nbytes), 0
    for chunk in item:
        n = len(memoryview(chunk).cast("B"))
        buf[done:done + n] = memoryview(chunk).cast("B")
        done += n
    if done != pt.nbytes:
        raise AssertionError(f"{pt.key}: planned {pt.nbytes} bytes, produced {done}")
    return torch.frombuffer(buf, dtype=DTYPES[pt.dtype]).reshape(pt.shape)


def plan_quantized(cp, weights: str, backend_name: str | None = None) -> QuantizedPlan:
    """`cp`: a ComponentPlan whose coverage is proven (converter.convert). `backend_name`: None
    for the policy's default backend."""
    target = cp.plan.target
    backend_name = choose_backend(weights, backend_name)
    policy = load_policy(backend_name)
    if weights not in policy.weights:
        raise ConversionError(f"{policy_path()}: the {policy.backend} backend offers {', '.join(policy.weights)} "
                              f"weights, not {weights!r}")
    spec = component_policy(cp.component, target.class_name, backend_name)
    backend = get_backend(policy.backend)
    keep_float = list(spec.modules_to_not_convert)
    modules, expected, qconfig = loader_layout(backend, target, weights, keep_float)

    by_key = {pt.key: pt for pt in cp.plan.tensors}
    own: dict[str, dict[str, PlannedTensor]] = {}  # quantized module -> its float tensors by name
    for pt in cp.plan.tensors:
        module, _, name = pt.key.rpartition(".")
        own.setdefault(module, {})[name] = pt
    planned: dict[str, PlannedTensor | QuantizedTensor] = {k: pt for k, pt in by_key.items()}
    for module in modules:
        params = own.get(module, {})
        weight = params.get("weight")
        if weight is None or len(weight.shape) != 2 or weight.dtype not in FLOAT_TAGS:
            found = "nothing" if weight is None else f"{weight.dtype} {list(weight.shape)}"
            raise ConversionError(f"{cp.source.path}: {module}.weight: expected a 2-D float weight to "
                                  f"quantize, the plan has {found}")
        del planned[weight.key]
        for e in backend.module_entries(weights, weight.shape, weight.dtype, "bias" in params):
            if e.name in params:
                continue  # one of its float tensors (the bias): written as planned
            planned[f"{module}.{e.name}"] = QuantizedTensor(f"{module}.{e.name}", e.dtype, e.shape, weight, e.name)

    # the proof: exactly the keys and shapes the loader will build, in its order
    problems = []
    for key in sorted(set(planned) - set(expected)):
        problems.append(f"{key}: planned, but the quantized {target.class_name} has no such entry")
    for key in sorted(set(expected) - set(planned)):
        problems.append(f"{key}: the quantized {target.class_name} expects it, nothing produces it")
    for key, (dtype, shape) in expected.items():
        t = planned.get(key)
        if t is None:
            continue
        if tuple(t.shape) != shape:
            problems.append(f"{key}: planned shape {list(t.shape)}, the loader expects {list(shape)}")
        elif dtype not in FLOAT_DTYPES and t.dtype != TAGS[dtype]:
            problems.append(f"{key}: planned dtype {t.dtype}, the loader expects {TAGS[dtype]}")
    if problems:
        raise ConversionError(f"{cp.source.path}: {cp.component}: the quantized layout does not match what "
                              f"{target.class_name}.from_pretrained expects; nothing was written", problems)
    tensors = [planned[k] for k in expected]
    widths = {m: (own[m]["weight"].shape[1], own[m]["weight"].dtype) for m in modules}
    return QuantizedPlan(backend, weights, keep_float, modules, tensors, qconfig,
                         sum(pt.nbytes for pt in cp.plan.tensors), list(target.shapes), widths)


def loader_layout(backend: QuantBackend, target, weights: str, keep_float: list[str]):
    """(the modules written quantized, what the loader expects: key -> (dtype, shape) in its order,
    the quantization_config) for `target` (a TargetModel) quantized by `backend`.  All three come
    from the model built on the meta device and quantized as the loader does it (the backend
    imports diffusers and its library: seconds), so they are kept in the layout cache beside the
    target's layout, keyed by everything they depend on (class, config, backend, weights, the
    modules kept float, the versions of diffusers, transformers, torch and the backend's library)."""
    from ..plan import layout_cache
    from .formats import PACKAGES

    libraries = (PACKAGES[backend.name].partition(">")[0],)
    keyed = {"config": target.config, "backend": backend.name, "weights": weights, "keep_float": keep_float,
             "keep_in_fp32": target.keep_in_fp32}
    cached = layout_cache.load_derived("quantized", target.class_name, keyed, libraries)
    if _well_formed(cached):
        return (cached["modules"], {k: (DTYPES[tag], tuple(shape)) for k, tag, shape in cached["expected"]},
                cached["config"])
    check_policy_names(backend, target.model, keep_float, target.class_name)
    modules = backend.quantized_modules(target.model, keep_float)
    fresh = build_target(target.class_name, target.config).model  # the backend quantizes this one
    expected = backend.loader_state_dict(fresh, weights, keep_float, target.keep_in_fp32)
    qconfig = backend.config(weights, keep_float, target.keep_in_fp32)
    layout_cache.store_derived("quantized", target.class_name, keyed, {
        "modules": modules, "config": qconfig,
        "expected": [[k, TAGS[dtype], list(shape)] for k, (dtype, shape) in expected.items()]}, libraries)
    return modules, expected, qconfig


def _well_formed(payload) -> bool:
    """The shape of what loader_layout stores: anything else is ignored (and rebuilt)."""
    if not isinstance(payload, dict) or not isinstance(payload.get("config"), dict):
        return False
    modules, expected = payload.get("modules"), payload.get("expected")
    return (isinstance(modules, list) and all(isinstance(m, str) for m in modules)
            and isinstance(expected, list)
            and all(isinstance(e, list) and len(e) == 3 and isinstance(e[0], str) and e[1] in DTYPES
                    and isinstance(e[2], list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                       for d in e[2])
                    for e in expected))


def check_policy_names(backend: QuantBackend, model: torch.nn.Module, keep_float: list[str], class_name: str) -> None:
    """A name that keeps nothing float (e.g. a parent module: diffusers' quanto backend only
    compares the names of the Linear modules themselves) is refused rather than pretended."""
    default = set(backend.quantized_modules(model, []))
    dead = [n for n in keep_float if set(backend.quantized_modules(model, [n])) == default]
    if dead:
        raise ConversionError(f"{policy_path()}: modules_to_not_convert names {', '.join(map(repr, dead))}, which "
                              f"keeps no module of {class_name} float with the {backend.name} backend "
                              f"(it matches the name of a quantized Linear, not of a parent module)")


def attach(cp, weights: str, backend: str | None = None) -> QuantizedPlan:
    """Plan the quantized variant of `cp` and make write_component write it."""
    cp.quantized = plan_quantized(cp, weights, backend)
    return cp.quantized


def quantize_plans(plans: list, infos: list[dict], weights: str, say, backend: str | None = None) -> None:
    """`convert --quantize`: the quantizable components of `plans` (those the policy names: the
    transformer) planned quantized; their report entries (describe()) updated in place."""
    from ..sizes import human_size

    backend = choose_backend(weights, backend)
    policy = load_policy(backend)
    chosen = [(cp, info) for cp, info in zip(plans, infos) if cp.component in policy.components]
    if not chosen:
        raise ConversionError(f"--quantize: none of the components to convert ({', '.join(cp.component for cp in plans)}) "
                              f"can be quantized (quantizable: {', '.join(policy.components)})")
    for cp, info in chosen:
        qp = attach(cp, weights, backend)
        q = qp.describe()
        info.update(bytes=q["bytes"], dtypes=q["dtypes"], quantization=q)
        say(f"{cp.folder}: quantized: {q['quantized_modules']} Linear weights to {weights} ({qp.backend.name}), "
            f"kept float: {', '.join(qp.keep_float)}; {human_size(q['float_bytes'])} -> {human_size(q['bytes'])}")
