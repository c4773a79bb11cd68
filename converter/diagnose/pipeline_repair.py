"""A folder of component subfolders without model_index.json (e.g. converted one component at a
time): when every component its variant needs is there, write what the pipeline folder lacks
(model_index.json, and the scheduler / image processor the pipeline table generates), as
`convert` would have; new files only, moved in when complete, model_index.json last."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..errors import ConversionError
from ..pipeline import PipelinePlan, choose_pipeline, write_pipeline_extras
from ..read.files import load_json
from ..write.workfiles import REPAIR, make_work_dir
from ..write.naming import MODEL_INDEX
from .examine import Diagnosis
from .layout import Found

# what marks a pipeline part that is not weights as present
PRESENT = {"tokenizer": "tokenizer_config.json", "scheduler": "scheduler_config.json",
           "image_processor": "preprocessor_config.json"}
GENERATED = ("scheduler", "image_processor")


def plan_model_index(found: Found, diags: list[Diagnosis]) -> tuple[PipelinePlan | None, str | None]:
    """(plan, None) when model_index.json can be written; (None, reason) when it cannot;
    (None, None) when there is nothing to do."""
    if found.kind != "folder of component subfolders":
        return None, None
    transformers = [d for d in diags if d.unit.component == "transformer"]
    transformer = transformers[0] if transformers else None
    variant = transformer and (transformer.detection.variant if transformer.detection else transformer.variant)
    if transformer is None or not variant:
        return None, "no model_index.json, and no transformer whose variant names the pipeline"
    if not all(d.healthy for d in diags):
        return None, "no model_index.json: repair the components first"
    facts = transformer.detection.facts if transformer.detection else {}
    spec = choose_pipeline(variant, [d.unit.path.name for d in transformers], facts)
    weights = {d.unit.path.name: (d.target.library, d.target.class_name) for d in diags if d.target is not None}
    present = {c for c, marker in PRESENT.items() if (found.path / c / marker).is_file()}
    missing = [c for c in spec.components if c not in weights and c not in present and c not in GENERATED]
    if missing:
        return None, f"no model_index.json, and no {', '.join(missing)} here for {spec.class_name}"
    extras = [c for c in spec.components if c in GENERATED and c not in present]
    return PipelinePlan(variant, spec, spec.flow_shift, None, weights, extras, []), None


def write_model_index(plan: PipelinePlan, folder: Path) -> list[str]:
    """Write the plan's extras and model_index.json into `folder`; returns what was added."""
    work = make_work_dir(folder, REPAIR)
    try:
        write_pipeline_extras(plan, work)
        added = sorted(p.name for p in work.iterdir())
        for name in added:
            if name != MODEL_INDEX:
                os.rename(work / name, folder / name)
        os.rename(work / MODEL_INDEX, folder / MODEL_INDEX)  # last: the folder is now a pipeline
        return added
    finally:
        shutil.rmtree(work, ignore_errors=True)


def expected_pipeline(diags: list[Diagnosis]):
    """The pipeline the transformer(s) of these diagnoses make (mappings/pipeline.yaml), or None."""
    transformers = [d for d in diags if d.unit.component == "transformer" and d.detection is not None]
    if not transformers:
        return None
    det = transformers[0].detection
    try:
        return choose_pipeline(det.variant, [d.unit.path.name for d in transformers], det.facts)
    except Exception:  # noqa: BLE001 - no row fits (e.g. an unusual folder name): nothing to compare with
        return None


def model_index_fixes(found: Found, diags: list[Diagnosis]) -> dict:
    """What a pipeline folder's model_index.json must change to be what `convert` writes for its
    transformer(s): key -> (what it says, what it should say). E.g. a Wan 2.2 A14B folder whose
    boundary_ratio is lost (transformer_2 would never run) or whose transformer_2 is not listed."""
    if found.kind != "pipeline folder" or found.model_index is None:
        return {}
    spec = expected_pipeline(diags)
    index = found.model_index
    if spec is None:
        return {}
    fixes = {}
    if index.get("_class_name") != spec.class_name:  # from_pretrained would build another pipeline
        fixes["_class_name"] = (index.get("_class_name", "absent"), spec.class_name)
    fixes.update({k: (index.get(k, "absent"), v) for k, v in spec.config.items() if index.get(k) != v})
    for d in diags:  # a converted component the index does not list is never loaded; a wrong class fails
        name = d.unit.path.name
        want = [d.target.library, d.target.class_name] if d.target is not None else None
        if want is not None and name in spec.components and index.get(name) != want:
            fixes[name] = (index.get(name, "absent"), want)
    return fixes


def fix_model_index(folder: Path, fixes: dict, backup) -> None:
    """Rewrite model_index.json with `fixes` applied (atomically); the old one goes into the backup."""
    path = folder / MODEL_INDEX
    data = load_json(path, MODEL_INDEX)
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: not a JSON object")
    data.update({k: want for k, (_, want) in fixes.items()})
    from ..write.atomic import replace_file

    replace_file(path, json.dumps(dict(sorted(data.items())), indent=2) + "\n",
                 (lambda: shutil.copy2(path, backup() / MODEL_INDEX)) if backup is not None else None)
