"""The quantization policy (mappings/quantization.yaml): the backend, the weight dtypes offered,
and per component which modules stay float (`modules_to_not_convert`), validated when loaded and
checked against the target model when planned."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator

from ..errors import ConversionError
from ..mapping.schema import Strict
from ..mapping.tables import parse_yaml, tables_root
from .backend import BACKENDS, OFFERS

POLICY_FILE = "quantization.yaml"
MODULE_NAME = r"^([A-Za-z_][A-Za-z0-9_]*|[0-9]+)$"  # an attribute name: diffusers matches the last path part


class ComponentPolicy(Strict):
    classes: list[str] = Field(min_length=1)  # the target classes this policy may quantize
    modules_to_not_convert: list[str]

    @field_validator("modules_to_not_convert")
    @classmethod
    def names(cls, v: list[str]) -> list[str]:
        import re

        bad = [n for n in v if not re.match(MODULE_NAME, n)]
        if bad:
            raise ValueError(f"{bad[0]!r} is not a module attribute name (diffusers matches the last "
                             f"part of a module's path, e.g. proj_out, not condition_embedder.time_proj)")
        dup = sorted({n for n in v if v.count(n) > 1})
        if dup:
            raise ValueError(f"{dup[0]!r} is listed twice")
        return v


class BackendPolicy(Strict):
    """The policy of a further backend (mappings/quantization.yaml `backends:`)."""

    description: str
    weights: list[str] = Field(min_length=1)
    components: dict[str, ComponentPolicy] = Field(min_length=1)


class Policy(Strict):
    schema_version: int = Field(ge=1, le=1)
    description: str
    backend: str  # the default backend, whose policy is this one
    weights: list[str] = Field(min_length=1)
    components: dict[str, ComponentPolicy] = Field(min_length=1)
    backends: dict[str, BackendPolicy] = {}

    def for_backend(self, name: str | None) -> "Policy":
        """The policy of backend `name` (None: the default), as a Policy of its own."""
        if name is None or name == self.backend:
            return self
        if name not in self.backends:
            known = ", ".join([self.backend, *self.backends])
            raise ConversionError(f"{policy_path()}: no policy for the {name!r} backend (known: {known})")
        b = self.backends[name]
        return Policy(schema_version=self.schema_version, description=b.description, backend=name, weights=b.weights,
                      components=b.components)

    @field_validator("backend")
    @classmethod
    def known_backend(cls, v: str) -> str:
        if v not in BACKENDS:
            raise ValueError(f"unknown backend {v!r} (known: {', '.join(BACKENDS)})")
        return v

    @field_validator("backends")
    @classmethod
    def known_backends(cls, v: dict) -> dict:
        unknown = [k for k in v if k not in BACKENDS]
        if unknown:
            raise ValueError(f"unknown backend {unknown[0]!r} (known: {', '.join(BACKENDS)})")
        return v


def choose_backend(weights: str, name: str | None) -> str:
    """The backend that writes `weights`: `name` when given; else the default backend when it
    offers them, else the first further backend that does (int4 -> quanto). A backend that does not
    offer them is left to plan_quantized, which says what it offers."""
    if name is not None:
        return name
    policy = _load_file()
    if weights in policy.weights:
        return policy.backend
    return next((b for b, spec in policy.backends.items() if weights in spec.weights), policy.backend)


def policy_path() -> Path:
    return Path(str(tables_root().joinpath(POLICY_FILE)))


def load_policy(backend: str | None = None) -> Policy:
    """The policy of `backend` (None: the default backend)."""
    return _load_file().for_backend(backend)


@lru_cache(maxsize=None)
def _load_file() -> Policy:
    path = policy_path()
    try:
        return parse_policy(path.read_text(encoding="utf-8"), str(path))
    except OSError as e:
        raise ConversionError(f"{path}: cannot read the quantization policy: {e.strerror or e}") from None


def parse_policy(text: str, where: str) -> Policy:
    policy = parse_yaml(text, where, Policy, "quantization policy")
    for name in [policy.backend, *policy.backends]:
        sub = policy.for_backend(name)
        offered = OFFERS[name]
        unknown = [w for w in sub.weights if w not in offered]
        if unknown:
            raise ConversionError(f"{where}: invalid quantization policy at weights: backend {name} "
                                  f"offers {', '.join(offered)}, not {unknown[0]!r}")
    return policy


def component_policy(component: str, class_name: str, backend: str | None = None) -> ComponentPolicy:
    policy = load_policy(backend)
    spec = policy.components.get(component)
    if spec is None or class_name not in spec.classes:
        raise ConversionError(f"{class_name} ({component}) cannot be quantized: {policy_path()} has no policy "
                              f"for it (quantizable: {', '.join(c for p in policy.components.values() for c in p.classes)})")
    return spec
