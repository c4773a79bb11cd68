"""What `convert` does (the CLI and the Python API call it): original Wan weights -> a Diffusers folder."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from ..errors import ConversionError, NotYet
from ..plan.plan import DTYPE_CHOICES
from ..sizes import human_size
from .common import silent


OPTION_NAMES = {"only": "--only", "dtype": "--dtype", "max_shard_size": "--max-shard-size", "clip_heads": "--clip-heads",
                "flow_shift": "--flow-shift", "settings": "--set", "override_config": "--override-config",
                "quantize": "--quantize", "backend": "--backend", "check_finite": "--check-finite",
                "drop_unsupported": "--drop-unsupported", "loras": "--lora"}


@dataclass(frozen=True)
class Options:
    """Everything `convert` was given besides SRC and OUT; None/False/"keep": not given."""

    only: list | None = None
    dtype: str = "keep"
    max_shard_size: str | None = None
    clip_heads: int | None = None
    flow_shift: float | None = None
    settings: dict = field(default_factory=dict)
    override_config: bool = False
    quantize: str | None = None
    backend: str | None = None
    check_finite: bool = False
    drop_unsupported: bool = False
    loras: tuple = ()  # merge: actions/merge.LoraArg, merged into the transformer while it is written
    overwrite: bool = False
    dry_run: bool = False

    @property
    def shard_size(self) -> str:
        return self.max_shard_size or "5GB"

    def given(self) -> dict:
        return {k: getattr(self, k) for k in OPTION_NAMES if getattr(self, k) not in (None, False, {}, [], (), "keep")}


@dataclass(frozen=True)
class Output:
    """One kind of output `--to` names: the options it honours (any other one given is refused in
    one line, never ignored; `why_not` says why for some), and what writes it."""

    name: str
    honours: frozenset[str]
    write: Callable[..., dict]  # (src, out, options, say, warn, progress, check_values) -> report
    why_not: dict[str, str] = field(default_factory=dict)
    only: tuple[str, ...] | None = None  # the only components it writes, if it is restricted
    accepts: dict[str, tuple[str, ...]] = field(default_factory=dict)  # option -> the values it takes

    def check(self, options: Options) -> None:
        for name, value in options.given().items():
            if name not in self.honours:
                why = self.why_not.get(name) or self.why_not.get("*", "it does not apply to this output")
                raise ConversionError(f"{OPTION_NAMES[name]} does not apply to --to {self.name}: {why}")
            if name in self.accepts and value not in self.accepts[name]:
                why = self.why_not.get(f"{name}={value}", "")
                raise ConversionError(f"{OPTION_NAMES[name]} {value}: --to {self.name} takes "
                                      f"{', '.join(self.accepts[name])}" + (f" ({why})" if why else ""))
        if self.only is not None and options.only and list(options.only) != list(self.only):
            raise ConversionError(f"--only {','.join(options.only)}: --to {self.name} writes the "
                                  f"{', '.join(self.only)} only (--only {','.join(self.only)})")


def _write_gguf(src, out, o: Options, say, warn, progress, check):
    from .to_gguf import run_gguf

    return run_gguf(src, out, o.quantize, o.overwrite, o.dry_run, o.settings, say, progress, check, o.loras)


def _write_back(to: str):
    def write(src, out, o: Options, say, warn, progress, check):
        from .to_original import run_to_original

        plain = o.dtype in PLAIN_FP8  # --dtype fp8_e4m3fn: ComfyUI's plain fp8 transformer file
        return run_to_original(src, out, o.only, "keep" if plain else o.dtype, o.shard_size, o.overwrite, o.dry_run,
                               say, progress, to, check, fp8=o.dtype if plain else o.quantize, loras=o.loras)
    return write


BACK = "the way back writes the float weights of a Diffusers SRC, whose config.json already holds every fact"
FLOAT_DTYPES = tuple(name for name, tag in DTYPE_CHOICES.items() if tag)  # fp32, bf16, fp16
PLAIN_FP8 = ("fp8_e4m3fn", "fp8_e5m2")  # mappings/fp8.yaml write.plain_formats
DTYPE_OPTIONS = ("keep", *FLOAT_DTYPES, *PLAIN_FP8)  # --dtype of convert and merge (each --to takes some)
FP8_WHY = {"quantize=fp8_scaled": "fp8_scaled is ComfyUI's file format: --to comfyui --quantize fp8_scaled",
           "dtype=fp8_e4m3fn": "plain fp8 is ComfyUI's file format: --to comfyui --dtype fp8_e4m3fn",
           "dtype=fp8_e5m2": "plain fp8 is ComfyUI's file format: --to comfyui --dtype fp8_e5m2"}
OUTPUTS = {o.name: o for o in (
    Output("diffusers", frozenset({"only", "dtype", "max_shard_size", "clip_heads", "flow_shift", "settings",
                                   "override_config", "quantize", "backend", "check_finite", "loras"}),
           lambda *a: write_diffusers(*a), FP8_WHY,
           accepts={"dtype": FLOAT_DTYPES, "quantize": ("int8", "float8", "int4")}),
    Output("gguf", frozenset({"only", "quantize", "settings", "override_config", "check_finite", "loras"}), _write_gguf,
           {"dtype": "a GGUF file's types come from --quantize (mappings/gguf.yaml)",
            "max_shard_size": "a GGUF file is one file per transformer",
            "clip_heads": "a GGUF file holds the transformer only", "flow_shift": "a GGUF file holds no scheduler",
            "backend": "--backend picks torchao or quanto for a Diffusers folder"}, ("transformer",)),
    Output("original", frozenset({"only", "dtype", "max_shard_size", "check_finite", "loras"}), _write_back("original"),
           {"*": BACK, **FP8_WHY}, accepts={"dtype": FLOAT_DTYPES}),
    Output("comfyui", frozenset({"only", "dtype", "quantize", "check_finite", "loras"}), _write_back("comfyui"),
           {"max_shard_size": "ComfyUI's files are one file per component", "*": BACK},
           accepts={"dtype": FLOAT_DTYPES + PLAIN_FP8, "quantize": ("fp8_scaled",)}),
)}


def run_convert(src, out, only, max_shard_size, dtype, overrides, clip_heads, flow_shift, overwrite, dry_run,
                say=silent, warn=silent, progress: bool = True, quantize=None, check_finite=False,
                override_config=False, backend=None, to="diffusers", drop_unsupported=False, loras=()) -> dict:
    """`--to` picks an output (OUTPUTS), which refuses what it does not honour and writes; a LoRA
    file (recognised by its keys) goes to the LoRA format `--to` names (actions/lora.py)."""
    from ..layouts import locate
    from .lora import run_convert_lora

    o = Options(only, dtype, max_shard_size, clip_heads, flow_shift, overrides or {}, override_config, quantize,
                backend, check_finite, drop_unsupported, tuple(loras), overwrite, dry_run)
    if locate(src).layout == "lora":  # converter/layouts
        extra = [OPTION_NAMES[k] for k in o.given() if k != "drop_unsupported"]
        if extra:
            raise ConversionError(f"{extra[0]} does not apply to a LoRA file ({src}): a LoRA is converted key by key "
                                  f"into the format --to names")
        return run_convert_lora(Path(src), Path(out), to, overwrite, dry_run, drop_unsupported, say)
    if to not in OUTPUTS:
        raise ConversionError(f"--to {to!r}: choose from {', '.join(OUTPUTS)} ({to} is a LoRA format: for LoRA files)")
    if o.drop_unsupported:  # for a merge: the LoRA modules this model lacks are left out and listed
        if not o.loras:
            raise ConversionError("--drop-unsupported applies to LoRA files and to merge: nothing to leave out here")
        o = replace(o, loras=tuple(replace(a, drop=True) for a in o.loras), drop_unsupported=False)
    output = OUTPUTS[to]
    output.check(o)
    if override_config and not overrides:
        raise ConversionError("--override-config lets --set replace config.json values: give --set too")

    def check(cps, infos, report):  # --check-finite, wherever the output reads its source
        check_values(cps, infos, report, check_finite, progress, say, warn)

    return output.write(src, out, o, say, warn, progress, check)


def write_diffusers(src, out, o: Options, say, warn, progress, check) -> dict:
    """read -> plan (coverage proven) -> [check values] -> [quantize plan] -> pipeline plan -> write."""
    only, dtype, overrides, clip_heads, flow_shift = o.only, o.dtype, o.settings, o.clip_heads, o.flow_shift
    overwrite, dry_run, quantize, backend, override_config = o.overwrite, o.dry_run, o.quantize, o.backend, o.override_config
    max_shard_size = o.shard_size
    from ..component import describe
    from ..hub import download, looks_like_repo_id
    from ..write.atomic import check_output

    src, out = Path(src), Path(out)
    if o.loras and _is_diffusers(src):  # merge into a Diffusers base: the quantize action, float or quantized
        from .quantize import run_quantize

        extra = [OPTION_NAMES[k] for k in o.given() if k not in ("loras", "quantize", "backend", "max_shard_size")]
        if extra:
            raise ConversionError(f"{extra[0]} does not apply to merging into the Diffusers folder {src}: its tensors "
                                  f"keep their dtype and components (merge the original repo, or --to original first)")

        return run_quantize(src, out, quantize, max_shard_size, overwrite, dry_run, say, backend, progress, o.loras)
    check_output(src, out, overwrite or dry_run)
    started = time.perf_counter()
    hub_repo = None
    if looks_like_repo_id(str(src)):
        say(f"downloading from the Hub: {src} (only what the components need)")
        hub_repo, src = str(src), download(str(src), only)
    plans = plan_components(src, only, dtype, overrides, clip_heads, override_config, say)
    classless = next((cp for cp in plans if cp.plan.target.missing), None)
    if classless is not None:  # e.g. Wan 2.2 S2V: no Diffusers layout to write (its GGUF is written)
        raise NotYet(f"{classless.source.path}: {classless.plan.target.missing}")
    fp8 = next((cp for cp in plans if cp.source.fp8 is not None), None)
    if fp8 is not None and dtype == "keep" and not quantize:
        raise ConversionError(f"{fp8.source.path}: holds fp8 weights ({fp8.source.fp8.scheme}), which Diffusers "
                              f"does not load as they are: choose --dtype bf16, fp16 or fp32 (the values "
                              f"dequantized as ComfyUI does), or --quantize float8 (torchao)")
    report = {"ok": True, "dry_run": dry_run, "components": [describe(cp) for cp in plans]}
    check(plans, report["components"], report)
    if quantize:  # the transformer written quantized (converter/quantization)
        from ..quantization.plan import quantize_plans

        quantize_plans(plans, report["components"], quantize, say, backend)
    if o.loras:  # LoRAs merged into the transformer while it is written (actions/merge.py)
        from .merge import plan_merges

        report["loras"] = plan_merges(plans, list(o.loras), say)
    pipe = pipeline_plan(plans, src, flow_shift, only, report, say)
    if dry_run:
        total = sum(c["bytes"] for c in report["components"])
        say(f"dry run: would write {out} ({human_size(total)}); nothing written")
        return report
    write_all(plans, pipe, src, out, hub_repo, dtype, max_shard_size, overwrite, report, progress, say)
    elapsed = time.perf_counter() - started
    report["seconds"] = round(elapsed, 3)
    say(f"done in {elapsed:.1f} s")
    say(f"result: {out.resolve()}")
    return report


def _is_diffusers(src: Path) -> bool:
    """A converted Diffusers folder (pipeline or component) whose transformers `merge` can rewrite."""
    from .to_gguf import _diffusers

    return Path(src).is_dir() and _diffusers(Path(src)) is not None


def plan_components(src: Path, only, dtype, overrides, clip_heads, override_config, say) -> list:
    """Every component found in SRC planned, its coverage proven (nothing written)."""
    from ..component import describe, plan_component, require_coverage
    from ..discover import component_of, discover

    found = discover(src, only)
    components = list(dict.fromkeys(component_of(i) for i in found))
    stray = set(overrides) - set(components)
    if stray:
        raise ConversionError(f"--set: {', '.join(sorted(stray))} is not among the components found in {src} "
                              f"({', '.join(components)})")
    if clip_heads and "image_encoder" in found:  # a shorthand: harmless where there is no CLIP
        overrides.setdefault("image_encoder", {}).setdefault("num_heads", clip_heads)
    plans, needs = [], None
    # the transformers first: the pipeline they make may need another variant of a component's table
    for instance, path in sorted(found.items(), key=lambda kv: component_of(kv[0]) != "transformer"):
        component = component_of(instance)
        if component != "transformer" and needs is None:
            needs = pipeline_variants(plans)
        cp = plan_component(component, path, dtype, overrides.get(component), override_config,
                            (needs or {}).get(component))
        cp.folder = instance  # transformer_2: the second expert, converted with the transformer table
        det = cp.plan.detection
        say(f"{instance}:")
        say(f"  source:   {cp.source.path} ({describe(cp)['source_layout']}, {len(cp.source.files)} file(s), "
            f"{len(cp.source.tensors)} tensors, {human_size(cp.source.total_bytes)})")
        say(f"  detected: {det.says}{', size ' + det.size if det.size else ''} -> {cp.plan.target.class_name}")
        for note in det.notes:
            say(f"  note:     {note}")
        require_coverage(cp)
        say(f"  coverage: {len(cp.source.tensors)}/{len(cp.source.tensors)} source tensors used "
            f"({len(cp.plan.dropped)} dropped by rule), " + (
                f"{len(cp.plan.tensors)}/{len(cp.plan.target.shapes)} target tensors produced, shapes match"
                if not cp.plan.target.missing else "every key known to the table (no Diffusers class to check against)"))
        plans.append(cp)
    order = list(found)
    return sorted(plans, key=lambda cp: order.index(cp.folder))


def pipeline_variants(plans) -> dict[str, str]:
    """component -> table variant, as the pipeline of the planned transformer(s) needs it
    (mappings/pipeline.yaml `variants:`); none without a transformer."""
    from ..pipeline import choose_pipeline

    transformers = [cp for cp in plans if cp.component == "transformer"]
    if not transformers:
        return {}
    det = transformers[0].plan.detection
    return dict(choose_pipeline(det.variant, [cp.folder for cp in transformers], det.facts).variants)


def check_values(plans, infos, report, check_finite, progress, say, warn) -> None:
    """--check-finite: name the source tensors holding NaN or Inf; otherwise say they were not checked."""
    from ..component import nonfinite_values

    report["finite_check"] = "done" if check_finite else "skipped"
    checked = 0
    for cp, info in zip(plans, infos):
        info["nonfinite"] = nonfinite_values(cp, progress=progress) if check_finite else None
        checked += len(cp.source.tensors) if check_finite else 0
        bad = info["nonfinite"]
        if bad:
            warn(f"warning: {cp.component}: {len(bad)} source tensor(s) hold NaN or Inf values: "
                 + ", ".join(f"{k} ({n})" for k, n in list(bad.items())[:8])
                 + (f" and {len(bad) - 8} more" if len(bad) > 8 else "") + "; converted as they are")
    if not check_finite:
        say("values: not checked for NaN/Inf (--check-finite reads the source once more)")
    elif not any(info["nonfinite"] for info in infos):
        say(f"values: no NaN or Inf in the {checked} source tensors (--check-finite)")


def pipeline_plan(plans, src: Path, flow_shift, only, report, say):
    """The pipeline the transformer's variant names, complete or not (then: what is missing, and why)."""
    from ..discover import component_of
    from ..pipeline import plan_pipeline

    transformers = [cp for cp in plans if cp.component == "transformer"]
    if not transformers:
        return None
    det = transformers[0].plan.detection
    vae = next((cp.plan.detection.variant for cp in plans if cp.component == "vae"), None)
    weights = {cp.folder: (cp.plan.target.library, cp.plan.target.class_name) for cp in plans}
    pipe = plan_pipeline(det.variant, [cp.folder for cp in transformers], det.facts, weights, src, flow_shift, only,
                         vae)
    report["pipeline"] = {"name": pipe.spec.name, "family": pipe.spec.family, "class": pipe.spec.class_name,
                          "complete": pipe.complete, "missing": pipe.missing, "extras": pipe.extras,
                          "flow_shift": pipe.flow_shift, "config": dict(pipe.spec.config)}
    if pipe.complete:
        extra = "".join(f", {k} {v}" for k, v in pipe.spec.config.items())
        say(f"pipeline: {pipe.spec.class_name} ({pipe.spec.family} {pipe.spec.name}; scheduler flow_shift "
            f"{pipe.flow_shift}{extra})")
        return pipe
    chosen = set(only or []) | ({"tokenizer"} if only and "text_encoder" in only else set())
    left = [c for c in pipe.missing if only and component_of(c) not in chosen]
    absent = [c for c in pipe.missing if c not in left]
    why = ([f"{', '.join(left)} left out (--only)"] if left else []) + \
          ([f"no {', '.join(absent)} in {src}"] if absent else [])
    report["pipeline"]["left_out"] = left
    say(f"pipeline: incomplete for {pipe.spec.class_name}: {'; '.join(why)}; "
        f"model_index.json is not written (load the components one by one)")
    return pipe


