"""The schema of a mapping table (mappings/<component>.yaml), as frozen pydantic models.
A table that does not fit is refused when loaded, with the file and the rule named."""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .ops import OPS as _REGISTRY

OPS = tuple(_REGISTRY)  # the closed set of ops: mapping/ops.py


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceSpec(Strict):
    weights_name: str | None = None  # safetensors components: file name (an index is <name>.index.json)
    file_names: list[str] = []  # .pth components: the original file name(s)
    strip_prefixes: list[str] = []
    required_keys: list[str] = Field(min_length=1)


class OutputSpec(Strict):
    folder: str  # the pipeline subfolder: transformer, vae, text_encoder, image_encoder
    weights_name: str  # diffusion_pytorch_model.safetensors (diffusers) or model.safetensors (transformers)


class Variant(Strict):
    name: str
    when_present: list[str] = []
    target_class: str
    file_name: str | None = None  # .pth components: this variant's file in the original repos (--to original)
    # what the files of target_class carry before the model's own state-dict keys, where the class
    # itself has none (transformers 5 CLIPVisionModel; its checkpoints, transformers 4's included,
    # hold `vision_model.`, which transformers 5 maps when it loads them)
    key_prefix: str = ""
    # why diffusers has no class for this variant yet: target_class then names the original class,
    # never built; the keys are proven against the rules alone, and only the outputs in the original
    # key names (GGUF) are written; a Diffusers output is refused with this text
    no_class: str | None = None


class Kind(Strict):
    """A kind of model a variant's weights can be, told by its facts (Wan 2.2 I2V-A14B: T2V's
    blocks with in_dim 36): what convert says it detected, and the model_type its config.json holds."""
    variant: str
    model_type: str
    facts: dict[str, Any]
    label: str


class Size(Strict):
    name: str
    dim: int
    num_heads: int | None = None


LIST_FACTS = ("indices", "shapes", "present_at", "member_of", "length", "add")  # primary sources added for layouts


class Fact(Strict):
    """How one fact is derived; exactly one primary source: shape, present, count, config,
    divide, const.  `else*` is the fallback when the key/config field is absent."""

    shape: tuple[str, Union[int, str]] | None = None
    present: str | None = None
    count: str | None = None
    config: str | None = None
    divide: tuple[str, str] | None = None
    const: Any = None
    then: Any = None
    then_fact: str | None = None
    else_: Any = Field(default="__required__", alias="else")
    else_size: str | None = None
    else_every: tuple[int, str] | None = None
    # list-valued facts over the {n} of a template (e.g. a flat list of blocks): the sorted {n} of the
    # keys it matches; their shape[dim]; whether it is present at each n of a list fact. `length`:
    # a list fact's length; `add`: the sum of facts/ints. `every`, `divide_by` (fact or int) then
    # take every k-th item of a list and divide exactly (element-wise for a list).
    indices: str | None = None
    shapes: tuple[str, int] | None = None
    present_at: tuple[str, str] | None = None
    member_of: tuple[str, str] | None = None  # [A, B]: for each item of list fact B, whether list fact A holds it
    length: str | None = None
    add: list[Union[int, str]] | None = None
    every: Union[int, str, None] = None
    divide_by: Union[int, str, None] = None
    divide_by_product_of: str | None = None
    # arithmetic on the derived value, applied in this order (before divide_by_product_of):
    # subtract a constant, take the exact integer square root, multiply by another fact
    subtract: int | None = None
    square_root: bool = False
    multiply_by: str | None = None
    hint: str | None = None  # told to the user when the fact cannot be derived (e.g. an override flag)
    check: str | None = None
    variant: list[str] | None = None
    # what a value given from outside (a config.json field, --set) must be: int = a positive integer,
    # float = a positive finite number, indices = a list of block indices (integers >= 0)
    type: Literal["int", "float", "indices"] | None = None

    @model_validator(mode="after")
    def one_source(self):
        primary = [f for f in ("shape", "present", "count", "config", "divide") + LIST_FACTS if getattr(self, f) is not None]
        if len(primary) + ("const" in self.model_fields_set) != 1:
            raise ValueError("a fact needs exactly one of shape, present, count, config, divide, const")
        if (self.config or self.check) and self.type is None:
            raise ValueError("a fact read from or checked against a config needs a `type`")
        return self


class ConfigEntry(Strict):
    fact: str | None = None
    const: Any = None
    variant: list[str] | None = None
    # original_config only: a constant the conversion record's copy of the source's config.json may
    # replace, and what that value must be (int: a positive integer; version: a version string).
    # A constant without it is decided by the weights and tables: the record must agree with it.
    kept: Literal["int", "version"] | None = None


