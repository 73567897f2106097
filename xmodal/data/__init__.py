"""Data sets, manifests and deterministic synthetic generators."""
