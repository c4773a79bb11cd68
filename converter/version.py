"""The tool's version, at the bottom of the import layers (the layout cache keys and the conversion
record name it; the package's __init__ re-exports it as wan2diffusers.__version__)."""

__version__ = "0.1.0"