def write_all(plans, pipe, src, out: Path, hub_repo, dtype, max_shard_size, overwrite, report, progress, say):
    """Write every component (streamed), the pipeline's extras and the record into a work folder,
    check each written header against the plan, and rename the folder to OUT."""
    from ..component import verify_written, write_component
    from ..pipeline import write_pipeline_extras
    from ..publishing.provenance import RECORD_NAME, build_record, write_record
    from ..write.atomic import atomic_output_dir, clean_stale

    report["notes"] = clean_stale(out, say)
    with atomic_output_dir(out, overwrite) as work:
        for cp, info in zip(plans, report["components"]):
            folder = work / cp.folder
            t0 = time.perf_counter()
            layout = write_component(cp, folder, max_shard_size, progress=progress)
            verify_written(cp, folder, layout)
            info["seconds"] = round(time.perf_counter() - t0, 3)
            info["output"] = str((out / cp.folder).resolve())
            info["files"] = sorted(p.name for p in folder.iterdir())
            # one line per component, terminal or not (the progress bar is gone when it is done)
            say(f"wrote {info['instance']}: {len(info['files'])} file(s), {human_size(info['bytes'])} in "
                f"{info['seconds']:.1f} s ({human_size(info['bytes'] / max(info['seconds'], 1e-3))}/s), "
                f"{', '.join(info['dtypes'])}")
        if pipe is not None:
            write_pipeline_extras(pipe, work)
        report["written"] = sorted(p.name for p in work.iterdir())
        # the conversion record publish reads (from_pretrained never looks at it)
        write_record(work, build_record(src, hub_repo, dtype, plans, report))
    report["output"] = str(out.resolve())
    report["record"] = RECORD_NAME
    if pipe is not None and pipe.extras:
        say(f"wrote {', '.join(pipe.extras)}{' and model_index.json' if pipe.complete else ''}")
