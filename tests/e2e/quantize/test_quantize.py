"""Quantized variants (convert --quantize, quantize) against diffusers' own quanto path and the
official outputs: same entries and values tensor for tensor, loadable with a plain from_pretrained,
no less accurate than diffusers' default (every Linear quantized)."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import diffusers
from conftest import FIXTURES, TOL, rel_err, run_cli
from loading import run_official_call

from wan2diffusers.errors import ConversionError
from wan2diffusers.quantization.policy import load_policy, parse_policy, policy_path

WEIGHTS = ["int8", "float8", "int4"]
# diffusers' default path on a fixture, as the issue reports it: the bound our policy must meet
REFERENCE = {"int8": 8e-3, "float8": 4e-2, "int4": 0.16}
QUANTIZED = "blocks.0.ffn.net.0.proj"  # a Linear every policy quantizes
KEPT = "proj_out"  # a Linear the policy keeps float


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # QuantoConfig / QuantoQuantizer are deprecated
        yield


def policy_names() -> list[str]:
    return list(load_policy("quanto").components["transformer"].modules_to_not_convert)


def tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def weight_bytes(folder) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def model_class(folder):
    return getattr(diffusers, json.loads((folder / "config.json").read_text())["_class_name"])


def load_plain(folder):
    """from_pretrained with no extra argument; no missing, unexpected or mismatched key."""
    model, info = model_class(folder).from_pretrained(str(folder), output_loading_info=True)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info[kind], (kind, info[kind])
    return model.eval()


def diffusers_path(float_folder, weights, keep):
    from diffusers import QuantoConfig

    config = QuantoConfig(weights_dtype=weights, modules_to_not_convert=list(keep) if keep is not None else None)
    return model_class(float_folder).from_pretrained(str(float_folder), quantization_config=config).eval()


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    """A fixture's float Diffusers transformer folder, converted once per module."""
    root, made = tmp_path_factory.mktemp("float"), {}

    def get(name):
        if name not in made:
            run_cli("convert", FIXTURES / name, root / name, "--only", "transformer")
            made[name] = root / name / "transformer"
        return made[name]

    return get


@pytest.fixture
def t2v_float(float_dir):
    return float_dir("t2v")


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("name", ["t2v", "i2v", "flf2v", "vace"])
def test_convert_quantize_is_diffusers_format_and_values(float_dir, tmp_path, name, weights, record_property):
    from optimum.quanto import QLinear

    float_folder = float_dir(name)
    out = tmp_path / "q"
    report = run_cli("convert", FIXTURES / name, out, "--quantize", weights, "--backend", "quanto", "--json").json()
    folder = out / "transformer"
    q = report["components"][0]["quantization"]
    assert q["weights"] == weights and q["backend"] == "quanto"

    # diffusers' own path, same weights and the same modules_to_not_convert, saved by save_pretrained
    theirs = tmp_path / "diffusers"
    diffusers_path(float_folder, weights, policy_names()).save_pretrained(str(theirs))
    ours_t, theirs_t = tensors(folder), tensors(theirs)
    assert sorted(ours_t) == sorted(theirs_t)
    for key, t in ours_t.items():
        assert t.dtype == theirs_t[key].dtype and torch.equal(t, theirs_t[key]), key
    ours_c = json.loads((folder / "config.json").read_text())
    theirs_c = json.loads((theirs / "config.json").read_text())
    theirs_c.pop("_name_or_path")  # the path it was loaded from
    assert ours_c == theirs_c
    assert ours_c["quantization_config"]["modules_to_not_convert"][:len(policy_names())] == policy_names()

    # plain from_pretrained: quantized where planned, float where the policy says
    model = load_plain(folder)
    modules = dict(model.named_modules())
    assert isinstance(modules[QUANTIZED], QLinear) and modules[QUANTIZED].frozen
    assert type(modules[KEPT]) is torch.nn.Linear
    assert sum(isinstance(m, QLinear) for m in modules.values()) == q["quantized_modules"]

    # accuracy against the official output: quantized (not exact), and no worse than diffusers' default
    out_t, expected = run_official_call(model, name)
    err = rel_err(out_t, expected)
    default_err = rel_err(run_official_call(diffusers_path(float_folder, weights, None), name)[0], expected)
    print(f"\n{name} {weights}: rel err {err:.3g} (diffusers default {default_err:.3g}); "
          f"weights on disk {weight_bytes(folder)} B (float {weight_bytes(float_folder)} B)")
    record_property("rel_err", err)
    record_property("rel_err_diffusers_default", default_err)
    record_property("bytes_on_disk", weight_bytes(folder))
    assert TOL < err <= default_err and err <= REFERENCE[weights]

    # size: what was planned is what was written, and less than the float model
    assert report["components"][0]["bytes"] == q["bytes"] == sum(t.numel() * t.element_size() for t in ours_t.values())
    assert weight_bytes(folder) < weight_bytes(float_folder) * (0.55 if weights != "int4" else 0.45)

    # `quantize` on the float Diffusers folder writes the very same files
    again = tmp_path / "again"
    run_cli("quantize", float_folder, again, "--weights", weights, "--backend", "quanto")
    # beside the weights: the float folder's conversion record, carried over (publish reads it)
    record = json.loads((again / "wan2diffusers.json").read_text())
    assert record["derived_from"]["weights"] == weights
    assert sorted(p.name for p in again.iterdir() if p.name != "wan2diffusers.json") == \
        sorted(p.name for p in folder.iterdir())
    for p in folder.iterdir():
        assert (again / p.name).read_bytes() == p.read_bytes(), p.name


