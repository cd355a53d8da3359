"""Engines behind the Backend protocol (base.py): llama.cpp and MLX, imported lazily."""
