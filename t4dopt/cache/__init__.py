"""Reuse across denoising steps (Turbo4DGen): ``options={"cache": {...}}`` of the turbo4d backend."""

from t4dopt.cache.registry import CacheReport, GraphUnits, cache_report, reset, units_found
from t4dopt.cache.scope import branch, generation

__all__ = ["CacheReport", "GraphUnits", "branch", "cache_report", "generation", "reset", "units_found"]
