"""The target-layout cache: a memo of what the meta-device model yields, keyed by class, config
and library versions. Output is identical with or without it; a warm conversion that only copies
bytes imports neither torch nor diffusers; a damaged entry is ignored."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import FIXTURES, run_cli

PROBE = """
import sys
from wan2diffusers.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print("IMPORTED", sorted(m for m in ("torch", "diffusers", "transformers") if m in sys.modules), file=sys.stderr)
"""


def imported(cache, *args):
    env = {**os.environ, "WAN2DIFFUSERS_CACHE": str(cache)}
    r = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], capture_output=True, text=True, env=env,
                       timeout=300)
    line = next(l for l in r.stderr.splitlines() if l.startswith("IMPORTED"))
    return r, eval(line.split(" ", 1)[1])


def files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "wan2diffusers.json"}


def test_cold_and_warm_conversions_are_identical_and_warm_needs_no_heavy_imports(tmp_path):
    cache = tmp_path / "cache"
    cold, cold_imports = imported(cache, "convert", FIXTURES / "vace", tmp_path / "cold")
    assert cold.returncode == 0, cold.stderr
    assert "diffusers" in cold_imports and list(cache.glob("WanVACETransformer3DModel-*.json"))
    warm, warm_imports = imported(cache, "convert", FIXTURES / "vace", tmp_path / "warm")
    assert warm.returncode == 0, warm.stderr
    assert warm_imports == []  # every tensor is a byte copy and the layout is known
    assert files(tmp_path / "cold") == files(tmp_path / "warm")


def test_a_damaged_entry_is_ignored(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("WAN2DIFFUSERS_CACHE", str(cache))
    run_cli("convert", FIXTURES / "t2v", tmp_path / "first")
    (entry,) = cache.glob("WanTransformer3DModel-*.json")
    data = json.loads(entry.read_text())
    data["layout"]["shapes"]["proj_out.weight"] = [1, 1]  # tampered: its signature no longer matches
    entry.write_text(json.dumps(data))
    run_cli("convert", FIXTURES / "t2v", tmp_path / "second")
    assert files(tmp_path / "first") == files(tmp_path / "second")
    # not what the cache writes (issue 9): ignored and rebuilt, never a traceback
    for i, text in enumerate(["{not json", "[1, 2, 3]", '"text"', "[" * 100_000, "null"]):
        entry.write_text(text)
        run_cli("convert", FIXTURES / "t2v", tmp_path / f"again{i}")
        assert files(tmp_path / "first") == files(tmp_path / f"again{i}")
        assert json.loads(entry.read_text())["class"] == "WanTransformer3DModel"  # rebuilt
    # a valid signature over a layout of a foreign shape: not trusted either
    from wan2diffusers.plan import layout_cache

    data = json.loads(entry.read_text())
    data["layout"]["shapes"] = {"proj_out.weight": "not a shape"}
    data["mac"] = layout_cache._mac(layout_cache._secret(cache, create=False), data)
    entry.write_text(json.dumps(data))
    run_cli("convert", FIXTURES / "t2v", tmp_path / "foreign")
    assert files(tmp_path / "first") == files(tmp_path / "foreign")


def test_the_cache_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv("WAN2DIFFUSERS_CACHE", "off")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    run_cli("convert", FIXTURES / "t2v", tmp_path / "out")
    assert not (tmp_path / "xdg").exists()


def test_the_way_back_with_a_warm_cache_imports_neither_torch_nor_diffusers(tmp_path):
    """The class's library and constructor parameters are cached beside its layouts: once a family
    is known, `--to original` of a transformer only copies bytes; a damaged signature entry is
    ignored (the class is imported again) and the output is the same."""
    cache = tmp_path / "cache"
    run_cli("convert", FIXTURES / "t2v", tmp_path / "d", "--only", "transformer")
    first, _ = imported(cache, "convert", tmp_path / "d", tmp_path / "o1", "--to", "original")
    assert first.returncode == 0, first.stderr
    warm, warm_imports = imported(cache, "convert", tmp_path / "d", tmp_path / "o2", "--to", "original")
    assert warm.returncode == 0 and warm_imports == [], (warm.stderr, warm_imports)
    assert files(tmp_path / "o1") == files(tmp_path / "o2")
    for entry in cache.glob("*-signature-*.json"):
        entry.write_text(json.dumps({"key": "x", "library": "diffusers", "params": 7}))
    damaged, damaged_imports = imported(cache, "convert", tmp_path / "d", tmp_path / "o3", "--to", "original")
    assert damaged.returncode == 0 and "diffusers" in damaged_imports
    assert files(tmp_path / "o3") == files(tmp_path / "o1")


def test_a_warm_quantized_conversion_imports_no_diffusers_and_writes_the_same(tmp_path):
    """What the quantizing loader expects (modules, keys, dtypes, shapes, quantization_config) is kept
    beside the layout: a warm `--quantize int8` imports neither diffusers nor transformers (seconds
    of a torchao run) and writes the same bytes; a tampered or foreign entry is ignored and rebuilt."""
    from wan2diffusers.plan import layout_cache

    cache = tmp_path / "cache"
    args = ("convert", FIXTURES / "t2v", "--only", "transformer", "--quantize", "int8")
    cold, cold_imports = imported(cache, args[0], args[1], tmp_path / "cold", *args[2:])
    assert cold.returncode == 0, cold.stderr
    assert "diffusers" in cold_imports
    (entry,) = cache.glob("WanTransformer3DModel-quantized-*.json")
    warm, warm_imports = imported(cache, args[0], args[1], tmp_path / "warm", *args[2:])
    assert warm.returncode == 0, warm.stderr
    assert "diffusers" not in warm_imports and "transformers" not in warm_imports, warm_imports
    assert files(tmp_path / "cold") == files(tmp_path / "warm")
    data = json.loads(entry.read_text())
    first = data["payload"]["expected"][0]
    data["payload"]["expected"][0] = [first[0], first[1], [1, 1]]  # tampered: the signature fails
    entry.write_text(json.dumps(data))
    again, again_imports = imported(cache, args[0], args[1], tmp_path / "again", *args[2:])
    assert again.returncode == 0 and "diffusers" in again_imports
    assert files(tmp_path / "cold") == files(tmp_path / "again")
    data = json.loads(entry.read_text())
    data["payload"]["expected"] = [["proj_out.weight", "no such dtype", [1]]]  # signed, but not what is stored
    data["mac"] = layout_cache._mac(layout_cache._secret(cache, create=False), data)
    entry.write_text(json.dumps(data))
    foreign, foreign_imports = imported(cache, args[0], args[1], tmp_path / "foreign", *args[2:])
    assert foreign.returncode == 0 and "diffusers" in foreign_imports
    assert files(tmp_path / "cold") == files(tmp_path / "foreign")


def test_a_pth_way_back_with_a_warm_cache_imports_no_torch(tmp_path):
    """The .pth writer pickles torch's names without importing torch and copies bytes without it:
    a warm `--to original` of the umT5 encoder imports neither torch nor diffusers, and writes the
    same tensors as the cold run."""
    cache = tmp_path / "cache"
    run_cli("convert", FIXTURES / "t5" / "models_t5_umt5-xxl-enc-bf16.pth", tmp_path / "d", "--only", "text_encoder")
    first, _ = imported(cache, "convert", tmp_path / "d", tmp_path / "o1", "--to", "original")
    assert first.returncode == 0, first.stderr
    warm, warm_imports = imported(cache, "convert", tmp_path / "d", tmp_path / "o2", "--to", "original")
    assert warm.returncode == 0 and warm_imports == [], (warm.stderr, warm_imports)
    import torch

    a = torch.load(tmp_path / "o1" / "models_t5_umt5-xxl-enc-bf16.pth", weights_only=True)
    b = torch.load(tmp_path / "o2" / "models_t5_umt5-xxl-enc-bf16.pth", weights_only=True)
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
