#!/usr/bin/env python
"""For maintainers: write mappings/constants.safetensors, the fixed tensors an original checkpoint
holds and Diffusers rebuilds, which the way back writes again (a drop rule's `restore:`).

  blur_kernel_1331: the motion encoder's Blur kernel of Wan 2.2 Animate (wan22
  wan/modules/animate/motion_encoder.py make_kernel([1, 3, 3, 1]): the outer product of [1, 3, 3, 1]
  with itself, divided by its sum; every value is exact in float32). tests/families/test_animate.py checks it
  against the official make_kernel.

  python scripts/make_constants.py          # (re)write the file
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parents[1] / "mappings" / "constants.safetensors"


def constants() -> dict[str, torch.Tensor]:
    k = torch.tensor([1.0, 3.0, 3.0, 1.0], dtype=torch.float32)
    k = k[None, :] * k[:, None]
    return {"blur_kernel_1331": (k / k.sum()).contiguous()}


if __name__ == "__main__":
    save_file(constants(), str(OUT), metadata={"format": "pt"})
    print(f"wrote {OUT}")
