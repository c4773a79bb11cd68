"""`merge BASE OUT --lora [EXPERT=]FILE[:STRENGTH] ...` (and `convert --lora`): LoRAs merged into the
transformer while it is converted, one tensor at a time: W' = W + sum_i s_i * alpha_i/rank_i * (B_i @ A_i)
(+ diff), bias' = b + s_i * diff_b, modulation' = m + s_i * diff_m, in float32, then cast to the output
dtype. Each LoRA module is placed on the planned tensor it changes through the transformer table
(converter/lora.py); a LoRA module the model lacks or whose shape differs (a LoRA for another
variant, another size, the other expert) is refused naming it, never applied in part.

The merge is folded into the source TensorRefs (`Delta`: B @ A x factor, or an added tensor): every
reader (the streamed cast, the row slices quantizers and GGUF read, whole reads) yields the merged
values, a slice at a time, so every output -- Diffusers at any dtype, torchao/quanto, GGUF, the
original layout, ComfyUI files, fp8_scaled -- merges, and no merged tensor is ever a byte copy."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConversionError


@dataclass(frozen=True)
class LoraArg:
    path: Path
    strength: float = 1.0
    expert: str | None = None  # a transformer instance or expert folder (transformer_2, low_noise_model, low)
    drop: bool = False  # --drop-unsupported: modules the model lacks are left out and listed, not refused

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


def plan_merges(plans: list, args: list[LoraArg], say, refs: dict | None = None) -> list[dict]:
    """Fold each LoRA into the source TensorRefs of the transformer it is for (read/safetensors_file
    Delta: every reader then yields the merged values, so every output merges); the report entries.
    `plans`: ComponentPlans (forward: Diffusers keys planned; backward: original keys); `refs`:
    instance -> {planned key -> TensorRef} a writer reads instead of the plan (GGUF), rewritten too."""
    from dataclasses import replace

    from ..lora import read_lora, rename_module
    from ..read.safetensors_file import Delta

    transformers = [cp for cp in plans if cp.component == "transformer"]
    if not transformers:
        raise ConversionError("--lora: no transformer among the components to convert (a LoRA changes the transformer)")
    by_instance: dict[str, dict[str, list]] = {}
    reports = []
    for arg in args:
        cp = _instance(transformers, arg)
        lora = read_lora(arg.path)
        naming = "diffusers" if cp.plan.direction.forward else "original"
        shapes = {pt.key: tuple(pt.shape) for pt in cp.plan.tensors}
        deltas = by_instance.setdefault(cp.folder, {})
        touched, skipped = [], []
        for name in sorted(lora.modules):
            m = lora.modules[name]
            target = name if naming == "original" else rename_module(name, "original", "diffusers")
            placed, problem = _placements(m, name, target, naming, shapes, cp.folder)
            if problem is not None:
                if arg.drop:
                    skipped.append(name)
                    continue
                raise ConversionError(f"{arg.path}: {name} {problem}; nothing was written")
            for kind, key in placed:
                delta = (Delta(arg.strength * m.scale(), up=m.parts["up"], down=m.parts["down"]) if kind == "ab"
                         else Delta(arg.strength, add=m.parts[kind]))
                deltas.setdefault(key, []).append(delta)
                touched.append(key)
        info = {"lora": str(arg.path), "format": lora.format, "strength": arg.strength, "instance": cp.folder,
                "modules": len(lora.modules), "tensors_changed": sorted(set(touched)), "left_out": skipped}
        reports.append(info)
        say(f"  lora:     {arg.path} ({lora.format}, {len(lora.modules)} modules) x {arg.strength:g} -> {cp.folder}: "
            f"{len(set(touched))} tensors changed"
            + (f"; left out (--drop-unsupported: not in this model): {', '.join(skipped)}" if skipped else ""))
    for cp in transformers:
        planned = {pt.key: pt for pt in cp.plan.tensors}
        owner = {r: k for k, r in cp.source.tensors.items()}  # a source ref -> the key the source lists it under
        mine = (refs or {}).get(cp.folder)
        for key, ds in by_instance.get(cp.folder, {}).items():
            pt = planned[key]
            old = pt.sources[0]
            if not pt.is_elementwise or len(pt.sources) != 1:
                raise ConversionError(f"{old.file}: {old.key} is made by a {pt.rule.op}: a LoRA cannot be merged "
                                      f"into it here")
            new = replace(old, deltas=old.deltas + tuple(ds))
            pt.sources = [new]
            if old in owner:
                cp.source.tensors[owner[old]] = new
            # a writer's own refs (GGUF from a Diffusers folder), unless they are the source's, rewritten above
            if mine is not None and key in mine and mine[key] is not cp.source.tensors.get(key):
                mine[key] = replace(mine[key], deltas=new.deltas)
    return reports


def _placements(m, name: str, target: str | None, naming: str, shapes: dict, instance: str):
    """Where each part of a LoRA module lands: [(kind, planned key)] ("ab" for the matrices), and the
    first reason it cannot (the model lacks the tensor, or its shape is not the delta's), else None."""
    from ..lora import param_key

    placed = []
    for role in m.parts:
        if role in ("down", "alpha"):
            continue
        if role == "diff_m":
            key = param_key(name, naming)
        elif role in ("diff_b", "bias"):
            key = f"{target}.bias" if target else None
        else:
            key = f"{target}.weight" if target else None
        kind = "ab" if role == "up" else role
        if key is None or key not in shapes:
            return placed, f"({role}): {instance} has no {key or name}: a LoRA for another variant or size"
        want, have = shapes[key], _delta_shape(m, kind)
        if math.prod(have) != math.prod(want) or (kind == "ab" and have[0] != want[0]):
            return placed, f"({role}) changes {key} {list(want)} by {list(have)}: a LoRA for another size or variant"
        placed.append((kind, key))
    return placed, None


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
        return (b.shape[0], math.prod(a.shape[1:]))
    return tuple(m.parts[kind].shape)
