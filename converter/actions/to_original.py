"""`convert SRC OUT --to original|comfyui`: Diffusers components back in the layout of the original
Wan-AI repos, or as ComfyUI's single files, through the same tables and planner run backwards
(converter/plan/plan.py BACKWARD; SAME for the ComfyUI files that keep the transformers keys).

read (the Diffusers folders' headers) -> derive each component's facts from its keys and config.json
-> plan backwards (every Diffusers key of the class read exactly once, every original key made
exactly once) -> write into a work folder (transformer: safetensors sharded with an index and the
original config.json; VAE, umT5: a `.pth` as torch.save writes it, streamed; the tokenizer as
google/umt5-xxl/; ComfyUI: one .safetensors per component in its models/ folder, mappings/comfyui.yaml)
-> read the written headers back against the plan -> rename to OUT."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConversionError
from ..plan.plan import BACKWARD, SAME, build_plan
from ..write.copying import copy_folder
from ..sizes import human_size
from .common import silent


@dataclass
class Reversed:
    """One component planned backwards, and where its original files go."""

    instance: str  # its Diffusers folder: transformer, transformer_2, vae, text_encoder
    cp: object  # a ComponentPlan whose plan runs BACKWARD
    dest: str  # its folder in OUT ("" for the repo's root, high_noise_model for an expert)
    file_name: str  # diffusion_pytorch_model.safetensors, Wan2.1_VAE.pth, ...
    config: dict | None = None  # the original config.json, for a transformer
    config_from: dict = field(default_factory=dict)  # field -> where its value came from (not the weights)

    @property
    def is_pth(self) -> bool:
        return self.file_name.endswith(".pth")


class OriginalFiles:
    """The layout of the original Wan-AI repos: every component's original keys (the CLIP vision
    tower excepted: its file cannot be rebuilt, it goes out as ComfyUI's clip_vision file)."""

    name = "original"
    sharded = True  # at --max-shard-size, with an index, as the repos are

    def direction(self, component: str):
        return ComfyFiles().direction(component) if component == "image_encoder" else BACKWARD

    def place(self, parts: list[Reversed], src: Path, model_name: str) -> list[str]:
        from ..mapping.tables import load_table

        clip = [r for r in parts if r.cp.component == "image_encoder"]
        _place([r for r in parts if r not in clip], src)
        ComfyFiles().place(clip, src, model_name)
        notes = []
        for r in parts:  # what the way in dropped by rule with nothing to restore it from
            if r not in clip and r.cp.plan.lost:
                reasons = "; ".join(dict.fromkeys(lost.reason for lost in r.cp.plan.lost if lost.reason))
                notes.append(f"{r.instance}: not written, as Diffusers does not keep them: {reasons}")
        for r in clip:  # the vision tower, as ComfyUI's clip_vision reads it, at the root
            r.dest = ""
            notes.append(f"{r.instance}: {load_table('image_encoder').source.file_names[0]} cannot be rebuilt: the "
                         f"Diffusers image encoder has only the vision tower (the original file also holds "
                         + "; ".join(dict.fromkeys(lost.reason for lost in r.cp.plan.lost if lost.reason))
                         + f"); the vision tower is written as {r.file_name}, in the keys ComfyUI's clip_vision loads")
        return notes

    def tokenizer(self, src: Path, parts: list[Reversed]):
        return _tokenizer(src, parts)


class ComfyFiles:
    """ComfyUI's single files (mappings/comfyui.yaml): per component its models/ folder and keys."""

    name = "comfyui"
    sharded = False  # one file per component

    def direction(self, component: str):
        from ..comfyui import load_comfy_layout

        spec = load_comfy_layout().components.get(component)
        if spec is None:
            raise ConversionError(f"mappings/comfyui.yaml has no ComfyUI file for {component}")
        return BACKWARD if spec.keys == "original" else SAME

    def place(self, parts: list[Reversed], src: Path, model_name: str) -> list[str]:
        _place_comfy(parts, model_name)
        return []

    def tokenizer(self, src: Path, parts: list[Reversed]):
        return None  # ComfyUI's umT5 loader brings its own tokenizer


