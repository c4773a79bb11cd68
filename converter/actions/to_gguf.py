"""`convert SRC OUT.gguf --to gguf --quantize TYPE`: the transformer of SRC as one GGUF file in its
original key names (converter/gguf_out.py), checked, written atomically; a two-expert source (Wan
2.2 A14B) as a folder of one GGUF file per expert."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from ..errors import ConversionError
from ..sizes import human_size
from .common import silent


def run_gguf(src: Path, out: Path, qtype: str | None, overwrite: bool, dry_run: bool, overrides: dict,
             say=silent, progress: bool = True, check_values=None, loras=()) -> dict:
    """One transformer: OUT is a .gguf file.  Two (Wan 2.2 A14B): OUT is a folder that gets one
    .gguf per expert, named after the expert's folder in the original repo (high_noise_model.gguf,
    low_noise_model.gguf), written into a work folder and renamed to OUT when both are complete."""
    from ..gguf_out import load_gguf_policy, plan_gguf, single_file_gaps, write_gguf
    from ..write.atomic import atomic_output_dir, atomic_output_file, check_output, clean_stale

    src, out = Path(src), Path(out)
    if qtype is None:
        raise ConversionError(f"--to gguf needs --quantize TYPE ({', '.join(load_gguf_policy().types)})")
    started = time.perf_counter()
    plans = transformer_sources(src, overrides, say)
    merged = None
    if loras:  # LoRAs folded into the source refs (actions/merge.py): the GGUF values are the merged ones
        from .merge import plan_merges

        merged = plan_merges([cp for cp, _, _ in plans], list(loras), say,
                             {cp.folder: refs for cp, refs, _ in plans})
    one = len(plans) == 1
    if one and out.suffix != ".gguf":
        raise ConversionError(f"{out}: --to gguf writes one file for this transformer: give OUT a .gguf name")
    if not one and out.suffix == ".gguf":
        raise ConversionError(f"{out}: {src} holds {len(plans)} transformers (Wan 2.2 A14B experts): give OUT a "
                              f"folder name; it gets one .gguf per expert")
    check_output(src, out, overwrite or dry_run, kind="file" if one else "folder")
    files = []  # (name of the .gguf, its component plan, its tensors); coverage of each is proven
    notes: list[str] = []
    for cp, refs, expert in plans:
        name = out.name if one else f"{expert}.gguf"
        tensors = plan_gguf(refs, qtype)
        types = dict(Counter(t.qtype for t in tensors))
        say(f"{name}: {len(tensors)} tensors in the original key names, {human_size(sum(t.nbytes for t in tensors))}: "
            + ", ".join(f"{k} x{v}" for k, v in sorted(types.items())))
        files.append((name, cp, tensors, types))
        gaps = single_file_gaps(t.key for t in tensors)
        if gaps:
            notes.append(f"{name}: diffusers' from_single_file cannot load this file: it has no place for "
                         f"{', '.join(gaps)} (ComfyUI-GGUF's loader reads it)")
            say(f"note: {notes[-1]}")
    if len({name for name, *_ in files}) != len(files):
        raise ConversionError(f"{src}: its experts' folder names do not tell the files apart")
    entries = [{"file": name, "instance": cp.folder, "source": str(cp.source.path), "variant": cp.plan.detection.variant,
                "tensors": len(tensors), "types": types, "bytes": sum(t.nbytes for t in tensors)}
               for name, cp, tensors, types in files]
    report = {"ok": True, "dry_run": dry_run, "to": "gguf", "source": str(src), "variant": entries[0]["variant"],
              "type": qtype, "tensors": sum(e["tensors"] for e in entries), "bytes": sum(e["bytes"] for e in entries),
              "types": dict(sum((Counter(e["types"]) for e in entries), Counter())), "files": entries, "notes": notes,
              **({"loras": merged} if merged else {})}
    if check_values is not None:  # --check-finite: the source tensors read once more
        check_values([cp for _, cp, _, _ in files], entries, report)
    if dry_run:
        say(f"dry run: would write {out}; nothing written")
        return report
    report["notes"] += clean_stale(out, say)
    if one:
        with atomic_output_file(out, overwrite) as work:
            write_gguf(files[0][2], work, qtype, progress, out.name)
    else:
        with atomic_output_dir(out, overwrite) as work:
            for name, _, tensors, _ in files:
                write_gguf(tensors, work / name, qtype, progress)
    report["output"] = str(out.resolve())
    report["seconds"] = round(time.perf_counter() - started, 3)
    size = out.stat().st_size if one else sum((out / e["file"]).stat().st_size for e in entries)
    say(f"wrote {out} ({human_size(size)}{'' if one else ', ' + ', '.join(e['file'] for e in entries)}) "
        f"in {report['seconds']:.1f} s")
    say(f"result: {out.resolve()}")
    return report


def expert_name(cp) -> str:
    """The expert's folder name in the original repo (high_noise_model), else its Diffusers instance."""
    path = Path(cp.source.path)
    return path.name if path.is_dir() else cp.folder


