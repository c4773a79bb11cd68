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
FP8_TAGS = {"F8_E4M3", "F8_E5M2"}  # read as values (dequantized when scaled), cast by --dtype
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
        return transforms.is_view(self.rule) and self.sources[0].stride is None

    @property
    def is_byte_copy(self) -> bool:
        """The output is the source's bytes unchanged: the kernel can copy it."""
        src = self.sources[0]
        return (transforms.is_view(self.rule) and self.dtype == src.dtype and src.stride is None and src.scale is None
                and not src.deltas)


@dataclass
class Dropped:
    key: str
    reason: str


@dataclass(frozen=True)
class Direction:
    """Which way a table runs. forward: original -> Diffusers (a rule's `from` keys are read, its
    `to` keys written, through its op); backward: Diffusers -> original (`to` read, `from` written,
    through the op's inverse).  The class built on the meta device (the target) is always the
    Diffusers side: forward, the keys written are proven against it; backward, the keys read.
    same: Diffusers keys read and written as they are (ComfyUI's umT5 and CLIP vision files keep
    the transformers keys), proven like backward."""

    name: str

    @property
    def forward(self) -> bool:
        return self.name == "forward"

    def inputs(self, rule: Rule) -> list[str]:
        return rule.sources if self.forward else rule.targets

    def outputs(self, rule: Rule) -> list[str]:
        return {"forward": rule.targets, "backward": rule.sources, "same": rule.targets}[self.name]

    def op(self, rule: Rule) -> Rule | None:
        """The op that makes the outputs from the inputs; None: each input is its own output."""
        if self.name == "same":
            return None
        return rule if self.forward else transforms.inverse(rule)


FORWARD, BACKWARD, SAME = Direction("forward"), Direction("backward"), Direction("same")
KEEP = Rule.model_validate({"from": "x", "to": "x"})  # a tensor written as it is read


