"""Wan 2.1 VAE (Wan2.1_VAE.pth) -> diffusers AutoencoderKLWan, through the CLI."""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLWan
from safetensors.torch import load_file

from conftest import FIXTURES, TOL, fixture_io, rel_err, run_cli
from wan2diffusers.mapping.tables import load_table
from wan2diffusers.plan.detect import detect
from wan2diffusers.plan.plan import build_plan
from wan2diffusers.plan.target import build_target
from wan2diffusers.read.pth_file import read_pth_index
from wan2diffusers.read.safetensors_file import TensorRef
from wan2diffusers.read.source import SourceCheckpoint

VAE_PTH = FIXTURES / "vae" / "Wan2.1_VAE.pth"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae") / "out"
    run_cli("convert", VAE_PTH, out)
    return out / "vae"


def test_config_is_derived_from_the_weights(converted):
    inputs, _, info = fixture_io("vae")
    cfg = json.loads((converted / "config.json").read_text())
    for key, value in info["diffusers_reference_config"].items():
        assert cfg[key] == value, key
    # Wan 2.1's latent statistics, as the Wan pipelines de-normalise with them
    for key in ("latents_mean", "latents_std"):
        assert torch.allclose(torch.tensor(cfg[key]), inputs[key], atol=1e-6), key


def test_loads_strictly_and_reproduces_the_official_outputs(converted):
    assert_official_vae_outputs(converted, "vae")


def assert_official_vae_outputs(converted, name: str) -> None:
    """The converted VAE loads strictly and encodes/decodes the fixture's inputs as the official code."""
    inputs, expected, _ = fixture_io(name)
    vae, loading = AutoencoderKLWan.from_pretrained(converted, torch_dtype=torch.float32, output_loading_info=True)
    assert not any(loading[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), loading
    vae.eval()
    with torch.no_grad():
        mu = vae.encode(inputs["sample"]).latent_dist.mean
        decoded = vae.decode(inputs["latents"]).sample
    assert rel_err(mu, expected["mu"]) <= TOL
    assert rel_err(decoded, expected["decode_sample"]) <= TOL


# --- an independent statement of the layout (as diffusers' own converter computes it), so a
# misrouted tensor cannot pass by agreeing with the table under test
RESIDUAL = {"residual.0.gamma": "norm1.gamma", "residual.2.weight": "conv1.weight", "residual.2.bias": "conv1.bias",
            "residual.3.gamma": "norm2.gamma", "residual.6.weight": "conv2.weight", "residual.6.bias": "conv2.bias",
            "shortcut.weight": "conv_shortcut.weight", "shortcut.bias": "conv_shortcut.bias"}


def reference_name(key: str, num_res_blocks: int = 2) -> str:
    if m := re.fullmatch(r"(encoder|decoder)\.conv1\.(\w+)", key):
        return f"{m[1]}.conv_in.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.head\.0\.gamma", key):
        return f"{m[1]}.norm_out.gamma"
    if m := re.fullmatch(r"(encoder|decoder)\.head\.2\.(\w+)", key):
        return f"{m[1]}.conv_out.{m[2]}"
    if m := re.fullmatch(r"conv([12])\.(\w+)", key):
        return f"{'quant_conv' if m[1] == '1' else 'post_quant_conv'}.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.middle\.1\.(.+)", key):
        return f"{m[1]}.mid_block.attentions.0.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.middle\.([02])\.(.+)", key):
        return f"{m[1]}.mid_block.resnets.{int(m[2]) // 2}.{RESIDUAL[m[3]]}"
    if m := re.fullmatch(r"encoder\.downsamples\.(\d+)\.(.+)", key):
        return f"encoder.down_blocks.{m[1]}.{RESIDUAL.get(m[2], m[2])}"
    if m := re.fullmatch(r"decoder\.upsamples\.(\d+)\.(.+)", key):
        stage, pos = divmod(int(m[1]), num_res_blocks + 2)  # num_res_blocks + 1 resnets, then an upsampler
        if pos <= num_res_blocks:
            return f"decoder.up_blocks.{stage}.resnets.{pos}.{RESIDUAL[m[2]]}"
        return f"decoder.up_blocks.{stage}.upsamplers.0.{m[2]}"
    raise AssertionError(f"unexpected original key {key}")


def test_every_tensor_lands_where_the_layout_says(tmp_path):
    """Each source tensor filled with its own constant: a swapped block or stage shows up."""
    index = read_pth_index(VAE_PTH)
    constants = {key: float(i + 1) for i, key in enumerate(index)}
    state = OrderedDict((k, torch.full(tuple(ref.shape), constants[k])) for k, ref in index.items())
    src = tmp_path / "Wan2.1_VAE.pth"
    torch.save(state, src)
    run_cli("convert", src, tmp_path / "out")

    out = load_file(str(tmp_path / "out" / "vae" / "diffusion_pytorch_model.safetensors"))
    want = {reference_name(k): k for k in index}
    assert len(want) == len(index) == len(out) == 194
    assert set(out) == set(want)
    for key, tensor in out.items():
        source = want[key]
        assert tuple(tensor.shape) == tuple(index[source].shape), key
        assert torch.all(tensor == constants[source]), f"{key} holds {tensor.flatten()[0]}, not {source}"


