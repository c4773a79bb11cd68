"""The model families of mappings/pipeline.yaml: where a repo keeps its transformer instances
(one, or Wan 2.2 A14B's two experts), which pipeline the converted components make, and the parts
of a pipeline folder that are not converted weights: scheduler/, tokenizer/, image_processor/ and
model_index.json (with the pipeline's own config, e.g. boundary_ratio)."""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, Field

from .errors import ConversionError
from .mapping.schema import Strict
from .mapping.tables import parse_yaml, tables_root
from .write.naming import MODEL_INDEX
from .write.copying import copy_folder


class _Strict(Strict):
    model_config = ConfigDict(**Strict.model_config, populate_by_name=True)  # the table's "from" alias


class When(_Strict):
    variant: str | None = None  # the transformer table's detected variant
    instances: list[str] | None = None  # the transformer instances converted (exactly these)
    facts: dict[str, Any] = {}  # transformer facts that must have these values


class PipelineSpec(_Strict):
    name: str
    family: str = "Wan 2.1"
    when: When
    class_name: str = Field(alias="class")
    flow_shift: float
    config: dict[str, Any] = {}  # the pipeline's own config (model_index.json): boundary_ratio, ...
    vae: str | None = None  # the VAE variant the pipeline needs, when not any
    components: list[str]
    original_config: dict[str, Any] = {}  # --to original: fields of each transformer's config.json
    variants: dict[str, str] = {}  # component -> the variant of its table this pipeline needs

    def fits(self, variant: str, instances: list[str], facts: dict) -> bool:
        w = self.when
        return ((w.variant is None or w.variant == variant)
                and (w.instances is None or sorted(w.instances) == sorted(instances))
                and all(facts.get(k) == v for k, v in w.facts.items()))


class TransformerLayout(_Strict):
    name: str
    instances: dict[str, str]  # output folder -> folder in the repo ("." = the repo's root)


class ClassConfig(_Strict):
    class_name: str = Field(alias="class")
    config: dict[str, Any] = {}


class TokenizerSpec(_Strict):
    source_folder: str
    class_name: str = Field(alias="class")


class PipelineTable(_Strict):
    schema_version: int
    description: str
    transformer_layouts: list[TransformerLayout]
    pipelines: list[PipelineSpec]
    scheduler: ClassConfig
    tokenizer: TokenizerSpec
    image_processor: ClassConfig


@lru_cache(maxsize=None)
def load_pipeline_table() -> PipelineTable:
    path = tables_root().joinpath("pipeline.yaml")
    return parse_yaml(path.read_text(encoding="utf-8"), str(path), PipelineTable, "pipeline table")


def transformer_instances() -> dict[str, str]:
    """Every transformer instance folder a pipeline may hold -> the table component it is an
    instance of (transformer_2 -> transformer)."""
    return {name: "transformer" for lay in load_pipeline_table().transformer_layouts for name in lay.instances}


def choose_pipeline(variant: str, instances: list[str], facts: dict) -> PipelineSpec:
    for spec in load_pipeline_table().pipelines:
        if spec.fits(variant, instances, facts):
            return spec
    raise ConversionError(f"no pipeline in mappings/pipeline.yaml fits a {variant} transformer with instances "
                          f"{', '.join(instances)}")


@dataclass
class PipelinePlan:
    variant: str
    spec: PipelineSpec
    flow_shift: float
    tokenizer_source: Path | None
    weights: dict[str, tuple[str, str]]  # component -> (library, class) of converted weights
    extras: list[str] = field(default_factory=list)  # scheduler, tokenizer, image_processor to write
    missing: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.missing


