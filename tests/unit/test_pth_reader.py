"""The .pth reader: tensor by tensor, identical to torch.load, and no pickled code ever runs."""

from __future__ import annotations

import os
import pickle
import zipfile

import pytest
import torch

from conftest import FIXTURES
from wan2diffusers.errors import ConversionError
from wan2diffusers.read.pth_file import read_pth_index
from wan2diffusers.read.safetensors_file import read_tensor

PTH = [FIXTURES / "vae" / "Wan2.1_VAE.pth", FIXTURES / "t5" / "models_t5_umt5-xxl-enc-bf16.pth",
       FIXTURES / "clip" / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"]


@pytest.mark.parametrize("path", PTH, ids=lambda p: p.name)
def test_every_tensor_equals_torch_load(path):
    refs = read_pth_index(path)
    state = torch.load(path, weights_only=True, map_location="cpu")
    assert list(refs) == list(state)
    for key, t in state.items():
        got = read_tensor(refs[key])
        assert got.dtype == t.dtype and torch.equal(got, t), key


def test_views_strides_and_shared_storage(tmp_path):
    base = torch.arange(24.0).reshape(4, 6)
    state = {"base": base, "transposed": base.t(), "window": base[1:3, 2:5], "row": base[2],
             "half": torch.randn(3, 5).half(), "bf16": torch.randn(2, 3).bfloat16(), "ints": torch.arange(5),
             "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 3)}
    path = tmp_path / "views.pth"
    torch.save(state, path)
    refs = read_pth_index(path)
    for key, t in state.items():
        assert torch.equal(read_tensor(refs[key]), t), key


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_pickled_code_is_refused_and_never_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(2)}, path)
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    pkl = next(n for n in members if n.endswith("data.pkl"))
    members[pkl] = pickle.dumps({"w": Exploit()})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for n, data in members.items():
            z.writestr(n, data)
    with pytest.raises(ConversionError, match="refusing"):
        read_pth_index(path)
    assert not (tmp_path / "pwned").exists()


def test_truncated_and_legacy_files_are_refused(tmp_path):
    src = PTH[1].read_bytes()
    (tmp_path / "cut.pth").write_bytes(src[: len(src) // 2])
    with pytest.raises(ConversionError, match="cut.pth"):
        read_pth_index(tmp_path / "cut.pth")
    torch.save({"w": torch.zeros(2)}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    with pytest.raises(ConversionError, match="legacy"):
        read_pth_index(tmp_path / "legacy.pth")