def test_reference_layout_is_the_one_diffusers_builds():
    """The independent layout above names exactly AutoencoderKLWan's keys (so the test is sound)."""
    _, _, info = fixture_io("vae")
    cfg = {k: v for k, v in info["diffusers_reference_config"].items() if not k.startswith("_")}
    with torch.device("meta"):
        model = AutoencoderKLWan(**cfg)
    assert {reference_name(k) for k in read_pth_index(VAE_PTH)} == set(model.state_dict())


def test_a_missing_decoder_block_is_a_clean_error(tmp_path):
    index = read_pth_index(VAE_PTH)
    state = OrderedDict((k, torch.zeros(tuple(r.shape))) for k, r in index.items()
                        if not k.startswith("decoder.upsamples.14."))
    src = tmp_path / "Wan2.1_VAE.pth"
    torch.save(state, src)
    result = run_cli("convert", src, tmp_path / "out", ok=False)
    assert "coverage check failed" in result.stderr
    assert "decoder.upsamples.14.residual.0.gamma" in result.stderr  # named through the nested layout
    assert not (tmp_path / "out").exists()


def test_not_a_vae_is_refused(tmp_path):
    src = tmp_path / "Wan2.1_VAE.pth"
    torch.save({"encoder.conv1.weight": torch.zeros(8, 3, 3, 3, 3)}, src)
    result = run_cli("convert", src, tmp_path / "out", ok=False)
    assert str(src) in result.stderr


def original_name(key: str, num_res_blocks: int) -> str:
    """diffusers key -> original key: the inverse of reference_name, for any layout."""
    inv = {v: k for k, v in RESIDUAL.items()}
    if m := re.fullmatch(r"(encoder|decoder)\.conv_in\.(\w+)", key):
        return f"{m[1]}.conv1.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.norm_out\.gamma", key):
        return f"{m[1]}.head.0.gamma"
    if m := re.fullmatch(r"(encoder|decoder)\.conv_out\.(\w+)", key):
        return f"{m[1]}.head.2.{m[2]}"
    if m := re.fullmatch(r"(post_)?quant_conv\.(\w+)", key):
        return f"conv{2 if m[1] else 1}.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
        return f"{m[1]}.middle.1.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)", key):
        return f"{m[1]}.middle.{2 * int(m[2])}.{inv[m[3]]}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.(.+)", key):
        return f"encoder.downsamples.{m[1]}.{inv.get(m[2], m[2])}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"decoder.upsamples.{int(m[1]) * (num_res_blocks + 2) + int(m[2])}.{inv[m[3]]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
        return f"decoder.upsamples.{int(m[1]) * (num_res_blocks + 2) + num_res_blocks + 1}.{m[2]}"
    raise AssertionError(f"unexpected diffusers key {key}")


LAYOUTS = [  # base_dim, dim_mult, num_res_blocks, temperal_downsample
    (96, [1, 2, 4, 4], 2, [False, True, True]),  # the published Wan2.1_VAE.pth
    (16, [1, 2, 2], 3, [True, False]),
    (8, [1, 1, 2, 4, 4], 1, [True, True, False, False]),
]


@pytest.mark.parametrize("base_dim,dim_mult,num_res_blocks,temperal", LAYOUTS, ids=["wan2.1", "3-stage", "5-stage"])
def test_other_layouts_are_derived_and_planned(base_dim, dim_mult, num_res_blocks, temperal):
    cfg = dict(base_dim=base_dim, z_dim=16, dim_mult=dim_mult, num_res_blocks=num_res_blocks,
               attn_scales=[], temperal_downsample=temperal, dropout=0.0)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in AutoencoderKLWan(**cfg).state_dict().items()}
    refs = {}
    for key, shape in shapes.items():
        orig = original_name(key, num_res_blocks)
        assert reference_name(orig, num_res_blocks) == key
        refs[orig] = TensorRef(Path("/virtual/Wan2.1_VAE.pth"), orig, "F32", shape, 0, 4 * int(torch.Size(shape).numel()))
    src = SourceCheckpoint(Path("/virtual/Wan2.1_VAE.pth"), "pth file", [], refs)
    table = load_table("vae")
    det = detect(table, src)
    assert {k: det.config[k] for k in cfg} == cfg
    plan = build_plan(table, src, det, build_target(det.target_class, det.config))
    assert plan.problems == []
    assert len(plan.tensors) == len(refs) == len(shapes)
    for pt in plan.tensors:
        assert reference_name(pt.sources[0].key, num_res_blocks) == pt.key
