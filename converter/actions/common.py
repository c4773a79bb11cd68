"""What every action shares, with no CLI in it: sizes in words, `--set` values, shard sizes, and
OS errors turned into the one exception type whose message is meant for people."""

from __future__ import annotations

from contextlib import contextmanager

from ..errors import ConversionError


def silent(*args, **kwargs) -> None:
    """The default `say`: an action run from Python prints nothing but its progress bars."""


def parse_settings(settings) -> dict[str, dict]:
    """`COMPONENT.FACT=VALUE` strings (the CLI's --set; values parsed as YAML) -> {component: {fact: value}}."""
    import yaml

    out: dict[str, dict] = {}
    for item in settings:
        name, eq, value = item.partition("=")
        component, dot, fact = name.partition(".")
        if not (eq and dot and component and fact):
            raise ConversionError(f"--set {item!r}: expected COMPONENT.FACT=VALUE, e.g. transformer.num_heads=12")
        try:
            out.setdefault(component, {})[fact] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConversionError(f"--set {item!r}: the value is not a number, list or word") from None
    return out


def check_size(size: str) -> None:
    from huggingface_hub.serialization._base import parse_size_to_int

    try:
        parse_size_to_int(size)
    except ValueError:
        raise ConversionError(f"--max-shard-size {size!r}: expected a size such as 5GB or 500MB") from None


@contextmanager
def os_errors(where, after: str = ""):
    """An OS error (disk full, permission denied) becomes one line naming its file."""
    try:
        yield
    except OSError as e:
        raise ConversionError(f"{e.filename or where}: {e.strerror or e}{after}") from None
