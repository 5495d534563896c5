"""`t4dopt.deploy.load(bundle)`: run a deployment bundle (see `t4dopt.export.bundle`) without the model's code.

The loaded bundle is called like the model (same inputs, same output) and reuses work across
denoising steps with the cache schedule of its manifest; `sample` runs a whole flow-matching
sampling loop.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from t4dopt.cache.lowered import SegmentRunners
from t4dopt.cache.program import Program
from t4dopt.cache.runtime import CacheRuntime
from t4dopt.cache.stats import table
from t4dopt.options import CACHE_KEYS, CacheSpec

import t4dopt.ops  # noqa: F401  (registers torch.ops.t4d, which the segments call)

BUNDLE_FORMAT = 1
MANIFEST = "manifest.json"
MANIFEST_KEYS = ("format", "versions", "inputs", "program", "artifacts", "cache")


class BundleError(ValueError):
    """A bundle folder that is missing, incomplete or not one of ours."""


class DeployedModel:
    """A bundle loaded for running: ``bundle(*inputs)`` like the model, ``bundle.sample(...)`` a whole loop."""

    def __init__(self, folder: Path, manifest: dict[str, Any], runtime: CacheRuntime):
        self.folder, self.manifest, self.runtime = folder, manifest, runtime
        self.inputs = manifest["inputs"]

    def __call__(self, *args: torch.Tensor) -> Any:
        if len(args) != len(self.inputs):
            raise TypeError(f"bundle {self.folder} takes {len(self.inputs)} inputs "
                            f"({', '.join(i['name'] for i in self.inputs)}), got {len(args)}")
        for value, expected in zip(args, self.inputs):
            if not isinstance(value, torch.Tensor) or list(value.shape) != expected["shape"]:
                got = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"bundle input {expected['name']!r} must have shape {expected['shape']} "
                                 f"(the shape it was exported with), got {got}")
        with torch.no_grad():
            outputs = self.runtime(*args)
        return outputs[0] if isinstance(outputs, (list, tuple)) and len(outputs) == 1 else outputs

    def sample(self, noise: torch.Tensor, cond: torch.Tensor, *, steps: int | None = None,
               shift: float = 1.0) -> torch.Tensor:
        """A flow-matching Euler loop (``t4dopt.models.sample_flow_matching``) over the bundle, a fresh generation."""
        from t4dopt.models.sampler import sample_flow_matching

        steps = steps or self.runtime.spec.steps
        if steps is None:
            raise ValueError("bundle.sample needs steps= (the manifest's cache schedule has none)")
        with self.runtime.generation():
            return sample_flow_matching(self, noise, cond, steps=steps, shift=shift)

    def reset(self) -> None:
        """Drop the cached state (generations are also told apart on their own, `t4dopt.cache.generations`)."""
        self.runtime.reset()

    def cache_table(self) -> str:
        """What the cache did in the last generation, per sublayer."""
        return table(self.runtime.stats.report())


def _read_manifest(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise BundleError(f"no bundle folder at {folder}")
    path = folder / MANIFEST
    if not path.is_file():
        raise BundleError(f"{folder} is not a t4dopt bundle: it has no {MANIFEST}")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise BundleError(f"{path} is not valid JSON: {error}") from None
    missing = [key for key in MANIFEST_KEYS if key not in manifest] if isinstance(manifest, dict) else MANIFEST_KEYS
    if missing:
        raise BundleError(f"{path} lacks {', '.join(missing)}; was it written by t4dopt.export.bundle?")
    if manifest["format"] != BUNDLE_FORMAT:
        raise BundleError(f"{path} is bundle format {manifest['format']!r}; this t4dopt reads format {BUNDLE_FORMAT}")
    unknown = sorted(set(manifest["cache"]) - set(CACHE_KEYS))
    if unknown:
        raise BundleError(f"{path}: unknown cache settings {unknown}; known: {list(CACHE_KEYS)}")
    return manifest


def _load_program(folder: Path, name: str | None) -> Any:
    if name is None:
        return None
    path = folder / name
    if not path.is_file():
        raise BundleError(f"bundle {folder} is incomplete: {name} is missing")
    return torch.export.load(os.fspath(path)).module()


def load(bundle: str | os.PathLike) -> DeployedModel:
    """Load the bundle folder written by ``t4dopt.export.bundle``; raises `BundleError` for a malformed one."""
    folder = Path(bundle)
    manifest = _read_manifest(folder)
    try:
        program = Program.from_json(manifest["program"])
        cache = manifest["cache"]
        spec = CacheSpec(**{**cache, "levels": tuple(cache["levels"])})
    except (KeyError, TypeError) as error:
        raise BundleError(f"{folder / MANIFEST}: malformed program or cache schedule ({error})") from None
    if len(manifest["artifacts"]) != len(program.segments):
        raise BundleError(f"{folder / MANIFEST}: {len(manifest['artifacts'])} artifacts for "
                          f"{len(program.segments)} segments")
    runners = [SegmentRunners(_load_program(folder, files.get("plain")), _load_program(folder, files.get("full")),
                              _load_program(folder, files.get("pruned"))) for files in manifest["artifacts"]]
    return DeployedModel(folder, manifest, CacheRuntime(program, runners, spec, set()))
