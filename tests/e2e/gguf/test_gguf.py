"""GGUF output (issue 13, first step): `convert SRC OUT.gguf --to gguf --quantize TYPE` writes the
transformer in its original key names, every tensor byte-identical to the `gguf` package's own
`gguf.quants.quantize` of the same float tensor in the type mappings/gguf.yaml gives it; diffusers'
GGUF loader (`from_single_file` + `GGUFQuantizationConfig`) loads it on CPU and reproduces the
official outputs within a measured error."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES, TOL, rel_err, run_cli
from loading import run_official_call

gguf = pytest.importorskip("gguf")
# measured on the t2v fixture (float32 CPU), with margin; F32 is the float model itself
BOUND = {"F32": TOL, "F16": 5e-3, "BF16": 2e-2, "Q8_0": 1e-2, "Q5_1": 5e-2, "Q4_0": 0.2}


def source_tensors(name: str) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted((FIXTURES / name).glob("diffusion_pytorch_model*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("name,qtype", [("t2v", "Q8_0"), ("t2v", "Q4_0"), ("t2v", "Q5_1"), ("t2v", "Q5_0"),
                                        ("t2v", "Q4_1"), ("t2v", "BF16"),
                                        ("t2v", "F16"), ("t2v", "F32"), ("i2v", "Q8_0"), ("flf2v", "Q8_0"),
                                        ("vace", "Q8_0")])
def test_every_tensor_is_what_gguf_quants_makes_of_the_source(tmp_path, name, qtype):
    out = tmp_path / f"{name}-{qtype}.gguf"
    report = run_cli("convert", FIXTURES / name, out, "--to", "gguf", "--quantize", qtype, "--json").json()
    src = source_tensors(name)
    reader = gguf.GGUFReader(str(out))
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == "wan"
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == set(src) and report["tensors"] == len(src)  # the original key names, all of them
    for key, value in src.items():
        t = tensors[key]
        kind = t.tensor_type.name
        assert tuple(int(d) for d in reversed(t.shape.tolist())) == tuple(value.shape), key
        want = gguf.quants.quantize(value.float().numpy(), t.tensor_type)
        assert bytes(t.data.tobytes()) == bytes(want.tobytes()), (key, kind)
        # the type the policy gives it (ComfyUI-GGUF's rules for Wan)
        if value.ndim == 1 or ".modulation" in key or key == "head.modulation" or value.ndim > 4:
            assert kind == "F32", (key, kind)
        elif qtype in ("F32", "F16", "BF16"):
            assert kind == qtype, (key, kind)
        elif key.startswith(("patch_embedding.", "text_embedding.", "time_projection.", "time_embedding.",
                             "img_emb.", "head.")):
            assert kind in ("F16", "F32"), (key, kind)
        elif value.ndim == 2 and value.numel() > 1024:
            # ComfyUI-GGUF's lcpp.patch raises the FFN's down projection in Q4_0 / Q5_0 files
            raised = {"Q4_0": "Q4_1", "Q5_0": "Q5_1"}.get(qtype, qtype) if ".ffn.2.weight" in key else qtype
            assert kind == raised, (key, kind)


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q5_1", "Q4_0"])
def test_diffusers_gguf_loader_reproduces_the_official_output(tmp_path, qtype):
    import diffusers

    run_cli("convert", FIXTURES / "t2v", tmp_path / "float")  # the Diffusers config the loader is given
    out = tmp_path / "t2v.gguf"
    run_cli("convert", FIXTURES / "t2v", out, "--to", "gguf", "--quantize", qtype)
    model = diffusers.WanTransformer3DModel.from_single_file(
        str(out), quantization_config=diffusers.GGUFQuantizationConfig(compute_dtype=torch.float32),
        config=str(tmp_path / "float" / "transformer"), torch_dtype=torch.float32).eval()
    got, expected = run_official_call(model, "t2v")
    err = rel_err(got, expected)
    print(f"\nt2v gguf {qtype}: rel err {err:.3g}")
    assert err <= BOUND[qtype]


def test_gguf_refusals(tmp_path):
    r = run_cli("convert", FIXTURES / "t2v", tmp_path / "x.safetensors", "--to", "gguf", "--quantize", "Q8_0", ok=False)
    assert ".gguf" in r.stderr
    r = run_cli("convert", FIXTURES / "t2v", tmp_path / "x.gguf", "--to", "gguf", ok=False)
    assert "--quantize TYPE" in r.stderr
    r = run_cli("convert", FIXTURES / "t2v", tmp_path / "x.gguf", "--to", "gguf", "--quantize", "int8", ok=False)
    assert "a GGUF file takes" in r.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("name", ["t2v", "i2v", "vace"])
def test_inspect_recognises_a_gguf_file(tmp_path, name):
    out = tmp_path / f"{name}.gguf"
    made = run_cli("convert", FIXTURES / name, out, "--to", "gguf", "--quantize", "Q8_0", "--json").json()
    report = run_cli("inspect", out, "--json").json()
    assert report["kind"] == "gguf file" and report["architecture"] == "wan" and report["healthy"]
    assert report["variant"] == name and report["types"] == made["types"] and report["tensors"] == made["tensors"]
    assert report["bytes"] == made["bytes"]
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"\x00" * 3000)
    r = run_cli("inspect", bad, ok=False)
    assert r.stderr.startswith(f"error: {bad}: not a readable GGUF file")


def test_slices_of_rows_give_the_bytes_of_the_whole_tensor(tmp_path, monkeypatch):
    """Streamed: 2-D weights are quantized a slice of rows at a time; the file is the same."""
    from wan2diffusers import gguf_out

    run_cli("convert", FIXTURES / "t2v", tmp_path / "whole.gguf", "--to", "gguf", "--quantize", "Q4_1")
    monkeypatch.setattr(gguf_out, "SLICE_ELEMENTS", 3 * 128)  # 3 rows of 128 values per slice
    run_cli("convert", FIXTURES / "t2v", tmp_path / "sliced.gguf", "--to", "gguf", "--quantize", "Q4_1")
    assert (tmp_path / "whole.gguf").read_bytes() == (tmp_path / "sliced.gguf").read_bytes()


def test_verify_checks_every_tensor_against_the_source_quantized_again(tmp_path):
    from gguf import GGUFReader

    out = tmp_path / "t2v.gguf"
    run_cli("convert", FIXTURES / "t2v", out, "--to", "gguf", "--quantize", "Q8_0")
    ok = run_cli("verify", out, "--source", FIXTURES / "t2v", "--json").json()
    assert ok["ok"] and ok["components"][0]["compared"] == 69
    # one byte of one quantized weight changed: named
    t = next(t for t in GGUFReader(str(out)).tensors if t.name == "blocks.1.ffn.2.weight")
    data = bytearray(out.read_bytes())
    data[int(t.data_offset) + 5] ^= 0xFF
    out.write_bytes(bytes(data))
    bad = run_cli("verify", out, "--source", FIXTURES / "t2v", "--json", ok=False).json()
    assert [d["key"] for d in bad["differences"]] == ["blocks.1.ffn.2.weight"]
    other = run_cli("verify", out, "--source", FIXTURES / "i2v", "--json", ok=False).json()
    assert not other["ok"] and any("lacks it" in d["problem"] for d in other["differences"])


def test_overwrite_replaces_an_existing_gguf_file_and_a_folder_is_refused(tmp_path):
    out = tmp_path / "deep" / "t2v.gguf"  # a parent that does not exist yet is made
    run_cli("convert", FIXTURES / "t2v", out, "--to", "gguf", "--quantize", "F16")
    first = out.read_bytes()
    r = run_cli("convert", FIXTURES / "t2v", out, "--to", "gguf", "--quantize", "Q8_0", ok=False)
    assert "already exists" in r.stderr and out.read_bytes() == first
    run_cli("convert", FIXTURES / "t2v", out, "--to", "gguf", "--quantize", "Q8_0", "--overwrite")
    assert out.read_bytes() != first and gguf.GGUFReader(str(out)).tensors
    folder = tmp_path / "folder.gguf"
    folder.mkdir()
    r = run_cli("convert", FIXTURES / "t2v", folder, "--to", "gguf", "--quantize", "Q8_0", "--overwrite", ok=False)
    assert "exists and is not a file" in r.stderr and folder.is_dir()


def test_a_two_expert_repo_becomes_one_gguf_per_expert(tmp_path):
    """Wan 2.2 A14B: OUT is a folder with high_noise_model.gguf and low_noise_model.gguf, each the
    file its expert folder alone gives; each loads in diffusers' GGUF loader and reproduces its
    expert's official output."""
    import diffusers
    from repos import make_original_repo

    src = make_original_repo(tmp_path / "src", "t2v_a14b", with_tokenizer=False)
    r = run_cli("convert", src, tmp_path / "x.gguf", "--to", "gguf", "--quantize", "Q8_0", ok=False)
    assert "give OUT a folder name" in r.stderr and not (tmp_path / "x.gguf").exists()
    out = tmp_path / "a14b-Q8_0"
    report = run_cli("convert", src, out, "--to", "gguf", "--quantize", "Q8_0", "--json").json()
    assert [f["file"] for f in report["files"]] == ["high_noise_model.gguf", "low_noise_model.gguf"]
    assert sorted(p.name for p in out.iterdir()) == ["high_noise_model.gguf", "low_noise_model.gguf"]
    run_cli("convert", src, tmp_path / "float", "--only", "transformer")
    for expert, instance in (("high_noise_model", "transformer"), ("low_noise_model", "transformer_2")):
        alone = tmp_path / f"{expert}.gguf"
        run_cli("convert", src / expert, alone, "--to", "gguf", "--quantize", "Q8_0")
        assert (out / f"{expert}.gguf").read_bytes() == alone.read_bytes(), expert
        model = diffusers.WanTransformer3DModel.from_single_file(
            str(out / f"{expert}.gguf"), quantization_config=diffusers.GGUFQuantizationConfig(compute_dtype=torch.float32),
            config=str(tmp_path / "float" / instance), torch_dtype=torch.float32).eval()
        got, expected = run_official_call(model, f"t2v_a14b/{expert}")
        err = rel_err(got, expected)
        print(f"\nt2v_a14b {expert} gguf Q8_0: rel err {err:.3g}")
        assert err <= BOUND["Q8_0"]
    # --overwrite replaces the folder; inspect and verify take it, each file against its expert
    run_cli("convert", src, out, "--to", "gguf", "--quantize", "Q8_0", "--overwrite")
    seen = run_cli("inspect", out, "--json").json()
    assert seen["kind"] == "folder of gguf files" and seen["healthy"] and len(seen["files"]) == 2
    verified = run_cli("verify", out, "--source", src, "--json").json()
    assert verified["ok"] and [c["compared"] for c in verified["components"]] == [69, 69]
    (out / "high_noise_model.gguf").rename(out / "tmp.gguf")  # the experts swapped: caught
    (out / "low_noise_model.gguf").rename(out / "high_noise_model.gguf")
    (out / "tmp.gguf").rename(out / "low_noise_model.gguf")
    swapped = run_cli("verify", out, "--source", src, "--json", ok=False).json()
    assert not swapped["ok"] and {d["component"] for d in swapped["differences"]} == \
        {"high_noise_model.gguf", "low_noise_model.gguf"}


