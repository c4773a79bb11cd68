"""Make the Wan 2.2 VACE-Fun A14B fixture (tests/fixtures/vace_fun_a14b/) with VideoX-Fun's own model
code: `VaceWanTransformer3DModel` (videox_fun/models/wan_transformer3d_vace.py, aigc-apps/VideoX-Fun at
commit 804a4258e2608f855ccaec8fffa279e75a3b89c6), two tiny seeded experts saved in the layout of
`alibaba-pai/Wan2.2-VACE-Fun-A14B` (high_noise_model/ and low_noise_model/, each its config.json as
the class writes it and its safetensors weights), with fixed inputs and each expert's output.

Run once, by hand, with a VideoX-Fun checkout: `python tests/vace_fun_fixture.py /path/to/VideoX-Fun`.
The tests read only what it wrote (VideoX-Fun is no dependency). Of VideoX-Fun only the model files
run; three imports of theirs that need CUDA-only or cluster packages are stood in for (see
`_videox_fun`): the sequence-parallel helpers (world size 1), the Triton sparse-attention kernel (not
used by this model), and, as VideoX-Fun itself falls back to it without flash-attn, torch's
scaled_dot_product_attention in float32."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
import types
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
FOLDER = HERE / "fixtures" / "vace_fun_a14b"
COMMIT = "804a4258e2608f855ccaec8fffa279e75a3b89c6"
FILES = ["videox_fun/models/wan_transformer3d.py", "videox_fun/models/wan_transformer3d_vace.py",
         "videox_fun/models/attention_utils.py", "videox_fun/models/cache_utils.py",
         "videox_fun/models/wan_camera_adapter.py", "videox_fun/utils/cfg_optimization.py"]
# tiny, with the real structure: VACE blocks at some layers, the 96 control channels WanVACEPipeline makes
INIT = dict(vace_layers=[0, 3], vace_in_dim=96, model_type="t2v", patch_size=(1, 2, 2), text_len=512, in_dim=16,
            dim=128, ffn_dim=256, freq_dim=40, text_dim=32, out_dim=16, num_heads=4, num_layers=4,
            window_size=(-1, -1), qk_norm=True, cross_attn_norm=True, eps=1e-6)
EXPERTS = {"high_noise_model": 7400, "low_noise_model": 7401}  # folder -> seed
LATENT = (3, 4, 4)


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _videox_fun(root: Path):
    for pkg in ("videox_fun", "videox_fun.models", "videox_fun.utils"):
        p = types.ModuleType(pkg)
        p.__path__ = []
        sys.modules[pkg] = p
    dist = types.ModuleType("videox_fun.dist")  # sequence parallelism (xfuser): one process
    dist.get_sequence_parallel_rank = lambda: 0
    dist.get_sequence_parallel_world_size = lambda: 1
    dist.get_sp_group = dist.usp_attn_forward = dist.xFuserLongContextAttention = None
    sys.modules["videox_fun.dist"] = dist
    kernel = types.ModuleType("videox_fun.models.attention_kernel")  # Triton sparse attention: unused here
    kernel._sparse_linear_attention = kernel.get_block_map = None
    sys.modules["videox_fun.models.attention_kernel"] = kernel
    cfg = _load("videox_fun.utils.cfg_optimization", root / "videox_fun/utils/cfg_optimization.py")
    sys.modules["videox_fun.utils"].cfg_skip = cfg.cfg_skip
    for f in FILES[2:5]:
        _load(f[:-3].replace("/", "."), root / f)
    _load("videox_fun.models.wan_transformer3d", root / FILES[0])
    return _load("videox_fun.models.wan_transformer3d_vace", root / FILES[1])


def make_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7450)
    f, h, w = LATENT
    return {"x": torch.randn(16, f, h, w, generator=g), "vace_context": torch.randn(96, f, h, w, generator=g),
            "context": torch.randn(9, INIT["text_dim"], generator=g), "t": torch.tensor([640.0])}


def main(root: Path) -> None:
    from safetensors.torch import save_file

    vace = _videox_fun(root)
    inputs = make_inputs()
    FOLDER.mkdir(parents=True, exist_ok=True)
    save_file(inputs, str(FOLDER / "inputs.safetensors"))
    f, h, w = LATENT
    meta = {"fixture": "vace_fun_a14b", "kind": "transformer (two experts)",
            "reference_source": {"repo": "aigc-apps/VideoX-Fun", "commit": COMMIT,
                                 "files_sha256": {p: hashlib.sha256((root / p).read_bytes()).hexdigest() for p in FILES}},
            "reference_class": "VaceWanTransformer3DModel", "init_kwargs": INIT, "torch": torch.__version__,
            "experts": {}, "attention": "torch scaled_dot_product_attention, float32 (VideoX-Fun's own fallback)",
            "reference_call": "out = model(x=x[None], t=t, vace_context=vace_context[None], context=[context], seq_len=12, "
                              "vace_context_scale=0.75)[0]   # -> expected['out'] [C_out,F,H,W]",
            "diffusers_call": "WanVACETransformer3DModel(hidden_states=x[None], timestep=t, encoder_hidden_states=context "
                              "zero-padded to text_len, control_hidden_states=vace_context[None], "
                              "control_hidden_states_scale=[0.75] * len(vace_layers)).sample   # -> expected['sample']"}
    for folder, seed in EXPERTS.items():
        torch.manual_seed(seed)
        model = vace.VaceWanTransformer3DModel(**INIT).eval().requires_grad_(False)
        g = torch.Generator().manual_seed(seed + 100)  # zero-initialised projections and biases made visible
        for _, p in sorted(model.named_parameters()):
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        with torch.no_grad():
            out = model(x=inputs["x"][None], t=inputs["t"], vace_context=inputs["vace_context"][None],
                        context=[inputs["context"]], seq_len=f * (h // 2) * (w // 2), vace_context_scale=0.75)[0]
        d = FOLDER / folder
        d.mkdir(exist_ok=True)
        sd = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(sd, str(d / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
        model.save_config(str(d))  # config.json as VideoX-Fun's save_pretrained writes it
        save_file({"out": out.clone(), "sample": out[None].clone()}, str(d / "expected.safetensors"))
        meta["experts"][folder] = {"seed": seed, "state_dict_keys": len(sd), "max_abs_out": float(out.abs().max())}
        print(folder, len(sd), "tensors, out", list(out.shape), f"max {out.abs().max():.4g}")
    (FOLDER / "fixture.json").write_text(json.dumps(meta, indent=2) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
