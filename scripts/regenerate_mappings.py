#!/usr/bin/env python
"""For maintainers: check the mapping tables against the installed diffusers and transformers.

For every published checkpoint of every component (scripts/published_sizes.yaml: T2V, I2V,
FLF2V, VACE transformers at 1.3B/14B, the VAE, umT5-XXL, CLIP ViT-H/14), a source is described
from headers alone at the published size (the official-code fixture's keys, scaled), the config
is derived by the tables, the target class is built on the meta device, and its parameters and
persistent buffers are compared with what the tables produce: every key, with its shape.

  python scripts/regenerate_mappings.py --check      # exit 1 and list any drift (CI runs this)
  python scripts/regenerate_mappings.py              # write a proposed update for a person to review

Without --check nothing in mappings/ is touched: the keys that appeared in or vanished from the
target classes (e.g. after a diffusers or transformers release) are written, with the rule each
involves and a rule skeleton, to --out (default mapping-drift.yaml)."""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
INDEX = re.compile(r"(?<=\.)\d+(?=\.)")
MAX_LINES = 20
sys.path.insert(0, str(ROOT))  # run from a checkout, installed or not

from wan2diffusers.errors import ConversionError  # noqa: E402
from wan2diffusers.mapping.rules import resolve_layouts, template_for  # noqa: E402
from wan2diffusers.mapping.tables import KNOWN_COMPONENTS, load_table, parse_table  # noqa: E402
from wan2diffusers.plan.detect import detect  # noqa: E402
from wan2diffusers.plan.plan import active_rules, build_plan  # noqa: E402
from wan2diffusers.plan.target import build_target  # noqa: E402
from wan2diffusers.read.pth_file import read_pth_index  # noqa: E402
from wan2diffusers.read.safetensors_file import TensorRef, read_header  # noqa: E402
from wan2diffusers.read.source import SourceCheckpoint  # noqa: E402


# ---- a published checkpoint from the fixture's headers -------------------------------------

def block_pattern(prefix: str) -> tuple[str, str, re.Pattern]:
    """"blocks.{n}." -> ("blocks.", ".", ^blocks\\.(\\d+)\\.(.*)$)"""
    head, _, tail = prefix.partition("{n}")
    return head, tail, re.compile("^" + re.escape(head) + r"(\d+)" + re.escape(tail) + "(.*)$")


def key_pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(re.escape("{n}"), r"\d+") + "$")


def fixture_refs(folder: Path, file: str | None) -> dict[str, TensorRef]:
    if file:
        return read_pth_index(folder / file)
    refs = {}
    for f in sorted(folder.glob("diffusion_pytorch_model*.safetensors")):
        refs.update(read_header(f).tensors)
    if not refs and (folder / "header.json").is_file():  # a fixture kept as its header (tests/animate_fixture.py)
        import json

        refs = {k: TensorRef(folder / "header.json", k, dtype, tuple(shape), 0, 0)
                for k, (dtype, shape) in json.loads((folder / "header.json").read_text()).items()}
    return refs


def published_source(entry: dict, fixtures: Path) -> SourceCheckpoint:
    """The fixture's keys with the published block counts and shapes; no tensor data."""
    folder = fixtures / entry["fixture"]
    tiny = fixture_refs(folder, entry.get("file"))
    scale = {int(k): int(v) for k, v in (entry.get("scale") or {}).items()}
    exact = [(key_pattern(k), tuple(v)) for k, v in (entry.get("shapes") or {}).items()]
    blocks = [(*block_pattern(p), n) for p, n in (entry.get("blocks") or {}).items()]
    unscaled = tuple(entry.get("unscaled") or ())  # keys of parts built at fixed sizes (Animate's motion encoder)

    keys: dict[str, tuple[str, tuple[int, ...]]] = {}  # published key -> (dtype, tiny shape)
    for key, ref in tiny.items():
        hit = next(((head, tail, pat.match(key), count, pat) for head, tail, pat, count in blocks if pat.match(key)),
                   None)
        if hit is None:
            keys[key] = (ref.dtype, ref.shape)
            continue
        head, tail, m, count, pat = hit
        last = max(int(pm.group(1)) for k in tiny if (pm := pat.match(k)))
        if int(m.group(1)) == 0:  # block 0 as in the fixture
            keys[f"{head}0{tail}{m.group(2)}"] = (ref.dtype, ref.shape)
        if int(m.group(1)) == last:  # every other block like the fixture's last one
            for n in range(1, count):
                keys[f"{head}{n}{tail}{m.group(2)}"] = (ref.dtype, ref.shape)
    refs = {}
    for key, (dtype, shape) in keys.items():
        new = next((s for p, s in exact if p.match(key)), None)
        if new is None:
            new = tuple(shape) if key.startswith(unscaled) else tuple(scale.get(d, d) for d in shape)
        refs[key] = TensorRef(Path(f"/published/{entry['name']}"), key, dtype, new, 0, 0)
    config = None
    if entry.get("config") is not None:
        import json

        config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
        config.update(entry["config"])
    layout = "pth file" if entry.get("file") else "folder"
    return SourceCheckpoint(Path(f"/published/{entry['name']}"), layout, [], refs, config)


