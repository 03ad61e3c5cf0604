"""The lite-train version: the one place it is written (pyproject.toml reads it; source.json records it)."""

__version__ = "0.1.0"
