"""A rule's op at work (the ops themselves, one class each: mapping/ops.py): the shapes it makes,
its values, and the rule that undoes it."""

from __future__ import annotations

from .ops import OPS, ShapeError  # noqa: F401 - ShapeError is what output_shapes raises
from .schema import Rule


def output_shapes(rule: Rule, shapes: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    return OPS[rule.op].shapes(rule, shapes)


def apply(rule: Rule, tensors: list) -> list:
    return OPS[rule.op].apply(rule, tensors)


def is_view(rule: Rule) -> bool:
    """The op keeps the source's bytes and their order (a rename, a reshape, a squeeze)."""
    return OPS[rule.op].view


def inverse(rule: Rule) -> Rule:
    """The rule that undoes `rule` (source and target swapped).  `drop` has no inverse; a reshape's
    inverse takes the original shape the table gives (`undo_shape`)."""
    op = OPS[rule.op]
    if op.inverse_name is None:
        raise ValueError(f"a {rule.op} rule ({rule.sources[0]}: {rule.reason}) cannot be inverted")
    to = rule.sources if len(rule.sources) > 1 else rule.sources[0]
    frm = rule.targets if len(rule.targets) > 1 else rule.targets[0]
    return Rule.model_validate({"from": frm, "to": to, "op": op.inverse_name, **op.inverse_args(rule)})
