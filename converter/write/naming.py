"""The one place that knows output file naming and sharding, shared by every component.
Sharding is huggingface_hub's own splitter, the one diffusers' and transformers'
save_pretrained use, so shard boundaries and names match theirs."""

from __future__ import annotations

import re
from dataclasses import dataclass

from huggingface_hub import split_state_dict_into_shards_factory


MODEL_INDEX = "model_index.json"  # a pipeline folder's
SHARD = re.compile(r"^(?P<stem>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.safetensors$")


def index_name(weights_name: str) -> str:
    """diffusion_pytorch_model.safetensors -> diffusion_pytorch_model.safetensors.index.json"""
    return weights_name + ".index.json"


def shard_glob(weights_name: str) -> str:
    """The glob that matches the shards of `weights_name`."""
    return weights_name.replace(".safetensors", "-*-of-*.safetensors")


def shard_name(stem: str, i: int, n: int) -> str:
    return f"{stem}-{i:05d}-of-{n:05d}.safetensors"


@dataclass
class ShardLayout:
    files: dict[str, list[str]]  # file name -> keys, in write order
    index_name: str | None  # None when there is a single file
    index: dict | None


def plan_shards(sizes: dict[str, int], weights_name: str, max_shard_size: int | str) -> ShardLayout:
    """`sizes`: key -> bytes, in the order they are to be written."""
    pattern = weights_name.replace(".safetensors", "{suffix}.safetensors")
    split = split_state_dict_into_shards_factory(
        dict(sizes), get_storage_size=lambda n: n, filename_pattern=pattern,
        get_storage_id=lambda n: None, max_shard_size=max_shard_size)
    files = {name: list(keys) for name, keys in split.filename_to_tensors.items()}
    if not split.is_sharded:
        return ShardLayout(files, None, None)
    index = {"metadata": dict(split.metadata), "weight_map": dict(split.tensor_to_filename)}
    return ShardLayout(files, index_name(weights_name), index)
