"""The target model, built on the meta device from the derived config: its class, its exact
state-dict keys and shapes (parameters and persistent buffers), and the config file it saves."""

from __future__ import annotations

import importlib
import re
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConversionError
from ..quiet import quiet_imports
from . import layout_cache

LIBRARIES = ("diffusers", "transformers")


@dataclass
class TargetModel:
    class_name: str
    library: str
    config: dict[str, Any]  # the constructor arguments it was built from
    shapes: dict[str, tuple[int, ...]]  # state-dict order, as save_pretrained writes it
    keep_in_fp32: list[str]
    # transformers tied weights left out of `shapes`: key -> the key written in its place
    # (save_pretrained writes one tensor per tied group; from_pretrained re-ties the others)
    tied: dict[str, str] = field(default_factory=dict)
    config_json: str = ""  # exactly what the library's save_config writes as config.json
    _model: Any = None
    missing: str = ""  # a variant diffusers has no class for (its table's `no_class`): why; shapes None

    @property
    def model(self):
        """The model on the meta device (holds no memory); built on first use."""
        if self._model is None:
            self._model = _instantiate(self.class_name, self.config)[1]
        return self._model

    def save_config(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(self.config_json, encoding="utf-8")


def model_class(class_name: str):
    for lib in LIBRARIES:
        with quiet_imports():  # the lazy module imports the class's own modules on first access
            module = importlib.import_module(lib)
            cls = getattr(module, class_name, None)
        if cls is not None:
            return lib, cls
    raise ConversionError(f"neither diffusers nor transformers has a class {class_name!r}")


def class_signature(class_name: str) -> tuple[str, list[str]]:
    """(library, constructor parameter names; [] for transformers classes, which take a config
    object) of a target class: from the layout cache, else by importing it (seconds)."""
    cached = layout_cache.load_signature(class_name)
    if cached is not None:
        return cached
    import inspect

    library, cls = model_class(class_name)
    params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"] if library == "diffusers" else []
    layout_cache.store_signature(class_name, library, params)
    return library, params


def _instantiate(class_name: str, config: dict[str, Any]):
    import torch

    library, cls = model_class(class_name)
    try:
        with torch.device("meta"):
            if library == "diffusers":
                return library, cls(**config)
            return library, cls(cls.config_class(**config))
    except Exception as e:  # noqa: BLE001 - a derived config the class refuses is a bug to report clearly
        raise ConversionError(f"{class_name} refuses the derived config: {type(e).__name__}: {e}") from None


def _saved_config(library: str, model) -> str:
    """What save_pretrained writes as config.json, captured as text."""
    with tempfile.TemporaryDirectory() as tmp:
        if library == "diffusers":
            model.save_config(tmp)
        else:
            model.config.architectures = [type(model).__name__]  # as save_pretrained records it
            model.config.save_pretrained(tmp)
        return (Path(tmp) / "config.json").read_text(encoding="utf-8")


def build_target(class_name: str, config: dict[str, Any]) -> TargetModel:
    """The target's layout. Building the model needs diffusers/transformers imported (seconds);
    the layout it yields depends only on the class, the config and the library versions, so it
    is kept in the layout cache (converter/plan/layout_cache.py) and reused."""
    from ..mapping.tables import no_class, target_key_prefix

    why = no_class(class_name)
    if why is not None:  # nothing to build: the plan proves the keys against the rules alone
        return TargetModel(class_name, "none", dict(config), None, [], {}, "", None, why)
    pre = target_key_prefix(class_name)  # the files' keys: the model's own behind a declared prefix
    cached = layout_cache.load(class_name, config)
    if cached is not None:
        return TargetModel(class_name, cached["library"], dict(config),
                           {pre + k: tuple(v) for k, v in cached["shapes"].items()}, cached["keep_in_fp32"],
                           {pre + k: pre + v for k, v in cached["tied"].items()}, cached["config_json"])
    library, model = _instantiate(class_name, config)
    tied = tied_copies(model, class_name) if library == "transformers" else {}
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in tied}
    keep = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    target = TargetModel(class_name, library, dict(config), {pre + k: v for k, v in shapes.items()}, keep,
                         {pre + k: pre + v for k, v in tied.items()}, _saved_config(library, model), model)
    layout_cache.store(class_name, config, library, {
        "library": library, "shapes": {k: list(v) for k, v in shapes.items()}, "keep_in_fp32": keep,
        "tied": tied, "config_json": target.config_json})
    return target


def tied_copies(model, class_name: str) -> dict[str, str]:
    """The state-dict keys a transformers `save_pretrained` leaves out because they are the same
    tensor as another key (tied weights), mapped to the key it keeps.  As save_pretrained does:
    group the keys by tensor identity; in each group drop, in sorted order, the keys the modules
    declare tied (`_tied_weights_keys`: a dict of tied -> source in transformers 5, a list of
    patterns in 4), keeping at least one."""
    groups: dict[int, list[str]] = defaultdict(list)
    for name, t in model.named_parameters(remove_duplicate=False):
        groups[id(t)].append(name)
    declared = []
    for prefix, module in model.named_modules():
        for pattern in getattr(module, "_tied_weights_keys", None) or []:  # dict -> its keys
            declared.append(f"{prefix}.{pattern}" if prefix else pattern)
    sd_keys = set(model.state_dict())
    tied: dict[str, str] = {}
    for names in groups.values():
        names = sorted(n for n in names if n in sd_keys)
        if len(names) < 2:
            continue
        drop = [n for n in names if any(re.search(p, n) for p in declared)][:len(names) - 1]
        keep = [n for n in names if n not in drop]
        if len(keep) > 1:
            raise ConversionError(f"{class_name}: {keep} share one tensor but are not declared tied; "
                                  f"cannot tell which one save_pretrained would write")
        tied.update({n: keep[0] for n in drop})
    return tied
