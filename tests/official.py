"""The official Wan code (PyPI wan22==2.2.11, installed with --no-deps by the README's test command)
loaded module by module, so that its package __init__ (which imports every pipeline, cv2, ...) never
runs: wan/modules/model.py (WanModel), vae2_1.py / vae2_2.py (WanVAE_), t5.py (T5Encoder). The
fixtures were made with these very files (fixture.json `official_source` gives their sha256)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
import types

import torch


def _load(name: str, rel: str):
    if name in sys.modules:
        return sys.modules[name]
    path = importlib.metadata.distribution("wan22").locate_file(rel)
    spec = importlib.util.spec_from_file_location(name, str(path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _packages():
    for pkg in ("wan", "wan.modules"):
        if pkg not in sys.modules:
            p = types.ModuleType(pkg)
            p.__path__ = []
            sys.modules[pkg] = p
    if "wan.modules.tokenizers" not in sys.modules:  # t5.py imports it at the top; the encoder never uses it
        stub = types.ModuleType("wan.modules.tokenizers")
        stub.HuggingfaceTokenizer = None
        sys.modules["wan.modules.tokenizers"] = stub


def available() -> bool:
    try:
        importlib.metadata.distribution("wan22")
        import einops  # noqa: F401 - vae2_1.py / vae2_2.py need it
    except (importlib.metadata.PackageNotFoundError, ImportError):
        return False
    return True


def wan_model_module():
    """wan/modules/model.py, its flash_attention replaced by the same package's own
    scaled_dot_product fallback (wan/modules/attention.py `attention`) in float32: flash-attn needs
    CUDA. With it, the fixtures' own weights reproduce expected['out'] exactly (0 error)."""
    _packages()
    attention = _load("wan.modules.attention", "wan/modules/attention.py")
    model = _load("wan.modules.model", "wan/modules/model.py")

    def fp32_attention(q, k, v, q_lens=None, k_lens=None, **kwargs):
        return attention.attention(q, k, v, q_lens=q_lens, k_lens=k_lens, dtype=torch.float32)

    model.flash_attention = fp32_attention
    return model


def vae_module(version: str):
    _packages()
    return _load(f"wan.modules.vae{version}", f"wan/modules/vae{version}.py")


def t5_module():
    """wan/modules/t5.py; its T5EncoderModel wrapper (not used) has a default argument
    `device=torch.cuda.current_device()`, evaluated at import: answered with 0 while importing on a
    CPU-only torch."""
    _packages()
    real = torch.cuda.current_device
    torch.cuda.current_device = lambda: 0
    try:
        return _load("wan.modules.t5", "wan/modules/t5.py")
    finally:
        torch.cuda.current_device = real


def flash_attn_func_fp32(q, k, v, **kwargs):
    """What flash-attn's `flash_attn_func(q, k, v)` computes ([B, S, H, D] in and out, softmax
    scale 1/sqrt(D), no mask), in float32 with torch's scaled_dot_product_attention: flash-attn
    needs CUDA. Stands in for it in wan/modules/animate/face_blocks.py (its own "torch" mode skips
    the [B, S, H, D] -> [B, H, S, D] transpose, so it is not a usable fallback)."""
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2).float(), k.transpose(1, 2).float(), v.transpose(1, 2).float())
    return out.transpose(1, 2).to(q.dtype)


def _with_distributed(family: str):
    """model.py as in `wan_model_module`, the package `wan.modules.<family>` and the sequence-parallel
    helpers the Wan 2.2 family models import (wan/distributed: one process, never used here)."""
    model = wan_model_module()
    for pkg in ("wan.distributed", f"wan.modules.{family}"):
        if pkg not in sys.modules:
            p = types.ModuleType(pkg)
            p.__path__ = []
            sys.modules[pkg] = p
    for name in ("util", "ulysses", "sequence_parallel"):
        _load(f"wan.distributed.{name}", f"wan/distributed/{name}.py")
    return model


def animate_module():
    """wan/modules/animate/model_animate.py (WanAnimateModel) with what it imports: the shared
    model.py as in `wan_model_module` (flash_attention -> the package's own float32 fallback), the
    face blocks' flash_attn_func -> `flash_attn_func_fp32`."""
    model = _with_distributed("animate")
    face = _load("wan.modules.animate.face_blocks", "wan/modules/animate/face_blocks.py")
    face.flash_attn_func = flash_attn_func_fp32
    _load("wan.modules.animate.motion_encoder", "wan/modules/animate/motion_encoder.py")
    animate = _load("wan.modules.animate.model_animate", "wan/modules/animate/model_animate.py")
    animate.flash_attention = model.flash_attention
    return animate


def s2v_module():
    """wan/modules/s2v/model_s2v.py (WanModel_S2V) with what it imports, as `animate_module`."""
    _with_distributed("s2v")
    for name in ("s2v_utils", "auxi_blocks", "audio_utils", "motioner"):
        _load(f"wan.modules.s2v.{name}", f"wan/modules/s2v/{name}.py")
    return _load("wan.modules.s2v.model_s2v", "wan/modules/s2v/model_s2v.py")
