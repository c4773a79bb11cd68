"""What a saved `quantization_config` says, read without importing torch or a backend: which
backend wrote it and to which weight type (inspect, verify and the model card ask this)."""

from __future__ import annotations

PACKAGES = {"quanto": "optimum-quanto>=0.2.7", "torchao": "torchao>=0.18"}  # what loading each needs
TORCHAO_TYPES = {"Int8WeightOnlyConfig": "int8", "Float8WeightOnlyConfig": "float8"}


def describe_config(qconfig: dict | None) -> tuple[str, str] | None:
    """(backend, weights) of a config.json's quantization_config as the backends write it, e.g.
    ("quanto", "int8") or ("torchao", "float8"); None when not one of ours."""
    if not isinstance(qconfig, dict):
        return None
    method = qconfig.get("quant_method")
    if method == "quanto":
        return "quanto", str(qconfig.get("weights_dtype") or qconfig.get("weights") or "?")
    if method == "torchao":
        qtype = qconfig.get("quant_type")
        name = ((qtype or {}).get("default") or {}).get("_type") if isinstance(qtype, dict) else qtype
        return "torchao", TORCHAO_TYPES.get(str(name), str(name))
    return None
