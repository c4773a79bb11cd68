"""Find a component's weights on disk and read their headers: a folder with one file, a sharded
folder with an index, or a single file whose keys may carry a prefix.  Only headers are read."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConversionError
from ..write.naming import index_name
from .files import load_json, parse_json, what_is
from .safetensors_file import SafetensorsHeader, TensorRef, read_header


@dataclass
class SourceCheckpoint:
    path: Path
    layout: str  # "folder", "sharded folder" or "single file"
    files: list[Path]
    tensors: dict[str, TensorRef]  # canonical key (prefix removed) -> where its bytes are
    original_config: dict | None = None
    prefix: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    fp8: object = None  # a converter.fp8.Fp8Source when the file holds fp8 weights (their scales folded in)

    @property
    def total_bytes(self) -> int:
        return sum(r.nbytes for r in self.tensors.values())


# the safetensors metadata entry in which a single file wan2diffusers writes carries its source's
# config.json, where the weights cannot tell it (a transformer diffusers has no class for: Wan 2.2 S2V)
CARRIED_CONFIG = "wan2diffusers.config.json"


def open_safetensors_source(path: Path, weights_name: str, strip_prefixes: list[str]) -> SourceCheckpoint:
    """`weights_name` is e.g. diffusion_pytorch_model.safetensors; its index is `<name>.index.json`."""
    path = Path(path)
    if not path.exists():
        raise ConversionError(f"{path}: no such file or folder")
    if path.is_file():
        header = read_header(path)
        prefix = common_prefix(header.tensors, strip_prefixes)
        tensors = {k[len(prefix):]: r for k, r in header.tensors.items()}
        carried = header.metadata.get(CARRIED_CONFIG) if header.metadata else None
        config = parse_json(carried, path, "carried config.json") if carried is not None else None
        if config is not None and not isinstance(config, dict):
            raise ConversionError(f"{path}: its carried config.json ({CARRIED_CONFIG}) is not a JSON object")
        return SourceCheckpoint(path, "single file", [path], tensors, config, prefix, header.metadata)

    config_path = path / "config.json"
    config = load_json(config_path, "config") if config_path.exists() else None
    if config is not None and not isinstance(config, dict):
        raise ConversionError(f"{config_path}: not a JSON object")
    index_path = path / index_name(weights_name)
    single_path = path / weights_name
    if index_path.exists():
        files, tensors = read_index(path, index_path)
        return SourceCheckpoint(path, "sharded folder", files, tensors, config)
    if single_path.exists():
        header = read_header(single_path)
        return SourceCheckpoint(path, "folder", [single_path], dict(header.tensors), config,
                                metadata=header.metadata)
    stray = sorted(p.name for p in path.glob("*.safetensors"))
    hint = f" (found {', '.join(stray[:3])}; pass the file itself)" if stray else ""
    raise ConversionError(f"{path}: no {weights_name} or {index_path.name} in this folder{hint}")


def common_prefix(tensors: dict[str, TensorRef], candidates: list[str]) -> str:
    for prefix in sorted(candidates, key=len, reverse=True):
        if tensors and all(k.startswith(prefix) for k in tensors):
            return prefix
    return ""


def load_index(index_path: Path) -> tuple[dict, dict]:
    """A shard index (strict JSON): its weight_map (key -> shard file name) and its metadata; the one
    reader of an index, for the planner (read_index) and for diagnosis (diagnose/layout.py)."""
    index = load_json(index_path, "index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise ConversionError(f"{index_path}: no weight_map in the index")
    metadata = index.get("metadata")
    return weight_map, metadata if isinstance(metadata, dict) else {}


def read_index(folder: Path, index_path: Path) -> tuple[list[Path], dict[str, TensorRef]]:
    weight_map, _ = load_index(index_path)
    if not weight_map:
        raise ConversionError(f"{index_path}: no weight_map in the index")
    headers: dict[str, SafetensorsHeader] = {}
    for name in dict.fromkeys(weight_map.values()):
        if not isinstance(name, str) or not name:
            raise ConversionError(f"{index_path}: a weight_map entry is not a file name: {name!r}")
        # lexically: the Hub cache's snapshot files are symlinks into ../../blobs, which is fine
        parts = Path(os.path.normpath(name)).parts
        if Path(name).is_absolute() or not parts or parts[0] == "..":
            raise ConversionError(f"{index_path}: {name!r} points outside the source folder")
        shard = folder / name
        kind = what_is(shard)
        if kind != "a regular file":
            raise ConversionError(f"{index_path}: names {name}, which "
                                  + ("does not exist" if kind == "missing" else f"is {kind}, not a shard file"))
        headers[name] = read_header(folder / name)

    owner: dict[str, str] = {}
    for name, header in headers.items():
        for key in header.tensors:
            if key in owner:
                raise ConversionError(f"{folder}: duplicate key {key} in {owner[key]} and {name}")
            owner[key] = name
    tensors: dict[str, TensorRef] = {}
    for key, name in weight_map.items():
        ref = headers[name].tensors.get(key)
        if ref is None:
            where = f" (it is in {owner[key]})" if key in owner else ""
            raise ConversionError(f"{index_path}: key {key} is not in {name}{where}")
        tensors[key] = ref
    unlisted = sorted(set(owner) - set(weight_map))
    if unlisted:
        raise ConversionError(
            f"{folder / owner[unlisted[0]]}: holds {unlisted[0]}, which {index_path.name} does not list"
            + (f" (and {len(unlisted) - 1} more)" if len(unlisted) > 1 else ""), unlisted)
    return [folder / n for n in headers], tensors


def open_pth_source(path: Path, file_names: list[str], strip_prefixes: list[str]) -> SourceCheckpoint:
    """A `torch.save` state dict: the file itself, or a folder holding one of `file_names`."""
    from .pth_file import read_pth_index

    path = Path(path)
    if path.is_dir():
        found = [path / n for n in file_names if os.path.lexists(path / n)]
        if not found:
            raise ConversionError(f"{path}: none of {', '.join(file_names)} in this folder")
        path = found[0]
    elif not path.exists():
        raise ConversionError(f"{path}: no such file or folder")
    refs = read_pth_index(path)
    prefix = common_prefix(refs, strip_prefixes)
    return SourceCheckpoint(path, "pth file", [path], {k[len(prefix):]: r for k, r in refs.items()}, None, prefix)
