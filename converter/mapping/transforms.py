"""The closed set of tensor operations a table may use.  Each knows the shapes it makes (so the
plan can be checked from headers alone), how to apply itself, and its inverse (so a table can
run backwards: Diffusers -> original)."""

from __future__ import annotations

import math

from .schema import Rule


class ShapeError(ValueError):
    pass


def output_shapes(rule: Rule, shapes: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    op = rule.op
    if op == "rename":
        return [shapes[0]]
    if op == "drop":
        return []
    if op == "chunk":
        s, parts = list(shapes[0]), len(rule.targets)
        d = _dim(rule.dim, len(s))
        if s[d] % parts:
            raise ShapeError(f"cannot chunk dim {d} of size {s[d]} into {parts} equal parts")
        s[d] //= parts
        return [tuple(s)] * parts
    if op == "concat":
        d = _dim(rule.dim, len(shapes[0]))
        rest = [tuple(x for i, x in enumerate(s) if i != d) for s in shapes]
        if len(set(rest)) != 1:
            raise ShapeError(f"cannot concatenate shapes {shapes} along dim {d}")
        s = list(shapes[0])
        s[d] = sum(x[d] for x in shapes)
        return [tuple(s)]
    if op == "transpose":
        s = list(shapes[0])
        a, b = (_dim(x, len(s)) for x in rule.dims)
        s[a], s[b] = s[b], s[a]
        return [tuple(s)]
    if op == "reshape":
        s, want = shapes[0], list(rule.shape)
        if want.count(-1) == 1:
            known = math.prod(x for x in want if x != -1)
            if known == 0 or math.prod(s) % known:
                raise ShapeError(f"cannot reshape {list(s)} to {rule.shape}")
            want[want.index(-1)] = math.prod(s) // known
        if math.prod(want) != math.prod(s):
            raise ShapeError(f"cannot reshape {list(s)} to {rule.shape}")
        return [tuple(want)]
    if op == "squeeze":
        s = list(shapes[0])
        d = _dim(rule.dim, len(s))
        if s[d] != 1:
            raise ShapeError(f"cannot squeeze dim {d} of size {s[d]}")
        del s[d]
        return [tuple(s)]
    if op == "unsqueeze":
        s = list(shapes[0])
        s.insert(_dim(rule.dim, len(s) + 1), 1)
        return [tuple(s)]
    raise AssertionError(op)


def apply(rule: Rule, tensors: list) -> list:
    import torch

    op = rule.op
    if op == "rename":
        return [tensors[0]]
    if op == "chunk":
        return [t.contiguous() for t in torch.chunk(tensors[0], len(rule.targets), dim=rule.dim)]
    if op == "concat":
        return [torch.cat(tensors, dim=rule.dim)]
    if op == "transpose":
        return [tensors[0].transpose(*rule.dims).contiguous()]
    if op == "reshape":
        return [tensors[0].reshape(output_shapes(rule, [tuple(tensors[0].shape)])[0])]
    if op == "squeeze":
        return [tensors[0].squeeze(rule.dim)]
    if op == "unsqueeze":
        return [tensors[0].unsqueeze(rule.dim)]
    raise AssertionError(op)


def inverse(rule: Rule) -> Rule:
    """The rule that undoes `rule` (source and target swapped).  `drop` has no inverse; a reshape's
    inverse takes the original shape the table gives (`undo_shape`)."""
    op = rule.op
    if op == "drop":
        raise ValueError(f"a drop rule ({rule.sources[0]}: {rule.reason}) cannot be inverted")
    inv = {"rename": "rename", "chunk": "concat", "concat": "chunk", "transpose": "transpose",
           "reshape": "reshape", "squeeze": "unsqueeze", "unsqueeze": "squeeze"}[op]
    args = {k: v for k, v in (("dim", rule.dim), ("dims", rule.dims)) if v is not None}
    if op == "reshape":
        if rule.undo_shape is None:
            raise ValueError(f"a reshape rule ({rule.sources[0]}) without undo_shape cannot be inverted")
        args["shape"], args["undo_shape"] = list(rule.undo_shape), list(rule.shape)
    to = rule.sources if len(rule.sources) > 1 else rule.sources[0]
    frm = rule.targets if len(rule.targets) > 1 else rule.targets[0]
    return Rule.model_validate({"from": frm, "to": to, "op": inv, **args})


def _dim(d: int, ndim: int) -> int:
    if not -ndim <= d < ndim:
        raise ShapeError(f"dim {d} out of range for {ndim} dims")
    return d % ndim
