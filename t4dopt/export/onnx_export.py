"""`export_onnx` (``t4dopt.export.onnx``): a model with its joint attention made block-sparse, as ONNX.

1. Capture the model as one torch-level FX graph and rewrite it with the turbo4d passes
   (`capture`), exactly as ``backend="turbo4d"`` would.
2. ``ops="custom"``: export through torch.onnx's dynamo exporter with an onnxscript translation
   of ``torch.ops.t4d.block_sparse_attention`` to ``t4d.BlockSparseAttention`` (with a key mask:
   ``t4d.MaskedBlockSparseAttention``; `custom_domain`).
   ``ops="portable"``: first swap each t4d op for gathers, matmuls and a masked softmax over
   the kept blocks (`portable`), so the file holds standard ONNX ops only.
3. Save (external data past 2 GiB) and check the file with onnx.checker.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx as onnx_lib
import torch

from t4dopt.errors import T4DOptionError
from t4dopt.export import custom_domain
from t4dopt.export.capture import capture_for_export
from t4dopt.export.portable import make_portable
from t4dopt.options import Options
from t4dopt.export.result import ExportedArtifact

OPS = ("custom", "portable")
OPSET_VERSION = 20
"""Opset of the default ONNX domain (20 has Gelu, which the reference models use, as one op)."""


@dataclass(frozen=True)
class ExportResult(ExportedArtifact):
    """What `export_onnx` wrote and what it rewrote on the way."""

    ops: str = "custom"
    onnx_nodes: int = 0
    """Nodes of the saved graph (functions not expanded)."""

    @property
    def file_bytes(self) -> int:
        """Size of the .onnx file plus any external-data files beside it."""
        model = onnx_lib.load(str(self.path), load_external_data=False)
        external = {entry.value for tensor in model.graph.initializer for entry in tensor.external_data
                    if entry.key == "location"}
        return self.path.stat().st_size + sum((self.path.parent / name).stat().st_size for name in external)


def _check_ops(ops: str) -> None:
    if ops not in OPS:
        raise T4DOptionError(f"t4dopt.export.onnx option ops={ops!r} is not valid; allowed: "
                             + ", ".join(repr(o) for o in OPS))


def export_onnx(
    model: torch.nn.Module,
    args: Sequence[Any] | torch.Tensor,
    path: str | os.PathLike,
    *,
    options: Mapping[str, Any] | Options | None = None,
    ops: str = "custom",
    progress: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export `model` (called as ``model(*args)``) to ONNX at `path`, joint attention block-sparse.

    `options` are the turbo4d backend options (``layout``, ``sparse``, ``strict``; ``target`` and
    ``verify`` do not apply). ``ops="custom"`` writes ``t4d.BlockSparseAttention`` nodes (run them
    in ONNX Runtime with ``t4dopt.plugins.onnxruntime_ops``); ``ops="portable"`` writes standard
    ONNX ops only, still computing only the kept blocks. `progress` is called with a line per step.
    """
    _check_ops(ops)
    say = progress or (lambda line: None)
    gm, args, decisions, sites = capture_for_export(model, args, options, say)

    if ops == "portable":
        make_portable(gm)
    translations = custom_domain.TRANSLATION_TABLE if ops == "custom" else {}
    say(f"exporting to ONNX ({'standard ops only' if ops == 'portable' else 't4d custom domain'})")
    with torch.no_grad():
        program = torch.onnx.export(gm, args, dynamo=True, opset_version=OPSET_VERSION,
                                    custom_translation_table=translations, verbose=False)
    if ops == "custom":
        custom_domain.annotate_layouts(program.model, [d.block_layout for d in decisions if d.action == "sparse"])

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(path)
    onnx_lib.checker.check_model(str(path))
    nodes = len(onnx_lib.load(str(path), load_external_data=False).graph.node)
    result = ExportResult(path, sites, ops=ops, onnx_nodes=nodes)
    say(f"wrote {path} ({result.file_bytes / 2**20:.2f} MiB, {nodes} nodes), onnx.checker passed")
    return result
