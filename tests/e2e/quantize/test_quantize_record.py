"""quantize carries the float folder's conversion record, so publish cards the quantized copy
without --record and says which folder it was made from."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import run_cli
from repos import make_original_repo


def test_quantize_carries_the_record_and_publish_reads_it(tmp_path):
    src = make_original_repo(tmp_path / "src", "t2v")
    run_cli("convert", src, tmp_path / "float")
    result = run_cli("quantize", tmp_path / "float", tmp_path / "q8", "--weights", "int8")
    assert "carried over" in result.stdout and "left out" not in result.stdout
    record = json.loads((tmp_path / "q8" / "wan2diffusers.json").read_text())
    original = json.loads((tmp_path / "float" / "wan2diffusers.json").read_text())
    assert record.pop("derived_from") == {"folder": "float", "by": "wan2diffusers quantize", "weights": "int8"}
    assert record == original

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    r = subprocess.run([sys.executable, "-m", "wan2diffusers.cli", "publish", str(tmp_path / "q8"), "me/wan-int8",
                        "--dry-run", "--no-measure"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    card = (tmp_path / "q8" / "README.md").read_text()
    assert "made from (`float`)" in card
    assert "weights `int8`" in card
