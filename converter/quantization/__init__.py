"""Quantized Diffusers variants written while streaming: the policy (mappings/quantization.yaml),
the backend that quantizes one weight at a time (backend.py: the interface; quanto.py:
optimum-quanto, diffusers' `QuantoConfig` format), the plan of the quantized entries (plan.py)
and the plan of an already-converted Diffusers folder (diffusers_folder.py)."""
