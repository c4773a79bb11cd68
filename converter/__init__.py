"""wan2diffusers: exact, streamed, verified conversion of original Wan checkpoints to Diffusers.

The Python API (the CLI `wan2diffusers` is a thin layer over it): `convert`, `convert_lora`, `quantize`,
`inspect`, `verify`, `repair`, `publish` return the report `--json` prints (a `Report`);
expected failures raise `ConversionError` with the one-line message the CLI prints."""

from .version import __version__
from .api import ConversionError, Report, convert, convert_lora, inspect, merge, publish, quantize, repair, verify

__all__ = ["__version__", "ConversionError", "Report", "convert", "convert_lora", "inspect", "merge", "publish",
           "quantize", "repair", "verify"]
