"""Diagnose one component from headers alone: its variant and size, the config its weights imply
(the table's facts run on the weights, backwards for Diffusers keys), what `from_pretrained`
would complain about (missing, unexpected, mis-shaped keys against the class built on the meta
device from the folder's config.json), and each problem with the fix `repair` or `convert`
applies."""

from __future__ import annotations

import inspect
import json
import math
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import ConversionError
from ..mapping.rules import resolve_layouts, template_for
from ..mapping.schema import Fixed, Nested
from ..plan.detect import Detection, detect, within_limits
from ..plan.plan import Plan, active_rules, build_plan
from ..plan.target import TargetModel, build_target, class_signature
from ..quantization.formats import describe_config
from ..read.files import config_class
from ..read.source import SourceCheckpoint
from .keys import original_view
from .layout import Unit

# repair names (converter/diagnose/repairs.py implements them)
CONVERT_IN_PLACE = "convert-in-place"
RESTORE = "restore-from-source"
REBUILD_INDEX = "rebuild-index"
COMPLETE_CONFIG = "complete-config"
REMOVE_LEFTOVERS = "remove-leftovers"


@dataclass
class Finding:
    code: str
    message: str
    fix: str
    repair: str | None = None  # the repair that fixes it; None: repair cannot (the fix says what can)
    keys: list[str] = field(default_factory=list)
    needs_source: bool = False

    def as_dict(self) -> dict:
        return {"code": self.code, "message": self.message, "fix": self.fix, "repair": self.repair,
                "needs_source": self.needs_source, "keys": self.keys}


@dataclass
class Diagnosis:
    unit: Unit
    detection: Detection | None = None  # from the weights
    target: TargetModel | None = None  # the class on meta, from config.json as from_pretrained builds it
    derived_target: TargetModel | None = None  # from the config the weights imply
    plan: Plan | None = None  # original layout: the conversion plan
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, list[int], list[int]]] = field(default_factory=list)
    config_missing: list[str] = field(default_factory=list)
    config_wrong: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    derived_config: dict = field(default_factory=dict)
    variant: str | None = None  # when the detection could not finish

    @property
    def healthy(self) -> bool:
        return not self.findings

    @property
    def layout_label(self) -> str:
        u = self.unit
        label = {"original": "original Wan", "diffusers": "Diffusers", "mixed": "mixed (half-converted)",
                 "unknown": "unknown"}[u.layout]
        if u.layout == "diffusers" and self.target is not None and self.target.library == "transformers":
            label = "transformers"
        if u.quantized:
            backend, weights = describe_config((u.config or {}).get("quantization_config")) or (u.key_format.backend if u.key_format else "?", "weights")
            label += f", quantized with {backend} ({weights})"
        if u.weights is not None and u.weights.prefix:
            label += f", single file with key prefix {u.weights.prefix!r}"
        elif u.where == "single file":
            label += ", single file"
        return label


def given_overrides(table, cfg: dict) -> dict:
    """The facts the weights cannot tell (the table reads them from a config: head count, eps,
    ...), fact name -> value, from a Diffusers/transformers config through the table's `config:`."""
    out = {}
    for name, entry in table.config.items():
        for e in entry if isinstance(entry, list) else [entry]:
            fact = e if isinstance(e, str) else e.fact
            f = table.facts.get(fact) if fact else None
            if f is not None and f.config is not None and name in cfg and cfg[name] is not None:
                out[fact] = cfg[name]
    return out


def given_facts(table, cfg: dict) -> dict:
    """given_overrides as the original config.json would have held them (field name -> value)."""
    return {table.facts[k].config: v for k, v in given_overrides(table, cfg).items()}