def config_entry(entry, variant: str):
    """The entry of a `config:` field that applies to `variant`: a fact name, one entry, or the
    first of a list of per-variant entries whose `variant` holds it (None: the field is not set)."""
    if isinstance(entry, str):
        return ConfigEntry(fact=entry)
    for e in entry if isinstance(entry, list) else [entry]:
        if e.variant is None or variant in e.variant:
            return e
    return None


class Rule(Strict):
    from_: Union[str, list[str]] = Field(alias="from")
    to: Union[str, list[str], None] = None
    op: Literal[OPS] = "rename"  # type: ignore[valid-type]
    dim: int | None = None  # chunk, concat, squeeze, unsqueeze
    dims: tuple[int, int] | None = None  # transpose
    shape: list[int] | None = None  # reshape (-1 allowed once)
    undo_shape: list[int] | None = None  # reshape: the source's shape (-1 allowed once), for running backwards
    reason: str | None = None  # drop
    # drop: a fixed value the original holds and Diffusers rebuilds; the way back writes it again from
    # this tensor of mappings/constants.safetensors (each of the rule's keys; its placeholders must
    # be lists or facts-sized layouts, so that every key can be named)
    restore: str | None = None
    variant: list[str] | None = None  # active only for these detected variants

    @model_validator(mode="after")
    def op_arguments(self):
        sources = [self.from_] if isinstance(self.from_, str) else self.from_
        targets = [] if self.to is None else [self.to] if isinstance(self.to, str) else self.to
        op = _REGISTRY[self.op]
        n_src, n_dst, args = op.sources, op.targets, op.needs
        if n_src is not None and len(sources) != n_src:
            raise ValueError(f"op {self.op} takes {n_src} source key(s), got {len(sources)}")
        if n_dst is not None and len(targets) != n_dst:
            raise ValueError(f"op {self.op} makes {n_dst} target key(s), got {len(targets)}")
        if n_dst is None and len(targets) < 2 or n_src is None and len(sources) < 2:
            raise ValueError(f"op {self.op} needs at least two keys on its many side")
        for a in args:
            if getattr(self, a) in (None, ""):
                raise ValueError(f"op {self.op} needs `{a}`")
        if self.restore is not None and self.op != "drop":
            raise ValueError("`restore` is for drop rules (a fixed value Diffusers rebuilds)")
        return self

    @property
    def sources(self) -> list[str]:
        return [self.from_] if isinstance(self.from_, str) else list(self.from_)

    @property
    def targets(self) -> list[str]:
        return [] if self.to is None else [self.to] if isinstance(self.to, str) else list(self.to)


class Nested(Strict):
    """A placeholder for a flat list index that stands for nested indices (a flat list of blocks
    that the target groups by stage): flat = offset + sum(nested_k * strides_k) for each nested_k
    in range(ranges_k). Numbers may be fact names. Target templates use the `nested` names."""

    nested: list[str] = Field(min_length=1)
    ranges: list[Union[int, str]]
    strides: list[Union[int, str]]
    offset: Union[int, str] = 0

    @model_validator(mode="after")
    def same_lengths(self):
        if not len(self.nested) == len(self.ranges) == len(self.strides):
            raise ValueError("nested, ranges and strides need the same length")
        return self


class Fixed(Strict):
    """A placeholder that stands for one number given by a fact (or an int): e.g. the index of a
    stage's resample, which follows its `num_res_blocks` residual blocks."""

    fixed: Union[int, str]


class Table(Strict):
    schema_version: Literal[1]
    component: str
    description: str
    source: SourceSpec
    output: OutputSpec
    variants: list[Variant] = Field(min_length=1)
    sizes: list[Size] = []
    kinds: list[Kind] = []
    facts: dict[str, Fact] = {}
    config: dict[str, Union[str, ConfigEntry, list[ConfigEntry]]] = {}
    # the original config.json (`convert --to original`), field by field in this order, from facts
    # or constants; a constant the weights cannot tell is taken from the conversion record when it
    # kept the source's config.json
    original_config: dict[str, Union[str, ConfigEntry, list[ConfigEntry]]] = {}
    rules: list[Rule] = Field(min_length=1)
    # config fields that multiply modules (block counts, list lengths) -> the most a real model of
    # this kind could have: a config.json beyond it is refused before a model is built from it (a
    # num_layers of 20000 would take minutes and GBs on the meta device)
    limits: dict[str, int] = {}
    placeholders: dict[str, Union[Literal["index"], list[str], Nested, Fixed]] = {}

    @property
    def built_classes(self) -> list[str]:
        """The Diffusers/transformers classes this table converts to, in variant order (a variant with
        `no_class` names an original class diffusers does not have)."""
        return list(dict.fromkeys(v.target_class for v in self.variants if v.no_class is None))
