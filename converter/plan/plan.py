"""From headers alone: which rule consumes each source key, which target key each output comes
from, its shape and dtype, and the coverage proof (every source key used or dropped once, every
target key produced once with the right shape).  Nothing is read or written here."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..mapping import transforms
from ..mapping.rules import resolve_layouts, template_for
from ..mapping.schema import Rule, Table
from ..read.safetensors_file import TensorRef, itemsize
from ..read.source import SourceCheckpoint
from .detect import Detection
from .target import TargetModel

FLOAT_TAGS = {"F64", "F32", "F16", "BF16"}
DTYPE_CHOICES = {"keep": None, "fp32": "F32", "bf16": "BF16", "fp16": "F16"}


@dataclass
class PlannedTensor:
    key: str  # target key
    shape: tuple[int, ...]
    dtype: str  # safetensors tag written
    sources: list[TensorRef]
    rule: Rule
    part: int  # which output of the rule (chunk)

    @property
    def nbytes(self) -> int:
        return itemsize(self.dtype) * _numel(self.shape)

    @property
    def is_elementwise(self) -> bool:
        """Only the name, the view or the dtype changes: values keep their order, so a cast can
        stream chunk by chunk."""
        return self.rule.op in ("rename", "squeeze", "unsqueeze", "reshape") and self.sources[0].stride is None

    @property
    def is_byte_copy(self) -> bool:
        """The output is the source's bytes unchanged: the kernel can copy it."""
        src = self.sources[0]
        return (self.rule.op in ("rename", "squeeze", "unsqueeze", "reshape") and self.dtype == src.dtype
                and src.stride is None)


@dataclass
class Dropped:
    key: str
    reason: str


@dataclass
class Plan:
    detection: Detection
    target: TargetModel
    tensors: list[PlannedTensor]  # in target state-dict order
    dropped: list[Dropped]
    problems: list[str] = field(default_factory=list)  # coverage failures; empty = proven

    @property
    def ok(self) -> bool:
        return not self.problems


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def active_rules(table: Table, variant: str) -> list[tuple[int, Rule]]:
    return [(i, r) for i, r in enumerate(table.rules) if r.variant is None or variant in r.variant]


def build_plan(table: Table, src: SourceCheckpoint, det: Detection, target: TargetModel,
               dtype: str = "keep") -> Plan:
    rules = active_rules(table, det.variant)
    problems: list[str] = []
    lay = resolve_layouts(table, det.facts)  # nested placeholders: flat index <-> (stage, block)
    # 1. every source key is matched by exactly one active rule
    instances: dict[tuple, dict[int, str]] = {}  # (rule index, bindings) -> {source slot: key}
    unknown = []
    for key in src.tensors:
        hits = []
        for i, rule in rules:
            for slot, text in enumerate(rule.sources):
                b = template_for(table, text, lay).match(key)
                if b is not None:
                    hits.append((i, slot, b))
        if not hits:
            unknown.append(key)
            continue
        if len({h[0] for h in hits}) > 1:
            problems.append(f"{key}: matched by more than one rule ({[table.rules[h[0]].sources for h in hits]})")
            continue
        i, slot, b = hits[0]
        instances.setdefault((i, tuple(sorted(b.items()))), {})[slot] = key
    for key in unknown:
        problems.append(f"{_where(src, key)}: no rule knows {key}")

    produced: dict[str, PlannedTensor] = {}
    dropped: list[Dropped] = []
    for (i, bindings), slots in instances.items():
        rule = table.rules[i]
        b = dict(bindings)
        if len(slots) != len(rule.sources):
            gone = [template_for(table, t, lay).fill(b) for s, t in enumerate(rule.sources) if s not in slots]
            problems.append(f"{src.path}: missing key {gone[0]} (needed with {slots[min(slots)]})")
            continue
        refs = [src.tensors[slots[s]] for s in range(len(rule.sources))]
        if rule.op == "drop":
            dropped.extend(Dropped(r.key, rule.reason) for r in refs)
            continue
        try:
            shapes = transforms.output_shapes(rule, [r.shape for r in refs])
        except transforms.ShapeError as e:
            problems.append(f"{_where(src, slots[0])}: {slots[0]} has the wrong shape: {e}")
            continue
        for part, (text, shape) in enumerate(zip(rule.targets, shapes)):
            out_key = template_for(table, text, lay).fill(b)
            if out_key in produced:
                problems.append(f"{out_key} would be produced twice (from {slots[0]} and {produced[out_key].sources[0].key})")
                continue
            produced[out_key] = PlannedTensor(out_key, shape, "", refs, rule, part)

    # 2. every target key is produced exactly once with the right shape
    for key, pt in produced.items():
        if key not in target.shapes:
            problems.append(f"{_where(src, pt.sources[0].key)}: {pt.sources[0].key} maps to {key}, "
                            f"which {target.class_name} ({det.variant}) does not have")
        elif tuple(target.shapes[key]) != tuple(pt.shape):
            problems.append(f"{_where(src, pt.sources[0].key)}: {pt.sources[0].key} has the wrong shape: "
                            f"{list(pt.sources[0].shape)}, {target.class_name} needs {list(target.shapes[key])}")
    for key in target.shapes:
        if key not in produced:
            problems.append(f"{src.path}: missing key {_expected_source(table, rules, key, lay)} (for {key})")

    out_tag = DTYPE_CHOICES[dtype]
    ordered = []
    for key in target.shapes:
        pt = produced.get(key)
        if pt is None:
            continue
        src_tag = pt.sources[0].dtype
        if out_tag and src_tag in FLOAT_TAGS and not _keep_fp32(key, target.keep_in_fp32, out_tag):
            pt.dtype = out_tag
        elif out_tag and src_tag in FLOAT_TAGS:
            pt.dtype = "F32"
        else:
            pt.dtype = src_tag
        ordered.append(pt)
    return Plan(det, target, ordered, dropped, problems)


def _keep_fp32(key: str, modules: list[str], out_tag: str) -> bool:
    """diffusers keeps `_keep_in_fp32_modules` in float32 when loading in half precision; storing
    them in half would lose what the upcast cannot give back."""
    return out_tag in ("F16", "BF16") and any(m in key.split(".") for m in modules)


def _where(src: SourceCheckpoint, key: str) -> str:
    ref = src.tensors.get(key)
    return str(ref.file) if ref is not None else str(src.path)


def _expected_source(table: Table, rules, target_key: str, lay: dict | None = None) -> str:
    """Run the table backwards to name the source key that should have produced target_key."""
    for _, rule in rules:
        for text in rule.targets:
            b = template_for(table, text).match(target_key)
            if b is not None:
                try:
                    return " + ".join(template_for(table, s, lay).fill(b) for s in rule.sources)
                except KeyError:  # a nested index outside its layout
                    continue
    return "(no rule produces it)"
