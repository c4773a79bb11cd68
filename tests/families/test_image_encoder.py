"""CLIP image encoder (models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth, the whole
XLMRobertaCLIP) -> transformers CLIPVisionModelWithProjection, against the official Wan outputs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import transformers
from conftest import FIXTURES, TOL, fixture_io, rel_err, run_cli
from wan2diffusers.read.pth_file import read_pth_index
from test_text_encoder import load_converted

PTH = FIXTURES / "clip" / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
HEADS = 2  # the fixture's head count, which the weights cannot tell


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("clip") / "out"
    report = run_cli("convert", PTH, out, "--clip-heads", HEADS, "--json").json()
    return out / "image_encoder", report["components"][0]


def test_reproduces_official_output(converted):
    folder, _ = converted
    inputs, expected, _ = fixture_io("clip")
    model = load_converted(folder)
    with torch.no_grad():
        out = model(pixel_values=inputs["pixel_values"], output_hidden_states=True)
    # what Wan I2V consumes: every block but the last, no post-norm
    assert rel_err(out.hidden_states[-2], expected["visual_31"]) <= TOL
    assert rel_err(out.last_hidden_state, expected["visual_full"]) <= TOL
    assert rel_err(out.image_embeds, expected["image_embeds"]) <= TOL


def test_derives_the_reference_config(converted):
    folder, report = converted
    _, _, info = fixture_io("clip")
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architectures"] == ["CLIPVisionModelWithProjection"]  # as the Wan-AI Diffusers repos
    for key, value in info["transformers_reference_config"].items():
        if key != "_class_name":
            assert cfg[key] == value, (key, cfg[key], value)
    assert report["coverage"] == "ok" and report["problems"] == []
    assert f"num_heads={HEADS} as given (not derived)" in report["notes"]


def test_text_tower_and_logit_scale_are_dropped_by_rule(converted):
    _, report = converted
    keys = read_pth_index(PTH)
    dropped = {d["key"]: d["reason"] for d in report["dropped"]}
    assert set(dropped) == {k for k in keys if not k.startswith("visual.")}
    assert "log_scale" in dropped and all(k.startswith("textual.") for k in dropped if k != "log_scale")
    assert all(reason for reason in dropped.values())
    assert report["source_tensors"] == len(keys) and report["converted"] == report["target_tensors"]


def test_writes_exactly_what_save_pretrained_writes(converted, tmp_path):
    """transformers 5 spells CLIPVisionModelWithProjection keys with `vision_model.` (plain
    CLIPVisionModel has none); the file matches what save_pretrained writes."""
    folder, _ = converted
    config = transformers.AutoConfig.from_pretrained(str(folder))
    transformers.CLIPVisionModelWithProjection(config).save_pretrained(str(tmp_path / "ref"))
    shapes = {}
    for name in ("ref", None):
        path = (tmp_path / "ref" if name else folder) / "model.safetensors"
        with safe_open(str(path), "pt") as f:
            shapes[name] = {k: f.get_slice(k).get_shape() for k in f.keys()}
    assert shapes[None] == shapes["ref"]
    assert all(k.startswith("vision_model.") for k in shapes[None] if k != "visual_projection.weight")


def test_head_count_is_required_for_an_unknown_width(tmp_path):
    result = run_cli("convert", PTH, tmp_path / "out", ok=False)
    message = result.stderr.strip().splitlines()
    assert len(message) == 1 and str(PTH) in message[0] and "--clip-heads" in message[0], message
    assert not (tmp_path / "out").exists()
    result = run_cli("convert", PTH, tmp_path / "out", "--clip-heads", 3, ok=False)
    assert "not divisible" in result.stderr


def test_vit_h_14_width_takes_16_heads_from_the_table(tmp_path):
    """A ViT-H/14-shaped checkpoint (one block, zero-stride tensors to keep the file tiny) is
    planned with 16 heads and image size 224 from (257 positions - 1) ** 0.5 * 14."""
    d, ffn, proj = 1280, 5120, 1024
    shapes = {
        "visual.cls_embedding": (1, 1, d), "visual.pos_embedding": (1, 257, d), "visual.head": (d, proj),
        "visual.patch_embedding.weight": (d, 3, 14, 14), "visual.pre_norm.weight": (d,), "visual.pre_norm.bias": (d,),
        "visual.post_norm.weight": (d,), "visual.post_norm.bias": (d,),
    }
    block = "visual.transformer.0"
    for name, (o, i) in {"attn.to_qkv": (3 * d, d), "attn.proj": (d, d), "mlp.0": (ffn, d), "mlp.2": (d, ffn)}.items():
        shapes.update({f"{block}.{name}.weight": (o, i), f"{block}.{name}.bias": (o,)})
    for norm in ("norm1", "norm2"):
        shapes.update({f"{block}.{norm}.weight": (d,), f"{block}.{norm}.bias": (d,)})
    src = tmp_path / PTH.name
    torch.save({k: torch.zeros(1).expand(s) for k, s in shapes.items()}, src)
    report = run_cli("convert", src, tmp_path / "out", "--dry-run", "--json").json()["components"][0]
    assert report["size"] == "ViT-H/14" and report["coverage"] == "ok", report["problems"]
    cfg = report["config"]
    assert (cfg["num_attention_heads"], cfg["image_size"], cfg["patch_size"], cfg["hidden_size"],
            cfg["intermediate_size"], cfg["projection_dim"], cfg["num_hidden_layers"]) == (16, 224, 14, d, ffn, proj, 1)


def test_every_tensor_lands_where_the_official_names_say(tmp_path):
    """Distinct constants: each source tensor (each third of a fused q|k|v) holds its own value,
    so a misrouted, swapped or mis-chunked tensor cannot pass. Routes written out independently."""
    shapes = {k: r.shape for k, r in read_pth_index(PTH).items()}
    value = {k: float(i + 1) for i, k in enumerate(sorted(shapes))}
    tensors = {k: torch.full(s, value[k]) for k, s in shapes.items()}
    qkv = {}  # (block, p, part) -> its constant
    for k in sorted(shapes):
        if ".attn.to_qkv." in k:
            n, p = k.split(".")[2], k.split(".")[-1]
            thirds = []
            for part in range(3):
                qkv[n, p, part] = 1000.0 + len(qkv)
                thirds.append(torch.full((shapes[k][0] // 3, *shapes[k][1:]), qkv[n, p, part]))
            tensors[k] = torch.cat(thirds)
    src = tmp_path / PTH.name
    torch.save(tensors, src)
    run_cli("convert", src, tmp_path / "out", "--clip-heads", HEADS)
    out = load_file(str(tmp_path / "out" / "image_encoder" / "model.safetensors"))

    v = "vision_model"
    routes = {
        f"{v}.embeddings.class_embedding": "visual.cls_embedding",
        f"{v}.embeddings.position_embedding.weight": "visual.pos_embedding",
        f"{v}.embeddings.patch_embedding.weight": "visual.patch_embedding.weight",
        f"{v}.pre_layrnorm.weight": "visual.pre_norm.weight", f"{v}.pre_layrnorm.bias": "visual.pre_norm.bias",
        f"{v}.post_layernorm.weight": "visual.post_norm.weight", f"{v}.post_layernorm.bias": "visual.post_norm.bias",
        "visual_projection.weight": "visual.head",
    }
    chunks = {}
    for n in range(3):
        t, s = f"{v}.encoder.layers.{n}", f"visual.transformer.{n}"
        for p in ("weight", "bias"):
            routes.update({
                f"{t}.layer_norm1.{p}": f"{s}.norm1.{p}", f"{t}.layer_norm2.{p}": f"{s}.norm2.{p}",
                f"{t}.self_attn.out_proj.{p}": f"{s}.attn.proj.{p}",
                f"{t}.mlp.fc1.{p}": f"{s}.mlp.0.{p}", f"{t}.mlp.fc2.{p}": f"{s}.mlp.2.{p}",
            })
            for part, name in enumerate(("q_proj", "k_proj", "v_proj")):
                chunks[f"{t}.self_attn.{name}.{p}"] = qkv[str(n), p, part]
    assert set(out) == set(routes) | set(chunks)
    for target, source in routes.items():
        assert torch.all(out[target] == value[source]), (target, source)
    for target, const in chunks.items():
        assert torch.all(out[target] == const), target
    # layouts: [1,1,D] -> [D], [1,N,D] -> [N,D], head [D,P] -> Linear weight [P,D]
    assert tuple(out[f"{v}.embeddings.class_embedding"].shape) == (shapes["visual.cls_embedding"][-1],)
    assert tuple(out[f"{v}.embeddings.position_embedding.weight"].shape) == tuple(shapes["visual.pos_embedding"][1:])
    assert tuple(out["visual_projection.weight"].shape) == tuple(reversed(shapes["visual.head"]))


def test_head_is_transposed_not_reshaped(tmp_path):
    """A transpose and a reshape of the projection agree on shapes; only the values tell."""
    tensors = torch.load(PTH, weights_only=True)
    tensors["visual.head"] = torch.arange(tensors["visual.head"].numel(), dtype=torch.float32).reshape(
        tensors["visual.head"].shape)
    src = tmp_path / PTH.name
    torch.save(tensors, src)
    run_cli("convert", src, tmp_path / "out", "--clip-heads", HEADS)
    out = load_file(str(tmp_path / "out" / "image_encoder" / "model.safetensors"))
    assert torch.equal(out["visual_projection.weight"], tensors["visual.head"].t())
