"""The one place user files are opened for reading metadata: a path must be a regular file (a
FIFO, socket or device would block or never end; a folder is named as one), and JSON is parsed
strictly (a key named twice, nesting too deep for the parser, an integer too long to read: one
line naming the file, never a traceback)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from ..errors import ConversionError

MAX_JSON_BYTES = 100 * 1024 * 1024  # a config, index or header larger than this is not one
MAX_JSON_DEPTH = 32  # nesting no config, index, header, record or cache entry of ours comes near


def _depth(value) -> int:
    """How deeply `value` nests (iteratively: no recursion on hostile input)."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        v, d = todo.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d)
            if d > MAX_JSON_DEPTH:
                return d
            todo.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


def what_is(path: Path) -> str:
    """What is at `path`, in words: "a regular file", "a folder", "a FIFO (named pipe)", ..."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "missing" if not os.path.islink(path) else "a broken symlink"
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    for test, name in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a folder"),
                       (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def require_file(path: Path, what: str = "") -> int:
    """Refuse anything but a regular file (following symlinks); return its size."""
    kind = what_is(path)
    if kind != "a regular file":
        label = f" ({what})" if what else ""
        if kind == "missing":
            raise ConversionError(f"{path}{label}: does not exist")
        raise ConversionError(f"{path}{label}: is {kind}, not a file")
    return os.stat(path).st_size


class LongInteger:
    """An integer literal too long to be a real config value, kept (not converted) so that the
    check of the field that holds it can name that field."""

    def __init__(self, digits: str):
        self.digits = len(digits.lstrip("-"))

    def __repr__(self) -> str:
        return f"<an integer of {self.digits} digits>"


def _parse_int(text: str):
    return int(text) if len(text) <= 40 else LongInteger(text)


def parse_json(data: bytes | str, path: Path, what: str = "JSON") -> object:
    """Strict JSON: duplicate keys, too deep nesting and over-long numbers are refused in one line."""
    def no_duplicates(pairs):
        seen = {}
        for k, v in pairs:
            if k in seen:
                raise ConversionError(f"{path}: {what} names {k!r} twice")
            seen[k] = v
        return seen

    try:
        if isinstance(data, bytes):
            data = data.decode("utf-8")
        value = json.loads(data, object_pairs_hook=no_duplicates, parse_int=_parse_int)
    except RecursionError:
        raise ConversionError(f"{path}: {what} is nested too deeply to be what it claims") from None
    except UnicodeDecodeError as e:
        raise ConversionError(f"{path}: {what} is not UTF-8 text ({e.reason})") from None
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None
    except ValueError as e:  # e.g. an integer of thousands of digits
        raise ConversionError(f"{path}: {what} holds a value that cannot be read ({e})") from None
    if _depth(value) > MAX_JSON_DEPTH:
        raise ConversionError(f"{path}: {what} is nested too deeply to be what it claims")
    return value


def config_class(cfg: dict) -> str | None:
    """The class a config.json names: diffusers' `_class_name`, else transformers' first `architectures`."""
    return cfg.get("_class_name") or (cfg.get("architectures") or [None])[0]


def load_json(path: Path, what: str = "JSON", max_bytes: int = MAX_JSON_BYTES) -> object:
    size = require_file(path, what)
    if size > max_bytes:
        raise ConversionError(f"{path}: {size} bytes is too large for a {what} file")
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ConversionError(f"{path}: cannot read: {e.strerror or e}") from None
    return parse_json(data, path, what)


HASH_CHUNK = 8 * 1024 * 1024


def file_sha256(path: Path, on_bytes=None) -> str:
    """The sha256 of a file, streamed through one reused buffer (never the whole file in memory);
    `on_bytes(n)` is told each chunk's size (a progress bar)."""
    import hashlib

    h = hashlib.sha256()
    buf = bytearray(HASH_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            if on_bytes is not None:
                on_bytes(n)
    return h.hexdigest()

