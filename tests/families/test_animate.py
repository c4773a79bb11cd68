"""Wan 2.2 Animate-14B (issue 22): the original repo's layout (transformer shards + index + config.json
at the root, the Wan 2.1 VAE, umT5, the CLIP file, the tokenizer) -> a WanAnimatePipeline folder.
The transformer reproduces the official WanAnimateModel's output (tests/animate_fixture.py: made by
wan22's own code) on pose latents and a face video; the pipeline loads with no warning and generates;
every other output kind loads as users load it and runs."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import animate_fixture
import official
from conftest import FIXTURES, TOL, rel_err, run_cli
from repos import CLIP_PTH, T5_PTH, VAE_PTH, make_umt5_tokenizer
from loading import load_pipeline

pytestmark = pytest.mark.skipif(not official.available(), reason="the official Wan code (wan22) is not installed")


def make_animate_repo(root):
    """Wan-AI/Wan2.2-Animate-14B's layout, tiny: the fixture's transformer, the shared .pth files."""
    animate_fixture.write_repo(root)
    for name, pth in (("vae", VAE_PTH), ("t5", T5_PTH), ("clip", CLIP_PTH)):
        shutil.copy(FIXTURES / name / pth, root / pth)
    make_umt5_tokenizer(root / "google" / "umt5-xxl")
    (root / "xlm-roberta-large").mkdir()
    (root / "xlm-roberta-large" / "tokenizer_config.json").write_text('{"tokenizer_class": "XLMRobertaTokenizer"}')
    return root


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return make_animate_repo(tmp_path_factory.mktemp("animate") / "Wan2.2-Animate-14B-tiny")


@pytest.fixture(scope="module")
def converted(repo, tmp_path_factory):
    out = tmp_path_factory.mktemp("animate-out") / "pipe"
    report = run_cli("convert", repo, out, "--clip-heads", "2", "--json").json()
    return out, report


@pytest.fixture(scope="module")
def inputs():
    got = animate_fixture.make_inputs()
    assert animate_fixture.digest(got) == json.loads((animate_fixture.FOLDER / "fixture.json").read_text())["inputs_sha256"]
    return got


def expected():
    return load_file(str(animate_fixture.FOLDER / "expected.safetensors"))["sample"]


def run_diffusers(model, inputs, dtype=torch.float32):
    args = {k: v.to(dtype) if v.is_floating_point() and k != "timestep" else v
            for k, v in animate_fixture.diffusers_inputs(inputs).items()}
    with torch.no_grad():
        return model(**args).sample.float()


def test_animate_repo_becomes_a_wan_animate_pipeline(converted, inputs):
    from diffusers import WanAnimateTransformer3DModel

    out, report = converted
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "WanAnimatePipeline"
    assert index["transformer"] == ["diffusers", "WanAnimateTransformer3DModel"]
    assert index["image_encoder"] == ["transformers", "CLIPVisionModel"]  # as diffusers' script writes it
    assert report["pipeline"]["name"] == "wan2.2-animate-14b" and report["pipeline"]["family"] == "Wan 2.2"
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["flow_shift"] == 5.0
    transformer = next(c for c in report["components"] if c["instance"] == "transformer")
    assert transformer["variant"] == "animate"
    cfg = json.loads((out / "transformer" / "config.json").read_text())
    # diffusers scripts/convert_wan_to_diffusers.py "Wan2.2-Animate-14B": the same Animate-specific values
    assert {k: cfg[k] for k in ("motion_encoder_size", "motion_style_dim", "motion_dim", "motion_encoder_dim",
                                "face_encoder_hidden_dim", "face_encoder_num_heads", "inject_face_latents_blocks",
                                "image_dim", "in_channels", "latent_channels")} == {
        "motion_encoder_size": 512, "motion_style_dim": 512, "motion_dim": 20, "motion_encoder_dim": 512,
        "face_encoder_hidden_dim": 1024, "face_encoder_num_heads": 4, "inject_face_latents_blocks": 5,
        "image_dim": 1280, "in_channels": 36, "latent_channels": 16}
    model = WanAnimateTransformer3DModel.from_pretrained(str(out / "transformer")).eval()
    assert rel_err(run_diffusers(model, inputs), expected()) <= TOL


def test_the_face_path_counts(converted, inputs):
    """The comparison would see a misplaced motion encoder, face encoder or face adapter weight:
    each moved a little changes the output well beyond the tolerance."""
    from diffusers import WanAnimateTransformer3DModel

    out, _ = converted
    model = WanAnimateTransformer3DModel.from_pretrained(str(out / "transformer")).eval()
    for part in ("motion_encoder.motion_network.2.weight", "face_encoder.conv2.weight", "face_adapter.1.to_v.weight",
                 "motion_encoder.res_blocks.6.conv1.act_fn.bias"):
        p = model.get_parameter(part)
        saved = p.detach().clone()
        with torch.no_grad():
            p.add_(torch.randn_like(p) * 0.2 * saved.std())
        assert rel_err(run_diffusers(model, inputs), expected()) > 10 * TOL, part
        with torch.no_grad():
            p.copy_(saved)


def test_the_vision_tower_is_wans_penultimate_block(converted):
    from transformers import CLIPVisionModel

    out, _ = converted
    d = FIXTURES / "clip"
    inp, exp = load_file(str(d / "inputs.safetensors")), load_file(str(d / "expected.safetensors"))
    model = CLIPVisionModel.from_pretrained(str(out / "image_encoder")).eval()
    with torch.no_grad():
        hidden = model(pixel_values=inp["pixel_values"], output_hidden_states=True).hidden_states[-2]
    assert rel_err(hidden, exp["visual_31"]) <= TOL
    with safe_open(str(out / "image_encoder" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert all(k.startswith("vision_model.") for k in keys) and "visual_projection.weight" not in keys


def test_pipeline_loads_cleanly_and_animates_a_pose_and_face_video(converted, capfd):
    from PIL import Image

    out, _ = converted
    pipe = load_pipeline(out, capfd)
    capfd.readouterr()
    assert type(pipe.image_encoder).__name__ == "CLIPVisionModel"
    # the fixtures' tiny CLIP tower is 160 wide while the transformer keeps the real 1280-wide image
    # tokens (tests/fixtures/README.md): the image tokens are given, as a caller with cached ones does
    # (the tower itself is compared with the official output above); the pipeline takes no image_embeds
    # beside the image it also encodes with the VAE, so they come through its encode_image
    image_embeds = torch.randn(1, 257, 1280, generator=torch.Generator().manual_seed(1))
    pipe.encode_image = lambda image, device: image_embeds
    image = Image.new("RGB", (32, 32), (120, 60, 200))
    pose = [Image.new("RGB", (32, 32), (10 * i, 200, 30)) for i in range(5)]
    face = [Image.new("RGB", (512, 512), (200, 10 * i, 90)) for i in range(5)]  # the motion encoder's size
    frames = pipe(image=image, pose_video=pose, face_video=face, prompt="a cat dancing", negative_prompt="",
                  height=32, width=32, segment_frame_length=5, num_inference_steps=2, max_sequence_length=16,
                  output_type="pt", guidance_scale=1.0, generator=torch.Generator().manual_seed(0)).frames
    assert frames.shape[-3:] == (3, 32, 32) and frames.shape[1] >= 5 and torch.isfinite(frames).all()


def test_inspect_and_verify_take_the_animate_pipeline(converted, repo):
    out, _ = converted
    report = run_cli("inspect", out, "--json").json()
    assert report["healthy"]
    variants = {c["component"]: c.get("variant") for c in report["components"]}
    assert variants["transformer"] == "animate" and variants["image_encoder"] == "vision"
    verified = run_cli("verify", out, "--source", repo, "--json").json()
    assert verified["ok"]
    assert next(c for c in verified["components"] if c["component"] == "transformer")["compared"] == 423


def test_way_back_is_the_official_repo(converted, repo, tmp_path, inputs):
    """--to original: every tensor byte-identical to the repo's (the 14 blur kernels, which diffusers
    rebuilds, written again from mappings/constants.safetensors), its config.json the repo's; the
    official WanAnimateModel takes the file and reproduces its output."""
    out, _ = converted
    back = tmp_path / "back"
    r = run_cli("convert", out, back, "--to", "original", "--only", "transformer")
    assert "not written" not in r.stdout + r.stderr
    assert json.loads((back / "config.json").read_text()) == json.loads((repo / "config.json").read_text())
    written = load_file(str(back / "diffusion_pytorch_model.safetensors"))
    source = {}
    for f in sorted(repo.glob("diffusion_pytorch_model-*.safetensors")):
        source.update(load_file(str(f)))
    assert len([k for k in written if k.endswith(".kernel")]) == 14 and set(written) == set(source)
    assert all(torch.equal(written[k], source[k]) and written[k].dtype == source[k].dtype for k in written)
    torch.manual_seed(0)  # the model the official loader builds (its config.json: the real defaults, text_dim
    model = official.animate_module().WanAnimateModel(**animate_fixture.INIT).eval()  # 4096, are the tiny's)
    model.load_state_dict(written, strict=True)
    got = animate_fixture.official_output(model, inputs)
    assert rel_err(got[None], expected()) <= TOL


@pytest.mark.parametrize("kind", ["gguf-Q8_0", "gguf-Q4_K_M", "int8", "float8", "bf16", "fp8_scaled"])
def test_every_output_kind_loads_in_bf16_and_runs(repo, tmp_path, inputs, kind, capfd):
    """As users run Wan: diffusers in bfloat16. The error against the float32 official output stays
    near what bf16 alone gives (the motion encoder runs 512 px convolutions in bf16)."""
    import diffusers

    out = tmp_path / "out"
    if kind.startswith("gguf"):
        run_cli("convert", repo, tmp_path / "t.gguf", "--to", "gguf", "--quantize", kind.split("-")[1])
        run_cli("convert", repo, out, "--only", "transformer")  # the config from_single_file needs
        capfd.readouterr()
        model = diffusers.WanAnimateTransformer3DModel.from_single_file(
            str(tmp_path / "t.gguf"), config=str(out / "transformer"), torch_dtype=torch.bfloat16,
            quantization_config=diffusers.GGUFQuantizationConfig(compute_dtype=torch.bfloat16))
    else:
        src = repo
        if kind == "fp8_scaled":  # ComfyUI's fp8_scaled file (the motion encoder kept F16), read back
            run_cli("convert", repo, tmp_path / "d", "--only", "transformer")
            run_cli("convert", tmp_path / "d", tmp_path / "comfy", "--to", "comfyui", "--quantize", kind)
            src = next((tmp_path / "comfy" / "diffusion_models").iterdir())
            with safe_open(str(src), "pt") as f:
                assert {f.get_slice(k).get_dtype() for k in f.keys() if k.startswith("motion_encoder.")} == {"F16"}
        args = ["--dtype", "bf16"] if kind in ("bf16", "fp8_scaled") else ["--quantize", kind]
        if kind == "fp8_scaled":  # a single file has no config.json, and dim 128 is no published size
            args += ["--set", "transformer.num_heads=4"]
        run_cli("convert", src, out, "--only", "transformer", *args)
        capfd.readouterr()
        model = diffusers.WanAnimateTransformer3DModel.from_pretrained(str(out / "transformer"),
                                                                       torch_dtype=torch.bfloat16)
    got = run_diffusers(model.eval(), inputs, torch.bfloat16)
    assert torch.isfinite(got).all()
    assert rel_err(got, expected()) <= 0.06, kind  # measured: bf16 1.1e-2, int8 1.6e-2, float8 4.8e-2, Q8_0 1.6e-2, Q4_K_M 1.9e-2


def test_a_cached_animate_repo_converts_offline_and_leaves_the_preprocessing_models(tmp_path):
    """`convert Wan-AI/Wan2.2-Animate-14B OUT` from the Hub cache: the pipeline, and none of the
    preprocessing checkpoints or the relighting LoRA is asked for."""
    from fnmatch import fnmatch

    from test_hub import cli
    from wan2diffusers.hub import allow_patterns

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--Wan-AI--Wan2.2-Animate-14B"
    make_animate_repo(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    r = cli(["convert", "Wan-AI/Wan2.2-Animate-14B", tmp_path / "out", "--clip-heads", "2"], tmp_path / "hf")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "out" / "model_index.json").read_text())["_class_name"] == "WanAnimatePipeline"
    for unwanted in ("process_checkpoint/det/yolov10m.onnx", "process_checkpoint/sam2/sam2_hiera_large.pt",
                     "relighting_lora.ckpt", "xlm-roberta-large/tokenizer.json"):
        assert not any(fnmatch(unwanted, p) for p in allow_patterns(None)), unwanted


def test_the_relighting_lora_converts_and_diffusers_reproduces_it(converted, repo, inputs, tmp_path):
    """relighting_lora.ckpt as wan22 makes and loads it (wan/animate.py: get_loraconfig over every block
    Linear but the face ones, torch.load(path)["state_dict"] into PEFT): made the same way on the
    fixture model, converted to diffusers' LoRA format, loaded by diffusers' own LoRA loader into
    the converted transformer, and run: the official model with the adapter gives the same output."""
    from diffusers import WanAnimateTransformer3DModel
    from peft.utils import get_peft_model_state_dict

    official.animate_module()
    utils = official._load("wan.modules.animate.animate_utils", "wan/modules/animate/animate_utils.py")
    model = animate_fixture.build()
    model.add_adapter(utils.get_loraconfig(transformer=model, rank=8, alpha=8))
    g = torch.Generator().manual_seed(7350)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if ".lora_B." in name:  # PEFT's gaussian init leaves B at zero
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    ckpt = tmp_path / "relighting_lora.ckpt"
    torch.save({"state_dict": get_peft_model_state_dict(model)}, ckpt)
    want = animate_fixture.official_output(model, inputs)[None]
    assert rel_err(want, expected()) > 10 * TOL  # the adapter changes the output

    out = tmp_path / "relighting_lora_diffusers.safetensors"
    report = run_cli("convert", ckpt, out, "--to", "diffusers", "--json").json()
    assert report["lora"]["format"] == "original" and report["lora"]["modules"] == 10 * 12  # q k v o, q k v o k_img v_img, ffn 0 2
    transformer = WanAnimateTransformer3DModel.from_pretrained(str(converted[0] / "transformer")).eval()
    transformer.load_lora_adapter(str(out), adapter_name="relight", prefix="transformer")
    assert rel_err(run_diffusers(transformer, inputs), want) <= TOL
    # merged into the model instead (merge reads the same .ckpt): the same output
    run_cli("merge", repo, tmp_path / "merged", "--lora", str(ckpt), "--only", "transformer")
    merged = WanAnimateTransformer3DModel.from_pretrained(str(tmp_path / "merged" / "transformer")).eval()
    assert rel_err(run_diffusers(merged, inputs), want) <= TOL


def test_the_restored_blur_kernel_is_the_official_one(repo, tmp_path):
    """mappings/constants.safetensors (scripts/make_constants.py) holds what wan22's make_kernel builds;
    from a bf16 model the kernels go back in bf16, as the model's own buffers are."""
    from wan2diffusers.mapping.tables import constants_path

    official.animate_module()
    kernel = sys.modules["wan.modules.animate.motion_encoder"].make_kernel([1, 3, 3, 1])
    stored = load_file(str(constants_path()))["blur_kernel_1331"]
    assert stored.dtype == kernel.dtype and torch.equal(stored, kernel)
    run_cli("convert", repo, tmp_path / "bf16", "--only", "transformer", "--dtype", "bf16")
    run_cli("convert", tmp_path / "bf16", tmp_path / "back", "--to", "original")
    written = load_file(str(tmp_path / "back" / "diffusion_pytorch_model.safetensors"))
    kernels = [k for k in written if k.endswith(".kernel")]
    assert len(kernels) == 14 and all(written[k].dtype == torch.bfloat16 and torch.equal(written[k].float(), kernel)
                                      for k in kernels)