WAY_BACK = {"original": OriginalFiles(), "comfyui": ComfyFiles()}  # the output layouts of the way back


def plan_reversed(src: Path, only: list[str] | None, dtype: str, say=silent,
                  to: str = "original", model_name: str | None = None, found=None,
                  fp8: str | None = None) -> tuple[list[Reversed], list[str]]:
    """Every Diffusers component of SRC planned in the direction the output layout `to` (WAY_BACK)
    asks of it, its coverage proven, and placed; and notes on what cannot be written.
    `model_name`: the model's name in ComfyUI file names (default: SRC's); `found`: what
    diagnose.layout.find made of SRC, when the caller has it already; `fp8` (ComfyUI files):
    the transformer written as fp8_scaled or plain fp8 (quantization/fp8_scaled.py)."""
    from ..component import ComponentPlan, require_coverage
    from ..diagnose.examine import derive, diagnose
    from ..diagnose.layout import find
    from ..read.source import SourceCheckpoint

    layout = WAY_BACK[to]
    found = found if found is not None else find(src)
    units = [u for u in found.units if only is None or u.component in only]
    if not units:
        raise ConversionError(f"{src}: none of the components asked for ({', '.join(only or [])}) is here")
    out = []
    untied_notes: list[str] = []
    for unit in units:
        name = unit.instance or unit.component
        if unit.weights is None or unit.weights.fatal:
            problems = "; ".join(unit.weights.problems) if unit.weights is not None else "no weights"
            raise ConversionError(f"{unit.path}: {name}: {problems}; nothing was written")
        if unit.layout != "diffusers":
            cp = _original_as_it_is(unit, dtype, to, fp8) if unit.layout == "original" else None
            if cp is None:
                raise ConversionError(f"{unit.path}: {name} is in the {unit.layout} layout, not Diffusers: nothing to "
                                      f"convert back")
            if fp8 is not None:
                _attach_fp8(cp, fp8, name, say)
            say(f"{name}: {len(cp.plan.tensors)} tensors in the original key names ({cp.plan.detection.variant}: "
                f"no Diffusers class), written as they are; coverage proven against the table")
            out.append(Reversed(name, cp, "", ""))
            continue
        if unit.quantized:
            raise ConversionError(f"{unit.path}: {name} is quantized: its float weights cannot be recovered exactly; "
                                  f"convert back the float folder it was made from")
        d = diagnose(unit)
        if d.target is None or d.missing or d.unexpected or d.mismatched or d.config_wrong:
            problem = next((f.message for f in d.findings), "its config.json does not describe its weights")
            raise ConversionError(f"{unit.path}: {name} is not a complete Diffusers {unit.component}: {problem} "
                                  f"(wan2diffusers inspect {unit.path})")
        det = d.detection if d.detection is not None else derive(unit)  # diagnose settled it already
        weights = SourceCheckpoint(unit.path, "diffusers", unit.weights.files, dict(unit.weights.tensors), None)
        _untied(weights, d.target, name, untied_notes)
        direction = layout.direction(unit.component)
        fp8_here = fp8 is not None and unit.component == "transformer"
        if fp8 is not None and not fp8_here and fp8 != "fp8_scaled":
            raise ConversionError(f"--dtype {fp8} is for the transformer's file: add --only transformer (the other "
                                  f"components' files take --dtype fp32, bf16 or fp16)")
        plan = build_plan(unit.table, weights, det, d.target, _fp8_keep_dtype(dtype) if fp8_here else dtype, direction)
        cp = ComponentPlan(unit.component, weights, plan, "", name)
        require_coverage(cp)
        if fp8_here:
            _attach_fp8(cp, fp8, name, say)
        say(f"{name}: {len(weights.tensors)} Diffusers tensors ({det.variant}{', ' + det.size if det.size else ''}) "
            f"-> {len(plan.tensors)} {'original' if direction is BACKWARD else 'Diffusers'}-named tensors; "
            f"coverage proven")
        out.append(Reversed(name, cp, "", ""))
    notes = untied_notes + layout.place(out, src, model_name or Path(src).resolve().name)
    from ..write.pth_writer import STORAGE_TYPES

    for r in out:  # what a .pth can hold (torch.save's typed storages), checked before anything is written
        bad = [pt for pt in r.cp.plan.tensors if r.is_pth and pt.dtype not in STORAGE_TYPES]
        if bad:
            raise ConversionError(f"{r.cp.source.path}: {bad[0].sources[0].key} is {bad[0].dtype}, which the original "
                                  f"{r.file_name} (torch.save's typed storages) does not hold; convert back a folder "
                                  f"with float32/bf16/fp16 weights")
    return out, notes


