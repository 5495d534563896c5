"""`export_bundle` (``t4dopt.export.bundle``): a model cut into cache segments, as a folder that runs without it.

The model is captured and rewritten like every export (`capture`), then cut into the
segments the cache runtime runs (`t4dopt.cache.build.prepare`). Each segment, and the token
variants of camera and motion sublayers, is saved as a ``torch.export`` program (``.pt2``);
the first segment holds the weights. ``manifest.json`` records the program (which segment
feeds which, the sublayers and chains), the cache schedule, the layout and masks, the inputs
and the versions, sealed by a SHA-256 of each field and file (`t4dopt.manifest`).
`t4dopt.deploy.load` runs it with the same runtime, so a sampling loop over the bundle reuses
work exactly as the compiled model does, without the model's Python code.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

import t4dopt
from t4dopt.cache.build import prepare
from t4dopt.cache.graph.segments import token_outputs
from t4dopt import manifest as manifests
from t4dopt.errors import T4DUnsupportedError
from t4dopt.export.capture import capture_for_export, node_values
from t4dopt.fx_utils import example_value
from t4dopt.input_specs import InputSpec, input_names
from t4dopt.options import CacheSpec, Options, parse_options
from t4dopt.export.result import ExportedArtifact


@dataclass(frozen=True)
class BundleResult(ExportedArtifact):
    """What `export_bundle` wrote: the folder, the attention sites, its segments, cache units and chains."""

    segments: int = 0
    units: int = 0
    chains: int = 0


def _specialise_sizes(gm: fx.GraphModule) -> None:
    """Replace sizes read off tensors (``x.shape``, ``t.size(1)``) by their values: a bundle has fixed shapes.

    Otherwise a size read inside one sublayer and used in the next would tie the two together.
    """
    for node in list(gm.graph.nodes):
        value = example_value(node)
        if node.op == "placeholder" or isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
            continue
        constant = value if isinstance(value, int) else value.node.hint
        if constant is None:
            continue
        for user in list(node.users):
            user.args = fx.node.map_arg(user.args, lambda n: constant if n is node else n)
            user.kwargs = fx.node.map_arg(user.kwargs, lambda n: constant if n is node else n)
    gm.graph.eliminate_dead_code()
    gm.recompile()


def _save(module: fx.GraphModule, inputs: tuple, path: Path) -> str:
    with torch.no_grad():
        program = torch.export.export(module, inputs)
    program.example_inputs = None  # the manifest records the inputs; no need to store a copy per segment
    torch.export.save(program, os.fspath(path))
    return path.name


def export_bundle(
    model: torch.nn.Module,
    args: Sequence[Any] | torch.Tensor,
    path: str | os.PathLike,
    *,
    options: Mapping[str, Any] | Options | None = None,
    progress: Callable[[str], None] | None = None,
) -> BundleResult:
    """Write the deployment bundle of `model` called as ``model(*args)`` to the folder `path`.

    `options` are the turbo4d options (layout, sparse, cache); without ``"cache"`` the default
    cache schedule is recorded. Raises `T4DUnsupportedError` when the model has no residual
    sublayer the cache runtime can run.
    """
    say = progress or (lambda line: None)
    parsed = parse_options(options)
    spec = parsed.cache or CacheSpec()
    gm, args, decisions, sites = capture_for_export(model, args, parsed, say)
    _specialise_sizes(gm)
    prepared = prepare(gm, decisions, spec)
    if prepared.program is None:
        raise T4DUnsupportedError(f"t4dopt.export.bundle: {type(model).__name__} cannot be cut into cache segments: "
                                  f"{prepared.plan.reason}")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    values = node_values(gm, args)
    artifacts = []
    for index, segment in enumerate(prepared.segments):
        say(f"exporting segment {index + 1} of {len(prepared.segments)}")
        inputs = tuple(values[n.name] for n in segment.inputs)
        files = {"plain": _save(segment.gm, inputs, folder / f"segment{index:03d}.pt2")}
        if segment.token_full is not None:
            files["full"] = _save(segment.token_full, inputs, folder / f"segment{index:03d}.full.pt2")
            with torch.no_grad():
                _, rows = token_outputs(segment.token_full(*inputs))
            files["pruned"] = _save(segment.token_pruned, inputs + tuple(rows),
                                    folder / f"segment{index:03d}.pruned.pt2")
        artifacts.append(files)
    program = prepared.program
    manifest = {
        "versions": {"t4dopt": t4dopt.__version__, "torch": torch.__version__},
        "model": type(model).__name__,
        "inputs": [InputSpec.of(name, value).to_json() for name, value in zip(input_names(model.forward, len(args)), args)],
        "program": program.to_json(),
        "artifacts": artifacts,
        "cache": dataclasses.asdict(spec),
        "layout": dataclasses.asdict(parsed.layout),
        "sites": [{"name": s.name, "kind": s.kind, "action": s.action, "density": s.density, "why": s.reason}
                  for s in sites],
    }
    manifests.write(folder, manifest)
    result = BundleResult(folder, sites, segments=len(artifacts), units=len(program.units), chains=len(program.chains))
    say(f"wrote {folder}: {result.segments} segments, {result.units} cache units, "
        f"{result.chains} chains, {result.file_bytes / 2**20:.2f} MiB")
    return result
