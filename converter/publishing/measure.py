"""The error a conversion's mapping gives on the fixtures, measured at publish time: the tiny
checkpoint the official Wan code made for the component's variant (tests/fixtures of a source
checkout) is converted by this tool with the published folder's dtype, loaded with from_pretrained
in float32 on CPU, fed the fixture's inputs and compared with the official outputs:
max|out - expected| / max|expected|.  It checks the tables and transforms this tool applied, not
the published checkpoint's own numbers (which no reference exists for offline)."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConversionError

TOLERANCE = 1e-4  # the project's bar in float32 (tests/conftest.py TOL)
PIPELINE_FIXTURES = {"transformer": None, "vae": "vae", "text_encoder": "t5", "image_encoder": "clip"}
TRANSFORMER_ARGS = ("hidden_states", "timestep", "encoder_hidden_states", "encoder_hidden_states_image",
                    "control_hidden_states", "control_hidden_states_scale")


@dataclass
class Measurement:
    component: str
    fixture: str
    dtype: str  # the --dtype the fixture was converted with
    errors: dict[str, float]  # output name -> relative error

    @property
    def worst(self) -> float:
        return max(self.errors.values())


def default_fixtures() -> Path | None:
    """tests/fixtures of the source checkout this package runs from, if there is one."""
    here = Path(__file__).resolve().parents[2] / "tests" / "fixtures"
    return here if (here / "README.md").is_file() else None


def fixture_for(component: str, variant: str | None) -> str | None:
    if component == "transformer":
        return variant
    return PIPELINE_FIXTURES.get(component)


def rel_err(out, expected) -> float:
    if tuple(out.shape) != tuple(expected.shape):
        raise ConversionError(f"fixture output has shape {tuple(out.shape)}, expected {tuple(expected.shape)}")
    out, expected = out.detach().double(), expected.double()
    return float((out - expected).abs().max() / expected.abs().max())


def measure(component: str, variant: str | None, dtype: str, fixtures: Path) -> Measurement:
    """Convert fixtures/<fixture> with `dtype` into a temporary folder and compare its outputs."""
    from safetensors.torch import load_file

    from ..component import plan_component, require_coverage, verify_written, write_component

    name = fixture_for(component, variant)
    folder = Path(fixtures) / (name or "")
    if not name or not (folder / "fixture.json").is_file():
        raise ConversionError(f"{fixtures}: no fixture for {component} ({variant or 'any variant'})")
    info = json.loads((folder / "fixture.json").read_text())
    overrides = None
    ref = info.get("transformers_reference_config") or {}
    if component == "image_encoder":  # the head count is not in the weights
        overrides = {"num_heads": ref["num_attention_heads"]}
    inputs = load_file(str(folder / "inputs.safetensors"))
    expected = load_file(str(folder / "expected.safetensors"))
    with tempfile.TemporaryDirectory(prefix="wan2diffusers-measure-") as tmp:
        cp = plan_component(component, folder, dtype, overrides)
        require_coverage(cp)
        target = Path(tmp) / cp.folder
        layout = write_component(cp, target, "5GB", progress=False)
        verify_written(cp, target, layout)
        errors = _run(component, target, inputs, expected)
    return Measurement(component, name, dtype, errors)


def _load(folder: Path):
    import torch

    cfg = json.loads((folder / "config.json").read_text())
    if "_class_name" in cfg:
        import diffusers

        cls = getattr(diffusers, cfg["_class_name"])
        return cls.from_pretrained(str(folder), torch_dtype=torch.float32).eval()
    import transformers
    from transformers.utils import logging as tlogging

    cls = getattr(transformers, cfg["architectures"][0])
    tlogging.disable_progress_bar()  # a bar for 22 tiny tensors is noise
    try:
        return cls.from_pretrained(str(folder), dtype=torch.float32).eval()
    finally:
        tlogging.enable_progress_bar()


def _run(component: str, folder: Path, inputs: dict, expected: dict) -> dict[str, float]:
    """The calling conventions of tests/fixtures/README.md, one per component."""
    import torch

    model = _load(folder)
    with torch.no_grad():
        if component == "transformer":
            out = model(**{k: inputs[k] for k in TRANSFORMER_ARGS if k in inputs}, return_dict=False)[0]
            return {"sample": rel_err(out, expected["sample"])}
        if component == "vae":
            mu = model.encode(inputs["sample"]).latent_dist.mean
            decoded = model.decode(inputs["latents"]).sample
            return {"encode (mu)": rel_err(mu, expected["mu"]),
                    "decode": rel_err(decoded, expected["decode_sample"])}
        if component == "text_encoder":
            n = int(inputs["seq_len"])
            out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
            return {"last_hidden_state": rel_err(out[:, :n], expected["last_hidden_state"][:, :n])}
        if component == "image_encoder":
            out = model(pixel_values=inputs["pixel_values"], output_hidden_states=True)
            return {"hidden_states[-2]": rel_err(out.hidden_states[-2], expected["visual_31"])}
    raise ConversionError(f"no fixture measurement for component {component!r}")