def test_a_diffusers_folder_becomes_the_same_gguf_as_its_original(tmp_path):
    """A fine-tune in the Diffusers layout goes to GGUF through the tables run backwards: the very
    file the original checkpoint gives (one expert per file for Wan 2.2 A14B); verify takes the
    Diffusers folder as --source."""
    from repos import make_original_repo

    run_cli("convert", FIXTURES / "t2v", tmp_path / "d", "--only", "transformer")
    run_cli("convert", FIXTURES / "t2v", tmp_path / "orig.gguf", "--to", "gguf", "--quantize", "Q8_0")
    run_cli("convert", tmp_path / "d", tmp_path / "back.gguf", "--to", "gguf", "--quantize", "Q8_0")
    assert same_gguf(tmp_path / "back.gguf", tmp_path / "orig.gguf")
    assert run_cli("verify", tmp_path / "back.gguf", "--source", tmp_path / "d", "--json").json()["ok"]
    src = make_original_repo(tmp_path / "src", "t2v_a14b", with_tokenizer=False)
    run_cli("convert", src, tmp_path / "d2", "--only", "transformer")
    for qtype in ("Q4_0", "Q4_K_M"):  # a legacy type and a K-quant mixture (its first-N rules per file)
        run_cli("convert", src, tmp_path / f"orig2-{qtype}", "--to", "gguf", "--quantize", qtype)
        run_cli("convert", tmp_path / "d2", tmp_path / f"back2-{qtype}", "--to", "gguf", "--quantize", qtype)
        for name in ("high_noise_model.gguf", "low_noise_model.gguf"):
            a, b = tmp_path / f"back2-{qtype}" / name, tmp_path / f"orig2-{qtype}" / name
            assert same_gguf(a, b) and a.read_bytes() == b.read_bytes(), (qtype, name)