# ---- compare -------------------------------------------------------------------------------

@dataclass
class Drift:
    component: str
    name: str
    detected: str = ""
    target_keys: int = 0
    classless: bool = False  # a variant diffusers has no class for: only "every key taken by a rule" is checked
    appeared: dict[str, tuple] = field(default_factory=dict)  # target key nothing produces -> shape
    vanished: dict[str, tuple[str, int]] = field(default_factory=dict)  # produced key not in target -> (source, rule)
    unconsumed: list[str] = field(default_factory=list)  # source keys no rule takes
    wrong_shape: dict[str, tuple] = field(default_factory=dict)  # key -> (produced, target)
    other: list[str] = field(default_factory=list)  # detection mismatches, refused configs, ...

    @property
    def ok(self) -> bool:
        return not (self.appeared or self.vanished or self.unconsumed or self.wrong_shape or self.other)


def produced_keys(table, src: SourceCheckpoint, det) -> tuple[dict[str, tuple[str, int]], list[str]]:
    """What the active rules make of each source key: target key -> (source key, rule index)."""
    rules = active_rules(table, det.variant)
    lay = resolve_layouts(table, det.facts)
    out, unconsumed = {}, []
    for key in src.tensors:
        hit = False
        for i, rule in rules:
            for text in rule.sources:
                b = template_for(table, text, lay).match(key)
                if b is None:
                    continue
                hit = True
                for t in rule.targets:
                    try:
                        out.setdefault(template_for(table, t, lay).fill(b), (key, i))
                    except KeyError:
                        pass
        if not hit:
            unconsumed.append(key)
    return out, unconsumed


def check_entry(component: str, table, entry: dict, fixtures: Path) -> Drift:
    drift = Drift(component, entry["name"])
    try:
        src = published_source(entry, fixtures)
        det = detect(table, src, entry.get("facts"), variant=entry.get("variant"))
        drift.detected = f"{det.variant}" + (f", {det.size}" if det.size else "") + f" -> {det.target_class}"
        expect = dict(entry.get("expect") or {})
        for field_name, want in expect.pop("config", {}).items():
            if det.config.get(field_name) != want:
                drift.other.append(f"derived config {field_name}={det.config.get(field_name)!r}, expected {want!r}")
        for what, want in expect.items():
            have = getattr(det, what)
            if str(have) != str(want):
                drift.other.append(f"detected {what} {have!r}, expected {want!r}")
        target = build_target(det.target_class, det.config)
        plan = build_plan(table, src, det, target)
    except ConversionError as e:
        drift.other.append(str(e))
        return drift
    drift.classless = bool(target.missing)
    drift.target_keys = len(target.shapes)  # a classless target's shapes: what build_plan made
    produced, drift.unconsumed = produced_keys(table, src, det)
    drift.appeared = {k: s for k, s in target.shapes.items() if k not in produced}
    drift.vanished = {k: v for k, v in produced.items() if k not in target.shapes}
    drift.wrong_shape = {pt.key: (tuple(pt.shape), tuple(target.shapes[pt.key])) for pt in plan.tensors
                         if tuple(pt.shape) != tuple(target.shapes[pt.key])}
    if plan.problems and drift.ok:  # anything build_plan saw that the lists above do not say
        drift.other += plan.problems
    return drift


def load_tables(folder: Path | None, components) -> dict:
    tables = {}
    for c in components:
        if folder is None:
            tables[c] = load_table(c)
        else:
            path = folder / f"{c}.yaml"
            tables[c] = parse_table(path.read_text(encoding="utf-8"), str(path))
    return tables


# ---- report --------------------------------------------------------------------------------

def template(key: str, keep: dict[int, str] | None = None) -> str:
    """blocks.12.attn1.to_out.0.weight -> blocks.{n}.attn1.to_out.{m}.weight; the indices in `keep`
    (position -> value: the same in every key of a group, e.g. to_out.0) stay as they are."""
    names = iter(["{n}", "{m}", "{k}", "{j}"])
    pos = iter(range(1000))

    def sub(m: re.Match) -> str:
        i = next(pos)
        return keep[i] if keep and i in keep else next(names, "{i}")

    return INDEX.sub(sub, key)


def grouped(keys) -> dict[str, int]:
    """Keys -> templates with their counts: an index position becomes a placeholder only where the
    keys of the group differ."""
    groups: dict[str, list[list[str]]] = {}
    for k in keys:
        groups.setdefault(INDEX.sub("#", k), []).append(INDEX.findall(k))
    out: dict[str, int] = {}
    for k in keys:
        members = groups[INDEX.sub("#", k)]
        keep = {i: v for i, v in enumerate(INDEX.findall(k)) if all(m[i] == v for m in members)}
        t = template(k, keep)
        out[t] = out.get(t, 0) + 1
    return out