@dataclass
class Plan:
    detection: Detection
    target: TargetModel
    tensors: list[PlannedTensor]  # in target state-dict order
    dropped: list[Dropped]
    problems: list[str] = field(default_factory=list)  # coverage failures; empty = proven
    direction: Direction = FORWARD
    lost: list[Dropped] = field(default_factory=list)  # backward: original keys the way in dropped (patterns)

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
               dtype: str = "keep", direction: Direction = FORWARD) -> Plan:
    """The plan of one component in `direction`; `target` is the Diffusers class (meta)."""
    rules = active_rules(table, det.variant)
    problems: list[str] = []
    lay = resolve_layouts(table, det.facts)  # nested placeholders: flat index <-> (stage, block)
    dropped: list[Dropped] = []
    # 1. every source key is matched by exactly one active rule (backward: a stored tied copy of
    # another Diffusers key is no source of its own)
    instances: dict[tuple, dict[int, str]] = {}  # (rule index, bindings) -> {input slot: key}
    unknown = []
    for key in src.tensors:
        if not direction.forward and key in target.tied:
            dropped.append(Dropped(key, f"a tied copy of {target.tied[key]}"))
            continue
        hits = []
        for i, rule in rules:
            for slot, text in enumerate(direction.inputs(rule)):
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
    made_from: dict[str, list[str]] = {}  # input key -> the keys made from it
    for (i, bindings), slots in instances.items():
        rule = table.rules[i]
        inputs, outputs = direction.inputs(rule), direction.outputs(rule)
        b = dict(bindings)
        if len(slots) != len(inputs):
            gone = [template_for(table, t, lay).fill(b) for s, t in enumerate(inputs) if s not in slots]
            problems.append(f"{src.path}: missing key {gone[0]} (needed with {slots[min(slots)]})")
            continue
        refs = [src.tensors[slots[s]] for s in range(len(inputs))]
        if rule.op == "drop":  # forward only: a drop rule has no Diffusers side to match backwards
            dropped.extend(Dropped(r.key, rule.reason) for r in refs)
            continue
        op = direction.op(rule)
        if op is None:  # each input is written as it is, under its own name
            for s_, r in enumerate(refs):
                produced[slots[s_]] = PlannedTensor(slots[s_], tuple(r.shape), "", [r], KEEP, 0)
                made_from.setdefault(slots[s_], []).append(slots[s_])
            continue
        try:
            shapes = transforms.output_shapes(op, [r.shape for r in refs])
        except transforms.ShapeError as e:
            problems.append(f"{_where(src, slots[0])}: {slots[0]} has the wrong shape: {e}")
            continue
        for part, (text, shape) in enumerate(zip(outputs, shapes)):
            out_key = template_for(table, text, lay).fill(b)
            if out_key in produced:
                problems.append(f"{out_key} would be produced twice (from {slots[0]} and {produced[out_key].sources[0].key})")
                continue
            produced[out_key] = PlannedTensor(out_key, shape, "", refs, op, part)
            for s_ in range(len(inputs)):  # by the key the source lists it under
                made_from.setdefault(slots[s_], []).append(out_key)

    # 2. the Diffusers side is exactly the class's keys with its shapes: forward the keys written,
    # backward the keys read. A variant diffusers has no class for (target.missing): what the rules
    # make is all there is to prove (every source key taken by one rule, each output made once)
    if target.shapes is None:
        if not direction.forward:
            raise ValueError(f"{target.class_name}: no class to run the table backwards from")
        target.shapes = {k: tuple(pt.shape) for k, pt in produced.items()}
    if direction.forward:
        side = {k: (pt.shape, pt.sources[0].key) for k, pt in produced.items()}
    else:
        side = {k: (r.shape, k) for k, r in src.tensors.items() if k not in target.tied and k not in unknown}
    for key, (shape, origin) in side.items():
        if key not in target.shapes:
            problems.append(f"{_where(src, origin)}: {origin} maps to {key}, which {target.class_name} "
                            f"({det.variant}) does not have" if direction.forward else
                            f"{_where(src, origin)}: {key}: {target.class_name} ({det.variant}) has no such key")
        elif tuple(target.shapes[key]) != tuple(shape):
            shown = src.tensors[origin].shape
            problems.append(f"{_where(src, origin)}: {origin} has the wrong shape: "
                            f"{list(shown)}, {target.class_name} needs {list(target.shapes[key])}")
    for key in target.shapes:
        if key not in side:
            problems.append(f"{src.path}: missing key {_expected_source(table, rules, key, lay)} (for {key})"
                            if direction.forward else f"{src.path}: missing key {key} ({target.class_name} has it)")

    restored = [] if direction.forward else _restored(table, rules, lay, produced, problems)
    out_tag = DTYPE_CHOICES[dtype]
    if direction.forward:
        order = [produced[k] for k in target.shapes if k in produced]
    else:  # the original keys in the order of the Diffusers keys they come from
        seen: dict[str, PlannedTensor] = {}
        for key in target.shapes:
            for out_key in made_from.get(key, []):
                seen.setdefault(out_key, produced[out_key])
        order = list(seen.values()) + restored
    placed = {pt.key for pt in order}
    for key, pt in produced.items():  # every tensor planned is written: never a silent loss
        if key not in placed:
            problems.append(f"{_where(src, pt.sources[0].key)}: {key} is planned from {pt.sources[0].key} but "
                            f"placed in no output (the planner would lose it)")
    ordered = []
    fixed = {id(pt) for pt in restored}
    floats = [pt.sources[0].value_dtype for pt in order if id(pt) not in fixed]
    model_tag = max(set(floats) & FLOAT_TAGS, key=floats.count, default=None)
    for pt in order:
        src_tag = pt.sources[0].value_dtype
        if id(pt) in fixed and not out_tag:  # a restored constant takes the model's dtype
            pt.dtype = model_tag or src_tag
        elif out_tag and src_tag in FP8_TAGS:
            pt.dtype = out_tag  # fp8 only widens: no float32-only module loses anything
        elif out_tag and src_tag in FLOAT_TAGS and not (direction.forward and _keep_fp32(pt.key, target.keep_in_fp32, out_tag)):
            pt.dtype = out_tag
        elif out_tag and src_tag in FLOAT_TAGS:
            pt.dtype = "F32"
        else:
            pt.dtype = src_tag
        ordered.append(pt)
    lost = [] if direction.forward else [Dropped(" + ".join(r.sources), r.reason) for _, r in rules
                                         if r.op == "drop" and r.restore is None]
    return Plan(det, target, ordered, dropped, problems, direction, lost)


def _restored(table: Table, rules, lay: dict, produced: dict, problems: list[str]) -> list[PlannedTensor]:
    """Backward: every key of a drop rule with `restore`, written from mappings/constants.safetensors
    (a fixed value the original keeps and Diffusers rebuilds, e.g. Animate's blur kernels)."""
    import itertools

    from ..mapping.tables import constants_path
    from ..read.safetensors_file import read_header

    out = []
    for _, rule in rules:
        if rule.op != "drop" or rule.restore is None:
            continue
        const = read_header(constants_path()).tensors.get(rule.restore)
        if const is None:
            problems.append(f"mappings/{table.component}.yaml: restore {rule.restore!r}: no such constant")
            continue
        for text in rule.sources:
            t = template_for(table, text, lay)
            names = list(t.regex.groupindex)  # its placeholders, in order
            choices = []
            for name in names:
                spec = table.placeholders.get(name)
                if name in lay:
                    choices.append(list(lay[name].forward))
                elif isinstance(spec, list):
                    choices.append(spec)
                else:
                    problems.append(f"mappings/{table.component}.yaml: restore {text}: {{{name}}} cannot be enumerated")
                    break
            else:
                for values in itertools.product(*choices):
                    key = t.fill(dict(zip(names, values)))
                    if key in produced:
                        problems.append(f"{key} would be produced twice (restored and from {produced[key].sources[0].key})")
                        continue
                    out.append(PlannedTensor(key, tuple(const.shape), "", [const], KEEP, 0))
    return out


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
