"""The mapping tables: schema validation, invertible ops, and coverage at the real published
sizes, proven from headers alone (no tensor data needed)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import FIXTURES, ROOT
from wan2diffusers.errors import ConversionError
from wan2diffusers.mapping import transforms
from wan2diffusers.mapping.schema import Rule
from wan2diffusers.mapping.tables import load_table, parse_table, table_file, table_names
from wan2diffusers.plan.detect import detect
from wan2diffusers.plan.plan import build_plan
from wan2diffusers.plan.target import build_target
from wan2diffusers.read.safetensors_file import TensorRef
from wan2diffusers.read.source import SourceCheckpoint


def test_every_shipped_table_validates():
    names = table_names()
    assert "transformer" in names
    for name in names:
        table = load_table(name)
        assert table.component == name
        assert table_file(name).suffix == ".yaml"


def test_every_yaml_file_we_ship_reads_as_pyyamls_own_safe_loader_reads_it():
    """parse_yaml takes libyaml's loader for speed; PyYAML's pure-Python SafeLoader is the judge."""
    import yaml

    from wan2diffusers.mapping.tables import SAFE_LOADER

    if not yaml.__with_libyaml__:  # PyYAML built without libyaml: parse_yaml already uses the judge itself
        pytest.skip("PyYAML without libyaml")
    assert SAFE_LOADER is yaml.CSafeLoader  # PyPI's wheels carry libyaml: the fast path is the one tested
    shipped = sorted((ROOT / "mappings").glob("*.yaml"))
    assert len(shipped) >= 10
    for path in shipped:
        text = path.read_text(encoding="utf-8")
        assert yaml.load(text, Loader=SAFE_LOADER) == yaml.safe_load(text), path.name


def transformer_yaml() -> str:
    return table_file("transformer").read_text()


@pytest.mark.parametrize("change,message", [
    (lambda t: t.replace('to: "proj_out.{p}"}', 'to: "proj_out.{p}", op: fold}'), "rule"),
    (lambda t: t.replace('to: "proj_out.{p}"}', 'to: "proj_out.{p}", op: chunk}'), "rule"),
    (lambda t: t.replace('{from: "head.head.{p}"', '{from: "head.head.{q}"'), "placeholders ['q']"),
    (lambda t: t.replace("schema_version: 1", "schema_version: 7"), "schema_version"),
    (lambda t: t.replace('  - {from: "head.modulation",          to: "scale_shift_table"}',
                         '  - {from: "head.modulation", op: drop}'), "needs `reason`"),
    (lambda t: t + "\n  - [unbalanced", "not valid YAML"),
])
def test_a_broken_table_is_refused_naming_the_file_and_rule(change, message):
    broken = change(transformer_yaml())
    assert broken != transformer_yaml()
    with pytest.raises(ConversionError) as e:
        parse_table(broken, "mappings/broken.yaml")
    assert str(e.value).startswith("mappings/broken.yaml:") and message in str(e.value), str(e.value)


@pytest.mark.parametrize("rule,shape", [
    ({"from": "a", "to": "b"}, (3, 4)),
    ({"from": "a", "to": ["q", "k", "v"], "op": "chunk", "dim": 0}, (6, 4)),
    ({"from": ["q", "k"], "to": "a", "op": "concat", "dim": 1}, (3, 2)),
    ({"from": "a", "to": "b", "op": "transpose", "dims": [0, 1]}, (3, 5)),
    ({"from": "a", "to": "b", "op": "reshape", "shape": [-1], "undo_shape": [1, 1, -1]}, (1, 1, 7)),
    ({"from": "a", "to": "b", "op": "squeeze", "dim": 0}, (1, 1, 7)),
    ({"from": "a", "to": "b", "op": "unsqueeze", "dim": 1}, (2, 7)),
])
def test_every_op_has_an_inverse_that_undoes_it(rule, shape):
    rule = Rule.model_validate(rule)
    n_in = len(rule.sources)
    inputs = [torch.randn(shape) for _ in range(n_in)]
    shapes = [tuple(t.shape) for t in inputs]
    outputs = transforms.apply(rule, inputs)
    assert [tuple(t.shape) for t in outputs] == transforms.output_shapes(rule, shapes)
    back = transforms.apply(transforms.inverse(rule), outputs)
    assert len(back) == n_in and all(torch.equal(a, b) for a, b in zip(back, inputs))


def test_drop_has_no_inverse_and_bad_shapes_are_caught():
    drop = Rule.model_validate({"from": "a", "op": "drop", "reason": "unused"})
    with pytest.raises(ValueError):
        transforms.inverse(drop)
    chunk = Rule.model_validate({"from": "a", "to": ["q", "k", "v"], "op": "chunk", "dim": 0})
    with pytest.raises(transforms.ShapeError):
        transforms.output_shapes(chunk, [(7, 4)])


# ---- real sizes, from headers only -------------------------------------------------------

def fixture_shapes(name: str) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for f in sorted((FIXTURES / name).glob("diffusion_pytorch_model*.safetensors")):
        with safe_open(str(f), "pt") as s:
            shapes.update({k: tuple(s.get_slice(k).get_shape()) for k in s.keys()})
    return shapes


def real_size_source(name: str, dim: int, ffn: int, layers: int, vace_layers=None, config=True) -> SourceCheckpoint:
    """The fixture's keys, scaled to a published size (tiny dim 128 -> dim, ffn 256 -> ffn, ...)."""
    scale = {128: dim, 256: ffn, 32: 4096, 40: 256, 768: 6 * dim, 24: 96}
    tiny = fixture_shapes(name)
    keys = {}
    for key, shape in tiny.items():
        m = re.match(r"(vace_blocks|blocks)\.(\d+)\.(.*)", key)
        new_shape = tuple(scale.get(d, d) for d in shape)
        if m is None:
            keys[key] = new_shape
        elif m.group(2) == "0":
            count = len(vace_layers) if m.group(1) == "vace_blocks" else layers
            for n in range(count):
                if m.group(1) == "vace_blocks" and n > 0 and m.group(3).startswith("before_proj"):
                    continue
                keys[f"{m.group(1)}.{n}.{m.group(3)}"] = new_shape
    refs = {k: TensorRef(Path("/virtual.safetensors"), k, "F32", s, 0, 4 * int(torch.Size(s).numel())) for k, s in keys.items()}
    cfg = None
    if config:
        cfg = {"dim": dim, "ffn_dim": ffn, "num_layers": layers, "num_heads": dim // 128, "eps": 1e-6,
               "model_type": name, "in_dim": tiny["patch_embedding.weight"][1], "out_dim": 16, "freq_dim": 256}
        if vace_layers:
            cfg.update(vace_layers=vace_layers, vace_in_dim=96)
    return SourceCheckpoint(Path("/virtual"), "folder", [], refs, cfg)


