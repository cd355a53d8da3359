"""The tool's version, importable from every layer (manifests record it; the CLI shows it)."""

__version__ = "0.1.0"
