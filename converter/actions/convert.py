"""What `convert` does (the CLI and the Python API call it): original Wan weights -> a Diffusers folder."""

from __future__ import annotations

import time
from pathlib import Path

from ..errors import ConversionError
from ..sizes import human_size
from .common import silent


# The options each output honours (`--to`); any other option given is refused in one line, never ignored.
HONOURS = {
    "diffusers": {"only", "dtype", "max_shard_size", "clip_heads", "flow_shift", "settings", "override_config",
                  "quantize", "backend", "check_finite"},
    "gguf": {"only", "quantize", "settings", "override_config", "check_finite"},
    "original": {"only", "dtype", "max_shard_size", "check_finite"},
    "comfyui": {"only", "dtype", "check_finite"},
}
OPTION_NAMES = {"only": "--only", "dtype": "--dtype", "max_shard_size": "--max-shard-size", "clip_heads": "--clip-heads",
                "flow_shift": "--flow-shift", "settings": "--set", "override_config": "--override-config",
                "quantize": "--quantize", "backend": "--backend", "check_finite": "--check-finite"}
WHY_NOT = {
    ("gguf", "dtype"): "a GGUF file's types come from --quantize (mappings/gguf.yaml)",
    ("gguf", "max_shard_size"): "a GGUF file is one file per transformer",
    ("gguf", "clip_heads"): "a GGUF file holds the transformer only",
    ("gguf", "flow_shift"): "a GGUF file holds no scheduler",
    ("gguf", "backend"): "--backend picks torchao or quanto for a Diffusers folder",
    ("comfyui", "max_shard_size"): "ComfyUI's files are one file per component",
}


def check_options(to: str, given: dict) -> None:
    """Refuse, in one line, every option given that the output `to` does not honour."""
    if to not in HONOURS:
        raise ConversionError(f"--to {to!r}: choose from {', '.join(HONOURS)}")
    for name, value in given.items():
        if value in (None, False, {}, [], "keep") or name in HONOURS[to]:
            continue
        why = WHY_NOT.get((to, name)) or (
            "the way back writes the float weights of a Diffusers SRC, whose config.json already holds every fact"
            if to in ("original", "comfyui") else "it does not apply to this output")
        raise ConversionError(f"{OPTION_NAMES[name]} does not apply to --to {to}: {why}")
    only = given.get("only")
    if to == "gguf" and only and list(only) != ["transformer"]:
        raise ConversionError(f"--only {','.join(only)}: --to gguf writes the transformer only (--only transformer)")


def run_convert(src, out, only, max_shard_size, dtype, overrides, clip_heads, flow_shift, overwrite, dry_run,
                say=silent, warn=silent, progress: bool = True, quantize=None, check_finite=False,
                override_config=False, backend=None, to="diffusers") -> dict:
    """read -> plan (coverage proven) -> [check values] -> [quantize plan] -> pipeline plan -> write."""
    check_options(to, {"only": only, "dtype": dtype, "max_shard_size": max_shard_size, "clip_heads": clip_heads,
                       "flow_shift": flow_shift, "settings": overrides, "override_config": override_config,
                       "quantize": quantize, "backend": backend,
                       "check_finite": check_finite})
    if override_config and not overrides:
        raise ConversionError("--override-config lets --set replace config.json values: give --set too")
    max_shard_size = max_shard_size or "5GB"
    if to == "gguf":  # one file, the transformer in its original key names
        from .to_gguf import run_gguf

        return run_gguf(src, out, quantize, overwrite, dry_run, overrides, say, progress,
                        lambda cps, infos, report: check_values(cps, infos, report, check_finite, progress, say, warn))
    if to in ("original", "comfyui"):  # the tables run backwards: Diffusers -> the original Wan keys
        from .to_original import run_to_original

        return run_to_original(src, out, only, dtype, max_shard_size, overwrite, dry_run, say, progress, to,
                               lambda cps, infos, report: check_values(cps, infos, report, check_finite, progress, say, warn))
    from ..component import describe
    from ..hub import download, looks_like_repo_id
    from ..write.atomic import check_output

    src, out = Path(src), Path(out)
    check_output(src, out, overwrite or dry_run)
    started = time.perf_counter()
    hub_repo = None
    if looks_like_repo_id(str(src)):
        say(f"downloading from the Hub: {src} (only what the components need)")
        hub_repo, src = str(src), download(str(src), only)
    plans = plan_components(src, only, dtype, overrides, clip_heads, override_config, say)
    report = {"ok": True, "dry_run": dry_run, "components": [describe(cp) for cp in plans]}
    check_values(plans, report["components"], report, check_finite, progress, say, warn)
    if quantize:  # the transformer written quantized (converter/quantization)
        from ..quantization.plan import quantize_plans

        quantize_plans(plans, report["components"], quantize, say, backend)
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
    plans = []
    for instance, path in found.items():
        component = component_of(instance)
        cp = plan_component(component, path, dtype, overrides.get(component), override_config)
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
            f"({len(cp.plan.dropped)} dropped by rule), {len(cp.plan.tensors)}/{len(cp.plan.target.shapes)} "
            f"target tensors produced, shapes match")
        plans.append(cp)
    return plans


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