def _fits(t: str, key: str) -> bool:
    """Is `key` one of the keys template `t` stands for?"""
    pattern = re.sub(r"\\\{[nmkji]\\\}", lambda _: r"\d+", re.escape(t))
    return re.fullmatch(pattern, key) is not None


def rule_text(rule) -> str:
    def one(items):
        return f'"{items[0]}"' if len(items) == 1 else "[" + ", ".join(f'"{x}"' for x in items) + "]"

    extra = f", op: {rule.op}" if rule.op != "rename" else ""
    return f"{{from: {one(rule.sources)}, to: {one(rule.targets)}{extra}}}"


def print_drift(d: Drift) -> None:
    if d.ok:
        print(f"ok     {d.component:13} {d.name}: {d.detected}, {d.target_keys} keys produced with their shapes"
              + (" (no Diffusers class: every key taken by a rule)" if d.classless else ""))
        return
    print(f"DRIFT  {d.component:13} {d.name}: {d.detected}")
    lines = []
    for t, n in grouped(d.appeared).items():
        lines.append(f"appeared in the target, no rule produces it: {t} (x{n})")
    for t, n in grouped(d.vanished).items():
        lines.append(f"produced by a rule, not in the target: {t} (x{n})")
    for t, n in grouped(d.unconsumed).items():
        lines.append(f"source key no rule takes: {t} (x{n})")
    for k, (have, want) in list(d.wrong_shape.items()):
        lines.append(f"wrong shape: {k}: tables give {list(have)}, target needs {list(want)}")
    lines += d.other
    for line in lines[:MAX_LINES]:
        print(f"         {line}")
    if len(lines) > MAX_LINES:
        print(f"         ... and {len(lines) - MAX_LINES} more")


def proposal(drifts: list[Drift], tables: dict) -> dict:
    out: dict = {}
    for d in drifts:
        if d.ok:
            continue
        table = tables[d.component]
        entry: dict = {}
        if d.appeared:
            entry["appeared"] = [
                {"target": t, "count": n, "shape": str(list(d.appeared[next(k for k in d.appeared if _fits(t, k))])),
                 "proposed_rule": f'{{from: "?", to: "{t}"}}'}
                for t, n in grouped(d.appeared).items()]
        if d.vanished:
            rows = []
            for t, n in grouped(d.vanished).items():
                source, i = d.vanished[next(k for k in d.vanished if _fits(t, k))]
                rows.append({"target": t, "count": n, "from": template(source),
                             "rule": f"rule {i + 1}: {rule_text(table.rules[i])}",
                             "action": "remove the rule, or point it at the target's new name"})
            entry["vanished"] = rows
        if d.unconsumed:
            entry["unconsumed_source_keys"] = list(grouped(d.unconsumed))
        if d.wrong_shape:
            entry["wrong_shape"] = [{"target": k, "tables": str(list(a)), "target_class": str(list(b))}
                                    for k, (a, b) in d.wrong_shape.items()]
        if d.other:
            entry["other"] = d.other
        out.setdefault(d.component, {})[d.name] = entry
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 and list the drift; write nothing")
    ap.add_argument("--tables", type=Path, default=None,
                    help="a folder of mapping tables to check instead of the shipped ones (e.g. an edited copy)")
    ap.add_argument("--sizes", type=Path, default=HERE / "published_sizes.yaml", help="the published checkpoints")
    ap.add_argument("--fixtures", type=Path, default=ROOT / "tests" / "fixtures", help="the official-code fixtures")
    ap.add_argument("--out", type=Path, default=Path("mapping-drift.yaml"), help="where the proposal goes")
    ap.add_argument("--only", default=None, help="comma-separated components (default: all)")
    args = ap.parse_args(argv)

    sizes = yaml.safe_load(args.sizes.read_text(encoding="utf-8"))
    components = [c for c in KNOWN_COMPONENTS if c in sizes and (not args.only or c in args.only.split(","))]
    try:
        tables = load_tables(args.tables, components)
    except (ConversionError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    libs = f"diffusers {version('diffusers')}, transformers {version('transformers')}"
    print(f"checking {', '.join(components)} tables{f' in {args.tables}' if args.tables else ''} against {libs}")
    drifts = [check_entry(c, tables[c], entry, args.fixtures) for c in components for entry in sizes[c]]
    for d in drifts:
        print_drift(d)
    bad = [d for d in drifts if not d.ok]
    if args.check:
        print(f"{len(drifts) - len(bad)}/{len(drifts)} checkpoints match the tables"
              + (f"; drift in {len(bad)}" if bad else ""))
        return 1 if bad else 0
    header = (f"# Proposed mapping-table update, written by scripts/regenerate_mappings.py on "
              f"{datetime.now(timezone.utc).date()} with {libs}.\n"
              "# Nothing here is applied: edit mappings/*.yaml by hand, then run the script with --check.\n")
    body = proposal(drifts, tables)
    args.out.write_text(header + (yaml.safe_dump(body, sort_keys=False, width=120) if body else "{}  # no drift\n"),
                        encoding="utf-8")
    print(f"wrote {args.out} ({len(bad)} checkpoint(s) with drift)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
