"""What `publish` does: write the model card into a converted folder and upload it to the Hub."""

from __future__ import annotations

from pathlib import Path

from ..errors import ConversionError
from ..sizes import human_size
from .common import silent


def run_publish(out, repo_id, revision, private, commit_message, base_model, source, record, hash_sources,
                fixtures, no_measure, dry_run, say=silent, progress: bool = True) -> dict:
    from ..version import __version__
    from ..hub import REPO_ID
    from ..publishing.card import CardInputs, build_card, is_ours, write_card
    from ..publishing.folder import left_out, read_folder, upload_files
    from ..publishing.provenance import hash_sources as fill_hashes
    from ..publishing.provenance import source_card, write_record
    from ..publishing.upload import Target, find_token, hub_endpoint, upload

    told: list[str] = []

    def note(text: str) -> None:
        told.append(text)
        say(f"note: {text}")

    out = Path(out)
    for what, value in (("REPO_ID", repo_id), ("--base-model", base_model)):
        if value is not None and not REPO_ID.fullmatch(value):
            raise ConversionError(f"{what} {value!r}: expected a Hub repo id such as user/Wan2.1-T2V-1.3B-Diffusers")
    folder = read_folder(out, record)
    readme = out / "README.md"
    if readme.exists() and not is_ours(readme):
        raise ConversionError(f"{readme}: a README.md publish did not write; move it away (publish writes the card)")
    rec = folder.record
    notes = []
    if rec is None:
        note(f"no conversion record in {out} (convert writes wan2diffusers.json, and `quantize` of a pipeline "
             f"folder carries it; for a transformer folder `quantize` made, pass the float folder's with "
             f"--record): the card cannot state the source, tables or coverage")
    if hash_sources:
        if rec is None:
            raise ConversionError(f"{out}: --hash-sources needs the conversion record wan2diffusers.json")
        hashed = fill_hashes(rec, source, progress=progress)
        if hashed:
            write_record(out, rec, folder.record_path)  # so the next publish does not read them again
            say(f"hashed {len(hashed)} source file(s)")
    if base_model is None and rec is not None:
        base_model = rec["source"].get("repo_id")
    if base_model is None:
        note("base model unknown (convert read a local folder): pass --base-model Wan-AI/...")
    card_meta = source_card(Path(source)) if source is not None else (rec or {}).get("source", {}).get("card")
    if source is not None and card_meta is None:
        note(f"{source}: no README.md front matter to carry (license, tags)")
    notes += _record_notes(rec, __version__)

    measurements, measure_note = [], ""
    if no_measure:
        measure_note = "skipped (--no-measure)"
    else:
        measurements, measure_note = _measure(folder, fixtures, say)
        if not measurements:  # never silent: the card says "Not measured", and so does the console
            say(f"note: the fixture error was not measured: {measure_note} (the card says so)")

    inputs = CardInputs(folder, repo_id, base_model, card_meta, measurements, measure_note, __version__, notes)
    card = build_card(inputs)
    path = write_card(card, out)
    folder.files = upload_files(out)
    skipped = left_out(out)
    if skipped:
        note(f"not part of the model, not uploaded: {', '.join(skipped[:8])}"
             + (f" (and {len(skipped) - 8} more)" if len(skipped) > 8 else ""))
    target = Target(repo_id, revision, private,
                    commit_message or f"Upload {folder.pipeline_class or ', '.join(folder.components)} "
                                      f"converted with wan2diffusers {__version__}")
    data = card.data.to_dict()
    say(f"card: {path} (base_model {data.get('base_model') or '-'}, pipeline_tag {data.get('pipeline_tag') or '-'}, "
        f"license {data.get('license') or '-'}{', quantized' if data.get('base_model_relation') else ''})")
    say(f"target: {hub_endpoint()}/{repo_id} branch {target.branch}{' (private)' if private else ''}")
    say(f"files: {len(folder.files)}, {human_size(folder.total_bytes)}")
    for name, size in folder.files:
        say(f"  {name}  {human_size(size)}")
    report = {"ok": True, "dry_run": dry_run, "repo_id": repo_id, "revision": target.branch, "private": private,
              "commit_message": target.commit_message, "card": str(path), "card_metadata": data,
              "files": [{"path": n, "bytes": s} for n, s in folder.files], "bytes": folder.total_bytes,
              "left_out": skipped,
              "measurements": [{"component": m.component, "fixture": m.fixture, "dtype": m.dtype, "errors": m.errors}
                               for m in measurements], "notes": told}
    if dry_run:
        say("dry run: card written; nothing uploaded")
        return report
    token = find_token()
    say(f"uploading to {repo_id} ...")
    report.update(upload(out, target, token))
    say(f"done: {report['commit_url']}")
    return report


def _record_notes(rec: dict | None, version: str) -> list[str]:
    from ..publishing.provenance import table_versions

    if rec is None:
        return []
    notes = []
    if rec["tool"]["version"] != version:
        notes.append(f"Converted with wan2diffusers {rec['tool']['version']}; this card was written by {version}.")
    names = [n for n in rec["tables"] if n != "pipeline"]
    now = table_versions(names, "pipeline" in rec["tables"])
    changed = [n for n, t in rec["tables"].items() if now.get(n, {}).get("sha256") != t["sha256"]]
    if changed:
        notes.append(f"The mapping tables {', '.join(changed)} changed since the conversion: the fixture "
                     "measurement below used the current ones.")
    return notes


def _measure(folder, fixtures: Path | None, say):
    from ..publishing.card import transformer_variant
    from ..publishing.measure import TOLERANCE, default_fixtures, fixture_for, measure

    root = Path(fixtures) if fixtures is not None else default_fixtures()
    if root is None or not root.is_dir():
        where = f"{fixtures} is not a folder" if fixtures is not None else \
            "the project's test fixtures (tests/fixtures of a source checkout) were not found; pass --fixtures"
        return [], where
    dtype = (folder.record or {}).get("dtype", "keep")
    variant = transformer_variant(folder)
    results, skipped = [], []
    for component in folder.components:
        if fixture_for(component, variant) is None:
            skipped.append(component)
            continue
        say(f"measuring {component} on the fixture {fixture_for(component, variant)} (--dtype {dtype}) ...")
        m = measure(component, variant, dtype, root)
        if dtype in ("keep", "fp32") and m.worst > TOLERANCE:
            raise ConversionError(f"{root / m.fixture}: {component}: the mapping gives a relative error of "
                                  f"{m.worst:.2e} on the official outputs (tolerance {TOLERANCE:g}); not publishing")
        say(f"  relative error {', '.join(f'{k} {v:.2e}' for k, v in m.errors.items())}")
        results.append(m)
    note = f"no fixture for {', '.join(skipped)}" if skipped else ""
    return results, note