def derive(unit: Unit, keys: dict | None = None) -> Detection:
    """The table's facts on Diffusers weights: the keys mapped back to their original names."""
    table = unit.table
    keys = unit.keys if keys is None else keys
    given = given_facts(table, unit.config or {})

    def source(view):
        return SourceCheckpoint(unit.path, "diffusers", unit.weights.files, view, given)

    view = original_view(table, keys)
    if not view or not any(isinstance(v, (Nested, Fixed)) for v in table.placeholders.values()):
        return detect(table, source(view))
    # nested indices (a flat original list grouped by stage) need the facts to be named: derive
    # them first from the keys that need none, then name the rest
    pad = {k: next(iter(view.values())) for k in table.source.required_keys if k not in view}
    first = detect(table, source({**view, **pad}))
    return detect(table, source(original_view(table, keys, resolve_layouts(table, first.facts))))


def source_of(unit: Unit) -> SourceCheckpoint:
    """The unit's own weights as a conversion source (original layout)."""
    ws = unit.weights
    cfg = unit.config if unit.config_kind == "original" else None
    layout = {"sharded": "sharded folder", "single file": "folder" if unit.where != "single file" else "single file",
              "pth file": "pth file"}[ws.kind]
    return SourceCheckpoint(unit.path, layout, ws.files, dict(ws.tensors), cfg, ws.prefix)


def init_config(class_name: str, cfg: dict) -> dict:
    """What from_pretrained passes to the class: the config's fields the constructor takes
    (diffusers ignores the others); for transformers the whole config."""
    library, params = class_signature(class_name)
    if library != "diffusers":
        return {k: v for k, v in cfg.items() if k not in ("architectures", "transformers_version", "_name_or_path")}
    return {k: v for k, v in cfg.items() if k in params}


def compare(unit: Unit, target: TargetModel) -> tuple[list, list, list]:
    """(missing, unexpected, mismatched (key, shape here, shape expected)) of `unit`'s keys against
    `target`; a quantized weight stored in another shape (quanto int4) is not compared by shape."""
    keys = unit.keys
    unshaped = unit.key_format.unshaped(unit.quantized) if unit.key_format else set()
    have = {k: r for k, r in keys.items() if k not in target.tied}  # a stored tied copy loads fine
    missing = [k for k in target.shapes if k not in have]
    unexpected = sorted(k for k in have if k not in target.shapes)
    mismatched = []
    for k, shape in target.shapes.items():
        ref = have.get(k)
        if ref is None or k in unshaped:
            continue
        if tuple(ref.shape) != tuple(shape):
            mismatched.append((k, list(ref.shape), list(shape)))
    return missing, unexpected, mismatched


def _same(a, b) -> bool:
    return json.loads(json.dumps(a)) == json.loads(json.dumps(b))


def expected_source(unit: Unit, det: Detection, key: str) -> str | None:
    """The original key(s) a Diffusers key comes from (the table run backwards)."""
    table = unit.table
    for _, rule in active_rules(table, det.variant):
        for text in rule.targets:
            b = template_for(table, text).match(key)
            if b is not None:
                try:
                    return " + ".join(template_for(table, s).fill(b) for s in rule.sources)
                except KeyError:
                    return None
    return None


def settle_config(d: Diagnosis) -> None:
    """The config the weights imply. Where config.json gives another value and the class built
    with it still agrees with every key present (only some keys missing: a tensor a converter
    forgot), config.json is kept: the weights are incomplete, not the config. The variant is
    then detected with the missing keys put back in (their shapes from the class on meta)."""
    unit = d.unit
    det = derive(unit)
    merged = dict(det.config)
    for k, v in (unit.config or {}).items():
        if k in merged and not _same(merged[k], v):
            trial = {**merged, k: v}
            try:
                within_limits(unit.table, trial, unit.path / "config.json")
                t = build_target(det.target_class, trial)
            except ConversionError:
                continue
            _, unexpected, mismatched = compare(unit, t)
            if not unexpected and not mismatched:
                merged = trial
    target = build_target(det.target_class, merged)
    missing = [k for k in target.shapes if k not in unit.keys]
    if missing:
        fake = {k: replace(next(iter(unit.keys.values())), key=k, shape=tuple(target.shapes[k])) for k in missing}
        try:
            full = derive(unit, {**unit.keys, **fake})
            if _same(full.config, merged):
                det = full
        except ConversionError:
            pass
    d.detection, d.derived_config, d.derived_target = det, merged, target


