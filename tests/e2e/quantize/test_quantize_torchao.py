"""torchao variants (issue 13, first step): `convert --quantize W --backend torchao` and
`quantize --backend torchao` write, tensor for tensor and metadata entry for metadata entry, what
diffusers' own `from_pretrained(float, quantization_config=TorchAoConfig(...))` +
`save_pretrained` writes; a plain `from_pretrained(OUT)` loads it quantized; the error against the
official outputs is measured (quantized: not exact, and bounded)."""

from __future__ import annotations

import json
import struct
import warnings

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES, TOL, rel_err, run_cli
from loading import run_official_call

torchao = pytest.importorskip("torchao")
WEIGHTS = ("int8", "float8")
BOUND = {"int8": 0.02, "float8": 0.06}  # the worst measured on the four fixtures, with margin
VARIANTS = ("t2v", "i2v", "flf2v", "vace")


def metadata(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))["__metadata__"]


def keep_float() -> list[str]:
    from wan2diffusers.quantization.policy import load_policy

    return list(load_policy("torchao").components["transformer"].modules_to_not_convert)


# the dtype users load each variant in, and diffusers' path quantizes from (float8 runs only in the
# dtype it was quantized from: bf16, how Wan runs; int8 runs in any)
LOAD_DTYPE = {"int8": torch.float32, "float8": torch.bfloat16}


