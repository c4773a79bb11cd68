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

from ..read.files import what_is

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
    entry = _read(_path(folder, class_name, key))
    if entry is None:
        return None
    payload = entry.get("layout")
    if entry.get("key") != key or not isinstance(payload, dict) or entry.get("sha256") != _digest(payload):
        return None
    return payload if _well_formed(payload) else None


def _read(path: Path) -> dict | None:
    """A cache entry as JSON, or None (absent, unreadable, not an object)."""
    if what_is(path) != "a regular file":  # absent, or something no cache write makes (a FIFO would block)
        return None
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return entry if isinstance(entry, dict) else None


def _write(folder: Path, path: Path, entry: dict) -> None:
    """Into a new file renamed over `path`; a cache that cannot be written is skipped silently."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(entry, f)
        os.replace(tmp, path)
    except OSError:
        pass


def _well_formed(payload: dict) -> bool:
    """The shape of what store() writes: anything else is ignored (and rebuilt), never trusted."""
    shapes, tied = payload.get("shapes"), payload.get("tied")
    return (payload.get("library") in ("diffusers", "transformers")
            and isinstance(shapes, dict)
            and all(isinstance(k, str) and isinstance(v, list) and all(isinstance(d, int) and not isinstance(d, bool)
                                                                      and d >= 0 for d in v)
                    for k, v in shapes.items())
            and isinstance(payload.get("keep_in_fp32"), list)
            and all(isinstance(m, str) for m in payload["keep_in_fp32"])
            and isinstance(tied, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in tied.items())
            and isinstance(payload.get("config_json"), str))


def store(class_name: str, config: dict[str, Any], library: str, payload: dict) -> None:
    folder = cache_dir()
    if folder is None:
        return
    key = _key(class_name, config)
    _write(folder, _path(folder, class_name, key),
           {"key": key, "class": class_name, "library": library, "sha256": _digest(payload), "layout": payload})


def _signature_path(folder: Path, class_name: str, key: str) -> Path:
    return folder / f"{class_name}-signature-{key[:24]}.json"


def load_signature(class_name: str) -> tuple[str, list[str]] | None:
    """(library, constructor parameter names) of a target class, as store_signature kept them."""
    folder = cache_dir()
    if folder is None:
        return None
    key = _key(class_name, {"__signature__": 1})
    entry = _read(_signature_path(folder, class_name, key))
    if entry is None or entry.get("key") != key:
        return None
    library, params = entry.get("library"), entry.get("params")
    if library not in ("diffusers", "transformers") or not isinstance(params, list) \
            or not all(isinstance(p, str) for p in params):
        return None
    return library, params


def store_signature(class_name: str, library: str, params: list[str]) -> None:
    folder = cache_dir()
    if folder is None:
        return
    key = _key(class_name, {"__signature__": 1})
    _write(folder, _signature_path(folder, class_name, key),
           {"key": key, "class": class_name, "library": library, "params": params})