REAL = [
    # repo, fixture, dim, ffn, layers, vace_layers, size
    ("Wan2.1-T2V-1.3B", "t2v", 1536, 8960, 30, None, "1.3B"),
    ("Wan2.1-T2V-14B", "t2v", 5120, 13824, 40, None, "14B"),
    ("Wan2.1-I2V-14B-480P", "i2v", 5120, 13824, 40, None, "14B"),
    ("Wan2.1-FLF2V-14B-720P", "flf2v", 5120, 13824, 40, None, "14B"),
    ("Wan2.1-VACE-1.3B", "vace", 1536, 8960, 30, list(range(0, 30, 2)), "1.3B"),
    ("Wan2.1-VACE-14B", "vace", 5120, 13824, 40, list(range(0, 40, 5)), "14B"),
]


@pytest.mark.parametrize("repo,name,dim,ffn,layers,vace_layers,size", REAL, ids=[r[0] for r in REAL])
@pytest.mark.parametrize("with_config", [True, False], ids=["config.json", "single-file"])
def test_published_sizes_plan_with_full_coverage(repo, name, dim, ffn, layers, vace_layers, size, with_config):
    src = real_size_source(name, dim, ffn, layers, vace_layers, with_config)
    table = load_table("transformer")
    det = detect(table, src, None if with_config or not vace_layers else {"vace_layers": vace_layers})
    assert (det.variant, det.size) == (name, size)
    assert det.config["num_attention_heads"] * det.config["attention_head_dim"] == dim
    assert det.config["attention_head_dim"] == 128 and det.config["num_layers"] == layers
    plan = build_plan(table, src, det, build_target(det.target_class, det.config))
    assert plan.problems == []
    assert len(plan.tensors) == len(src.tensors) == len(plan.target.shapes)
    if name == "flf2v":
        assert det.config["pos_embed_seq_len"] == 514
    if name == "vace":
        assert det.config["vace_layers"] == vace_layers and det.config["vace_in_channels"] == 96


def test_the_installed_distribution_ships_every_table():
    from importlib.metadata import PackageNotFoundError, files

    try:
        shipped = {p.name for p in files("wan2diffusers") or [] if p.suffix in (".yaml", ".safetensors")}
    except PackageNotFoundError:
        pytest.skip("wan2diffusers is not installed (running from a bare checkout)")
    in_repo = {p.name for p in (ROOT / "mappings").glob("*.yaml")} | {"constants.safetensors"}
    assert in_repo and in_repo <= shipped


def test_every_variant_a_pipeline_asks_for_exists():
    from wan2diffusers.pipeline import load_pipeline_table

    for spec in load_pipeline_table().pipelines:
        for component, variant in spec.variants.items():
            assert variant in [v.name for v in load_table(component).variants], (spec.name, component, variant)
