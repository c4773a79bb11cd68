"""The YAML mapping tables (package data: converter.mappings)."""
