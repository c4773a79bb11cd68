"""verify --source checks quantized float8 / int4 weights value by value: the source quantized
again must give the stored tensors; a single changed byte is caught and named."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import FIXTURES, run_cli


DATA_SUFFIX = {"quanto": "._data", "torchao": "._weight_qdata"}  # the stored quantized values


@pytest.mark.parametrize("backend, weights", [("quanto", "float8"), ("quanto", "int4"), ("torchao", "int8"),
                                              ("torchao", "float8")])
def test_quantized_values_are_checked_against_the_source(tmp_path, backend, weights):
    out = tmp_path / "out"
    run_cli("convert", FIXTURES / "t2v", out, "--quantize", weights, "--backend", backend)
    ok = run_cli("verify", out, "--source", FIXTURES / "t2v", "--json").json()
    assert ok["ok"]
    seen = run_cli("inspect", out, "--json").json()
    (component,) = seen["components"]
    assert seen["healthy"] and component["quantized"], component
    assert json.loads((FIXTURES / "t2v" / "fixture.json").read_text())["num_parameters"] == component["parameters"]

    weights_file = out / "transformer" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights_file))
    key = next(k for k in sorted(tensors) if k.startswith("blocks.1.ffn") and k.endswith(DATA_SUFFIX[backend]))
    t = tensors[key]
    flat = t.view(-1).view(__import__("torch").uint8)
    flat[7] ^= 0x01  # one bit of one stored value
    save_file(tensors, str(weights_file), metadata=safe_open(str(weights_file), "pt").metadata())
    bad = run_cli("verify", out, "--source", FIXTURES / "t2v", ok=False)
    module = key.split(".weight")[0].split("._weight")[0]
    assert module in bad.stderr and weights in bad.stderr, bad.stderr
