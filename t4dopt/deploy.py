"""`t4dopt.deploy.load(bundle)`: run a deployment bundle (see `t4dopt.export.bundle`) without the model's code.

The loaded bundle is called like the model (same inputs, same output) and reuses work across
denoising steps with the cache schedule of its manifest; `sample` runs a whole flow-matching
sampling loop. Loading checks the manifest's every field and the integrity of every file
(`t4dopt.manifest`); each call checks its inputs against the exported ones (`t4dopt.input_specs`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from t4dopt import manifest as manifests
from t4dopt.cache.lowered import SegmentRunners
from t4dopt.cache.parameters import ParameterSet
from t4dopt.cache.program import Program
from t4dopt.cache.runtime import CacheRuntime
from t4dopt.cache.stats import table
from t4dopt.errors import BundleError, T4DOptionError
from t4dopt.input_specs import InputSpec, check_inputs
from t4dopt.options import CacheSpec, cache_spec, parse_cache

import t4dopt.ops  # noqa: F401  (registers torch.ops.t4d, which the segments call)

__all__ = ["BundleError", "DeployedModel", "load"]


class DeployedModel:
    """A bundle loaded for running: ``bundle(*inputs)`` like the model, ``bundle.sample(...)`` a whole loop."""

    def __init__(self, folder: Path, manifest: dict[str, Any], runtime: CacheRuntime):
        self.folder, self.manifest, self.runtime = folder, manifest, runtime
        self.inputs = [InputSpec.from_json(spec) for spec in manifest["inputs"]]

    def __call__(self, *args: torch.Tensor) -> Any:
        check_inputs(f"bundle {self.folder}", self.inputs, args)
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


def _load_program(folder: Path, name: str | None) -> Any:
    if name is None:
        return None
    try:
        return torch.export.load(os.fspath(folder / name)).module()
    except Exception as error:  # a damaged zip, a foreign file: torch raises many types
        raise BundleError(f"bundle {folder}: {name} could not be loaded as a torch.export program "
                          f"({type(error).__name__}: {error})", path=str(folder / name)) from error


FIXED_AT_EXPORT = ("levels", "token_ratio")
"""Cache settings the exported programs depend on (the pruned variants' row counts): not replaceable on load."""


def _cache_spec(recorded: dict[str, Any], override: Mapping[str, Any] | CacheSpec | None) -> CacheSpec:
    """The manifest's cache schedule, with the settings given in `override` (``load``'s ``cache=``) replaced."""
    exported = cache_spec(recorded)
    if override is None:
        return exported
    spec = parse_cache(override, recorded)
    if spec is None:
        raise T4DOptionError(f"t4dopt.deploy.load cache={override!r} is not valid; allowed: a dict of cache settings "
                             "to replace (a bundle always runs its cache; threshold=0 never reuses)",
                             option="cache", value=override)
    for key in FIXED_AT_EXPORT:
        if getattr(spec, key) != getattr(exported, key):
            raise T4DOptionError(f"t4dopt.deploy.load cache[{key!r}]={getattr(spec, key)!r} is not valid; allowed: "
                                 f"the bundle's {getattr(exported, key)!r} (fixed at export: export it again to "
                                 "change it)", option=f"cache[{key!r}]", value=getattr(spec, key))
    return spec


def load(bundle: str | os.PathLike, *, cache: Mapping[str, Any] | CacheSpec | None = None) -> DeployedModel:
    """Load the bundle folder written by ``t4dopt.export.bundle``.

    Raises `BundleError` (naming the file and the field) for a missing, damaged, edited or
    malformed bundle. `cache` replaces settings of the manifest's cache schedule (keys of the
    backend's ``cache`` option, checked alike: `T4DOptionError`), where an edit of the manifest
    would be refused by its integrity record; ``levels`` and ``token_ratio`` are fixed at export.
    """
    folder = Path(bundle)
    manifest = manifests.read(folder)
    spec = _cache_spec(manifest["cache"], cache)
    program = Program.from_json(manifest["program"])
    runners = [SegmentRunners(_load_program(folder, files.get("plain")), _load_program(folder, files.get("full")),
                              _load_program(folder, files.get("pruned"))) for files in manifest["artifacts"]]
    return DeployedModel(folder, manifest, CacheRuntime(program, runners, spec, ParameterSet()))
