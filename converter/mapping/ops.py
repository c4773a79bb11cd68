"""The closed set of tensor operations a table may use, one class each, registered in OPS.

An op knows how many source and target keys it takes and which rule arguments it needs (the
table schema asks it), the shapes it makes (so the plan is checked from headers alone), how to
apply itself, its inverse (so a table runs backwards: Diffusers -> original), and whether it is a
view: the values keep their bytes and order and only the name or shape changes, so the output can
be the source's bytes copied unchanged, or cast a chunk at a time (transformers 5's ConversionOps
are the model: an op and its reverse defined in one place). A new op is one class and one line
in OPS."""

from __future__ import annotations

import math
from typing import Any


class ShapeError(ValueError):
    pass


def _dim(d: int, ndim: int) -> int:
    if not -ndim <= d < ndim:
        raise ShapeError(f"dim {d} out of range for {ndim} dims")
    return d % ndim


class Op:
    name: str
    sources: int | None = 1  # how many source keys (None: two or more)
    targets: int | None = 1  # how many target keys (None: two or more)
    needs: tuple[str, ...] = ()  # the rule arguments it needs
    view: bool = False  # the bytes and their order are the source's: only the name or the shape changes
    inverse_name: str | None = None  # the op that undoes it (None: it cannot be undone)

    def shapes(self, rule, shapes: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        raise NotImplementedError

    def apply(self, rule, tensors: list) -> list:
        raise NotImplementedError

    def inverse_args(self, rule) -> dict[str, Any]:
        """The arguments of the inverse rule."""
        return {k: v for k, v in (("dim", rule.dim), ("dims", rule.dims)) if v is not None}


class Rename(Op):
    name, view, inverse_name = "rename", True, "rename"

    def shapes(self, rule, shapes):
        return [shapes[0]]

    def apply(self, rule, tensors):
        return [tensors[0]]


class Drop(Op):
    name, targets, needs = "drop", 0, ("reason",)

    def shapes(self, rule, shapes):
        return []

    def apply(self, rule, tensors):
        return []


class Chunk(Op):
    name, targets, needs, inverse_name = "chunk", None, ("dim",), "concat"

    def shapes(self, rule, shapes):
        s, parts = list(shapes[0]), len(rule.targets)
        d = _dim(rule.dim, len(s))
        if s[d] % parts:
            raise ShapeError(f"cannot chunk dim {d} of size {s[d]} into {parts} equal parts")
        s[d] //= parts
        return [tuple(s)] * parts

    def apply(self, rule, tensors):
        import torch

        return [t.contiguous() for t in torch.chunk(tensors[0], len(rule.targets), dim=rule.dim)]


class Concat(Op):
    name, sources, needs, inverse_name = "concat", None, ("dim",), "chunk"

    def shapes(self, rule, shapes):
        d = _dim(rule.dim, len(shapes[0]))
        rest = [tuple(x for i, x in enumerate(s) if i != d) for s in shapes]
        if len(set(rest)) != 1:
            raise ShapeError(f"cannot concatenate shapes {shapes} along dim {d}")
        s = list(shapes[0])
        s[d] = sum(x[d] for x in shapes)
        return [tuple(s)]

    def apply(self, rule, tensors):
        import torch

        return [torch.cat(tensors, dim=rule.dim)]


class Transpose(Op):
    name, needs, inverse_name = "transpose", ("dims",), "transpose"

    def shapes(self, rule, shapes):
        s = list(shapes[0])
        a, b = (_dim(x, len(s)) for x in rule.dims)
        s[a], s[b] = s[b], s[a]
        return [tuple(s)]

    def apply(self, rule, tensors):
        return [tensors[0].transpose(*rule.dims).contiguous()]


class Reshape(Op):
    name, needs, view, inverse_name = "reshape", ("shape", "undo_shape"), True, "reshape"

    def shapes(self, rule, shapes):
        s, want = shapes[0], list(rule.shape)
        if want.count(-1) == 1:
            known = math.prod(x for x in want if x != -1)
            if known == 0 or math.prod(s) % known:
                raise ShapeError(f"cannot reshape {list(s)} to {rule.shape}")
            want[want.index(-1)] = math.prod(s) // known
        if math.prod(want) != math.prod(s):
            raise ShapeError(f"cannot reshape {list(s)} to {rule.shape}")
        return [tuple(want)]

    def apply(self, rule, tensors):
        return [tensors[0].reshape(self.shapes(rule, [tuple(tensors[0].shape)])[0])]

    def inverse_args(self, rule):
        if rule.undo_shape is None:
            raise ValueError(f"a reshape rule ({rule.sources[0]}) without undo_shape cannot be inverted")
        return {"shape": list(rule.undo_shape), "undo_shape": list(rule.shape)}


class Squeeze(Op):
    name, needs, view, inverse_name = "squeeze", ("dim",), True, "unsqueeze"

    def shapes(self, rule, shapes):
        s = list(shapes[0])
        d = _dim(rule.dim, len(s))
        if s[d] != 1:
            raise ShapeError(f"cannot squeeze dim {d} of size {s[d]}")
        del s[d]
        return [tuple(s)]

    def apply(self, rule, tensors):
        return [tensors[0].squeeze(rule.dim)]


class Unsqueeze(Op):
    name, needs, view, inverse_name = "unsqueeze", ("dim",), True, "squeeze"

    def shapes(self, rule, shapes):
        s = list(shapes[0])
        s.insert(_dim(rule.dim, len(s) + 1), 1)
        return [tuple(s)]

    def apply(self, rule, tensors):
        return [tensors[0].unsqueeze(rule.dim)]


OPS: dict[str, Op] = {op.name: op for op in (Rename(), Chunk(), Concat(), Transpose(), Reshape(), Squeeze(),
                                             Unsqueeze(), Drop())}