def same_gguf(a, b) -> bool:
    """The same tensors (names, shapes, types, bytes) and metadata; the order may differ (a
    Diffusers source is read in its class's order)."""
    ra, rb = gguf.GGUFReader(str(a)), gguf.GGUFReader(str(b))
    ta = {t.name: (t.tensor_type, tuple(t.shape.tolist()), bytes(t.data.tobytes())) for t in ra.tensors}
    tb = {t.name: (t.tensor_type, tuple(t.shape.tolist()), bytes(t.data.tobytes())) for t in rb.tensors}
    fields = lambda r: {k: bytes(f.parts[-1]) for k, f in r.fields.items() if not k.startswith("GGUF.")}
    return ta == tb and fields(ra) == fields(rb)


def test_f16_tensors_are_gguf_quants_bytes_for_every_kind_of_value(tmp_path):
    """F16 tensors are cast by torch (gguf-py's numpy astype ran 1.4 GB/s), falling back to gguf-py where
    a NaN or Inf is (their payload bits differ): subnormals, rounding ties, the edge of the range, NaN,
    +-Inf and a sweep of float32 bit patterns all give gguf.quants.quantize's bytes."""
    import numpy as np
    from safetensors.numpy import save_file

    from wan2diffusers.gguf_out import GGUFTensor, quantized_values
    from wan2diffusers.read.safetensors_file import read_header

    sweep = np.arange(0, 2**32, 4099, dtype=np.uint64).astype(np.uint32).view(np.float32)
    finite = sweep[np.isfinite(sweep) & (np.abs(sweep) < 65504)]
    finite = finite[:len(finite) // 256 * 256]
    special = np.array([1e-8, 6e-8, 2.98e-8, 65504, -65504, 65519.99, 1 + 2**-11, 1 + 3 * 2**-11, -0.0, 0.0],
                       dtype=np.float32)
    arrays = {"finite": finite.reshape(-1, 256), "special": np.tile(special, 32).reshape(-1, 32),
              "nan_inf": np.array([[1.0, np.nan, -np.inf, np.inf], [2.0, 3.0, -np.nan, 0.5]], dtype=np.float32),
              "nan_payloads": sweep[~np.isfinite(sweep)][:4032].reshape(-1, 64)}
    save_file(arrays, str(tmp_path / "values.safetensors"))
    refs = read_header(tmp_path / "values.safetensors").tensors
    for key, value in arrays.items():
        t = GGUFTensor(key, value.shape, "F16", refs[key], value.size * 2)
        got = b"".join(bytes(np.ascontiguousarray(part).view(np.uint8)) for part in quantized_values(t))
        with np.errstate(over="ignore", invalid="ignore"):
            want = gguf.quants.quantize(value, gguf.GGMLQuantizationType.F16)
        assert got == want.tobytes(), key