def diffusers_path(float_folder, weights: str, dest):
    """diffusers' own TorchAoConfig path on the float folder, loaded as users load it, saved: the reference."""
    import diffusers
    from wan2diffusers.quantization.ao import ao_config

    cls = getattr(diffusers, json.loads((float_folder / "config.json").read_text())["_class_name"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cls.from_pretrained(str(float_folder), torch_dtype=LOAD_DTYPE[weights], quantization_config=
                                    diffusers.TorchAoConfig(ao_config(weights), modules_to_not_convert=keep_float()))
    model.save_pretrained(str(dest))
    return dest


@pytest.fixture(scope="module")
def floats(tmp_path_factory):
    root = tmp_path_factory.mktemp("ao-float")
    for name in VARIANTS:
        run_cli("convert", FIXTURES / name, root / name, *(["--clip-heads", 2] if name in ("i2v", "flf2v") else []))
    return root


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("name", VARIANTS)
def test_torchao_variant_is_what_diffusers_writes(floats, tmp_path, name, weights):
    import diffusers

    ours = tmp_path / "ours"
    report = run_cli("convert", FIXTURES / name, ours, "--quantize", weights, "--backend", "torchao", "--json").json()
    assert report["components"][0]["quantization"]["backend"] == "torchao"
    folder = ours / "transformer"
    ref = diffusers_path(floats / name / "transformer", weights, tmp_path / "ref")
    a, b = (load_file(str(f / "diffusion_pytorch_model.safetensors")) for f in (folder, ref))
    assert a.keys() == b.keys()
    for k in a:  # the float tensors as the reference's load cast them (ours keep the source's dtype)
        if "._weight_" in k:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        else:
            assert a[k].dtype == torch.float32 and torch.equal(a[k].to(b[k].dtype), b[k]), k
    assert metadata(folder / "diffusion_pytorch_model.safetensors") == \
        metadata(ref / "diffusion_pytorch_model.safetensors")
    cfg_ours, cfg_ref = (json.loads((f / "config.json").read_text()) for f in (folder, ref))
    assert cfg_ours["quantization_config"] == cfg_ref["quantization_config"]
    assert cfg_ours["quantization_config"]["quant_method"] == "torchao"

    # a plain from_pretrained loads it quantized (no quantization argument)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = diffusers.WanTransformer3DModel if name != "vace" else diffusers.WanVACETransformer3DModel
        loaded = plain.from_pretrained(str(folder))
        assert type(loaded.blocks[0].attn1.to_q.weight).__name__ in ("Int8Tensor", "Float8Tensor")
        model = plain.from_pretrained(str(folder), torch_dtype=LOAD_DTYPE[weights]).eval()
    out, expected = run_official_call(model, name, LOAD_DTYPE[weights])
    err = rel_err(out, expected)
    print(f"\n{name} torchao {weights}: rel err {err:.3g}")
    assert TOL < err <= BOUND[weights]


@pytest.mark.parametrize("weights", WEIGHTS)
def test_quantize_command_with_torchao_writes_the_same_files(floats, tmp_path, weights):
    run_cli("convert", FIXTURES / "t2v", tmp_path / "c", "--quantize", weights, "--backend", "torchao")
    run_cli("quantize", floats / "t2v" / "transformer", tmp_path / "q", "--weights", weights, "--backend", "torchao")
    a = load_file(str(tmp_path / "c" / "transformer" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "q" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_weight_quantized_in_row_slices_equals_torchao_on_the_whole_weight(monkeypatch):
    """The streamed path (a slice of rows at a time) gives torchao's values for the whole weight."""
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    from wan2diffusers.quantization import ao

    w = torch.randn(37, 64)
    monkeypatch.setattr(ao, "SLICE_ELEMENTS", 64 * 5)  # 5 rows per slice: 8 slices, the last short
    for weights in WEIGHTS:
        ours = ao.TorchaoBackend().quantize(weights, w)
        whole, _ = flatten_tensor_state_dict({"m.weight": ao._quantize_tensor(weights, w.to(LOAD_DTYPE[weights]))})
        assert {k.removeprefix("m."): v for k, v in whole.items()}.keys() == ours.keys()
        for k, v in whole.items():
            assert torch.equal(ours[k.removeprefix("m.")], v), (weights, k)


def test_the_default_backend_is_torchao_and_int4_goes_to_quanto(tmp_path):
    """torchao is the default (diffusers deprecates QuantoConfig); int4, which torchao does not
    offer on CPU, is written by quanto, and the report says so."""
    r = run_cli("convert", FIXTURES / "t2v", tmp_path / "o", "--quantize", "int4", "--backend", "torchao", ok=False)
    assert "torchao backend offers int8, float8" in r.stderr and not (tmp_path / "o").exists()
    for weights, backend in [("int8", "torchao"), ("float8", "torchao"), ("int4", "quanto")]:
        out = tmp_path / weights
        report = run_cli("convert", FIXTURES / "t2v", out, "--quantize", weights, "--json").json()
        assert report["components"][0]["quantization"]["backend"] == backend
        qconfig = json.loads((out / "transformer" / "config.json").read_text())["quantization_config"]
        assert qconfig["quant_method"] == backend, qconfig
    # the default's files are exactly what --backend torchao writes
    run_cli("convert", FIXTURES / "t2v", tmp_path / "explicit", "--quantize", "int8", "--backend", "torchao")
    for p in (tmp_path / "int8" / "transformer").iterdir():
        if p.name != "wan2diffusers.json":
            assert (tmp_path / "explicit" / "transformer" / p.name).read_bytes() == p.read_bytes(), p.name


def test_inspect_verify_and_publish_take_a_torchao_variant(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "ao8"
    run_cli("convert", FIXTURES / "t2v", out, "--quantize", "int8", "--backend", "torchao")
    report = run_cli("inspect", out, "--json").json()
    (comp,) = report["components"]
    assert report["healthy"] and comp["layout_label"] == "Diffusers, quantized with torchao (int8)"
    verified = run_cli("verify", out, "--source", FIXTURES / "t2v", "--json").json()
    assert verified["ok"] and verified["components"][0]["compared"] == 69
    # one stored int8 value changed: verify --source names the weight
    path = out / "transformer" / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import save_file
    tensors = load_file(str(path))
    tensors["blocks.0.attn1.to_q._weight_qdata"][0, 0] += 1
    save_file(tensors, str(path), metadata=metadata(path))
    bad = run_cli("verify", out, "--source", FIXTURES / "t2v", "--json", ok=False).json()
    assert [d["key"] for d in bad["differences"]] == ["blocks.0.attn1.to_q.weight"]
    # the card says what the variant is; no torchao/diffusers import noise reaches the user
    r = subprocess.run([sys.executable, "-m", "wan2diffusers.cli", "publish", str(out), "me/ao8", "--dry-run",
                        "--no-measure", "--base-model", "Wan-AI/Wan2.1-T2V-1.3B"], capture_output=True, text=True,
                       env={**__import__("os").environ, "WAN2DIFFUSERS_CACHE": "off"}, timeout=300)
    assert r.returncode == 0, r.stderr
    card = (out / "README.md").read_text()
    assert "quantized to int8 (torchao)" in card and "base_model_relation: quantized" in card
    noise = subprocess.run([sys.executable, "-m", "wan2diffusers.cli", "inspect", str(out)], capture_output=True,
                           text=True, env={**__import__("os").environ, "WAN2DIFFUSERS_CACHE": "off"}, timeout=300)
    assert noise.returncode == 0 and "Failed to load" not in noise.stderr and "_pytree" not in noise.stderr, noise.stderr


@pytest.mark.parametrize("backend_name", ["quanto", "torchao"])
def test_each_backend_writes_what_its_key_format_reads_back(backend_name):
    """The writer's entry names come from the library (optimum-quanto, torchao); inspect/verify read
    them with the backend's key format: both must agree for every weight type and bias."""
    from wan2diffusers.quantization.backend import get_backend
    from wan2diffusers.quantization.keyformats import fold_quantized
    from wan2diffusers.read.safetensors_file import TensorRef

    backend = get_backend(backend_name)
    for weights in backend.weights:
        for bias in (False, True):
            entries = backend.module_entries(weights, (256, 512), "F32", bias)
            stored = {f"blocks.0.ffn.0.{e.name}": TensorRef(None, f"blocks.0.ffn.0.{e.name}", e.dtype, e.shape, 0, 0)
                      for e in entries}
            keys, parts, fmt = fold_quantized(stored)
            assert fmt is backend.key_format, (weights, bias)
            assert set(keys) == {"blocks.0.ffn.0.weight"} | ({"blocks.0.ffn.0.bias"} if bias else set())
            assert sorted(parts["blocks.0.ffn.0.weight"]) == sorted(k for k in stored if not k.endswith(".bias"))
            roles = set(fmt.by_role(parts["blocks.0.ffn.0.weight"]))
            assert "scale" in roles and roles & {"data", "packed data"}, roles
            folded = keys["blocks.0.ffn.0.weight"].shape  # as many values as the weight
            assert folded[0] * (folded[1] if len(folded) > 1 else 1) == 256 * 512, (weights, folded)
            assert (fmt.unshaped(parts) == set()) == (tuple(folded) == (256, 512)), (weights, folded)
