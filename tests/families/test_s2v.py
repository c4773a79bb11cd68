"""Wan 2.2 S2V-14B (issue 22): diffusers has no class for it, so a Diffusers output is refused in one
line that says why; its GGUF and ComfyUI files (bf16, fp8_scaled) are written in the original key
names, checked against gguf-py/ggml and ComfyUI's fp8 formula and loaded strictly by the official
class; the way back from the ComfyUI file gives the repo again; inspect and verify take them. The
checkpoint is a tiny WanModel_S2V built by the official code (wan22) in the layout of
Wan-AI/Wan2.2-S2V-14B, with its S2V config (wan22 wan/configs/wan_s2v_14B.py); its header is kept in
tests/fixtures/s2v/ for scripts/regenerate_mappings.py."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import official
from conftest import FIXTURES, run_cli
from repos import T5_PTH, VAE_PTH

pytestmark = pytest.mark.skipif(not official.available(), reason="the official Wan code (wan22) is not installed")

# wan_s2v_14B.py's transformer settings, at tiny widths
INIT = dict(cond_dim=16, audio_dim=64, num_audio_token=4, enable_adain=True, adain_mode="attn_norm",
            audio_inject_layers=[0, 2], zero_init=True, zero_timestep=True, enable_motioner=False,
            add_last_motion=True, enable_tsm=False, trainable_token_pos_emb=False, enable_framepack=True,
            framepack_drop_mode="padd", model_type="s2v", patch_size=(1, 2, 2), text_len=512, in_dim=16, dim=128,
            ffn_dim=256, freq_dim=40, text_dim=32, out_dim=16, num_heads=4, num_layers=4)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("s2v") / "Wan2.2-S2V-14B-tiny"
    root.mkdir()
    torch.manual_seed(7500)
    model = official.s2v_module().WanModel_S2V(**INIT).requires_grad_(False)
    g = torch.Generator().manual_seed(7501)  # zero_init leaves the injectors' outputs at zero: made visible
    for _, p in sorted(model.named_parameters()):
        p.add_(torch.randn(p.shape, generator=g) * 0.05)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(root / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    model.save_config(str(root))
    shutil.copy(FIXTURES / "vae" / VAE_PTH, root / VAE_PTH)
    shutil.copy(FIXTURES / "t5" / T5_PTH, root / T5_PTH)
    (root / "wav2vec2-large-xlsr-53-english").mkdir()  # the audio encoder the repo ships (transformers)
    (root / "wav2vec2-large-xlsr-53-english" / "config.json").write_text(json.dumps({"model_type": "wav2vec2"}))
    return root


def one_line_about_s2v(r):
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "S2V" in lines[0] and "no S2V transformer class" in lines[0], r.stdout + r.stderr
    assert "no rule knows" not in r.stdout + r.stderr


@pytest.mark.parametrize("to", [[], ["--dtype", "bf16"], ["--quantize", "int8"]])
def test_a_diffusers_output_of_s2v_is_refused_in_one_line(repo, tmp_path, to):
    out = tmp_path / "out"
    one_line_about_s2v(run_cli("convert", repo, out, *to, ok=False))
    assert not out.exists() and not list(tmp_path.iterdir())


def test_comfyui_file_of_s2v_is_its_weights_and_the_official_class_takes_it(repo, tmp_path):
    """--to comfyui --only transformer: ComfyUI's diffusion_models file in the original key names
    (what comfy/ldm/wan/model.py WanModel_S2V holds), each tensor the source's cast to bf16; the
    official class loads it strictly. The repo's VAE and umT5 (original layout) go through Diffusers
    first, as for every model: refused here in one line."""
    from safetensors.torch import load_file

    run_cli("convert", repo, tmp_path / "comfy", "--to", "comfyui", "--only", "transformer", "--dtype", "bf16")
    files = list((tmp_path / "comfy" / "diffusion_models").iterdir())
    assert [f.name for f in files] == ["Wan2.2-S2V-14B-tiny_bf16.safetensors"]
    written, src = load_file(str(files[0])), source_tensors(repo)
    assert written.keys() == src.keys()
    assert all(written[k].dtype == torch.bfloat16 and torch.equal(written[k], src[k].to(torch.bfloat16)) for k in src)
    official.s2v_module().WanModel_S2V(**INIT).load_state_dict(written, strict=True)
    r = run_cli("convert", repo, tmp_path / "all", "--to", "comfyui", ok=False)
    assert "not Diffusers" in r.stderr and not (tmp_path / "all").exists()


def test_fp8_scaled_file_of_s2v_is_comfyuis_quantizer_output(repo, tmp_path):
    from fp8_files import FP8, comfy_quantize
    from safetensors.torch import load_file

    run_cli("convert", repo, tmp_path / "comfy", "--to", "comfyui", "--only", "transformer", "--quantize", "fp8_scaled")
    path = next((tmp_path / "comfy" / "diffusion_models").iterdir())
    assert path.name.endswith("_fp8_scaled.safetensors")
    written, src = load_file(str(path)), source_tensors(repo)
    n = 0
    for key, w in src.items():
        if written[key].dtype != FP8:
            assert torch.equal(written[key], w.to(torch.float16)), key  # kept: F16, as Comfy-Org's files
            continue
        q, scale = comfy_quantize(w.to(torch.float32))
        assert torch.equal(written[key].view(torch.uint8), q.view(torch.uint8)), key
        assert torch.equal(written[f"{key.removesuffix('.weight')}.scale_weight"], scale), key
        n += 1
    assert written["trainable_cond_mask.weight"].dtype == torch.float16  # ComfyUI casts it itself
    assert written["audio_injector.injector.0.q.weight"].dtype == FP8 and n > 40
    # and read back: the GGUF of the fp8 file holds the dequantized values (ComfyUI's formula)
    import gguf
    import numpy as np

    gg = run_cli("convert", path, tmp_path / "from-fp8.gguf", "--to", "gguf", "--quantize", "F32",
                 "--set", "transformer.num_heads=4", "--json").json()  # tiny: no published width
    assert gg["variant"] == "s2v"
    key = "audio_injector.injector.0.q.weight"
    t = next(t for t in gguf.GGUFReader(str(tmp_path / "from-fp8.gguf")).tensors if t.name == key)
    want = written[key].float() * written[key.removesuffix(".weight") + ".scale_weight"]
    assert torch.equal(torch.from_numpy(np.array(t.data)).reshape(want.shape), want)


def source_tensors(repo) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(repo / "diffusion_pytorch_model.safetensors"))


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K_M"])
def test_gguf_of_s2v_is_what_the_reference_quantizers_make_of_its_weights(repo, tmp_path, qtype):
    """Every tensor of the S2V GGUF in its original name and shape, as gguf-py (and ggml, through
    verify) quantize the source's values; the audio modules' Linears quantized like the blocks'."""
    import gguf

    out = tmp_path / f"s2v-{qtype}.gguf"
    report = run_cli("convert", repo, out, "--to", "gguf", "--quantize", qtype, "--json").json()
    assert report["variant"] == "s2v"
    src = source_tensors(repo)
    tensors = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    assert set(tensors) == set(src)
    for key, value in src.items():
        t = tensors[key]
        assert tuple(int(d) for d in reversed(t.shape.tolist())) == tuple(value.shape), key
        if qtype == "Q8_0":
            want = gguf.quants.quantize(value.float().numpy(), t.tensor_type)
            assert bytes(t.data.tobytes()) == bytes(want.tobytes()), (key, t.tensor_type.name)
    assert tensors["audio_injector.injector.0.q.weight"].tensor_type.name == ("Q8_0" if qtype == "Q8_0" else "F16")
    # ComfyUI's WanModel_S2V (comfy/ldm/wan/model.py) casts the cond-mask embedding's weight itself: kept float
    assert tensors["trainable_cond_mask.weight"].tensor_type.name in ("F16", "F32")
    verified = run_cli("verify", out, "--source", repo, "--json").json()  # ggml's own K-quantizer as judge
    assert verified["ok"], verified


