"""wan2diffusers: offline conversion of original Wan 2.1 checkpoints to the Diffusers layout."""

__version__ = "0.1.0"