def test_bf16_variant_equals_diffusers_path_in_bf16(tmp_path):
    """--dtype bf16: each weight is cast while streamed, then quantized; scales in bf16, as
    diffusers' path with torch_dtype=torch.bfloat16 on the bf16 float folder."""
    from diffusers import QuantoConfig

    run_cli("convert", FIXTURES / "t2v", tmp_path / "float", "--dtype", "bf16")
    run_cli("convert", FIXTURES / "t2v", tmp_path / "q", "--dtype", "bf16", "--quantize", "int8", "--backend", "quanto")
    config = QuantoConfig(weights_dtype="int8", modules_to_not_convert=policy_names())
    diffusers.WanTransformer3DModel.from_pretrained(
        str(tmp_path / "float" / "transformer"), torch_dtype=torch.bfloat16,
        quantization_config=config).save_pretrained(str(tmp_path / "diffusers"))
    ours_t, theirs_t = tensors(tmp_path / "q" / "transformer"), tensors(tmp_path / "diffusers")
    assert sorted(ours_t) == sorted(theirs_t)
    for key, t in ours_t.items():
        assert t.dtype == theirs_t[key].dtype and torch.equal(t, theirs_t[key]), key
    assert ours_t[f"{QUANTIZED}.weight._scale"].dtype == torch.bfloat16


def test_sliced_quantization_equals_whole_weight_quantization(float_dir, tmp_path, monkeypatch):
    """The weights are quantized a few rows at a time (memory); with slices far smaller than any
    weight (odd sizes, int4 groups paired across the packing), the values are still diffusers'.
    i2v: the image embedder's 1280-wide FFN is quantized in groups of 128."""
    import wan2diffusers.quantization.quanto as quanto

    float_folder = float_dir("i2v")
    monkeypatch.setattr(quanto, "SLICE_ELEMENTS", 300)
    for weights in ("int4", "int8"):
        out = tmp_path / weights
        run_cli("quantize", float_folder, out, "--weights", weights, "--backend", "quanto")
        theirs = tmp_path / f"diffusers-{weights}"
        diffusers_path(float_folder, weights, policy_names()).save_pretrained(str(theirs))
        ours_t, theirs_t = tensors(out), tensors(theirs)
        assert sorted(ours_t) == sorted(theirs_t)
        for key, t in ours_t.items():
            assert torch.equal(t, theirs_t[key]), (weights, key)


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backend_equals_qlinear_freeze_on_odd_shapes(monkeypatch, weights, dtype):
    """Shapes the fixtures lack: odd row counts, one row, int4 groups of 96 and none; sliced
    far smaller than the weights."""
    from optimum.quanto import QLinear

    import wan2diffusers.quantization.quanto as quanto
    from wan2diffusers.quantization.backend import get_backend

    monkeypatch.setattr(quanto, "SLICE_ELEMENTS", 500)
    backend = get_backend("quanto")
    g = torch.Generator().manual_seed(0)
    shapes = [(7, 300), (1, 64), (3, 288), (16, 256), (33, 40)]
    if dtype == torch.float32:  # bf16 int4 in groups of 128 needs rows in 16s (quanto's tinygemm packing)
        shapes.append((5, 256))
    for shape in shapes:
        w = torch.randn(shape, generator=g).to(dtype)
        ref = QLinear(shape[1], shape[0], bias=False, dtype=dtype, weights=quanto.QTYPES[weights])
        ref.weight = torch.nn.Parameter(w.clone(), requires_grad=False)
        ref.freeze()
        expected = ref.state_dict()
        got = backend.quantize(weights, w)
        assert sorted(got) == sorted(expected), shape
        for k in expected:
            assert got[k].dtype == expected[k].dtype and torch.equal(got[k], expected[k]), (shape, k)
        planned = {e.name: (e.dtype, e.shape) for e in backend.module_entries(weights, shape, quanto.TAGS[dtype], False)}
        assert planned == {k: (quanto.TAGS[v.dtype], tuple(v.shape)) for k, v in expected.items()}, shape