def transformer_sources(src: Path, overrides: dict, say=silent) -> list[tuple]:
    """Each transformer of SRC as (its component plan, original key -> TensorRef, expert folder name):
    an original checkpoint as it is (coverage proven forward); a Diffusers folder (a fine-tune, a
    *-Diffusers repo) through the tables run backwards (coverage proven backward), its tensors read
    under their original names."""
    from dataclasses import replace

    from .convert import plan_components

    found = _diffusers(src)
    if found is not None:
        from .to_original import plan_reversed

        if overrides:
            raise ConversionError(f"--set does not apply to {src}: a Diffusers folder's config.json holds every fact")

        parts, _ = plan_reversed(src, ["transformer"], "keep", say, "original", found=found)
        out = []
        for r in parts:
            refs = {}
            for pt in r.cp.plan.tensors:
                ref = pt.sources[0]
                if not pt.is_byte_copy:  # a view op (rename, reshape, squeeze): the source's bytes, renamed
                    raise ConversionError(f"{ref.file}: {ref.key} becomes {pt.key} by a {pt.rule.op}, which moves "
                                          f"or casts values: GGUF from a Diffusers folder reads them in place only")
                refs[pt.key] = replace(ref, key=pt.key, shape=tuple(pt.shape))
            out.append((r.cp, refs, r.dest or r.instance))
        return out
    plans = plan_components(src, ["transformer"], "keep", overrides, None, False, say)
    return [(cp, cp.source.tensors, expert_name(cp)) for cp in plans]


def _diffusers(src: Path):
    """What diagnose.layout.find makes of SRC when its transformers are in the Diffusers layout, else None."""
    from ..diagnose.layout import find

    try:
        found = find(src)
    except ConversionError:
        return None
    units = [u for u in found.units if u.component == "transformer"]
    return found if units and all(u.layout == "diffusers" and not u.comfy for u in units) else None


def verify_gguf(path: Path, source: Path | None, progress: bool = True) -> dict:
    """A GGUF file checked: readable, a Wan transformer in the original key names; with `source`
    (the original checkpoint), every tensor the source's tensor quantized again, in the file's own
    type for it, byte for byte, and every source tensor present with its shape."""
    import numpy as np
    from tqdm import tqdm

    from ..gguf_out import GGUFTensor, gguf_module, inspect_gguf, quantized_values
    from ..read.files import file_sha256

    gguf = gguf_module()
    report = inspect_gguf(path)
    diffs = [{"key": None, "problem": n} for n in report["notes"]] if not report["healthy"] else []
    compared = 0
    if source is not None:
        plans = transformer_sources(Path(source), {}, lambda *a, **k: None)
        if len(plans) != 1:
            raise ConversionError(f"{source}: --source holds {len(plans)} transformers; give the expert folder")
        ((_, refs, _),) = plans
        reader = gguf.GGUFReader(str(path))
        stored = {t.name: t for t in reader.tensors}
        for key in sorted(set(refs) - set(stored)):
            diffs.append({"key": key, "problem": "in the source; the GGUF file lacks it"})
        for key in sorted(set(stored) - set(refs)):
            diffs.append({"key": key, "problem": "in the GGUF file; the source does not have it"})
        todo = [k for k in stored if k in refs]
        with tqdm(total=len(todo), desc="comparing gguf", disable=None if progress else True, leave=False) as bar:
            for key in todo:
                t, ref = stored[key], refs[key]
                shape = tuple(int(d) for d in reversed(t.shape.tolist()))
                if shape != tuple(ref.shape):
                    diffs.append({"key": key, "problem": f"shape {list(shape)}, the source has {list(ref.shape)}"})
                else:
                    want = GGUFTensor(key, shape, t.tensor_type.name, ref, int(t.n_bytes))
                    got = np.asarray(t.data).tobytes()
                    if got != b"".join(part.tobytes() for part in quantized_values(want)):
                        diffs.append({"key": key, "problem": f"not the source quantized to {t.tensor_type.name}"})
                compared += 1
                bar.update(1)
    comp = {"component": "transformer", "path": str(path), "layout": f"GGUF ({report['architecture']})",
            "class": "ggml / gguf.quants", "tensors": report["tensors"], "compared": compared,
            "differences": list(diffs)}
    return {"ok": not diffs, "path": str(path), "kind": "gguf file", "source": str(source) if source else None,
            "components": [comp], "differences": [{**d, "component": "transformer"} for d in diffs],
            "files": [{"file": Path(path).name, "bytes": Path(path).stat().st_size, "sha256": file_sha256(Path(path))}]}


def verify_gguf_folder(path: Path, files: list[Path], source: Path | None, progress: bool = True) -> dict:
    """Each file verified; with `source`, against the expert folder of its name (SRC/high_noise_model
    for high_noise_model.gguf), or SRC itself when the folder holds one file."""
    out = {"ok": True, "path": str(path), "kind": "folder of gguf files", "source": str(source) if source else None,
           "components": [], "differences": [], "files": []}
    for f in files:
        src = None
        if source is not None:
            src = Path(source) / f.stem if (Path(source) / f.stem).is_dir() else Path(source)
            if src == Path(source) and len(files) > 1:
                raise ConversionError(f"{source}: has no folder {f.stem}/ for {f.name} (--source: the original "
                                      f"repo folder with one folder per expert)")
        r = verify_gguf(f, src, progress)
        for c in r["components"]:
            out["components"].append({**c, "component": f.name})
        out["differences"] += [{**d, "component": f.name} for d in r["differences"]]
        out["files"] += r["files"]
        out["ok"] = out["ok"] and r["ok"]
    return out
