"""umT5 text encoder (models_t5_umt5-xxl-enc-bf16.pth) -> transformers UMT5EncoderModel, against
the official Wan T5Encoder outputs (fixture made by the official code)."""

from __future__ import annotations

import contextlib
import json
import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import transformers
from conftest import FIXTURES, TOL, fixture_io, rel_err, run_cli
from wan2diffusers.read.pth_file import read_pth_index

PTH = FIXTURES / "t5" / "models_t5_umt5-xxl-enc-bf16.pth"


@contextlib.contextmanager
def transformers_warnings():
    """Collect what transformers logs at WARNING and above (its load report among it)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    root = logging.getLogger("transformers")
    root.addHandler(handler)
    try:
        yield records
    finally:
        root.removeHandler(handler)


def load_converted(folder, dtype=torch.float32):
    """from_pretrained with its loading info; a clean load has nothing missing, unexpected or
    mismatched, and logs no warning about it."""
    arch = json.loads((folder / "config.json").read_text())["architectures"][0]
    with transformers_warnings() as logged:
        model, info = getattr(transformers, arch).from_pretrained(str(folder), dtype=dtype, output_loading_info=True)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(kind), (kind, info[kind])
    assert not logged, [r.getMessage() for r in logged]
    return model.eval()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("t5") / "out"
    report = run_cli("convert", PTH, out, "--json").json()
    return out / "text_encoder", report["components"][0]


def test_reproduces_official_output(converted):
    folder, _ = converted
    inputs, expected, _ = fixture_io("t5")
    model = load_converted(folder)
    n = int(inputs["seq_len"])
    with torch.no_grad():
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
    assert rel_err(out[:, :n], expected["last_hidden_state"][:, :n]) <= TOL
    # what the Wan pipeline keeps: the real tokens of the one prompt
    assert rel_err(out[0, :n], expected["context"]) <= TOL


def test_derives_the_reference_config(converted):
    folder, report = converted
    _, _, info = fixture_io("t5")
    ref = info["transformers_reference_config"]
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architectures"] == [ref["_class_name"]] and report["class"] == ref["_class_name"]
    for key, value in ref.items():
        if key != "_class_name":
            assert cfg[key] == value, (key, cfg[key], value)
    assert report["coverage"] == "ok" and report["problems"] == [] and report["dropped"] == []
    assert report["converted"] == report["source_tensors"] == info["state_dict_keys"]


def test_writes_exactly_what_save_pretrained_writes(converted, tmp_path):
    """Tied weights: transformers ties encoder.embed_tokens to shared; save_pretrained writes the
    shared one only. The converted file holds the same keys and shapes, kept in bfloat16."""
    folder, _ = converted
    config = transformers.AutoConfig.from_pretrained(str(folder))
    transformers.UMT5EncoderModel(config).save_pretrained(str(tmp_path / "ref"))
    with safe_open(str(tmp_path / "ref" / "model.safetensors"), "pt") as f:
        want = {k: f.get_slice(k).get_shape() for k in f.keys()}
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        got = {k: f.get_slice(k).get_shape() for k in f.keys()}
        assert f.metadata() == {"format": "pt"}
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert got == want
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]


def test_token_embedding_is_shared_and_tied(converted):
    folder, _ = converted
    model = load_converted(folder)
    original = torch.load(PTH, weights_only=True)["token_embedding.weight"].float()
    assert torch.equal(model.shared.weight, original)
    assert model.encoder.embed_tokens.weight.data_ptr() == model.shared.weight.data_ptr()


def test_fp32_output(tmp_path):
    run_cli("convert", PTH, tmp_path / "out", "--dtype", "fp32")
    folder = tmp_path / "out" / "text_encoder"
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    inputs, expected, _ = fixture_io("t5")
    n = int(inputs["seq_len"])
    with torch.no_grad():
        out = load_converted(folder)(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    assert rel_err(out.last_hidden_state[:, :n], expected["last_hidden_state"][:, :n]) <= TOL


def test_every_tensor_lands_where_the_official_names_say(tmp_path):
    """Distinct constants (exact in bfloat16): each source tensor holds its own value, so a
    misrouted or swapped tensor cannot pass. The routes are written out here, independently of
    the table."""
    shapes = {k: r.shape for k, r in read_pth_index(PTH).items()}
    value = {k: float(i + 1) for i, k in enumerate(sorted(shapes))}
    src = tmp_path / PTH.name
    torch.save({k: torch.full(s, value[k], dtype=torch.bfloat16) for k, s in shapes.items()}, src)
    run_cli("convert", src, tmp_path / "out")
    out = load_file(str(tmp_path / "out" / "text_encoder" / "model.safetensors"))

    routes = {"shared.weight": "token_embedding.weight", "encoder.final_layer_norm.weight": "norm.weight"}
    for n in range(2):
        t, s = f"encoder.block.{n}.layer", f"blocks.{n}"
        routes.update({
            f"{t}.0.layer_norm.weight": f"{s}.norm1.weight",
            f"{t}.0.SelfAttention.q.weight": f"{s}.attn.q.weight",
            f"{t}.0.SelfAttention.k.weight": f"{s}.attn.k.weight",
            f"{t}.0.SelfAttention.v.weight": f"{s}.attn.v.weight",
            f"{t}.0.SelfAttention.o.weight": f"{s}.attn.o.weight",
            f"{t}.0.SelfAttention.relative_attention_bias.weight": f"{s}.pos_embedding.embedding.weight",
            f"{t}.1.layer_norm.weight": f"{s}.norm2.weight",
            f"{t}.1.DenseReluDense.wi_0.weight": f"{s}.ffn.gate.0.weight",  # the GELU branch
            f"{t}.1.DenseReluDense.wi_1.weight": f"{s}.ffn.fc1.weight",     # the linear branch
            f"{t}.1.DenseReluDense.wo.weight": f"{s}.ffn.fc2.weight",
        })
    assert set(out) == set(routes)
    assert set(routes.values()) == set(shapes)
    for target, source in routes.items():
        assert tuple(out[target].shape) == tuple(shapes[source]), target
        assert torch.all(out[target] == value[source]), (target, source)
