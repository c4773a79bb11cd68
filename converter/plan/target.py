"""The target model, built on the meta device from the derived config: its class, its exact
state-dict keys and shapes (parameters and persistent buffers), and the config file it saves."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ConversionError

LIBRARIES = ("diffusers", "transformers")


@dataclass
class TargetModel:
    class_name: str
    library: str
    model: Any  # on the meta device: holds no memory
    shapes: dict[str, tuple[int, ...]]  # state-dict order, as save_pretrained writes it
    keep_in_fp32: list[str]

    def save_config(self, folder: Path) -> None:
        if self.library == "diffusers":
            self.model.save_config(str(folder))
        else:
            self.model.config.save_pretrained(str(folder))


def model_class(class_name: str):
    for lib in LIBRARIES:
        module = importlib.import_module(lib)
        cls = getattr(module, class_name, None)
        if cls is not None:
            return lib, cls
    raise ConversionError(f"neither diffusers nor transformers has a class {class_name!r}")


def build_target(class_name: str, config: dict[str, Any]) -> TargetModel:
    library, cls = model_class(class_name)
    try:
        with torch.device("meta"):
            if library == "diffusers":
                model = cls(**config)
            else:
                model = cls(cls.config_class(**config))
    except Exception as e:  # noqa: BLE001 - a derived config the class refuses is a bug to report clearly
        raise ConversionError(f"{class_name} refuses the derived config: {type(e).__name__}: {e}") from None
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    keep = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    return TargetModel(class_name, library, model, shapes, keep)
