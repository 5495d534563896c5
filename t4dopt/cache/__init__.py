"""Reuse across denoising steps (Turbo4DGen): ``options={"cache": {...}}`` of the turbo4d backend."""

from t4dopt.cache.registry import CacheReport, cache_report, reset
from t4dopt.cache.scope import branch, generation

__all__ = ["CacheReport", "branch", "cache_report", "generation", "reset"]
