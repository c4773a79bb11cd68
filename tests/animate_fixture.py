"""The Wan 2.2 Animate fixture: a tiny `WanAnimateModel` built by the official code (wan22==2.2.11
wan/modules/animate/model_animate.py), seeded, saved in the layout of `Wan-AI/Wan2.2-Animate-14B`
(transformer shards + index + config.json at the repo root).

The official code builds two parts at fixed sizes whatever the model's width: the motion encoder
(`Generator(size=512, style_dim=512, motion_dim=20)`, ~20M parameters) and the face encoder's
1024-wide convolutions. Kept as data they would be 130 MB, so the weights are made again by the
official constructor from the seed when a test needs them, and checked against the sha256 of every
tensor recorded in fixture.json (a different torch that draws other numbers fails loudly there).
The inputs and what the official model returned for them (`expected.safetensors`) are data.

Run as a script to make the fixture again: `python tests/animate_fixture.py` (writes
tests/fixtures/animate/{fixture.json,expected.safetensors,header.json}; header.json: every weight's
dtype and shape, which scripts/regenerate_mappings.py grows to the published size)."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
FOLDER = HERE / "fixtures" / "animate"
SEED = 7300
INIT = dict(patch_size=(1, 2, 2), text_len=512, in_dim=36, dim=128, ffn_dim=256, freq_dim=40, text_dim=32,
            out_dim=16, num_heads=4, num_layers=10, window_size=(-1, -1), qk_norm=True, cross_attn_norm=True,
            eps=1e-6, motion_encoder_dim=512, use_context_parallel=False, use_img_emb=True)
# the config.json of Wan-AI/Wan2.2-Animate-14B holds WanAnimateModel's constructor arguments
CONFIG_FIELDS = ("dim", "eps", "ffn_dim", "freq_dim", "in_dim", "motion_encoder_dim", "num_heads", "num_layers",
                 "out_dim", "text_len")
SHARDS = 2
# inputs: 3 latent frames 4x4 (the first is the reference), 5 face frames at the motion encoder's 512 px
LATENT = (3, 4, 4)
FACE_FRAMES = 5


def build():
    """The official model, its weights drawn from SEED by its own constructor (float32, eval),
    then every parameter moved by seeded noise (0.05 N(0,1)): the constructor leaves biases, norms,
    the padding tokens and the output head at zeros or ones, which would hide a misplaced tensor
    (and a zero head makes the output zero). The blur kernels (buffers) stay as built."""
    sys.path.insert(0, str(HERE))
    import official

    torch.manual_seed(SEED)
    model = official.animate_module().WanAnimateModel(**INIT).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(SEED + 2)
    for _, p in sorted(model.named_parameters()):
        p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def state_dict(model) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].contiguous()
        h.update(k.encode() + str(t.dtype).encode() + str(list(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def write_repo(root: Path) -> Path:
    """The transformer files of the Animate repo under `root`: shards, index, config.json. The
    weights' sha256 must equal fixture.json's."""
    from safetensors.torch import save_file

    sd = state_dict(build())
    meta = json.loads((FOLDER / "fixture.json").read_text())
    if digest(sd) != meta["weights_sha256"]:
        raise AssertionError("the official constructor drew other weights than the fixture's (torch version?)")
    root.mkdir(parents=True, exist_ok=True)
    keys = sorted(sd)
    total = sum(t.numel() * t.element_size() for t in sd.values())
    weight_map, shard, acc, names = {}, {}, 0, []
    for k in keys:  # split by bytes, as the Hub shards are
        shard[k] = sd[k]
        acc += sd[k].numel() * sd[k].element_size()
        if acc >= total * (len(names) + 1) / SHARDS and len(names) < SHARDS - 1:
            names.append(shard)
            shard = {}
    names.append(shard)
    for i, part in enumerate(names, 1):
        name = f"diffusion_pytorch_model-{i:05d}-of-{SHARDS:05d}.safetensors"
        save_file(part, str(root / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (root / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (root / "config.json").write_text(json.dumps(meta["config_json"], indent=2))
    return root


def make_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(SEED + 1)
    f, h, w = LATENT
    return {
        "x": torch.randn(16, f, h, w, generator=g),
        "y": torch.randn(20, f, h, w, generator=g),  # mask (4) + reference latents (16), joined to x
        "pose_latents": torch.randn(16, f - 1, h, w, generator=g),
        "face_pixel_values": torch.rand(1, 3, FACE_FRAMES, 512, 512, generator=g) * 2 - 1,
        "clip_fea": torch.randn(1, 257, 1280, generator=g),
        "context": torch.randn(7, INIT["text_dim"], generator=g),
        "t": torch.tensor([725.0]),
    }


def official_output(model, inputs) -> torch.Tensor:
    f, h, w = LATENT
    seq_len = f * (h // 2) * (w // 2)
    with torch.no_grad():
        return model(x=[inputs["x"]], t=inputs["t"], clip_fea=inputs["clip_fea"], context=[inputs["context"]],
                     seq_len=seq_len, y=[inputs["y"]], pose_latents=[inputs["pose_latents"]],
                     face_pixel_values=inputs["face_pixel_values"])[0]


def diffusers_inputs(inputs) -> dict[str, torch.Tensor]:
    """The same inputs as WanAnimateTransformer3DModel takes them (batch 1, text zero-padded to
    text_len as the official model pads it)."""
    context = torch.zeros(1, INIT["text_len"], INIT["text_dim"])
    context[0, :inputs["context"].shape[0]] = inputs["context"]
    return dict(hidden_states=torch.cat([inputs["x"], inputs["y"]])[None], timestep=inputs["t"],
                encoder_hidden_states=context, encoder_hidden_states_image=inputs["clip_fea"],
                pose_hidden_states=inputs["pose_latents"][None], face_pixel_values=inputs["face_pixel_values"])


def main() -> None:
    import importlib.metadata

    from safetensors.torch import save_file

    model = build()
    sd = state_dict(model)
    inputs = make_inputs()
    out = official_output(model, inputs)
    FOLDER.mkdir(parents=True, exist_ok=True)
    save_file({"out": out.clone(), "sample": out[None].clone()}, str(FOLDER / "expected.safetensors"))
    dist = importlib.metadata.distribution("wan22")
    files = ["wan/modules/animate/model_animate.py", "wan/modules/animate/motion_encoder.py",
             "wan/modules/animate/face_blocks.py", "wan/modules/model.py"]
    meta = {
        "fixture": "animate",
        "kind": "transformer",
        "seed": SEED,
        "official_source": {"package": f"wan22=={dist.version} (PyPI)",
                            "files_sha256": {f: hashlib.sha256(Path(dist.locate_file(f)).read_bytes()).hexdigest()
                                             for f in files}},
        "official_class": "WanAnimateModel",
        "official_init_kwargs": INIT,
        "torch": torch.__version__,
        "weights_sha256": digest(sd),
        "state_dict_keys": len(sd),
        "num_parameters": sum(t.numel() for t in sd.values()),
        "config_json": {"_class_name": "WanAnimateModel", "_diffusers_version": "0.33.0",
                        **{k: INIT[k] for k in CONFIG_FIELDS}},
        "inputs": "made by make_inputs() from seed + 1 (not stored: the face video alone is 15 MB)",
        "inputs_sha256": digest(inputs),
        "original_call": "out = model(x=[x], t=t, clip_fea=clip_fea, context=[context], seq_len=12, y=[y], "
                         "pose_latents=[pose_latents], face_pixel_values=face_pixel_values)[0]   # -> expected['out']",
        "diffusers_call": "WanAnimateTransformer3DModel(hidden_states=cat(x, y)[None], timestep=t, encoder_hidden_states="
                          "context zero-padded to text_len, encoder_hidden_states_image=clip_fea, pose_hidden_states="
                          "pose_latents[None], face_pixel_values=face_pixel_values).sample   # -> expected['sample']",
        "attention": "flash-attn replaced by torch SDPA in float32 (tests/official.py)",
    }
    (FOLDER / "fixture.json").write_text(json.dumps(meta, indent=2) + "\n")
    # the weights' header (key -> dtype, shape), for scripts/regenerate_mappings.py --check
    header = {k: [{torch.float32: "F32"}[t.dtype], list(t.shape)] for k, t in sorted(sd.items())}
    (FOLDER / "header.json").write_text(json.dumps(header, indent=0) + "\n")
    print(f"{len(sd)} tensors, {meta['num_parameters']} parameters, out {list(out.shape)} max {out.abs().max():.4g}")


if __name__ == "__main__":
    main()
