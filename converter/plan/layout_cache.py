"""A cache of target layouts: what the target model built on the meta device yields (state-dict
keys and shapes, the modules kept in float32, tied keys, the config.json it saves) depends only
on its class, its constructor arguments and the installed library versions.  Building it means
importing diffusers/transformers (seconds); a cached layout needs neither.

Location: $WAN2DIFFUSERS_CACHE, else $XDG_CACHE_HOME/wan2diffusers/layouts, else
~/.cache/wan2diffusers/layouts.  WAN2DIFFUSERS_CACHE=off disables it.  An unreadable, stale or
tampered entry is ignored and rebuilt; a cache that cannot be written is skipped silently."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

ENV = "WAN2DIFFUSERS_CACHE"
LIBRARIES = ("diffusers", "transformers", "torch")


def cache_dir() -> Path | None:
    value = os.environ.get(ENV)
    if value == "off":
        return None
    if value:
        return Path(value)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "wan2diffusers" / "layouts"


def _version(lib: str) -> str:
    try:
        return version(lib)
    except PackageNotFoundError:
        return "absent"


def _key(class_name: str, config: dict[str, Any]) -> str:
    from .. import __version__

    blob = json.dumps({"class": class_name, "config": config, "tool": __version__,
                       "versions": {lib: _version(lib) for lib in LIBRARIES}}, sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()


def _digest(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _path(folder: Path, class_name: str, key: str) -> Path:
    return folder / f"{class_name}-{key[:24]}.json"


def load(class_name: str, config: dict[str, Any]) -> dict | None:
    folder = cache_dir()
    if folder is None:
        return None
    key = _key(class_name, config)
    try:
        entry = json.loads(_path(folder, class_name, key).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    payload = entry.get("layout") if isinstance(entry, dict) else None
    if entry.get("key") != key or not isinstance(payload, dict) or entry.get("sha256") != _digest(payload):
        return None
    return payload


def store(class_name: str, config: dict[str, Any], library: str, payload: dict) -> None:
    folder = cache_dir()
    if folder is None:
        return
    key = _key(class_name, config)
    entry = {"key": key, "class": class_name, "library": library, "sha256": _digest(payload), "layout": payload}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(entry, f)
        os.replace(tmp, _path(folder, class_name, key))
    except OSError:
        pass
