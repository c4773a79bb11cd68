"""The model card (OUT/README.md), built with huggingface_hub's ModelCard/ModelCardData: the
metadata the Hub indexes (library, base model and relation, pipeline tag, license and tags carried
from the source README) and a section saying what the conversion did, with where each figure
comes from."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..quantization.formats import PACKAGES, describe_config
from .folder import ConvertedFolder
from .measure import TOLERANCE, Measurement
from .provenance import FROM_HUB_CACHE, FROM_PUBLISH, RECORD_NAME

MARKER = "<!-- written by `wan2diffusers publish`: regenerated on every publish -->"
PIPELINE_TAGS = {"WanPipeline": "text-to-video", "WanImageToVideoPipeline": "image-to-video"}
VARIANT_TAGS = {"t2v": "text-to-video", "i2v": "image-to-video", "flf2v": "image-to-video"}
DTYPE_NAMES = {"keep": "as in the source", "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass
class CardInputs:
    folder: ConvertedFolder
    repo_id: str
    base_model: str | None
    source_card: dict | None  # license/tags/... from the source README front matter
    measurements: list[Measurement] = field(default_factory=list)
    measure_note: str = ""  # why nothing (or not everything) was measured
    tool_version: str = ""
    notes: list[str] = field(default_factory=list)  # mismatches between record and this tool, ...


def pipeline_tag(folder: ConvertedFolder, source_card: dict | None) -> str | None:
    if folder.pipeline_class in PIPELINE_TAGS:
        return PIPELINE_TAGS[folder.pipeline_class]
    variant = transformer_variant(folder)
    if variant in VARIANT_TAGS:
        return VARIANT_TAGS[variant]
    return (source_card or {}).get("pipeline_tag")  # e.g. VACE: whatever the original says


def transformer_variant(folder: ConvertedFolder) -> str | None:
    for comp in (folder.record or {}).get("components", []):
        if comp["component"] == "transformer":
            return comp["variant"]
    cfg = folder.components.get("transformer")
    if cfg is None:
        return None
    if "vace_layers" in cfg:
        return "vace"
    if cfg.get("pos_embed_seq_len"):
        return "flf2v"
    return "i2v" if cfg.get("image_dim") else "t2v"


def card_data(inputs: CardInputs):
    from huggingface_hub import ModelCardData

    src = inputs.source_card or {}
    extra = {"base_model_relation": "quantized"} if inputs.folder.quantization and inputs.base_model else {}
    return ModelCardData(
        library_name="diffusers", base_model=inputs.base_model, pipeline_tag=pipeline_tag(inputs.folder, src),
        license=src.get("license"), license_name=src.get("license_name"), license_link=src.get("license_link"),
        language=src.get("language"), tags=list(src.get("tags") or []) or None, **extra)


def build_card(inputs: CardInputs):
    from huggingface_hub import ModelCard

    data = card_data(inputs)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{MARKER}\n\n{_body(inputs)}")


def write_card(card, out: Path) -> Path:
    from ..write.atomic import replace_file

    path = Path(out) / "README.md"
    replace_file(path, str(card))
    return path


def is_ours(readme: Path) -> bool:
    try:
        return MARKER in readme.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False


# ---- the body ------------------------------------------------------------------------------

def _size(n: int) -> str:
    from ..sizes import human_size

    return human_size(n)


def _body(inputs: CardInputs) -> str:
    f, rec = inputs.folder, inputs.folder.record
    name = inputs.repo_id.split("/")[-1]
    lines = [f"# {name}", ""]
    pipe = (rec or {}).get("pipeline") or {}
    family = pipe.get("family") or "Wan"
    what = f"[{inputs.base_model}](https://huggingface.co/{inputs.base_model})" if inputs.base_model \
        else f"An original {family} checkpoint"
    quant = f.quantization
    lines.append(f"{what} in the Diffusers layout"
                 + (f", with {_quant_summary(quant)}" if quant else "")
                 + ", converted with wan2diffusers from the original weights: every tensor "
                 "was mapped by a declarative table and the mapping was proven complete before anything was written.")
    if "transformer_2" in f.components:
        ratio = (pipe.get("config") or {}).get("boundary_ratio")
        lines += ["", f"A {family} two-expert model: `transformer` is the expert for high noise levels "
                  f"(timesteps at or above {ratio if ratio is not None else 'boundary_ratio'} x 1000), "
                  "`transformer_2` the one for low noise levels; the pipeline switches between them."]
    lines += ["", "## Use", "", "```python", "import torch"]
    lines += _usage(f, inputs.repo_id)
    lines += ["```", ""]
    if quant:
        methods = sorted({str(q.get("quant_method")) for q in quant.values()})
        installs = " ".join(f"'{PACKAGES.get(m, m)}'" for m in methods)
        lines += [f"Loading needs the quantization backend ({', '.join(methods)}): `pip install {installs}`.", ""]

    lines += ["## How it was converted", ""]
    lines += _conversion(inputs)
    lines += ["", "### Components", "", "| component | class | variant | tensors | dtype | size |", "|---|---|---|---|---|---|"]
    recorded = {c["component"]: c for c in (rec or {}).get("components", [])}
    for comp in f.components:
        r = recorded.get(comp)
        variant = f"{r['variant']}" + (f" ({r['size']})" if r.get("size") else "") if r else "-"
        tensors, dtypes = f.weights.get(comp, (0, []))  # from this folder's headers
        size = sum(s for p, s in f.files if p.startswith(comp + "/"))
        lines.append(f"| {comp} | {f.class_of(comp) or '-'} | {variant} | {tensors} | {', '.join(dtypes)} | "
                     f"{_size(size)} |")
    lines += ["", "### Coverage", ""]
    lines += _coverage(rec)
    lines += ["", "### Source files", ""]
    lines += _sources(rec)
    lines += ["", "### Error on the fixtures", ""]
    lines += _measurements(inputs)
    if inputs.notes:
        lines += ["", "### Notes", ""] + [f"- {n}" for n in inputs.notes]
    return "\n".join(lines) + "\n"


def _quant_summary(quant: dict[str, dict]) -> str:
    parts = []
    for comp, q in quant.items():
        backend, dtype = describe_config(q) or (q.get("quant_method"), "?")
        parts.append(f"{comp} weights quantized to {dtype} ({backend})")
    return "; ".join(parts)


def dtype_keyword() -> str:
    """The from_pretrained argument the installed diffusers wants for the dtype: `dtype` since it
    deprecated `torch_dtype` (diffusers PR #14205, utils/deprecation_utils.py `_resolve_dtype`),
    else `torch_dtype`. Read from its source file, without importing it."""
    import importlib.util

    spec = importlib.util.find_spec("diffusers")
    if spec is None or spec.origin is None:
        return "torch_dtype"
    helper = Path(spec.origin).parent / "utils" / "deprecation_utils.py"
    try:
        return "dtype" if "_resolve_dtype" in helper.read_text(encoding="utf-8") else "torch_dtype"
    except OSError:
        return "torch_dtype"


def _usage(f: ConvertedFolder, repo_id: str) -> list[str]:
    kw = dtype_keyword()
    if f.pipeline_class:
        return [f"from diffusers import {f.pipeline_class}", "",
                f'pipe = {f.pipeline_class}.from_pretrained("{repo_id}", {kw}=torch.bfloat16)']
    out = []
    for comp in f.components:
        cls = f.class_of(comp)
        lib = "diffusers" if "_class_name" in f.components[comp] else "transformers"
        where = "" if f.single else f', subfolder="{comp}"'
        out += [f"from {lib} import {cls}",
                f'{comp} = {cls}.from_pretrained("{repo_id}"{where}, '
                f'{kw if lib == "diffusers" else transformers_dtype_keyword()}=torch.bfloat16)']
    return out


def transformers_dtype_keyword() -> str:
    """transformers renamed `torch_dtype` to `dtype` in 4.56."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        major, minor = (int(x) for x in version("transformers").split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return "torch_dtype"
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def _conversion(inputs: CardInputs) -> list[str]:
    rec, f = inputs.folder.record, inputs.folder
    if rec is None:
        return [f"No conversion record ({RECORD_NAME}) was found in the converted folder, so the tool version, "
                "tables, source files and coverage of the conversion are not stated here.",
                f"- Card written by wan2diffusers {inputs.tool_version}."]
    libs = ", ".join(f"{k} {v}" for k, v in rec["libraries"].items() if v)
    src = rec["source"]
    where = (f"`{src['repo_id']}`" + (f" at revision `{src['revision']}`" if src.get("revision") else "")
             if src.get("repo_id") else f"a local folder `{src['name']}`")
    lines = [f"- Tool: wan2diffusers {rec['tool']['version']} ({libs}), on {rec['created']}.",
             f"- Source: {where}."]
    made_from = (rec.get("derived_from") or {}).get("folder")
    if f.record_path is not None and f.record_path.parent.resolve() != f.path.resolve():
        made_from = f.record_path.parent.name
    if made_from:
        lines.append(f"- The conversion record is that of the folder this one was made from (`{made_from}`): "
                     "the coverage and source files below are those of that conversion; the quantization is this folder's.")
    tables = "; ".join(f"`{t['file']}`" + (f" schema {t['schema_version']}" if "schema_version" in t else "")
                       + f" sha256 `{t['sha256']}`" for t in rec["tables"].values())
    lines.append(f"- Mapping tables: {tables}.")
    dtype = rec["dtype"]
    lines.append(f"- dtype: `--dtype {dtype}` ({DTYPE_NAMES.get(dtype, dtype)}"
                 + ("; the modules diffusers keeps in float32 stay float32" if dtype in ("bf16", "fp16") else "") + ").")
    quant = f.quantization
    if quant:
        for comp, q in quant.items():
            kept = q.get("modules_to_not_convert") or []
            other = {k: v for k, v in q.items()
                     if k not in ("quant_method", "weights_dtype", "modules_to_not_convert", "quant_type")
                     and v not in (None, [], {})}
            weights = (describe_config(q) or (None, q.get("weights_dtype")))[1]
            lines.append(f"- Quantization: {comp}: `{q.get('quant_method')}`, weights `{weights}`"
                         + (f", kept in float: {', '.join(f'`{m}`' for m in kept)}" if kept else "")
                         + (f", {other}" if other else "") + " (its config.json `quantization_config`).")
    else:
        lines.append("- Quantization: none.")
    pipe = rec.get("pipeline")
    if pipe:
        extra = "".join(f", {k} {v}" for k, v in (pipe.get("config") or {}).items())
        lines.append(f"- Pipeline: `{pipe['class']}`" + (f" ({pipe['family']})" if pipe.get("family") else "")
                     + (f", scheduler flow_shift {pipe['flow_shift']}{extra}" if pipe.get("complete")
                        else f", incomplete (no {', '.join(pipe['missing'])})") + ".")
    return lines


def _coverage(rec: dict | None) -> list[str]:
    if rec is None:
        return ["Not recorded."]
    lines = ["Proven from the headers before a byte was written, then checked again on the written headers:", ""]
    for c in rec["components"]:
        dropped = c["dropped"]
        reasons = sorted({d["reason"] for d in dropped})
        lines.append(f"- {c['component']}: {c['coverage']}: {c['source_tensors']}/{c['source_tensors']} source tensors "
                     f"used ({len(dropped)} dropped by a declared rule" + (f": {'; '.join(reasons)}" if reasons else "")
                     + f"), {c['converted']}/{c['target_tensors']} parameters and buffers of `{c['class']}` produced "
                     "with the shapes it needs.")
    return lines


def _sources(rec: dict | None) -> list[str]:
    if rec is None:
        return ["Not recorded."]
    lines = ["| component | file | size | sha256 |", "|---|---|---|---|"]
    missing = 0
    for c in rec["components"]:
        for s in c["source_files"]:
            if s.get("sha256"):
                how = {FROM_HUB_CACHE: "from the local Hub cache (the Hub's LFS oid, not recomputed)",
                       FROM_PUBLISH: "computed at publish time"}.get(s.get("sha256_from"), "")
                sha = f"`{s['sha256']}` ({how})"
            else:
                sha, missing = "not computed", missing + 1
            lines.append(f"| {c['component']} | `{s['name']}` | {_size(s['size'])} ({s['size']} bytes) | {sha} |")
    if missing:
        lines += ["", "Hashes marked *not computed* were skipped because they would need reading every byte "
                  "(`wan2diffusers publish --hash-sources` streams them)."]
    return lines


def _measurements(inputs: CardInputs) -> list[str]:
    if not inputs.measurements:
        return [f"Not measured: {inputs.measure_note or 'no fixture measurement was run'}."]
    lines = [f"Measured at publish time by wan2diffusers {inputs.tool_version}: the tiny checkpoint made by the "
             "official Wan code for each component (the project's test fixtures) was converted with the same "
             "tables and dtype, loaded with `from_pretrained` in float32 on CPU and run on the fixture's inputs; "
             "the figure is max|out - expected| / max|expected| against the official outputs (the project's "
             f"tolerance: {TOLERANCE:g}). It checks the mapping, not this checkpoint's own outputs.", "",
             "| component | fixture | converted as | output | relative error |", "|---|---|---|---|---|"]
    for m in inputs.measurements:
        for out, err in m.errors.items():
            lines.append(f"| {m.component} | {m.fixture} | `--dtype {m.dtype}` | {out} | {err:.2e} |")
    if inputs.folder.quantization:
        lines += ["", "The quantization was not part of this measurement: the figures are for the unquantized mapping."]
    if inputs.measure_note:
        lines += ["", inputs.measure_note]
    return lines