def _attach_fp8(cp, fp8: str, name: str, say) -> None:
    """The transformer's file as fp8_scaled or plain fp8 (quantization/fp8_scaled.py), said."""
    from ..quantization.fp8_scaled import plan_fp8

    cp.quantized = plan_fp8(cp, fp8)
    say(f"{name}: {cp.quantized.quantized} Linear weights as {fp8} (ComfyUI's formula, mappings/fp8.yaml), the "
        f"other tensors {', '.join(sorted({pt.dtype for pt in cp.plan.tensors}))}")


def _original_as_it_is(unit, dtype: str, to: str, fp8: str | None):
    """A transformer diffusers has no class for (its table variant's `no_class`, e.g. Wan 2.2 S2V), in
    the original layout, for an output in the original key names (ComfyUI's file, the original repo's
    layout): planned forward to prove its keys, then written key for key as it is (cast by --dtype).
    Its config.json, which the weights cannot tell, travels in a ComfyUI file's metadata
    (read.source.CARRIED_CONFIG) and comes back from there. None for anything else."""
    from dataclasses import replace

    from ..component import plan_component, require_coverage
    from ..plan.plan import DTYPE_CHOICES, FLOAT_TAGS, KEEP, PlannedTensor
    from ..read.source import CARRIED_CONFIG

    if to not in ("comfyui", "original") or unit.component != "transformer":
        return None
    try:
        cp = plan_component(unit.component, unit.path)
    except ConversionError:
        return None
    if not cp.plan.target.missing:
        return None
    require_coverage(cp)
    tag = DTYPE_CHOICES[_fp8_keep_dtype(dtype) if fp8 is not None else dtype]
    tensors = [PlannedTensor(k, tuple(r.shape), tag if tag and r.value_dtype in FLOAT_TAGS else r.value_dtype, [r],
                             KEEP, 0) for k, r in cp.source.tensors.items()]
    cp.plan = replace(cp.plan, tensors=tensors, direction=SAME)
    if to == "comfyui" and cp.source.original_config is not None:
        cp.metadata[CARRIED_CONFIG] = json.dumps(cp.source.original_config)
    return cp


def _fp8_keep_dtype(dtype: str) -> str:
    """The dtype of what an fp8 transformer file keeps unquantized: --dtype, else Comfy-Org's (F16)."""
    from ..fp8 import load_fp8_spec
    from ..plan.plan import DTYPE_CHOICES

    if dtype != "keep":
        return dtype
    return next(name for name, tag in DTYPE_CHOICES.items() if tag == load_fp8_spec().write.keep_dtype)


def _untied(weights, target, name: str, notes: list[str]) -> None:
    """A folder that stores a tied copy (transformers' encoder.embed_tokens.weight beside shared.weight)
    with other values than the key it is tied to: transformers then does not tie them, and the model
    runs on the copy. The original layout has one tensor for both: the copy's values are written
    under the tied key, and a note says so."""
    from dataclasses import replace

    from ..read.safetensors_file import same_values

    for copy, kept in target.tied.items():
        a, b = weights.tensors.get(copy), weights.tensors.get(kept)
        if a is None or b is None or same_values(a, b):
            continue
        if (a.dtype, tuple(a.shape)) != (b.dtype, tuple(b.shape)):
            raise ConversionError(f"{a.file}: {copy} ({a.dtype} {list(a.shape)}) and {kept} ({b.dtype} "
                                  f"{list(b.shape)}) are tied but differ in shape or dtype")
        weights.tensors[kept] = replace(a, key=kept)  # the values the model runs on, read under the kept name
        notes.append(f"{name}: {copy} differs from {kept} (transformers then does not tie them, and the model "
                     f"uses {copy}): the original layout holds one tensor for both; written from {copy}")


