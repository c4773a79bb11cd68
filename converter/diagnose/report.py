"""What `inspect` prints: per component the layout, variant and size, files, dtypes, parameter
count, shard health, what from_pretrained would complain about, and each problem with its fix;
as text for people and as JSON for scripts."""

from __future__ import annotations

from pathlib import Path

from ..sizes import human_size
from .examine import Diagnosis, diagnose, summary
from ..write.workfiles import leftovers_of
from ..layouts.names import model_root
from .layout import Found, find
from .pipeline_repair import model_index_fixes

SHOW = 5  # keys listed per kind in the text report


def inspect_path(path: Path, overrides: dict | None = None) -> tuple[Found, list[Diagnosis], dict]:
    """`overrides`: {component: {fact: value}} given with --set (repair)."""
    found = find(path)
    diags = [diagnose(u, (overrides or {}).get(u.component)) for u in found.units]
    return found, diags, as_dict(found, diags)


def component_dict(d: Diagnosis) -> dict:
    u, ws = d.unit, d.unit.weights
    det = d.detection
    out = {
        "component": u.name,
        "table": u.component,
        "path": str(u.path),
        "where": u.where,
        "layout": u.layout,
        "layout_label": d.layout_label,
        "quantized": bool(u.quantized),
        "prefix": ws.prefix if ws else "",
        "variant": det.variant if det else d.variant,
        "size": det.size if det else None,
        "class": d.derived_target.class_name if d.derived_target else (d.target.class_name if d.target else None),
        "weights": None if ws is None else {
            "kind": ws.kind, "files": [p.name for p in ws.files],
            "index": ws.index.name if ws.index is not None and ws.index.exists() else None,
            "problems": ws.problems},
        "from_pretrained_opens": u.loads,
        "config": {"state": u.config_kind, "missing_fields": d.config_missing,
                   "contradictions": {k: {"config": a, "weights": b} for k, (a, b) in d.config_wrong.items()}},
        "from_pretrained": None if d.derived_target is not None and d.derived_target.missing else {
            "missing": d.missing, "unexpected": d.unexpected,
            "mismatched": [{"key": k, "shape": a, "expected": b} for k, a, b in d.mismatched]},
        "leftovers": [p.name for p in u.leftovers],
        "findings": [f.as_dict() for f in d.findings],
        "notes": (det.notes if det else []) + d.notes,
        "healthy": d.healthy,
        "comfyui": u.comfy or None,  # a ComfyUI file: the key layout ComfyUI reads
        "fp8": None if u.fp8 is None else {"scheme": u.fp8.scheme, "scaled": u.fp8.scaled, "plain": u.fp8.plain,
                                           "input_scales_left_out": u.fp8.dropped_input_scales,
                                           "says": u.fp8.says()},
    }
    if ws is not None:
        out.update(summary(d))
    return out


def as_dict(found: Found, diags: list[Diagnosis]) -> dict:
    present = [d.unit.component for d in diags]
    work = leftovers_of(found.path, model_root(found.path))
    out = {"path": str(found.path), "kind": found.kind, "components": [component_dict(d) for d in diags],
           "healthy": all(d.healthy for d in diags) and not work, "notes": list(found.stray), "leftovers": work}
    if found.kind in ("pipeline folder", "folder of component subfolders"):
        out["model_index"] = found.model_index is not None
        fixes = model_index_fixes(found, diags)
        out["model_index_problems"] = [f"model_index.json: {k} is {have!r}, the pipeline needs {want!r}"
                                       for k, (have, want) in fixes.items()]
        out["healthy"] = out["healthy"] and not fixes
        if found.model_index is not None:
            listed = [k for k, v in found.model_index.items() if isinstance(v, list) and v and v[0]
                      and k in ("transformer", "vae", "text_encoder", "image_encoder")]
            absent = [c for c in listed if c not in present]
            if absent:
                out["notes"].append(f"model_index.json lists {', '.join(absent)}, which has no folder here")
        else:
            out["notes"].append("no model_index.json: DiffusionPipeline.from_pretrained cannot load this folder; "
                                "`repair PATH` writes it (with the scheduler) when every component the "
                                "pipeline needs is here, else load the components one by one")
    return out


def _from_pretrained_lines(c: dict) -> list[str]:
    fp = c["from_pretrained"]
    if not (fp["missing"] or fp["unexpected"] or fp["mismatched"]):
        return ["  from_pretrained: loads cleanly" if c["healthy"] else "  from_pretrained: keys match"]
    lines = [f"  from_pretrained would report: {len(fp['missing'])} missing, {len(fp['unexpected'])} "
             f"unexpected, {len(fp['mismatched'])} mis-shaped keys"]
    for kind in ("missing", "unexpected"):
        keys = fp[kind]
        if keys:
            lines.append(f"    {kind}: {', '.join(keys[:SHOW])}" + (f" ... (+{len(keys) - SHOW})" if len(keys) > SHOW else ""))
    if fp["mismatched"]:
        lines.append("    mis-shaped: " + ", ".join(f"{m['key']} {m['shape']} (needs {m['expected']})"
                                                 for m in fp["mismatched"][:SHOW]))
    return lines