def test_an_f32_gguf_of_s2v_loads_into_the_official_model(repo, tmp_path):
    """The GGUF's names and shapes are WanModel_S2V's own: the official class takes it strictly."""
    import gguf
    import numpy as np

    out = tmp_path / "s2v-f32.gguf"
    run_cli("convert", repo, out, "--to", "gguf", "--quantize", "F32")
    state = {t.name: torch.from_numpy(np.array(t.data)).reshape([int(d) for d in reversed(t.shape.tolist())])
             for t in gguf.GGUFReader(str(out)).tensors}
    model = official.s2v_module().WanModel_S2V(**INIT)
    model.load_state_dict(state, strict=True)
    src = source_tensors(repo)
    assert all(torch.equal(state[k], src[k]) for k in src)


def test_inspect_says_what_s2v_is_and_what_works(repo, tmp_path):
    report = run_cli("inspect", repo, "--json", ok=None).json()
    transformer = next(c for c in report["components"] if c["component"] == "transformer")
    assert transformer["variant"] == "s2v" and transformer["from_pretrained"] is None
    finding = next(f for f in transformer["findings"] if "S2V" in f["message"])
    assert "no S2V transformer class" in finding["message"] and "--to gguf" in finding["fix"]
    run_cli("convert", repo, tmp_path / "s2v.gguf", "--to", "gguf", "--quantize", "Q8_0")
    gg = run_cli("inspect", tmp_path / "s2v.gguf", "--json").json()
    assert gg["healthy"] and "s2v" in json.dumps(gg)


def test_way_back_from_the_comfyui_file_is_the_original_repo(repo, tmp_path):
    """The ComfyUI file carries the source's config.json in its metadata (the weights cannot tell
    audio_inject_layers and the rest); `--to original` from it gives the repo's weights byte for byte
    and its config.json. A file that carries none is refused in one line."""
    from safetensors.torch import load_file, save_file

    run_cli("convert", repo, tmp_path / "comfy", "--to", "comfyui", "--only", "transformer")
    path = next((tmp_path / "comfy" / "diffusion_models").iterdir())
    assert run_cli("verify", path, "--source", repo, "--json").json()["ok"]  # against the repo, key for key
    run_cli("convert", path, tmp_path / "back", "--to", "original")
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == json.loads((repo / "config.json").read_text())
    a, b = load_file(str(tmp_path / "back" / "diffusion_pytorch_model.safetensors")), source_tensors(repo)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    bare = tmp_path / "bare.safetensors"
    changed = load_file(str(path))
    changed["audio_injector.injector.1.k.weight"][2, 3] += 1
    save_file(changed, str(bare))  # also a ComfyUI file made elsewhere: no carried config.json
    bad = run_cli("verify", bare, "--source", repo, "--json", ok=False).json()
    assert [d["key"] for d in bad["differences"]] == ["audio_injector.injector.1.k.weight"]
    r = run_cli("convert", bare, tmp_path / "nope", "--to", "original", ok=False)  # (tiny: its head count is
    assert len([x for x in r.stderr.splitlines() if x.startswith("error:")]) == 1  # unknown too; 14B: "carries none")
    assert not (tmp_path / "nope").exists()