def diagnose(unit: Unit, overrides: dict | None = None) -> Diagnosis:
    """`overrides`: facts given with --set for this component (repair converts in place with them)."""
    d = Diagnosis(unit)
    ws = unit.weights
    if ws is None:
        d.findings.append(Finding("no-weights", f"{unit.path}: no weights for {unit.component}",
                                  f"convert the original {unit.component} into it"))
        return d
    if ws.fatal:
        d.findings.append(Finding("unreadable-weights", "; ".join(ws.problems),
                                  "the shard is gone or corrupt: convert again from the original checkpoint "
                                  "(wan2diffusers convert SRC OUT)"))
        return d
    if ws.problems:
        d.findings.append(Finding("index", "; ".join(ws.problems), "rebuild the index from the shard headers",
                                  REBUILD_INDEX))
    if unit.layout == "mixed":
        _diagnose_mixed(d)
    elif unit.layout == "original" or ws.kind == "pth file":
        _diagnose_original(d, overrides)
    elif unit.layout == "diffusers":
        _diagnose_diffusers(d)
    else:
        d.findings.append(Finding("unknown-keys", f"{unit.path}: no key is a Wan {unit.component} key "
                                  f"(e.g. {', '.join(sorted(unit.keys)[:3])})", "none: not a Wan checkpoint"))
    if unit.layout == "diffusers" and not unit.comfy:
        _judge_quantization(d)
    if unit.comfy:
        _judge_comfy(d)
    if unit.leftovers:
        names = ", ".join(p.name for p in unit.leftovers)
        chosen = ws.index.name if ws.index is not None else ws.name
        confused = f"; from_pretrained would open {unit.loads} instead of {chosen}" if unit.loads not in (chosen, ws.name) else ""
        d.findings.append(Finding("leftovers", f"leftover files beside the weights: {names}{confused}",
                                  "move them into the backup", REMOVE_LEFTOVERS,
                                  [p.name for p in unit.leftovers]))
    return d


# the stored dtype of the values each backend's weight type holds (what its loader reads back)
DATA_DTYPES = {("torchao", "int8"): "I8", ("torchao", "float8"): "F8_E4M3", ("quanto", "int8"): "I8",
               ("quanto", "float8"): "F8_E4M3", ("quanto", "int4"): "U8"}