def _place_comfy(parts: list[Reversed], model_name: str) -> None:
    """Each component's ComfyUI file: models/ folder and name from mappings/comfyui.yaml."""
    from ..comfyui import DTYPE_NAMES, load_comfy_layout
    from ..pipeline import load_pipeline_table

    layout = load_comfy_layout()
    instances = sorted(r.instance for r in parts if r.cp.component == "transformer")
    experts = next((lay.instances for lay in load_pipeline_table().transformer_layouts
                    if sorted(lay.instances) == instances and len(instances) > 1), {})
    for r in parts:
        spec = layout.components[r.cp.component]
        dtypes = sorted({pt.dtype for pt in r.cp.plan.tensors if pt.dtype in DTYPE_NAMES})
        name = model_name
        if r.instance in experts:
            name += "_" + spec.experts.get(experts[r.instance], experts[r.instance])
        r.dest = spec.folder
        kind = getattr(r.cp.quantized, "kind", None)  # an fp8 file is named by its kind, as Comfy-Org's are
        r.file_name = spec.file.format(name=name, variant=r.cp.plan.detection.variant,
                                       dtype=kind or "_".join(DTYPE_NAMES[d] for d in dtypes) or "mixed")


def _place(parts: list[Reversed], src: Path) -> None:
    """Each component's folder and file in the original repo layout; each transformer's config.json."""
    from ..mapping.tables import load_table
    from ..pipeline import choose_pipeline, load_pipeline_table

    transformers = [r for r in parts if r.cp.component == "transformer"]
    instances = sorted(r.instance for r in transformers)
    layout = next((lay for lay in load_pipeline_table().transformer_layouts
                   if sorted(lay.instances) == instances), None)
    record, record_path = _record(Path(src))
    kept = {c.get("component"): c.get("original_config") for c in (record or {}).get("components", [])}
    pipe = None
    if transformers:
        det = transformers[0].cp.plan.detection
        try:
            pipe = choose_pipeline(det.variant, instances, det.facts)
        except ConversionError:
            pipe = None
    for r in parts:
        table = load_table(r.cp.component)
        det = r.cp.plan.detection
        if r.cp.component == "transformer":
            folder = layout.instances[r.instance] if layout is not None else "."
            r.dest = "" if folder == "." else folder
            r.file_name = table.source.weights_name
            if r.cp.plan.target.missing:  # no class, no table of its config: the one it carries, as it is
                r.config = r.cp.source.original_config
                if r.config is None:
                    raise ConversionError(f"{r.cp.source.path}: {det.variant}: its config.json cannot be told from "
                                          f"the weights and this file carries none (a ComfyUI file wan2diffusers "
                                          f"writes carries its source's); convert the original repo instead")
                r.config_from = {"_class_name": "the config.json the source carries (all of it)"} \
                    if "_class_name" in r.config else {}
                continue
            r.config, r.config_from = original_config(table, det, pipe.original_config if pipe else {},
                                                      kept.get(r.instance), record_path)
        else:
            variant = next(v for v in table.variants if v.name == det.variant)
            r.file_name = variant.file_name or table.source.file_names[0]


def _record(src: Path) -> tuple[dict | None, Path | None]:
    """The conversion record of SRC, or of the folder SRC is a component folder of, and its path."""
    from ..layouts.names import output_folders
    from ..publishing.provenance import read_record
    from ..write.workfiles import RECORD_NAME

    places = [src] + ([src.parent] if src.name in output_folders() else [])
    for where in places:
        try:
            record = read_record(where) if where.is_dir() else None
        except ConversionError:
            record = None
        if record is not None:
            return record, where / RECORD_NAME
    return None, None


VERSION = re.compile(r"[0-9]+(\.[0-9]+){0,3}([.+-]?[0-9A-Za-z]+){0,3}")