def plan_pipeline(variant: str, instances: list[str], facts: dict, weights: dict[str, tuple[str, str]], src: Path,
                  flow_shift: float | None = None, only: list[str] | None = None,
                  vae_variant: str | None = None) -> PipelinePlan:
    """`weights`: output folder -> (library, class) of what was converted."""
    table = load_pipeline_table()
    spec = choose_pipeline(variant, instances, facts)
    if spec.vae is not None and vae_variant is not None and vae_variant != spec.vae:
        raise ConversionError(f"{src}: a {spec.family} {spec.name} transformer needs the {spec.vae} VAE; this "
                              f"repo's VAE is {vae_variant}")
    tok = src / table.tokenizer.source_folder if src.is_dir() else None
    tok = tok if tok is not None and tok.is_dir() and any(tok.iterdir()) else None
    plan = PipelinePlan(variant, spec, spec.flow_shift if flow_shift is None else flow_shift, tok, weights)
    generated = ("scheduler", "image_processor")  # made from the table, not found in the source
    if tok is not None and (not only or "tokenizer" in only or "text_encoder" in only):  # it comes with the encoder
        plan.extras.append("tokenizer")
    plan.missing = [c for c in spec.components if c not in weights and c not in plan.extras and c not in generated]
    if plan.complete:  # a partial conversion writes only what the source had
        plan.extras += [c for c in spec.components if c in generated]
    return plan


def write_pipeline_extras(plan: PipelinePlan, work: Path) -> None:
    from .quiet import quiet_imports

    with quiet_imports():  # diffusers/transformers imported here for the first time (torchao's noise)
        _write_pipeline_extras(plan, work)


def _write_pipeline_extras(plan: PipelinePlan, work: Path) -> None:
    table = load_pipeline_table()
    if "scheduler" in plan.extras:
        import diffusers

        cls = getattr(diffusers, table.scheduler.class_name)
        cls(**table.scheduler.config, flow_shift=plan.flow_shift).save_config(str(work / "scheduler"))
    if "tokenizer" in plan.extras:
        copy_folder(plan.tokenizer_source, work / "tokenizer")
        check_tokenizer(work / "tokenizer", plan.tokenizer_source)
    if "image_processor" in plan.extras:
        import transformers

        cls = getattr(transformers, table.image_processor.class_name)
        cls(**table.image_processor.config).save_pretrained(str(work / "image_processor"))
    if plan.complete:
        (work / MODEL_INDEX).write_text(json.dumps(model_index(plan), indent=2) + "\n")


def check_tokenizer(folder: Path, source: Path) -> None:
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # noqa: BLE001 - any failure means the source folder is not a tokenizer
        raise ConversionError(f"{source}: not a loadable tokenizer ({type(e).__name__}: {e})".splitlines()[0]) from None


def model_index(plan: PipelinePlan) -> dict:
    """What DiffusionPipeline.save_pretrained writes: the class, each component's (library,
    class), [null, null] for optional components not present, and the pipeline's config args."""
    import diffusers

    table = load_pipeline_table()
    cls = getattr(diffusers, plan.spec.class_name)
    libs = dict(plan.weights)
    libs["scheduler"] = ("diffusers", table.scheduler.class_name)
    libs["tokenizer"] = ("transformers", table.tokenizer.class_name)
    libs["image_processor"] = ("transformers", table.image_processor.class_name)
    index: dict[str, Any] = {"_class_name": plan.spec.class_name, "_diffusers_version": diffusers.__version__}
    modules, _ = cls._get_signature_keys(cls)
    params = inspect.signature(cls.__init__).parameters
    unknown = set(plan.spec.config) - set(params)
    if unknown:
        raise ConversionError(f"mappings/pipeline.yaml: {plan.spec.name}: {plan.spec.class_name} takes no "
                              f"{', '.join(sorted(unknown))}")
    for name, param in params.items():
        if name == "self":
            continue
        if name in plan.spec.components:
            index[name] = list(libs[name])
        elif name in modules or name in cls._optional_components:
            index[name] = [None, None]
        elif name in plan.spec.config:
            index[name] = plan.spec.config[name]
        elif param.default is not inspect.Parameter.empty:
            index[name] = param.default
    return dict(sorted(index.items()))
