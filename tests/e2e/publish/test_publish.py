"""`wan2diffusers publish`: the model card (T2V, I2V, a quantized variant), the dry-run plan, the
conversion record convert leaves, the offline error, and the upload itself through the real
huggingface_hub client against a local stand-in for the Hub (tests/fake_hub.py)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from conftest import FIXTURES, ROOT, run_cli, TOL
from fake_hub import FakeHub
from repos import make_original_repo

TOKEN = "hf_tEsTtOkEn0123456789abcdefSECRET"
RECORD = "wan2diffusers.json"
SOURCE_README = """---
license: apache-2.0
language:
- en
- zh
tags:
- video generation
pipeline_tag: text-to-video
---
# Wan2.1
"""
MAPPINGS = ROOT / "mappings"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fixture_keys(name: str) -> int:
    return json.loads((FIXTURES / name / "fixture.json").read_text())["state_dict_keys"]


def local_files(out: Path) -> dict[str, int]:
    """Every file under OUT but the conversion record, as the upload should send them."""
    return {p.relative_to(out).as_posix(): p.stat().st_size for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != RECORD}


@pytest.fixture(scope="module")
def t2v(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2v")
    src = make_original_repo(root / "Wan2.1-T2V-tiny", "t2v")
    (src / "README.md").write_text(SOURCE_README)
    run_cli("convert", src, root / "out")
    return src, root / "out"


@pytest.fixture(scope="module")
def i2v(tmp_path_factory):
    root = tmp_path_factory.mktemp("i2v")
    src = make_original_repo(root / "Wan2.1-I2V-tiny", "i2v")
    run_cli("convert", src, root / "out", "--clip-heads", 2)
    return src, root / "out"


def copy_out(out: Path, dest: Path) -> Path:
    shutil.copytree(out, dest)
    return dest


def cli(args, env_extra: dict, drop=("HF_TOKEN", "HF_HUB_OFFLINE", "HF_ENDPOINT")):
    """The CLI in a subprocess: huggingface_hub reads HF_ENDPOINT and HF_HUB_* when imported."""
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update({"HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1", **env_extra})
    return subprocess.run([sys.executable, "-m", "wan2diffusers.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)


# ---- the conversion record --------------------------------------------------------------

def test_convert_leaves_a_record_publish_reads_and_from_pretrained_ignores(t2v, capfd):
    import diffusers

    src, out = t2v
    record = json.loads((out / RECORD).read_text())
    assert record["tool"]["name"] == "wan2diffusers" and record["dtype"] == "keep"
    assert record["source"]["repo_id"] is None and record["source"]["name"] == "Wan2.1-T2V-tiny"
    assert record["source"]["card"] == {"license": "apache-2.0", "language": ["en", "zh"],
                                        "tags": ["video generation"], "pipeline_tag": "text-to-video"}
    assert record["tables"]["transformer"]["sha256"] == sha256(MAPPINGS / "transformer.yaml")
    transformer = record["components"][0]
    assert transformer["component"] == "transformer" and transformer["variant"] == "t2v"
    assert transformer["source_tensors"] == transformer["converted"] == fixture_keys("t2v")
    assert {f["name"]: f["size"] for f in transformer["source_files"]} == {
        p.name: p.stat().st_size for p in src.glob("diffusion_pytorch_model-*.safetensors")}
    assert all(f["sha256"] is None for f in transformer["source_files"])  # local files: not hashed at convert
    capfd.readouterr()
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(out))
    captured = capfd.readouterr()
    assert type(pipe).__name__ == "WanPipeline"
    assert RECORD not in captured.out + captured.err


# ---- the card and the plan (dry run) ----------------------------------------------------

def test_t2v_card_and_plan(t2v):
    src, out = t2v
    report = run_cli("publish", out, "me/Wan2.1-T2V-tiny-Diffusers", "--base-model", "Wan-AI/Wan2.1-T2V-1.3B",
                     "--dry-run", "--json", "--fixtures", FIXTURES).json()
    card = ModelCard.load(out / "README.md")
    assert card.data.to_dict() == {"library_name": "diffusers", "base_model": "Wan-AI/Wan2.1-T2V-1.3B",
                                   "pipeline_tag": "text-to-video", "license": "apache-2.0",
                                   "language": ["en", "zh"], "tags": ["video generation"]}
    text = card.text
    assert 'WanPipeline.from_pretrained("me/Wan2.1-T2V-tiny-Diffusers"' in text
    assert f"`transformer.yaml` schema 1 sha256 `{sha256(MAPPINGS / 'transformer.yaml')}`" in text
    assert f"`vae.yaml` schema 1 sha256 `{sha256(MAPPINGS / 'vae.yaml')}`" in text
    n = fixture_keys("t2v")
    assert f"- transformer: ok: {n}/{n} source tensors used" in text
    assert f"{n}/{n} parameters and buffers of `WanTransformer3DModel`" in text
    assert f"- vae: ok: {fixture_keys('vae')}/{fixture_keys('vae')} source tensors" in text
    for shard in src.glob("diffusion_pytorch_model-*.safetensors"):
        assert f"| transformer | `{shard.name}` |" in text and f"({shard.stat().st_size} bytes) | not computed |" in text
    assert "- dtype: `--dtype keep`" in text and "- Quantization: none." in text
    # measured at publish time on the official fixtures, and said so
    assert "Measured at publish time" in text
    errors = {(m["component"], m["fixture"]): m["errors"] for m in report["measurements"]}
    assert set(errors) == {("transformer", "t2v"), ("vae", "vae"), ("text_encoder", "t5")}
    for (component, fixture), errs in errors.items():
        for output, err in errs.items():
            assert err <= TOL, (component, output, err)
            assert f"| {component} | {fixture} | `--dtype keep` | {output} | {err:.2e} |" in text
    # the plan: every file of OUT but the record, with its size, to main of the repo
    assert report["dry_run"] and report["repo_id"] == "me/Wan2.1-T2V-tiny-Diffusers"
    assert report["revision"] == "main" and report["private"] is False
    assert {f["path"]: f["bytes"] for f in report["files"]} == local_files(out)
    assert "README.md" in local_files(out) and report["bytes"] == sum(local_files(out).values())


def test_i2v_card(i2v):
    _, out = i2v
    report = run_cli("publish", out, "me/Wan2.1-I2V-tiny-Diffusers", "--base-model", "Wan-AI/Wan2.1-I2V-14B-480P",
                     "--dry-run", "--json", "--fixtures", FIXTURES).json()
    data = ModelCard.load(out / "README.md").data.to_dict()
    text = ModelCard.load(out / "README.md").text
    assert data["pipeline_tag"] == "image-to-video" and data["base_model"] == "Wan-AI/Wan2.1-I2V-14B-480P"
    assert data["license"] == "apache-2.0" and "base_model_relation" not in data
    assert 'WanImageToVideoPipeline.from_pretrained("me/Wan2.1-I2V-tiny-Diffusers"' in text
    assert "| image_encoder | CLIPVisionModelWithProjection |" in text
    n = fixture_keys("clip")  # the whole CLIP file: the text tower is dropped by declared rules
    assert f"- image_encoder: ok: {n}/{n} source tensors used (" in text and "dropped by a declared rule: " in text
    assert f"- transformer: ok: {fixture_keys('i2v')}/{fixture_keys('i2v')} source tensors used" in text
    errors = {(m["component"], m["fixture"]): m["errors"] for m in report["measurements"]}
    assert set(errors) == {("transformer", "i2v"), ("vae", "vae"), ("text_encoder", "t5"), ("image_encoder", "clip")}
    assert all(err <= TOL for errs in errors.values() for err in errs.values()), errors
    assert {f["path"] for f in report["files"]} >= {"image_encoder/model.safetensors",
                                                    "image_processor/preprocessor_config.json"}


def test_quantized_variant_card(t2v, tmp_path):
    out = copy_out(t2v[1], tmp_path / "q")
    cfg_path = out / "transformer" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"] = {"quant_method": "quanto", "weights_dtype": "int8", "modules_to_not_convert": None}
    cfg_path.write_text(json.dumps(cfg))
    run_cli("publish", out, "me/Wan2.1-T2V-tiny-int8", "--base-model", "Wan-AI/Wan2.1-T2V-1.3B", "--dry-run",
            "--no-measure")
    card = ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    assert data["base_model_relation"] == "quantized" and data["base_model"] == "Wan-AI/Wan2.1-T2V-1.3B"
    assert data["library_name"] == "diffusers" and data["pipeline_tag"] == "text-to-video"
    assert "transformer weights quantized to int8 (quanto)" in card.text
    assert "- Quantization: transformer: `quanto`, weights `int8` (its config.json" in card.text
    assert "optimum-quanto" in card.text
    assert "Not measured: skipped (--no-measure)." in card.text


def test_a_folder_quantize_made_is_carded_with_the_float_record(t2v, tmp_path):
    from safetensors import safe_open

    _, out = t2v
    run_cli("quantize", out, tmp_path / "q8", "--weights", "int8")
    q8 = tmp_path / "q8"
    # quantize carries the float folder's record, noting what it derived from it
    assert json.loads((q8 / RECORD).read_text())["derived_from"]["folder"] == out.name
    run_cli("publish", q8, "me/Wan2.1-T2V-tiny-int8", "--base-model", "Wan-AI/Wan2.1-T2V-1.3B", "--record",
            out / RECORD, "--dry-run", "--no-measure")
    card = ModelCard.load(q8 / "README.md")
    assert card.data.base_model_relation == "quantized" and card.data.pipeline_tag == "text-to-video"
    assert "- Quantization: transformer: `torchao`, weights `int8`, kept in float: " in card.text
    assert "`pip install 'torchao>=0.18'`" in card.text
    assert "The conversion record is that of the folder this one was made from (`out`)" in card.text
    with safe_open(str(q8 / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        n, dtypes = len(f.keys()), sorted({f.get_slice(k).get_dtype() for k in f.keys()})
    assert dtypes == ["F32", "I8"]
    assert f"| transformer | WanTransformer3DModel | t2v (custom (dim 128)) | {n} | F32, I8 |" in card.text


def hub_cache(tmp_path: Path, variant: str, repo_id: str, commit: str) -> Path:
    """An original repo laid out as huggingface_hub caches it: snapshot files are links to blobs
    named by their sha256 (what the Hub reports as the LFS oid)."""
    repo = tmp_path / "hf" / "hub" / f"models--{repo_id.replace('/', '--')}"
    plain = make_original_repo(tmp_path / "plain", variant)
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    for f in sorted(plain.rglob("*")):
        if f.is_file():
            blob = repo / "blobs" / sha256(f)
            shutil.copy(f, blob)
            link = snapshot / f.relative_to(plain)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return plain


def test_hub_source_gives_base_model_revision_and_free_hashes(tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    plain = hub_cache(tmp_path, "i2v", "Wan-AI/Wan2.1-I2V-14B-480P", commit)
    r = cli(["convert", "Wan-AI/Wan2.1-I2V-14B-480P", tmp_path / "out", "--only", "transformer,vae"],
            {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    run_cli("publish", tmp_path / "out", "me/i2v-parts", "--dry-run", "--no-measure")
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.base_model == "Wan-AI/Wan2.1-I2V-14B-480P" and card.data.pipeline_tag == "image-to-video"
    assert f"- Source: `Wan-AI/Wan2.1-I2V-14B-480P` at revision `{commit}`." in card.text
    for name in ("diffusion_pytorch_model.safetensors", "Wan2.1_VAE.pth"):
        assert f"`{sha256(plain / name)}` (from the local Hub cache" in card.text
    assert "not computed" not in card.text
    assert 'WanTransformer3DModel.from_pretrained("me/i2v-parts", subfolder="transformer"' in card.text


def test_a_sharded_repo_from_the_hub_cache_converts(tmp_path):
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    hub_cache(tmp_path, "t2v", "Wan-AI/Wan2.1-T2V-14B", commit)
    r = cli(["convert", "Wan-AI/Wan2.1-T2V-14B", tmp_path / "out", "--only", "transformer"],
            {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr


def test_hash_sources_streams_the_local_files(t2v, tmp_path):
    src, out = t2v
    out = copy_out(out, tmp_path / "h")
    run_cli("publish", out, "me/h", "--base-model", "Wan-AI/Wan2.1-T2V-1.3B", "--dry-run", "--no-measure",
            "--hash-sources")
    text = (out / "README.md").read_text()
    for name in ("diffusion_pytorch_model-00001-of-00002.safetensors", "Wan2.1_VAE.pth",
                 "models_t5_umt5-xxl-enc-bf16.pth"):
        assert f"`{sha256(src / name)}` (computed at publish time)" in text
    assert "not computed" not in text
    record = json.loads((out / RECORD).read_text())  # kept, so the next publish does not read them again
    assert {f["name"]: f["sha256"] for c in record["components"] for f in c["source_files"]}[
        "Wan2.1_VAE.pth"] == sha256(src / "Wan2.1_VAE.pth")


def test_a_readme_publish_did_not_write_is_kept(t2v, tmp_path):
    out = copy_out(t2v[1], tmp_path / "r")
    (out / "README.md").write_text("# my notes\n")
    result = run_cli("publish", out, "me/r", "--dry-run", "--no-measure", ok=False)
    assert "README.md" in result.stderr and (out / "README.md").read_text() == "# my notes\n"


# ---- network: none in a dry run, one clear line without it, the real upload --------------

def test_dry_run_makes_no_network_call_and_never_shows_the_token(t2v, tmp_path):
    out = copy_out(t2v[1], tmp_path / "d")
    with FakeHub(TOKEN) as hub:
        r = cli(["publish", out, "me/d", "--dry-run", "--no-measure"],
                {"HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HOME": str(tmp_path / "hf")})
    assert r.returncode == 0, r.stderr
    assert hub.log == []
    assert TOKEN not in r.stdout + r.stderr + (out / "README.md").read_text()
    assert "dry run" in r.stdout and f"{hub.url}/me/d branch main" in r.stdout


@pytest.mark.parametrize("how", ["HF_HUB_OFFLINE", "no network"])
def test_without_network_a_real_publish_fails_with_one_line(t2v, tmp_path, how):
    out = copy_out(t2v[1], tmp_path / "o")
    env = {"HF_TOKEN": TOKEN, "HF_HOME": str(tmp_path / "hf")}
    env.update({"HF_HUB_OFFLINE": "1"} if how == "HF_HUB_OFFLINE" else {"HF_ENDPOINT": "http://127.0.0.1:9"})
    r = cli(["publish", out, "me/o", "--no-measure"], env)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "me/o" in lines[0], r.stderr
    assert ("HF_HUB_OFFLINE" if how == "HF_HUB_OFFLINE" else "cannot reach the Hub") in lines[0]
    assert TOKEN not in r.stdout + r.stderr


def test_no_token_is_one_line(t2v, tmp_path):
    out = copy_out(t2v[1], tmp_path / "n")
    with FakeHub(TOKEN) as hub:
        r = cli(["publish", out, "me/n", "--no-measure"], {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf")})
    assert r.returncode == 1 and "error: no Hugging Face token" in r.stderr and hub.log == []


def test_a_refused_token_is_one_line_and_not_shown(t2v, tmp_path):
    out = copy_out(t2v[1], tmp_path / "w")
    wrong = "hf_wrongtoken9876543210zyxwvu"
    with FakeHub(TOKEN) as hub:
        r = cli(["publish", out, "me/w", "--no-measure"],
                {"HF_ENDPOINT": hub.url, "HF_TOKEN": wrong, "HF_HOME": str(tmp_path / "hf")})
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "refused the token (401" in r.stderr and hub.repos == {}
    assert wrong not in r.stdout + r.stderr


def test_upload_through_huggingface_hub_to_a_local_hub(t2v, tmp_path):
    out = copy_out(t2v[1], tmp_path / "u")
    env = {"HF_TOKEN": TOKEN, "HF_HOME": str(tmp_path / "hf")}
    args = ["publish", out, "me/Wan2.1-T2V-tiny-Diffusers", "--base-model", "Wan-AI/Wan2.1-T2V-1.3B",
            "--revision", "dev", "--private", "--commit-message", "tiny T2V, converted", "--no-measure", "--json"]
    with FakeHub(TOKEN) as hub:
        r = cli(args, {**env, "HF_ENDPOINT": hub.url})
        assert r.returncode == 0, r.stderr
        report = json.loads(r.stdout)
        repo = hub.repos["me/Wan2.1-T2V-tiny-Diffusers"]
        assert repo["private"] is True
        sent = repo["branches"]["dev"]
        assert repo["branches"]["main"] == {}  # the branch, not main
        want = local_files(out)
        assert set(sent) == set(want) and RECORD not in sent
        for name in want:
            assert sent[name] == (out / name).read_bytes(), name
        assert ModelCard(sent["README.md"].decode()).data.base_model == "Wan-AI/Wan2.1-T2V-1.3B"
        [commit] = hub.commits
        assert commit["branch"] == "dev" and commit["summary"] == "tiny T2V, converted"
        kinds = commit["files"]  # weights went through the LFS batch, uploaded and verified
        assert kinds["transformer/diffusion_pytorch_model.safetensors"] == "lfs"
        assert kinds["vae/diffusion_pytorch_model.safetensors"] == "lfs" and kinds["model_index.json"] == "regular"
        assert ("POST", "/me/Wan2.1-T2V-tiny-Diffusers.git/info/lfs/objects/batch") in hub.log
        assert hub.unauthorized == []  # every Hub call carried the token
        assert report["commit_url"].startswith(f"{hub.url}/me/Wan2.1-T2V-tiny-Diffusers/commit/")
        assert TOKEN not in r.stdout + r.stderr + (out / "README.md").read_text()
        # again: the repo and branch exist (exist_ok), the files are re-committed unchanged
        again = cli(args, {**env, "HF_ENDPOINT": hub.url})
        assert again.returncode == 0, again.stderr
        assert hub.repos["me/Wan2.1-T2V-tiny-Diffusers"]["branches"]["dev"] == sent