def _judge_quantization(d: Diagnosis) -> None:
    """"Healthy" means "loads as written": the weights' quantized format, the config's
    quantization_config and the modules the backend's loader will quantize must agree (a config
    edited to another backend leaves weights unused; a config naming an unknown torchao class fails
    to load; a float folder with a quantization_config is re-quantized or fails)."""
    unit = d.unit
    qc = (unit.config or {}).get("quantization_config")
    said = describe_config(qc)
    stored = unit.key_format.backend if unit.key_format is not None and unit.quantized else None
    fix = "convert or quantize again from the float folder (wan2diffusers quantize FLOAT OUT)"

    def problem(text: str) -> None:
        d.findings.append(Finding("quantization", text, fix))

    if qc is None:
        if stored:
            problem(f"the weights are quantized ({stored} format) but config.json has no quantization_config: "
                    f"from_pretrained would not load them")
        return
    if said is None:
        method = qc.get("quant_method") if isinstance(qc, dict) else None
        problem(f"config.json's quantization_config ({str(method)[:40]!r}) is not a torchao or quanto config "
                f"this tool can check; from_pretrained may not load it as written")
        return
    backend, weights = said
    if stored is None:
        problem(f"config.json says the weights are quantized with {backend} ({weights}), but they are float: "
                f"from_pretrained would fail or quantize them again")
        return
    if backend != stored:
        problem(f"the weights are stored in the {stored} format, but config.json's quantization_config says "
                f"{backend}: from_pretrained would leave them unused")
        return
    if backend == "torchao" and weights not in ("int8", "float8") and not _torchao_has(weights):
        problem(f"quantization_config names the torchao config {weights[:60]!r}, which torchao does not have: "
                f"from_pretrained fails")
        return
    want = DATA_DTYPES.get((backend, weights))
    data = {unit.weights.tensors[k].dtype for parts in unit.quantized.values() for k in parts
            if k in unit.weights.tensors and unit.key_format.by_role([k]).get("data") in (k,)}
    if want is None or (data and data != {want}):
        problem(f"quantization_config says {backend} {weights}, but the quantized values are stored as "
                f"{', '.join(sorted(data)) or '?'}")
        return
    if d.target is None or not isinstance(qc.get("modules_to_not_convert", []), (list, type(None))):
        return
    from ..quantization.backend import get_backend

    keep = list(qc.get("modules_to_not_convert") or [])
    try:
        expected = set(get_backend(backend).quantized_modules(d.target.model, keep))
    except ConversionError:
        return  # the backend is not installed: inspect says what it can
    have = {k.removesuffix(".weight") for k in unit.quantized}
    if expected != have:
        extra, lacking = sorted(expected - have), sorted(have - expected)
        problem(f"{backend}'s loader would quantize other modules than the ones stored quantized (with this "
                f"config's modules_to_not_convert): "
                + "; ".join(x for x in (f"{len(extra)} it expects quantized are float (e.g. {extra[0]})" if extra
                                         else "", f"{len(lacking)} stored quantized it would not expect (e.g. "
                                         f"{lacking[0]})" if lacking else "") if x))


def _torchao_has(name: str) -> bool:
    """Whether torchao (quietly imported) has a quantization config class of that name."""
    from ..quiet import quiet_imports

    try:
        with quiet_imports():
            import torchao.quantization as q
    except ImportError:
        return False
    cls = getattr(q, str(name), None)
    return isinstance(cls, type) and "Config" in cls.__name__


def _judge_comfy(d: Diagnosis) -> None:
    """A ComfyUI file is judged by what ComfyUI's loader reads (mappings/comfyui.yaml): the key
    layout, every key of the component (original keys: the conversion's coverage proof; Diffusers
    keys: the class's keys), no config.json (ComfyUI has none)."""
    unit = d.unit
    keep = {"unreadable-weights", "index"}
    d.findings = [f for f in d.findings if f.code in keep]
    if unit.layout != unit.comfy:
        d.findings.append(Finding("comfyui-keys", f"{unit.path}: ComfyUI's loader reads {unit.comfy} keys for a "
                                  f"{unit.component}; this file has {unit.layout} keys",
                                  "wan2diffusers convert <the Diffusers folder> OUT --to comfyui"))
    elif unit.comfy == "original" and d.plan is not None and not d.plan.ok:
        d.findings.append(Finding("comfyui-keys", f"{unit.path}: incomplete: {d.plan.problems[0]}",
                                  "convert it again from a complete checkpoint"))
    elif unit.comfy == "diffusers" and (d.missing or d.unexpected or d.mismatched):
        first = (d.missing or d.unexpected or [m[0] for m in d.mismatched])[0]
        d.findings.append(Finding("comfyui-keys", f"{unit.path}: its keys are not the {unit.component}'s "
                                  f"(e.g. {first})", "convert it again from a complete checkpoint"))


