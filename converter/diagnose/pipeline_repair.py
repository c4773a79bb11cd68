"""A folder of component subfolders without model_index.json (e.g. converted one component at a
time): when every component its variant needs is there, write what the pipeline folder lacks
(model_index.json, and the scheduler / image processor the pipeline table generates), as
`convert` would have; new files only, moved in when complete, model_index.json last."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..pipeline import PipelinePlan, choose_pipeline, write_pipeline_extras
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
