"""FX passes of the turbo4d backend, one concern a module: detect, layout, sparsify, rewrite."""

from .manager import analyze, run_passes

__all__ = ["analyze", "run_passes"]
