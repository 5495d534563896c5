"""`export_aoti` (``t4dopt.export.aoti``): a model with its joint attention made block-sparse, as an
AOTInductor ``.pt2`` package.

1. Capture the model as one torch-level FX graph and rewrite it with the turbo4d passes
   (`capture`), exactly as ``backend="turbo4d"`` would.
2. On CUDA, each site our Triton kernel runs becomes ``t4d.block_sparse_attention_planned``, a
   ``torch.library.triton_op`` (`t4dopt.ops.triton_op`, via `planned_sites`) whose kernel AOTInductor compiles into
   the package; elsewhere (CPU, or inputs the kernel does not take) the site stays one
   ``torch.ops.t4d.block_sparse_attention`` node (its fake implementation makes it opaque).
3. ``torch.export.export``, then ``torch._inductor.aoti_compile_and_package``: Inductor compiles
   the rest to C++, and the package calls the remaining t4d op through AOTInductor's proxy
   executor, which dispatches it by name.

So the process that runs a package with the opaque op must have it registered: `load_aoti`
imports ``t4dopt.ops`` before ``torch._inductor.aoti_load_package``. `run_in_fresh_process` runs a
package the way a deployment would: in a new Python process that only loads it.

A package computes for the shapes, dtypes and device it was compiled for and does not check what
it is given (another shape comes back as a tensor of the exported shape). So `export_aoti` records
each input's `InputSpec` in the package's metadata (``aot_inductor.metadata``), and the callable
`load_aoti` returns checks every call against them, naming the input that differs.
"""

from __future__ import annotations

import json
import os
import subprocess
import warnings
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from t4dopt.errors import T4DWarning
from t4dopt.export.capture import capture_for_export
from t4dopt.input_specs import InputSpec, check_inputs, input_names
from t4dopt.options import Options
from t4dopt.export.result import ExportedArtifact
from t4dopt.report import count_rewritten

import t4dopt.ops  # noqa: F401  (registers torch.ops.t4d)

INPUTS_METADATA = "t4dopt.inputs"
"""The package metadata key holding the JSON list of the inputs' specs (null for an input that was no tensor)."""

_RUN_PACKAGE = """
import sys
import torch
from t4dopt.export import load_aoti

package, inputs, output = sys.argv[1:]
with torch.no_grad():
    torch.save(load_aoti(package)(*torch.load(inputs)), output)
"""


@dataclass(frozen=True)
class AotiResult(ExportedArtifact):
    """What `export_aoti` wrote (a ``.pt2`` package) and what it rewrote on the way."""

    t4d_nodes: int = 0
    """``t4d.block_sparse_attention`` nodes of the exported program's graph."""


def count_t4d_nodes(program: torch.export.ExportedProgram | torch.fx.GraphModule) -> int:
    """``t4d.block_sparse_attention`` calls (or their planned Triton form) in `program`'s graph.

    The rewritten sites, and calls of the op the model makes itself.
    """
    return sum(1 for node in program.graph.nodes
               if node.op == "call_function" and str(node.target).startswith("t4d.block_sparse_attention"))


def export_aoti(
    model: torch.nn.Module,
    args: Sequence[Any] | torch.Tensor,
    path: str | os.PathLike,
    *,
    options: Mapping[str, Any] | Options | None = None,
    progress: Callable[[str], None] | None = None,
) -> AotiResult:
    """Compile `model` (called as ``model(*args)``) ahead of time to a ``.pt2`` package at `path`.

    `options` are the turbo4d backend options (``layout``, ``sparse``, ``strict``; ``target`` and
    ``verify`` do not apply). The package takes inputs of the shapes, dtypes and device of
    `args`; run it with `load_aoti`. `progress` is called with a line per step.
    """
    say = progress or (lambda line: None)
    gm, args, _, sites = capture_for_export(model, args, options, say)
    in_graph = count_t4d_nodes(gm)
    if any(isinstance(a, torch.Tensor) and a.is_cuda for a in args):
        from t4dopt.export.planned_sites import plan_sites

        planned = plan_sites(gm, args)
        say(f"{planned} sites as the Triton kernel (triton_op), compiled into the package")

    say("exporting with torch.export")
    with torch.no_grad():
        program = torch.export.export(gm, args)
    t4d_nodes = count_t4d_nodes(program)
    if t4d_nodes != in_graph or in_graph < count_rewritten(sites):
        raise RuntimeError(f"t4dopt.export.aoti: torch.export kept {t4d_nodes} t4d.block_sparse_attention "
                           f"nodes of the {in_graph} in the rewritten graph ({count_rewritten(sites)} rewritten sites)")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    say("compiling with AOTInductor (C++; this takes a while)")
    specs = [InputSpec.of(name, value).to_json() if isinstance(value, torch.Tensor) else None
             for name, value in zip(input_names(model.forward, len(args)), args)]
    torch._inductor.aoti_compile_and_package(program, package_path=os.fspath(path), inductor_configs={
        "aot_inductor.metadata": {INPUTS_METADATA: json.dumps(specs)}})
    result = AotiResult(path, sites, t4d_nodes=t4d_nodes)
    say(f"wrote {path} ({result.file_bytes / 2**20:.2f} MiB, {t4d_nodes} t4d nodes)")
    return result


class LoadedPackage:
    """An AOTInductor package loaded by `load_aoti`: called like the model, its inputs checked on every call."""

    def __init__(self, path: Path, compiled: Callable[..., Any], inputs: list[InputSpec | None] | None):
        self.path, self.compiled, self.inputs = path, compiled, inputs

    def __call__(self, *args: Any) -> Any:
        if self.inputs is not None:
            check_inputs(f"AOTInductor package {self.path}", self.inputs, args)
        return self.compiled(*args)


def _recorded_inputs(path: Path, compiled: Any) -> list[InputSpec | None] | None:
    recorded = compiled.get_metadata().get(INPUTS_METADATA)
    if recorded is None:
        warnings.warn(f"{path} records no input specs (exported by another tool or an earlier t4dopt): its inputs "
                      "are not checked, and inputs of another shape or dtype give wrong results silently",
                      T4DWarning, stacklevel=3)
        return None
    return [InputSpec.from_json(spec) if spec is not None else None for spec in json.loads(recorded)]


def load_aoti(path: str | os.PathLike) -> LoadedPackage:
    """The compiled model in the ``.pt2`` package at `path`, callable on tensors like the original.

    Every call checks its inputs against the shapes, dtypes and devices the package was exported
    with: TypeError for their number, `t4dopt.errors.T4DInputError` naming the input that differs.
    This module imports ``t4dopt.ops`` first, so the op the package calls by name is registered.
    Load packages in a process that did not compile one: on torch 2.13 (CPU), a package loaded in
    the process that ran `export_aoti` sometimes hands the op garbage block-table tensors.
    """
    path = Path(path)
    compiled = torch._inductor.aoti_load_package(os.fspath(path))
    return LoadedPackage(path, compiled, _recorded_inputs(path, compiled))


def run_in_fresh_process(path: str | os.PathLike, args: Sequence[torch.Tensor]) -> Any:
    """The outputs of the package at `path` on `args`, loaded and run by `load_aoti` in a new Python process."""
    with tempfile.TemporaryDirectory(prefix="t4dopt-aoti-") as folder:
        inputs, output = os.path.join(folder, "inputs.pt"), os.path.join(folder, "output.pt")
        torch.save(tuple(args), inputs)
        subprocess.run([sys.executable, "-c", _RUN_PACKAGE, os.fspath(path), inputs, output], check=True)
        return torch.load(output)
