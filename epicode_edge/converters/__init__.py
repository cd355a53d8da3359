"""Offline work: read checkpoints, extrapolate, export GGUF / MLX / HF, write bundles."""
