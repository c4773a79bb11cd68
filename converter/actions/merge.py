"""`merge BASE OUT --lora [EXPERT=]FILE[:STRENGTH] ...` (and `convert --lora`): LoRAs merged into the
transformer while it is converted, one tensor at a time: W' = W + sum_i s_i * alpha_i/rank_i * (B_i @ A_i)
(+ diff), bias' = b + s_i * diff_b, modulation' = m + s_i * diff_m, in float32, then cast to the output
dtype. Each LoRA module is placed on the planned tensor it changes through the transformer table
(converter/lora.py); a LoRA module the model lacks or whose shape differs (a LoRA for another
variant, another size, the other expert) is refused naming it, never applied in part.

The merge rides on the writer's face (`ComponentPlan.quantized`: tensors, produce, expect, close,
file_metadata, write_config), so the Diffusers writer, its header check and the record are the
ones every conversion uses."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConversionError


@dataclass(frozen=True)
class LoraArg:
    path: Path
    strength: float = 1.0
    expert: str | None = None  # a transformer instance or expert folder (transformer_2, low_noise_model, low)

    @staticmethod
    def parse(text: str) -> "LoraArg":
        """`[EXPERT=]FILE[:STRENGTH]`; a `:` followed by a number ends the file name."""
        expert, _, rest = text.partition("=") if "=" in text.split("/")[0].split(":")[0] else ("", "", text)
        path, strength = rest, 1.0
        head, sep, tail = rest.rpartition(":")
        if sep and head:
            try:
                strength = float(tail)
                path = head
            except ValueError:
                pass
        if not path:
            raise ConversionError(f"--lora {text!r}: give [EXPERT=]FILE[:STRENGTH]")
        return LoraArg(Path(path), strength, expert or None)


@dataclass
class Change:
    lora: object  # a converter.lora.Lora
    module: str  # original naming
    role: str  # down/up pair ("ab"), diff, diff_b, bias, diff_m
    strength: float


@dataclass
class MergePlan:
    """The writer's face over a planned component: its own tensors, some of them changed."""

    cp: object
    changes: dict[str, list[Change]]  # planned (target) key -> what changes it
    tensors: list = field(default_factory=list)

    def file_metadata(self) -> dict[str, str]:
        return {}

    def expect(self, entries) -> None:
        pass

    def close(self) -> None:
        pass

    def write_config(self, folder) -> None:
        pass

    def produce(self, pt):
        from ..component import produce
        from ..read.safetensors_file import DTYPES, cast_checked, read_tensor

        changes = self.changes.get(pt.key)
        if not changes:
            return produce(pt)
        import torch

        w = read_tensor(pt.sources[0]).to(torch.float32).reshape(pt.shape)
        for c in changes:
            m = c.lora.modules[c.module]
            if c.role == "ab":
                a, b = (read_tensor(m.parts[r]).to(torch.float32) for r in ("down", "up"))
                delta = (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)) * m.scale()
            else:
                delta = read_tensor(m.parts[c.role]).to(torch.float32)
            w += c.strength * delta.reshape(w.shape)
        return cast_checked(w, DTYPES[pt.dtype], f"{pt.sources[0].file}: {pt.sources[0].key} (merged)")


def plan_merges(plans: list, args: list[LoraArg], say) -> list[dict]:
    """Attach a MergePlan to each transformer of `plans` that a LoRA is for; the report entries."""
    from ..lora import param_key, read_lora, rename_module

    transformers = [cp for cp in plans if cp.component == "transformer"]
    if not transformers:
        raise ConversionError("--lora: no transformer among the components to convert (a LoRA changes the transformer)")
    by_instance: dict[str, dict[str, list[Change]]] = {}
    reports = []
    for arg in args:
        cp = _instance(transformers, arg)
        lora = read_lora(arg.path)
        shapes = {pt.key: tuple(pt.shape) for pt in cp.plan.tensors}
        changes = by_instance.setdefault(cp.folder, {})
        touched = []
        for name in sorted(lora.modules):
            m = lora.modules[name]
            target = rename_module(name, "original", "diffusers")
            for role in m.parts:
                if role in ("down", "alpha"):
                    continue
                if role == "diff_m":
                    key = param_key(name, "diffusers")
                elif role in ("diff_b", "bias"):
                    key = f"{target}.bias" if target else None
                else:
                    key = f"{target}.weight" if target else None
                kind = "ab" if role == "up" else role
                if key is None or key not in shapes:
                    raise ConversionError(f"{arg.path}: {name} ({role}): {cp.folder} has no {key or name}: a LoRA for "
                                          f"another variant or size; nothing was written")
                want = shapes[key]
                have = _delta_shape(m, kind)
                if _numel(have) != _numel(want) or (kind == "ab" and (have[0] != want[0])):
                    raise ConversionError(f"{arg.path}: {name} ({role}) changes {key} {list(want)} by {list(have)}: a "
                                          f"LoRA for another size or variant; nothing was written")
                changes.setdefault(key, []).append(Change(lora, name, kind, arg.strength))
                touched.append(key)
        info = {"lora": str(arg.path), "format": lora.format, "strength": arg.strength, "instance": cp.folder,
                "modules": len(lora.modules), "tensors_changed": sorted(set(touched))}
        reports.append(info)
        say(f"  lora:     {arg.path} ({lora.format}, {len(lora.modules)} modules) x {arg.strength:g} -> {cp.folder}: "
            f"{len(set(touched))} tensors changed")
    for cp in transformers:
        if cp.folder in by_instance:
            if cp.quantized is not None:
                raise ConversionError("--lora with --quantize: merging into a quantized output is not supported yet; "
                                      "merge into a float folder, then quantize it")
            for key, cs in by_instance[cp.folder].items():
                pt = next(p for p in cp.plan.tensors if p.key == key)
                if not pt.is_elementwise:
                    raise ConversionError(f"{pt.sources[0].file}: {pt.sources[0].key} is made by a {pt.rule.op}: "
                                          f"a LoRA cannot be merged into it here")
            cp.quantized = MergePlan(cp, by_instance[cp.folder], list(cp.plan.tensors))
    return reports


def _instance(transformers: list, arg: LoraArg):
    if arg.expert is None:
        if len(transformers) > 1:
            names = ", ".join(cp.folder for cp in transformers)
            raise ConversionError(f"--lora {arg.path}: the model has {len(transformers)} experts ({names}); say which "
                                  f"one the LoRA is for: --lora high={arg.path} or --lora low={arg.path} (or the "
                                  f"instance name)")
        return transformers[0]
    from ..pipeline import load_pipeline_table

    aliases = {}
    for lay in load_pipeline_table().transformer_layouts:
        for instance, folder in lay.instances.items():
            if folder != ".":
                aliases[folder] = instance
                aliases[folder.split("_")[0]] = instance  # high_noise_model -> high
    want = aliases.get(arg.expert, arg.expert)
    for cp in transformers:
        if cp.folder == want:
            return cp
    raise ConversionError(f"--lora {arg.expert}={arg.path}: no transformer {arg.expert!r} here (have "
                          f"{', '.join(cp.folder for cp in transformers)})")


def _delta_shape(m, kind: str) -> tuple[int, ...]:
    if kind == "ab":
        a, b = m.parts["down"], m.parts["up"]
        import math

        return (b.shape[0], math.prod(a.shape[1:]))
    return tuple(m.parts[kind].shape)


def _numel(shape) -> int:
    import math

    return math.prod(shape)
