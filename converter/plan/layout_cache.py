"""A cache of target layouts: what the target model built on the meta device yields (state-dict
keys and shapes, the modules kept in float32, tied keys, the config.json it saves) depends only
on its class, its constructor arguments and the installed library versions.  Building it means
importing diffusers/transformers (seconds); a cached layout needs neither.

Location: $WAN2DIFFUSERS_CACHE, else $XDG_CACHE_HOME/wan2diffusers/layouts, else
~/.cache/wan2diffusers/layouts.  WAN2DIFFUSERS_CACHE=off disables it.  An unreadable, stale or
tampered entry is ignored and rebuilt; a cache that cannot be written is skipped silently.

A cache must never change what is written. Every entry carries an HMAC-SHA256 made with a random
key that only this user can read (`.key` in the cache folder, mode 0600, created on first use): an
entry edited by anything but this tool -- even with a recomputed checksum -- does not verify and is
rebuilt. On load, what can be re-proven cheaply is re-proven too: the saved config names the class
and holds every constructor argument the weights gave, with those values. `verify` never reads the
cache (`bypassed`): the judge builds the model itself."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import stat
from contextlib import contextmanager
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from ..errors import ConversionError
from ..read.files import load_json

ENV = "WAN2DIFFUSERS_CACHE"
LIBRARIES = ("diffusers", "transformers", "torch")
KEY_FILE = ".key"
MAX_ENTRY_BYTES = 16 * 1024 * 1024  # a 14B layout is ~100 KB
_bypass = [False]


@contextmanager
def bypassed():
    """Neither read nor write the cache inside the block (verify builds every model itself)."""
    _bypass.append(True)
    try:
        yield
    finally:
        _bypass.pop()


def cache_dir() -> Path | None:
    value = os.environ.get(ENV)
    if value == "off" or _bypass[-1]:
        return None
    if value:
        return Path(value)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "wan2diffusers" / "layouts"


@lru_cache(maxsize=None)  # importlib.metadata walks sys.path each call; a process sees one install
def _version(lib: str) -> str:
    try:
        return version(lib)
    except PackageNotFoundError:
        return "absent"


def _key(class_name: str, config: dict[str, Any], libraries: tuple[str, ...] = ()) -> str:
    from ..version import __version__

    blob = json.dumps({"class": class_name, "config": config, "tool": __version__,
                       "versions": {lib: _version(lib) for lib in LIBRARIES + tuple(libraries)}},
                      sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()


def _secret(folder: Path, create: bool) -> bytes | None:
    """The cache's HMAC key: 32 random bytes in a 0600 file of this user's (made when `create`)."""
    path = folder / KEY_FILE
    try:
        if create and not os.path.lexists(path):
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(os.urandom(32))
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if (not stat.S_ISREG(st.st_mode) or st.st_mode & 0o077 or st.st_size != 32
                    or (hasattr(os, "getuid") and st.st_uid != os.getuid())):
                return None  # someone else could have read or written it: no entry is trusted
            return f.read(32)
    except OSError:
        return None


def _mac(secret: bytes, entry: dict) -> str:
    body = json.dumps({k: v for k, v in entry.items() if k != "mac"}, sort_keys=True)
    return hmac.new(secret, body.encode(), hashlib.sha256).hexdigest()


def _path(folder: Path, class_name: str, key: str) -> Path:
    return folder / f"{class_name}-{key[:24]}.json"


def load(class_name: str, config: dict[str, Any]) -> dict | None:
    folder = cache_dir()
    if folder is None:
        return None
    key = _key(class_name, config)
    entry = _read(folder, _path(folder, class_name, key))
    if entry is None:
        return None
    payload = entry.get("layout")
    if entry.get("key") != key or entry.get("class") != class_name or not isinstance(payload, dict):
        return None
    return payload if _well_formed(payload) and _agrees(payload, class_name, config) else None


def _read(folder: Path, path: Path) -> dict | None:
    """A cache entry whose HMAC verifies, or None (absent, unreadable, too large, not an object,
    not made by this tool with this user's key)."""
    try:
        entry = load_json(path, "layout cache entry", MAX_ENTRY_BYTES)  # regular files only: a FIFO would block
    except ConversionError:
        return None
    secret = _secret(folder, create=False)
    if not isinstance(entry, dict) or secret is None or not isinstance(entry.get("mac"), str):
        return None
    return entry if hmac.compare_digest(entry["mac"], _mac(secret, entry)) else None


def _write(folder: Path, path: Path, entry: dict) -> None:
    """Signed, into a new file renamed over `path` (write/atomic.replace_file); a cache that cannot
    be written is skipped silently, and leaves no temporary file behind."""
    from ..write.atomic import replace_file

    try:
        secret = _secret(folder, create=True)
        if secret is None:
            return
        replace_file(path, json.dumps({**entry, "mac": _mac(secret, entry)}))
    except OSError:
        pass


def _agrees(payload: dict, class_name: str, config: dict[str, Any]) -> bool:
    """What can be re-proven without the class: the saved config names the class (diffusers) and
    holds each constructor argument the weights gave, with that value."""
    try:
        saved = json.loads(payload["config_json"])
    except ValueError:
        return False
    if not isinstance(saved, dict):
        return False
    if payload["library"] == "diffusers" and saved.get("_class_name") != class_name:
        return False
    normal = json.loads(json.dumps(config, default=list))
    return all(k in saved and saved[k] == v for k, v in normal.items())


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
           {"key": key, "class": class_name, "library": library, "layout": payload})


def _signature_path(folder: Path, class_name: str, key: str) -> Path:
    return folder / f"{class_name}-signature-{key[:24]}.json"


def load_signature(class_name: str) -> tuple[str, list[str]] | None:
    """(library, constructor parameter names) of a target class, as store_signature kept them."""
    folder = cache_dir()
    if folder is None:
        return None
    key = _key(class_name, {"__signature__": 1})
    entry = _read(folder, _signature_path(folder, class_name, key))
    if entry is None or entry.get("key") != key or entry.get("class") != class_name:
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


def _derived_path(folder: Path, class_name: str, kind: str, key: str) -> Path:
    return folder / f"{class_name}-{kind}-{key[:24]}.json"


def load_derived(kind: str, class_name: str, keyed: dict[str, Any], libraries: tuple[str, ...] = ()) -> dict | None:
    """Another fact derived from the built model (`kind`, e.g. what a quantizing loader expects),
    keyed by `keyed` (the config and whatever else it depends on) and the versions of LIBRARIES
    and `libraries`: the payload store_derived kept, or None.  The caller checks its shape."""
    folder = cache_dir()
    if folder is None:
        return None
    key = _key(class_name, {"__kind__": kind, **keyed}, libraries)
    entry = _read(folder, _derived_path(folder, class_name, kind, key))
    if entry is None or entry.get("key") != key or entry.get("class") != class_name:
        return None
    payload = entry.get("payload")
    return payload if isinstance(payload, dict) else None


def store_derived(kind: str, class_name: str, keyed: dict[str, Any], payload: dict,
                  libraries: tuple[str, ...] = ()) -> None:
    folder = cache_dir()
    if folder is None:
        return
    key = _key(class_name, {"__kind__": kind, **keyed}, libraries)
    _write(folder, _derived_path(folder, class_name, kind, key), {"key": key, "class": class_name, "payload": payload})