def _diagnose_mixed(d: Diagnosis) -> None:
    unit = d.unit
    cfg = unit.config or {}
    name = config_class(cfg)
    if unit.config_kind in ("diffusers", "transformers"):
        try:
            within_limits(unit.table, cfg, unit.path / "config.json")
            d.target = build_target(name, init_config(name, cfg))
            d.missing, d.unexpected, d.mismatched = compare(unit, d.target)
        except ConversionError as e:
            d.notes.append(f"config.json: {e}")
    orig = sorted(unit.sides.original)
    d.findings.append(Finding(
        "original-layout", f"mixed (half-converted): {len(orig)} key(s) still have their original Wan names "
        f"({', '.join(orig[:3])}{' ...' if len(orig) > 3 else ''}) beside {len(unit.sides.diffusers)} Diffusers names",
        "convert again from the original checkpoint (wan2diffusers convert SRC OUT)", None, orig))


def _diagnose_original(d: Diagnosis, overrides: dict | None = None) -> None:
    unit = d.unit
    try:
        src = source_of(unit)
        d.detection = detect(unit.table, src, overrides)
        d.derived_target = build_target(d.detection.target_class, d.detection.config)
        d.plan = build_plan(unit.table, src, d.detection, d.derived_target)
    except ConversionError as e:
        keys = unit.weights.tensors
        d.variant = next((v.name for v in unit.table.variants if all(k in keys for k in v.when_present)), None)
        d.findings.append(Finding("original-layout", f"original Wan layout; converting it needs more: {e}",
                                  f"wan2diffusers convert {unit.path} OUT, giving what the weights cannot tell "
                                  f"with --set {unit.component}.FACT=VALUE", None, sorted(unit.sides.original)))
        return
    if d.derived_target.missing:  # a variant diffusers has no class for (Wan 2.2 S2V): what it is, what works
        d.findings.append(Finding("original-layout", f"original Wan layout: {d.derived_target.missing}",
                                  f"wan2diffusers convert {unit.path} OUT.gguf --to gguf --quantize TYPE"
                                  + ("" if d.plan.ok else f" (its coverage check fails: {d.plan.problems[0]})"),
                                  None, sorted(unit.sides.original)))
        return
    d.target = d.derived_target
    d.missing, d.unexpected, d.mismatched = compare(unit, d.derived_target)
    in_place = unit.where == "component folder" and unit.layout == "original"
    fix = ("convert it in place (the original files go into the backup)" if in_place else
           f"wan2diffusers convert {unit.path} OUT")
    n_orig = len(unit.sides.original)
    msg = (f"{n_orig} key(s) in the original Wan layout where {d.derived_target.class_name} keys belong: "
           f"from_pretrained would report {len(d.unexpected)} unexpected and {len(d.missing)} missing keys")
    if not d.plan.ok:
        msg += f"; the conversion's coverage check fails: {d.plan.problems[0]}"
        in_place = False
    d.findings.append(Finding("original-layout", msg, fix, CONVERT_IN_PLACE if in_place else None,
                              sorted(unit.sides.original)))