def _kept_value(kind: str, value, where: str):
    """A value the record may give (ConfigEntry.kept), checked like a config.json value."""
    from ..plan.detect import MAX_INT, short_repr

    ok = (isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_INT if kind == "int"
          else isinstance(value, str) and len(value) <= 40 and VERSION.fullmatch(value) is not None)
    if not ok:
        raise ConversionError(f"{where}={short_repr(value)}: expected {'a positive integer' if kind == 'int' else 'a version'}"
                              f" (fix or remove the conversion record)")
    return value


def original_config(table, det, pipeline_fields: dict, kept: dict | None, record: Path | None = None
                    ) -> tuple[dict, dict]:
    """The original config.json from the table's `original_config` (facts or constants); a constant
    replaced by the pipeline row's value, then -- for the fields the table marks `kept:` -- by the
    source's own config.json when the conversion record kept it (type-checked). Any other field the
    record holds must agree with what the weights and tables give, else the record is refused.
    Returns (config, field -> where a value not from the weights came from)."""
    from ..mapping.schema import config_entry
    from ..plan.detect import short_repr

    cfg, origin = {}, {}
    kept = kept if isinstance(kept, dict) else {}
    for name, entry in table.original_config.items():
        e = config_entry(entry, det.variant)
        if e is None:
            continue
        where = f"{record}: original_config.{name}"
        if e.fact is not None:
            cfg[name] = det.facts[e.fact]
        elif e.kept is not None and name in kept:
            cfg[name] = _kept_value(e.kept, kept[name], where)
            origin[name] = "the conversion record (the source's config.json)"
        elif name in pipeline_fields:
            cfg[name], origin[name] = pipeline_fields[name], "mappings/pipeline.yaml"
        else:
            cfg[name], origin[name] = e.const, f"mappings/{table.component}.yaml (default)"
        if name in kept and e.kept is None and kept[name] != cfg[name]:
            raise ConversionError(f"{where}={short_repr(kept[name])} contradicts the weights and tables ({cfg[name]!r}); "
                                  f"fix or remove the conversion record")
    return cfg, origin


def run_to_original(src: Path, out: Path, only, dtype: str, max_shard_size, overwrite: bool, dry_run: bool,
                    say=silent, progress: bool = True, to: str = "original", check_values=None,
                    fp8: str | None = None, loras=()) -> dict:
    """`to`: original (the Wan-AI repo layout) or comfyui (one file per component, unsharded);
    `fp8`: (comfyui) the transformer as fp8_scaled or plain fp8 (plan_reversed)."""
    from ..component import written_tensors
    from ..hub import diffusers_patterns, download, looks_like_repo_id
    from ..write.atomic import atomic_output_dir, check_output, clean_stale

    src, out = Path(src), Path(out)
    check_output(src, out, overwrite or dry_run)
    started = time.perf_counter()
    name = Path(src).resolve().name
    if looks_like_repo_id(str(src)):  # a published Diffusers repo: only its components' files
        say(f"downloading from the Hub: {src} (only what the components need)")
        name = Path(str(src)).name
        src = download(str(src), only, patterns=diffusers_patterns(only))
    parts, notes = plan_reversed(src, only, dtype, say, to, name, fp8=fp8)
    merged = None
    if loras:  # LoRAs folded into the source refs (actions/merge.py)
        from .merge import plan_merges

        merged = plan_merges([r.cp for r in parts], list(loras), say)
    tokenizer = WAY_BACK[to].tokenizer(src, parts)
    if not WAY_BACK[to].sharded:
        max_shard_size = 1 << 62  # one file per component
    report = {"ok": True, "dry_run": dry_run, "to": to, "source": str(src), "components": [
        {"instance": r.instance, "component": r.cp.component, "variant": r.cp.plan.detection.variant,
         "file": "/".join(x for x in (r.dest, r.file_name) if x), "tensors": len(written_tensors(r.cp)),
         "bytes": sum(pt.nbytes for pt in written_tensors(r.cp)), "dropped": [d.key for d in r.cp.plan.dropped],
         "fp8": getattr(r.cp.quantized, "kind", None),
         "config": r.config, "config_from": r.config_from} for r in parts],
        "tokenizer": tokenizer[1] if tokenizer else None, "notes": notes, **({"loras": merged} if merged else {})}
    if check_values is not None:  # --check-finite: the source tensors read once more
        check_values([r.cp for r in parts], report["components"], report)
    for r in parts:  # one line per origin of the config.json values the Diffusers config lacks
        by_origin: dict[str, list[str]] = {}
        for field_name, where in r.config_from.items():
            by_origin.setdefault(where, []).append(f"{field_name}={r.config[field_name]!r}")
        for where, fields in by_origin.items():
            say(f"  note: {r.instance} config.json {', '.join(fields)} from {where}")
    for note in notes:
        say(f"note: {note}")
    if dry_run:
        say(f"dry run: would write {out} ({human_size(sum(c['bytes'] for c in report['components']))}); nothing written")
        return report
    clean_stale(out, say)
    with atomic_output_dir(out, overwrite) as work:
        for r in parts:
            write_original(r, work / r.dest if r.dest else work, max_shard_size, progress)
        if tokenizer:
            copy_folder(tokenizer[0], work / tokenizer[1])
    report["output"] = str(out.resolve())
    report["seconds"] = round(time.perf_counter() - started, 3)
    say(f"done in {report['seconds']:.1f} s")
    say(f"result: {out.resolve()}")
    return report


