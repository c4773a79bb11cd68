"""The one place that knows output file naming and sharding, shared by every component.
Sharding is huggingface_hub's own splitter, the one diffusers' and transformers'
save_pretrained use, so shard boundaries and names match theirs."""

from __future__ import annotations

from dataclasses import dataclass

from huggingface_hub import split_state_dict_into_shards_factory


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
    return ShardLayout(files, weights_name + ".index.json", index)
