"""Wan 2.2 VAE (Wan2.2_VAE.pth, in Wan2.2-TI2V-5B) -> diffusers AutoencoderKLWan with the 2.2
config, through the CLI: told from the 2.1 VAE by its keys, never by the file name."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import FIXTURES, fixture_io, run_cli
from test_vae import assert_official_vae_outputs

VAE22 = FIXTURES / "vae22" / "Wan2.2_VAE.pth"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae22") / "out"
    report = run_cli("convert", VAE22, out, "--json").json()
    assert report["components"][0]["variant"] == "wan2.2"
    return out / "vae"


def test_config_is_the_official_2_2_config(converted):
    inputs, _, info = fixture_io("vae22")
    cfg = json.loads((converted / "config.json").read_text())
    for key, value in info["diffusers_reference_config"].items():
        if key in ("latents_mean", "latents_std"):  # the official wrapper's 48 values
            assert torch.allclose(torch.tensor(cfg[key]), inputs[key], atol=1e-6), key
        else:
            assert cfg[key] == value, key
    assert cfg["decoder_base_dim"] == 12 != cfg["base_dim"] and cfg["z_dim"] == 48 and cfg["is_residual"] is True


def test_loads_strictly_and_reproduces_the_official_outputs(converted):
    assert_official_vae_outputs(converted, "vae22")


@pytest.mark.parametrize("fixture,name,variant", [("vae22", "Wan2.2_VAE.pth", "wan2.1"),
                                                  ("vae", "Wan2.1_VAE.pth", "wan2.2")])
def test_the_version_comes_from_the_keys_not_the_file_name(tmp_path, fixture, name, variant):
    """Each VAE under the other's file name is still detected as what its keys say."""
    swapped = tmp_path / ("Wan2.1_VAE.pth" if name == "Wan2.2_VAE.pth" else "Wan2.2_VAE.pth")
    shutil.copy(FIXTURES / fixture / name, swapped)
    report = run_cli("convert", swapped, tmp_path / "out", "--dry-run", "--json").json()
    assert report["components"][0]["variant"] == ("wan2.2" if fixture == "vae22" else "wan2.1")
    assert report["components"][0]["variant"] != variant


def test_inspect_and_verify_take_a_converted_2_2_vae(converted):
    report = run_cli("inspect", converted, "--json").json()
    assert report["healthy"], report
    (comp,) = report["components"]
    assert comp["variant"] == "wan2.2" and comp["config"]["contradictions"] == {}
    verified = run_cli("verify", converted, "--source", VAE22, "--json").json()
    assert verified["ok"] and verified["components"][0]["compared"] == 196
