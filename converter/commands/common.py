"""What every command shares: how an expected failure is printed (one line, exit 1) and sizes."""

from __future__ import annotations

import json
import sys

import click

from ..errors import ConversionError

MAX_DETAILS = 25

# --backend of convert and quantize
backend_option = click.option(
    "--backend", type=click.Choice(["torchao", "quanto"]), default=None,
    help="Quantization backend (default: torchao for int8/float8, quanto for int4; "
         "mappings/quantization.yaml): torchao writes diffusers' TorchAoConfig format, quanto its "
         "(deprecated) QuantoConfig format.")


def fail(e: ConversionError, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({"ok": False, "error": str(e), "details": e.details}, indent=2))
    click.echo(f"error: {e}", err=True)
    for line in e.details[:MAX_DETAILS]:
        click.echo(f"  {line}", err=True)
    if len(e.details) > MAX_DETAILS:
        click.echo(f"  ... and {len(e.details) - MAX_DETAILS} more", err=True)
    sys.exit(1)


def run_reporting(action, as_json: bool, where, interrupted: str, after_oserror: str = "") -> dict:
    """Run `action()` the way every command does: an expected failure is one `error:` line and
    exit 1 (the JSON error report with --json), an OS error (disk full, permission) names its file,
    Ctrl-C says what state things are in and exits 130; the report is printed with --json."""
    try:
        report = action()
    except ConversionError as e:
        fail(e, as_json)
    except OSError as e:
        fail(ConversionError(f"{e.filename or where}: {e.strerror or e}{after_oserror}"), as_json)
    except KeyboardInterrupt:
        click.echo(f"error: interrupted; {interrupted}", err=True)
        sys.exit(130)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    return report