def _diagnose_diffusers(d: Diagnosis) -> None:
    unit = d.unit
    cfg = unit.config
    if unit.config_kind == "unreadable":
        problem = unit.config_error
    elif cfg is None:
        problem = f"no config.json: from_pretrained cannot load {unit.path}"
    elif unit.config_kind not in ("diffusers", "transformers"):
        problem = f"config.json is not the config of a class the {unit.component} table targets ({config_class(cfg)!r})"
    else:
        problem = ""
        name = config_class(cfg)
        try:
            within_limits(unit.table, cfg, unit.path / "config.json")
            d.target = build_target(name, init_config(name, cfg))
        except ConversionError as e:
            problem = f"config.json: {e}"
    try:
        settle_config(d)
    except ConversionError as e:
        d.notes.append(f"cannot derive the config from the weights: {e}")
        if problem:
            problem += f"; it cannot be derived from the weights ({e})"
        elif d.target is not None:
            _, unexpected, mismatched = compare(unit, d.target)
            if unexpected or mismatched:
                absent = [k for k in inspect.signature(type(d.target.model).__init__).parameters
                          if k not in cfg and k not in ("self", "config")] if d.target.library == "diffusers" else []
                problem = ((f"config.json lacks {', '.join(absent)}; " if absent else "")
                           + f"the class it describes does not fit the weights, and the config cannot be derived "
                           f"from them ({e})")
    if problem:
        fix = ("write config.json derived from the weights" if d.derived_target else
               "put the values the weights cannot tell (e.g. the head count) in config.json, then run repair")
        d.findings.append(Finding("config", problem, fix, COMPLETE_CONFIG if d.derived_target else None))
    if d.target is not None:
        d.missing, d.unexpected, d.mismatched = compare(unit, d.target)
    if d.derived_target is not None and cfg is not None and not problem:
        d.config_missing = [k for k in d.derived_config if k not in cfg]
        d.config_wrong = {k: (cfg[k], v) for k, v in d.derived_config.items() if k in cfg and not _same(cfg[k], v)}
        if config_class(cfg) != d.derived_target.class_name:
            d.config_wrong["class"] = (config_class(cfg), d.derived_target.class_name)
        consistent = d.target is not None and not d.unexpected and not d.mismatched
        if consistent and not d.config_wrong:  # the class defaults fill the gaps with the right values
            if d.config_missing:
                d.notes.append(f"config.json omits {', '.join(d.config_missing)}; the class defaults agree with the weights")
        elif d.config_missing or d.config_wrong:
            parts = []
            if d.config_missing:
                parts.append(f"config.json lacks {', '.join(d.config_missing)} (from_pretrained would use the class defaults)")
            if d.config_wrong:
                parts.append("config.json contradicts the weights: " + ", ".join(
                    f"{k}={a!r} (weights: {b!r})" for k, (a, b) in d.config_wrong.items()))
            d.findings.append(Finding("config", "; ".join(parts), "complete/correct config.json from the weights",
                                      COMPLETE_CONFIG, d.config_missing + list(d.config_wrong)))
    # against the config the weights imply (what remains once config.json is right)
    ref = d.derived_target or d.target
    if ref is None or (d.derived_target is None and problem):
        return  # the keys cannot be judged before config.json is right
    missing, unexpected, mismatched = compare(unit, ref)
    if missing:
        origin = {k: expected_source(unit, d.detection, k) if d.detection else None for k in missing}
        msg = (f"{len(missing)} key(s) {ref.class_name} needs are missing: {', '.join(missing[:5])}"
               + (" ..." if len(missing) > 5 else ""))
        srcs = [v for v in origin.values() if v]
        fix = (f"restore from the original checkpoint: repair PATH --source SRC (reads {', '.join(srcs[:3])})" if srcs
               else "convert again from the original checkpoint")
        d.findings.append(Finding("missing-keys", msg, fix, RESTORE if srcs else None, missing, needs_source=True))
    if unexpected:
        d.findings.append(Finding("unexpected-keys", f"{len(unexpected)} key(s) {ref.class_name} does not have: "
                                  f"{', '.join(unexpected[:5])}" + (" ..." if len(unexpected) > 5 else ""),
                                  "none automatic (not Wan weights, e.g. a LoRA left in): convert again from the "
                                  "original checkpoint", None, unexpected))
    if mismatched:
        d.findings.append(Finding("mismatched-shapes", f"{len(mismatched)} key(s) have the wrong shape: " + ", ".join(
            f"{k} {a} (needs {b})" for k, a, b in mismatched[:5]),
                                  "convert again from the original checkpoint", None, [m[0] for m in mismatched]))


def summary(d: Diagnosis) -> dict:
    """Counts for the report: tensors, parameters, bytes, dtypes."""
    u = d.unit
    refs = list(u.weights.tensors.values()) if u.weights else []
    return {
        "tensors": len(refs),
        "parameters": sum(math.prod(r.shape) for k, r in u.keys.items()),
        "bytes": sum(r.nbytes for r in refs),
        "dtypes": dict(sorted(Counter(r.dtype for r in refs).items())),
    }