def test_quantize_a_pipeline_folder_links_the_other_components(t2v_float, tmp_path):
    src = tmp_path / "pipe"
    (src / "scheduler").mkdir(parents=True)
    os.symlink(t2v_float, src / "transformer")
    (src / "scheduler" / "scheduler_config.json").write_text('{"_class_name": "UniPCMultistepScheduler"}\n')
    (src / "model_index.json").write_text(json.dumps({
        "_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"],
        "scheduler": ["diffusers", "UniPCMultistepScheduler"], "transformer_2": [None, None]}))
    (src / "README.md").write_text("the float model\n")
    report = run_cli("quantize", src, tmp_path / "out", "--weights", "int8", "--json").json()
    out = tmp_path / "out"
    assert report["pipeline"] and report["left_out"] == ["README.md"]
    assert sorted(p.name for p in out.iterdir()) == ["model_index.json", "scheduler", "transformer"]
    for rel in ("model_index.json", "scheduler/scheduler_config.json"):
        assert (out / rel).read_bytes() == (src / rel).read_bytes()
        assert os.stat(out / rel).st_ino == os.stat(src / rel).st_ino  # hard-linked, not copied
    assert report["links"] == {"linked": 2, "copied": 0}
    load_plain(out / "transformer")


def test_sharded_quantized_output_loads_and_equals_the_single_file(t2v_float, tmp_path):
    run_cli("quantize", t2v_float, tmp_path / "one", "--weights", "int4")
    run_cli("quantize", t2v_float, tmp_path / "many", "--weights", "int4", "--max-shard-size", "200KB")
    shards = sorted((tmp_path / "many").glob("diffusion_pytorch_model-*-of-*.safetensors"))
    assert len(shards) >= 3
    index = json.loads((tmp_path / "many" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    one, many = tensors(tmp_path / "one"), tensors(tmp_path / "many")
    assert sorted(one) == sorted(many) and all(torch.equal(one[k], many[k]) for k in one)
    out_t, expected = run_official_call(load_plain(tmp_path / "many"), "t2v")
    out_one = run_official_call(load_plain(tmp_path / "one"), "t2v")[0]
    assert rel_err(out_t, out_one) <= 1e-5  # same weights (CPU kernels need not be bit-reproducible)


def test_quantize_refuses_what_it_cannot_prove(t2v_float, tmp_path):
    # a quantized folder
    run_cli("quantize", t2v_float, tmp_path / "q", "--weights", "int8")
    err = run_cli("quantize", tmp_path / "q", tmp_path / "qq", "--weights", "int4", ok=False)
    assert "already quantized" in err.stderr and str(tmp_path / "q") in err.stderr
    # a key missing and a stray key: named, nothing written
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((t2v_float / "config.json").read_text())
    sd = load_file(str(t2v_float / "diffusion_pytorch_model.safetensors"))
    sd["blocks.0.lora_A.weight"] = sd.pop("blocks.1.attn1.to_q.weight")
    save_file(sd, str(bad / "diffusion_pytorch_model.safetensors"))
    err = run_cli("quantize", bad, tmp_path / "out", "--weights", "int8", ok=False)
    assert "blocks.0.lora_A.weight" in err.stderr and "blocks.1.attn1.to_q.weight" in err.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))
    # not a quantizable class
    vae = tmp_path / "vae"
    vae.mkdir()
    (vae / "config.json").write_text('{"_class_name": "AutoencoderKLWan"}')
    err = run_cli("quantize", vae, tmp_path / "out", "--weights", "int8", ok=False)
    assert "AutoencoderKLWan" in err.stderr
    # the original layout: pointed to convert --quantize
    err = run_cli("quantize", FIXTURES / "t2v", tmp_path / "out", "--weights", "int8", ok=False)
    assert "WanModel" in err.stderr and "convert" in err.stderr
    # convert --quantize with no transformer among the components
    err = run_cli("convert", FIXTURES / "vae" / "Wan2.1_VAE.pth", tmp_path / "out", "--quantize", "int8", ok=False)
    assert "--quantize" in err.stderr and not (tmp_path / "out").exists()


