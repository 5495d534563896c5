"""The ``t4d`` ONNX domain: ``t4d.BlockSparseAttention`` (opset 1), its schema and its translation.

One node per rewritten site::

    out = t4d.BlockSparseAttention(q, k, v, kv_counts, kv_indices, block_starts,
                                   block_size=16, scale=0.25, layout="sculpt4d(...); frames=4, ...")

q, k, v are [B, H, N, D]; the block table (``BlockLayout.tensors()``: int32 kv_counts, int32
kv_indices, int64 block_starts) comes in as initializers. ``layout`` only describes the policy
and token grid, for people and plugin authors; the table is what the op runs.

onnxscript builds the node from `SCHEMA`, which is also registered with ``onnx.defs`` (once, on
import) so that onnx.checker validates these nodes rather than skipping an unknown domain.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx.defs import OpSchema
from onnxscript import ir, values

from t4dopt.ops.schema import ONNX_DOMAIN as DOMAIN
from t4dopt.ops.schema import ONNX_DOMAIN_VERSION as VERSION
from t4dopt.ops.schema import ONNX_OP_TYPE as OP_TYPE
from t4dopt.ops.schema import resolve_scale
from t4dopt.sites import SiteDecision

import t4dopt.ops  # noqa: F401  (registers torch.ops.t4d)

SCHEMA = OpSchema(
    OP_TYPE,
    DOMAIN,
    VERSION,
    doc="Attention of q over k, v [B, H, N, D] restricted to the key blocks each query block keeps; "
        "rows of a query block that keeps no key block are zeros.",
    inputs=[
        OpSchema.FormalParameter("q", "T", "queries [B, H, N, D]"),
        OpSchema.FormalParameter("k", "T", "keys [B, H, N, D]"),
        OpSchema.FormalParameter("v", "T", "values [B, H, N, Dv]"),
        OpSchema.FormalParameter("kv_counts", "tensor(int32)", "[blocks]: key blocks each query block keeps"),
        OpSchema.FormalParameter("kv_indices", "tensor(int32)", "[blocks, max_kv]: the kept key blocks, ascending"),
        OpSchema.FormalParameter("block_starts", "tensor(int64)", "[blocks + 1]: first token of each block, then N"),
    ],
    outputs=[OpSchema.FormalParameter("out", "T", "[B, H, N, Dv]")],
    type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"],
                       "floating-point q, k, v and output")],
    attributes=[
        OpSchema.Attribute("block_size", OpSchema.AttrType.INT, "nominal (largest) block length"),
        OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, "softmax scale"),
        OpSchema.Attribute("layout", onnx.helper.make_attribute("layout", ""), "mask policy and token grid the table was built for"),
    ],
)

if not onnx.defs.has(OP_TYPE, VERSION, DOMAIN):
    onnx.defs.register_schema(SCHEMA)

_OPSET = values.Opset(DOMAIN, VERSION)
_BLOCK_SPARSE_ATTENTION = values.Op(_OPSET, OP_TYPE, SCHEMA)


def _translate(q, k, v, kv_counts, kv_indices, block_starts, block_size: int, scale: float | None = None):
    """onnxscript translation of ``torch.ops.t4d.block_sparse_attention`` (the layout is filled in later)."""
    scale = resolve_scale(scale, q.shape[-1])
    return _BLOCK_SPARSE_ATTENTION(q, k, v, kv_counts, kv_indices, block_starts,
                                   block_size=block_size, scale=float(scale), layout="")


TRANSLATION_TABLE = {torch.ops.t4d.block_sparse_attention.default: _translate}


def _table_key(arrays: tuple[np.ndarray, ...]) -> tuple:
    return tuple((a.shape, np.ascontiguousarray(a).tobytes()) for a in arrays)


def describe(decision: SiteDecision) -> str:
    """The ``layout`` attribute of a site: policy, token grid and block size."""
    grid = decision.layout
    return (f"{decision.block_layout.description}; frames={grid.frames}, tokens_per_frame={grid.tokens_per_frame}, "
            f"prefix_tokens={grid.prefix_tokens}, block_size={decision.block_layout.block_size}")


def annotate_layouts(model: ir.Model, decisions: list[SiteDecision]) -> None:
    """Set the ``layout`` attribute of every ``t4d`` node from the site whose block table it carries.

    Nodes are matched to sites by the content of their table initializers: the exporter renames
    buffers and merges those that alias one tensor, so the names cannot be relied on.
    """
    descriptions = {
        _table_key(tuple(t.numpy() for t in d.block_layout.tensors("cpu"))): describe(d)
        for d in decisions if d.action == "sparse"
    }
    for node in model.graph.all_nodes():
        if node.domain != DOMAIN:
            continue
        constants = [value.const_value if value is not None else None for value in node.inputs[3:6]]
        if all(c is not None for c in constants):
            key = _table_key(tuple(c.numpy() for c in constants))
            node.attributes["layout"] = ir.AttrString("layout", descriptions.get(key, "custom"))
