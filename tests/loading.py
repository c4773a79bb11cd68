"""Loading an output the way users do (diffusers' from_pretrained, nothing missing or unexpected)
and running a fixture's official call on it: shared by the family, format and command tests."""

from __future__ import annotations

import json

import diffusers
import torch

from conftest import fixture_io

CALL_ARGS = ("hidden_states", "timestep", "encoder_hidden_states", "encoder_hidden_states_image",
             "control_hidden_states", "control_hidden_states_scale")


def load_converted(folder, dtype=torch.float32):
    cls = getattr(diffusers, json.loads((folder / "config.json").read_text())["_class_name"])
    model, info = cls.from_pretrained(str(folder), torch_dtype=dtype, output_loading_info=True)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info[kind], (kind, info[kind])
    return model.eval()


def run_official_call(model, name, dtype=None):
    """The fixture's official call; `dtype`: the float inputs cast to it (a model loaded in bf16)."""
    inputs, expected, _ = fixture_io(name)
    kwargs = {k: inputs[k] for k in CALL_ARGS if k in inputs}
    if dtype is not None:
        kwargs = {k: v.to(dtype) if k != "timestep" and v.is_floating_point() else v for k, v in kwargs.items()}
    with torch.no_grad():
        out = model(**kwargs, return_dict=False)[0]
    return out, expected["sample"]


WEIGHT_WARNINGS = ("missing", "unexpected", "not used", "were not used", "mismatch", "newly initialized")


def load_pipeline(folder, capfd):
    from diffusers.utils import logging as dlogging
    from transformers.utils import logging as tlogging

    dlogging.set_verbosity_warning()
    tlogging.set_verbosity_warning()
    capfd.readouterr()
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(folder), dtype=torch.float32)
    err = capfd.readouterr().err.lower()
    assert not [w for w in WEIGHT_WARNINGS if w in err], err
    return pipe