def _tokenizer(src: Path, parts: list[Reversed]):
    """(the Diffusers tokenizer folder, where the original repos keep it) when the text encoder is
    converted back and SRC has one."""
    from ..pipeline import load_pipeline_table

    folder = Path(src) / "tokenizer"
    if not any(r.cp.component == "text_encoder" for r in parts) or not folder.is_dir():
        return None
    return folder, load_pipeline_table().tokenizer.source_folder


def write_original(r: Reversed, folder: Path, max_shard_size, progress: bool = True) -> None:
    """One component's original files: a `.pth` as torch.save writes it, or safetensors shards
    (component.write_weights), and a transformer's config.json; the written headers read back."""
    from tqdm import tqdm

    from ..component import check_written, produce, verify_written, write_weights
    from ..progress import file_done
    from ..read.pth_file import read_pth_index
    from ..write.pth_writer import write_pth

    folder.mkdir(parents=True, exist_ok=True)
    if r.is_pth:
        pts = r.cp.plan.tensors
        with tqdm(total=sum(pt.nbytes for pt in pts), unit="B", unit_scale=True, desc=f"writing {r.instance}",
                  disable=None if progress else True, leave=False) as bar:
            write_pth(folder / r.file_name, [(pt.key, pt.dtype, tuple(pt.shape), pt.nbytes) for pt in pts],
                      lambda i: byte_chunks(produce(pts[i])), bar.update)
        file_done(f"writing {r.instance}", r.file_name, sum(pt.nbytes for pt in pts), progress)
        check_written(r.cp, folder / r.file_name,
                      {k: (ref.dtype, tuple(ref.shape)) for k, ref in read_pth_index(folder / r.file_name).items()})
    else:
        verify_written(r.cp, folder, write_weights(r.cp, folder, r.file_name, max_shard_size, progress))
    if r.config is not None:
        (folder / "config.json").write_text(json.dumps(r.config, indent=2) + "\n")


def byte_chunks(item):
    """What produce() gives (a TensorRef to copy, an iterator of byte chunks, a tensor) as byte chunks,
    or, for a plain byte copy, the TensorRef itself (write_pth copies it as cp does). Neither needs
    torch (a .pth way back of a warm family imports none)."""
    from ..read import safetensors_file as st  # DTYPES (torch's) only where a cast needs it

    if isinstance(item, st.TensorRef):  # a byte copy: read ahead into reused buffers
        if item.stride is None and item.scale is None and not item.deltas:
            return item  # copied unchanged (write_pth copies it kernel-side, or streams it)
        if item.stride is None:
            return st.iter_cast(item, st.DTYPES[item.dtype])
        import torch

        return (part.view(torch.uint8).numpy().data for part in st.iter_chunks(item))
    if hasattr(item, "contiguous"):
        import torch

        return [item.contiguous().reshape(-1).view(torch.uint8).numpy().data]
    return item
