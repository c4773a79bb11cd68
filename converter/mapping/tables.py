"""Load the YAML mapping tables shipped as package data (wan2diffusers.mappings)."""

from __future__ import annotations

import re
from functools import lru_cache
from importlib import resources
from pathlib import Path

import yaml
from pydantic import ValidationError

from ..errors import ConversionError
from .schema import Table

TABLE_PACKAGE = __name__.split(".")[0] + ".mappings"  # wan2diffusers.mappings


# pipeline order
KNOWN_COMPONENTS = ("transformer", "vae", "text_encoder", "image_encoder")


def tables_root():
    """Installed: the package data `wan2diffusers.mappings`. Imported from a source checkout that is
    not installed (e.g. `python -m pytest` in the clone): the checkout's top-level mappings/."""
    try:
        return resources.files(TABLE_PACKAGE)
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "mappings"


def table_names() -> list[str]:
    """The components that have a table shipped, in pipeline order."""
    root = tables_root()
    return [c for c in KNOWN_COMPONENTS if root.joinpath(f"{c}.yaml").is_file()]


def table_path(component: str):
    return tables_root().joinpath(f"{component}.yaml")


@lru_cache(maxsize=None)
def load_table(component: str) -> Table:
    path = table_path(component)
    if not path.is_file():
        raise ConversionError(f"no mapping table for component {component!r} ({path})")
    return parse_table(path.read_text(encoding="utf-8"), str(path))


CONSTANTS = "constants.safetensors"  # fixed tensors a drop rule's `restore` names (scripts/make_constants.py)


def constants_path() -> Path:
    return Path(str(tables_root().joinpath(CONSTANTS)))


@lru_cache(maxsize=None)
def _variants_of(class_name: str) -> tuple:
    """Every table variant whose target is this class."""
    return tuple(v for name in table_names() for v in load_table(name).variants if v.target_class == class_name)


def no_class(class_name: str) -> str | None:
    """Why a table variant's target class does not exist in diffusers yet (`no_class`), or None."""
    return next((v.no_class for v in _variants_of(class_name) if v.no_class), None)


def target_key_prefix(class_name: str) -> str:
    """The `key_prefix` a table variant declares for this target class ("" when none does)."""
    return next((v.key_prefix for v in _variants_of(class_name) if v.key_prefix), "")


# libyaml's safe loader where PyYAML was built with it (its wheels are): the same objects as the
# pure-Python SafeLoader (tests/unit/test_tables.py compares every shipped table), about 8x faster:
# the tables were a third of a start before it
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def parse_yaml(text: str, where: str, model, what: str, locate=None):
    """Parse a YAML data file into a pydantic `model`; a file that does not fit is one line naming
    the file and where (`locate(data, loc)` may name the place better than the raw path)."""
    try:
        data = yaml.load(text, Loader=SAFE_LOADER)
    except yaml.YAMLError as e:
        raise ConversionError(f"{where}: not valid YAML: {e}".replace("\n", " ")) from None
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        loc = first["loc"]
        at = (locate(data, loc) if locate else None) or ".".join(str(x) for x in loc) or "top level"
        raise ConversionError(f"{where}: invalid {what} at {at}: {first['msg']}") from None


def _rule_location(data, loc) -> str | None:
    if len(loc) >= 2 and loc[0] == "rules" and isinstance(loc[1], int):
        rule = data["rules"][loc[1]]
        return f"rule {loc[1] + 1} ({rule.get('from') if isinstance(rule, dict) else rule!r})"
    return None


def parse_table(text: str, where: str) -> Table:
    table = parse_yaml(text, where, Table, "table", _rule_location)
    undeclared = {name for r in table.rules for t in r.sources + r.targets
                  for name in re.findall(r"\{(\w+)\}", t)} - set(table.placeholders)
    undeclared -= {n for v in table.placeholders.values() for n in getattr(v, "nested", [])}  # bound by a Nested
    if undeclared:
        raise ConversionError(f"{where}: placeholders {sorted(undeclared)} are used but not declared")
    return table


def table_file(component: str) -> Path:
    return Path(str(table_path(component)))
