"""Shared test helpers: the fixtures (copied from the official Wan code's outputs), a way to run
the CLI in-process, and the relative error the project is judged by."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from wan2diffusers.cli import main

# keep the target-layout cache of the tests away from the user's ~/.cache (subprocesses inherit it)
os.environ["WAN2DIFFUSERS_CACHE"] = tempfile.mkdtemp(prefix="wan2diffusers-test-cache-")

ROOT = Path(__file__).parents[1]  # the project
FIXTURES = Path(__file__).parent / "fixtures"
DATA = Path(__file__).parent / "data"
EXAMPLE = ROOT / "examples" / "Wan2.1-T2V-tiny"
TOL = 1e-4  # max|out - expected| / max|expected|, float32


class CliResult:
    def __init__(self, result):
        self.exit_code = result.exit_code
        self.stdout = result.stdout
        self.stderr = result.stderr
        self.exception = result.exception

    def json(self):
        return json.loads(self.stdout)


def run_cli(*args, ok: bool | None = True) -> CliResult:
    """Run `wan2diffusers ARGS` in-process; assert success (or failure when ok=False; ok=None: either)."""
    result = CliResult(CliRunner().invoke(main, [str(a) for a in args]))
    if ok is None:
        return result
    if ok:
        assert result.exit_code == 0, f"exit {result.exit_code}\n{result.stdout}\n{result.stderr}\n{result.exception!r}"
    else:
        assert result.exit_code != 0, f"expected a failure\n{result.stdout}\n{result.stderr}"
        assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), \
            f"traceback instead of a clean error: {result.exception!r}"
        assert "Traceback" not in result.stderr
    return result


def rel_err(out: torch.Tensor, expected: torch.Tensor) -> float:
    assert tuple(out.shape) == tuple(expected.shape), (tuple(out.shape), tuple(expected.shape))
    out, expected = out.detach().double(), expected.double()
    assert torch.isfinite(out).all()
    return float((out - expected).abs().max() / expected.abs().max())


def fixture_io(name: str):
    """(inputs, expected, fixture.json) of a fixture."""
    d = FIXTURES / name
    return (load_file(str(d / "inputs.safetensors")), load_file(str(d / "expected.safetensors")),
            json.loads((d / "fixture.json").read_text()))


@pytest.fixture
def fixtures() -> Path:
    return FIXTURES
