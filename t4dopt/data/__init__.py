"""Procedural training data: dynamic multi-view scenes made on the fly, no files."""

from t4dopt.data.procedural import from_tokens, render_scenes, to_tokens

__all__ = ["from_tokens", "render_scenes", "to_tokens"]