def render(report: dict) -> list[str]:
    lines = [f"{report['path']}: {report['kind']}"]
    if report["kind"] == "LoRA file":
        lines.append(f"  format:   {report['format']} (prefix {report['prefix']!r})")
        lines.append(f"  modules:  {report['modules']} in blocks {report['blocks_text']}: {', '.join(report['module_kinds'])}")
        lines.append(f"  rank:     {'/'.join(map(str, report['ranks'])) or '-'}; alpha: "
                     f"{'/'.join(f'{a:g}' for a in report['alphas']) or 'none (scale 1)'}")
        lines.append("  parts:    " + ", ".join(f"{r} x{n}" for r, n in report["roles"].items()))
        lines.append(f"  fits:     {report['fits']}")
        for to, how in report["converts"].items():
            lines.append(f"  --to {to}: {how}")
        return lines
    if report["kind"] == "folder of gguf files":
        for r in report["files"]:
            lines += ["  " + line for line in render(r)]
        lines.append("healthy: one GGUF transformer per file" if report["healthy"] else "problems found (see notes)")
        return lines
    if report["kind"] == "gguf file":
        lines.append(f"  architecture: {report['architecture']}")
        if report.get("variant"):
            lines.append(f"  variant:  {report['variant']}{', size ' + report['size'] if report.get('size') else ''}"
                         " (original Wan key names)")
        lines.append(f"  tensors:  {report['tensors']} ({human_size(report['bytes'])}; "
                     + ", ".join(f"{k} x{n}" for k, n in report["types"].items()) + ")")
        for note in report["notes"]:
            lines.append(f"note: {note}")
        lines.append("healthy: a GGUF transformer" if report["healthy"] else "problems found (see notes)")
        return lines
    for c in report["components"]:
        lines.append(f"{c['component']}: {c['layout_label']}" + (f" ({c['where']}: {c['path']})" if c["where"] != "single file" else ""))
        if c["variant"]:
            lines.append(f"  variant:  {c['variant']}{', size ' + c['size'] if c['size'] else ''}"
                         f"{' -> ' + c['class'] if c['class'] else ''}")
        w = c["weights"]
        if w:
            files = ", ".join(w["files"][:4]) + (f" ... ({len(w['files'])} files)" if len(w["files"]) > 4 else "")
            lines.append(f"  weights:  {w['kind']}: {files}" + (f" + {w['index']}" if w["index"] else ""))
            lines.append(f"  tensors:  {c['tensors']} ({c['parameters']:,} parameters, {human_size(c['bytes'])}; "
                         + ", ".join(f"{k} x{n}" for k, n in c["dtypes"].items()) + ")")
            lines.append("  shards:   " + ("ok" if not w["problems"] else "; ".join(w["problems"])))
        if c.get("fp8"):
            lines.append(f"  fp8:      {c['fp8']['says']}")
        if c.get("comfyui"):  # read by ComfyUI's loaders: no config.json, no from_pretrained
            lines.append(f"  ComfyUI:  {c['comfyui']} keys, as ComfyUI's loader reads them")
        else:
            lines.append(f"  config:   {c['config']['state']}")
            lines += _from_pretrained_lines(c) if c["from_pretrained"] is not None else [
                "  from_pretrained: no Diffusers class for it"]
        for note in c["notes"]:
            lines.append(f"  note:     {note}")
        for f in c["findings"]:
            who = f"repair ({f['repair']}{', needs --source' if f['needs_source'] else ''})" if f["repair"] else "not repair"
            lines.append(f"  problem:  {f['message']}")
            lines.append(f"    fix:    {f['fix']} [{who}]")
    for note in report["notes"]:
        lines.append(f"note: {note}")
    for item in report.get("model_index_problems", []):
        lines.append(f"problem: {item}")
        lines.append("  fix:    `wan2diffusers repair PATH` rewrites model_index.json [repair]")
    for item in report.get("leftovers", []):
        lines.append(f"problem: {item}")
        lines.append("  fix:    `wan2diffusers repair PATH` moves work folders into a backup; or delete them")
    marked = any(f["repair"] for c in report["components"] for f in c["findings"])
    if report["healthy"]:
        lines.append("healthy: nothing to repair")
    elif marked or report.get("leftovers") or report.get("model_index_problems"):
        lines.append("problems found: `wan2diffusers repair PATH` fixes those marked repair")
    else:
        lines.append("problems found: none of them is one repair can fix (see each fix)")
    return lines