def test_dry_run_plans_the_quantized_size_and_writes_nothing(t2v_float, tmp_path):
    report = run_cli("quantize", t2v_float, tmp_path / "out", "--weights", "int4", "--dry-run", "--json").json()
    q = report["quantization"]
    assert report["dry_run"] and not (tmp_path / "out").exists()
    assert q["float_bytes"] == sum(t.numel() * t.element_size() for t in tensors(t2v_float).values())
    assert 0 < q["bytes"] < q["float_bytes"] / 2 and "U8" in q["dtypes"]


def test_the_shipped_policy_is_valid_and_bad_policies_are_refused():
    policy = load_policy()
    assert policy.backend == "torchao" and policy.weights == ["int8", "float8"]
    assert load_policy("quanto").weights == WEIGHTS
    good = policy_path().read_text()
    for bad, words in [
        (good.replace("- proj_out", "- condition_embedder.proj_out"), "attribute name"),
        (good.replace("- proj_out", "- linear_1"), "listed twice"),
        (good.replace("backend: torchao", "backend: bitsandbytes"), "unknown backend"),
        (good.replace("  quanto:", "  bnb:"), "unknown backend"),
        (good.replace("weights: [int8, float8, int4]", "weights: [int8, nf4]"), "nf4"),
        (good.replace("schema_version: 1", "schema_version: 2"), "schema_version"),
        ("schema_version: 1\nbackend: torchao\n", "description"),
    ]:
        with pytest.raises(ConversionError) as e:
            parse_policy(bad, "quantization.yaml")
        assert "quantization.yaml" in str(e.value) and words in str(e.value), str(e.value)


def test_what_the_policy_is_checked_against_is_what_each_backend_offers():
    """The policy is checked against OFFERS, without importing the backends (optimum.quanto's import
    cost a torchao run 1.7 s): each table entry is the backend class's own list."""
    from wan2diffusers.quantization.backend import BACKENDS, OFFERS, get_backend

    assert set(OFFERS) == set(BACKENDS)
    for name in BACKENDS:
        assert OFFERS[name] == tuple(get_backend(name).weights), name


def test_a_policy_name_that_keeps_nothing_float_is_refused(t2v_float):
    """diffusers only compares Linear names: a parent module (time_embedder) protects nothing."""
    from wan2diffusers.plan.target import build_target
    from wan2diffusers.quantization.backend import get_backend
    from wan2diffusers.quantization.plan import check_policy_names

    config = {k: v for k, v in json.loads((t2v_float / "config.json").read_text()).items() if not k.startswith("_")}
    model = build_target("WanTransformer3DModel", config).model
    check_policy_names(get_backend("quanto"), model, policy_names(), "WanTransformer3DModel")
    with pytest.raises(ConversionError) as e:
        check_policy_names(get_backend("quanto"), model, ["proj_out", "time_embedder"], "WanTransformer3DModel")
    assert "'time_embedder'" in str(e.value) and "proj_out" not in str(e.value).split("names")[1].split(",")[0]
