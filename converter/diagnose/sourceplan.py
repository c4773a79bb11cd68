"""The conversion plan of the original checkpoint a Diffusers folder came from (`--source`): what
each output tensor must be, rule by rule.  Shared by verify (compare) and repair (restore)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from ..component import ComponentPlan, plan_component
from ..discover import discover
from ..errors import ConversionError
from ..mapping.tables import load_table
from ..plan.plan import DTYPE_CHOICES, FLOAT_TAGS
from .examine import given_overrides


def source_path(src: Path, component: str, instance: str | None = None) -> Path:
    """Where the source keeps `instance` (transformer_2: a Wan 2.2 A14B repo's low-noise expert)
    when it has it, else `component`."""
    found = discover(Path(src))
    name = instance if instance in found else component
    if name not in found:
        have = ", ".join(found) or "nothing"
        raise ConversionError(f"{src}: --source holds no {component} weights (it holds {have})")
    return found[name]


def dtype_choice(tags: list[str]) -> str:
    """The convert --dtype that gives these output dtypes: the most common float dtype."""
    floats = Counter(t for t in tags if t in FLOAT_TAGS)
    if not floats:
        return "keep"
    tag = floats.most_common(1)[0][0]
    return next((k for k, v in DTYPE_CHOICES.items() if v == tag), "keep")


def plan_from_source(component: str, src: Path, out_config: dict | None, dtype: str = "keep",
                     instance: str | None = None, variant: str | None = None) -> ComponentPlan:
    """Plan the source as convert would. Facts the source cannot tell (e.g. a CLIP head count)
    come from the output's config.json, as `--set` would give them. `instance`: which of the
    source's instances (transformer_2: the low-noise expert of a Wan 2.2 A14B repo); `variant`:
    the table variant the output holds (Animate's CLIP vision tower without its projection)."""
    path = source_path(src, component, instance)
    try:
        cp = plan_component(component, path, dtype, variant=variant)
    except ConversionError:
        overrides = given_overrides(load_table(component), out_config or {})
        if not overrides:
            raise
        cp = plan_component(component, path, dtype, overrides, variant=variant)
    if not cp.plan.ok:
        raise ConversionError(f"{path}: {component}: the source's coverage check fails: {cp.plan.problems[0]}",
                              cp.plan.problems)
    return cp
