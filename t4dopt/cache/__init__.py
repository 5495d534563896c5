"""Reuse across denoising steps (Turbo4DGen): ``options={"cache": {...}}`` of the turbo4d backend."""

from t4dopt.cache.registry import CacheReport, cache_report, reset

__all__ = ["CacheReport", "cache_report", "reset"]
