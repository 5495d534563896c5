"""The ``t4d`` ONNX domain: ``t4d.BlockSparseAttention`` and ``t4d.MaskedBlockSparseAttention`` (opset 1),
their schemas and the translation of the op into them.

One node per rewritten site::

    out = t4d.BlockSparseAttention(q, k, v, kv_counts, kv_indices, block_starts,
                                   block_size=16, scale=0.25, layout="sculpt4d(...); frames=4, ...")
    out = t4d.MaskedBlockSparseAttention(q, k, v, kv_counts, kv_indices, block_starts, key_bias, ...)

q, k, v are [B, H, N, D]; the block table (``BlockLayout.tensors()``: int32 kv_counts, int32
kv_indices, int64 block_starts) comes in as initializers. A site with a key mask becomes the
masked node: ``key_bias`` [B, N] (or [1, N]) in q's type is added to the scaled scores of each
key, -inf removing it (a bool mask is turned into 0 / -inf in the graph); rows left with no key
are zeros (`t4dopt.ops.key_mask`). ``layout`` only describes the policy and token grid
(`BlockLayout.describe`: frames, tokens per frame, prefix and suffix tokens, block size), for
people and plugin authors; the table is what the op runs.

onnxscript builds the nodes from `SCHEMA` and `MASKED_SCHEMA`, which are also registered with
``onnx.defs`` (once, on import) so that onnx.checker validates these nodes rather than skipping an
unknown domain.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import onnx
import torch
from onnx.defs import OpSchema
from onnxscript import ir, values
from onnxscript import opset20 as op

from t4dopt.block_layout import BlockLayout
from t4dopt.ops.schema import ONNX_DOMAIN as DOMAIN
from t4dopt.ops.schema import ONNX_DOMAIN_VERSION as VERSION
from t4dopt.ops.schema import ONNX_MASKED_OP_TYPE as MASKED_OP_TYPE
from t4dopt.ops.schema import ONNX_OP_TYPE as OP_TYPE
from t4dopt.ops.schema import resolve_scale

import t4dopt.ops  # noqa: F401  (registers torch.ops.t4d)

_INPUTS = [
    OpSchema.FormalParameter("q", "T", "queries [B, H, N, D]"),
    OpSchema.FormalParameter("k", "T", "keys [B, H, N, D]"),
    OpSchema.FormalParameter("v", "T", "values [B, H, N, Dv]"),
    OpSchema.FormalParameter("kv_counts", "tensor(int32)", "[blocks]: key blocks each query block keeps"),
    OpSchema.FormalParameter("kv_indices", "tensor(int32)", "[blocks, max_kv]: the kept key blocks, ascending"),
    OpSchema.FormalParameter("block_starts", "tensor(int64)", "[blocks + 1]: first token of each block, then N"),
]
_TYPES = [("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"],
           "floating-point q, k, v and output")]
_ATTRIBUTES = [
    OpSchema.Attribute("block_size", OpSchema.AttrType.INT, "nominal (largest) block length"),
    OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, "softmax scale"),
    OpSchema.Attribute("layout", onnx.helper.make_attribute("layout", ""), "mask policy and token grid the table was built for"),
]

SCHEMA = OpSchema(
    OP_TYPE,
    DOMAIN,
    VERSION,
    doc="Attention of q over k, v [B, H, N, D] restricted to the key blocks each query block keeps; "
        "rows of a query block that keeps no key block are zeros.",
    inputs=_INPUTS,
    outputs=[OpSchema.FormalParameter("out", "T", "[B, H, N, Dv]")],
    type_constraints=_TYPES,
    attributes=_ATTRIBUTES,
)

MASKED_SCHEMA = OpSchema(
    MASKED_OP_TYPE,
    DOMAIN,
    VERSION,
    doc="BlockSparseAttention with a key mask: key_bias [B, N] is added to the scaled scores of each key "
        "(-inf removes it); rows left with no key are zeros.",
    inputs=_INPUTS + [OpSchema.FormalParameter("key_bias", "T", "[B, N] or [1, N]: added to each key's scores")],
    outputs=[OpSchema.FormalParameter("out", "T", "[B, H, N, Dv]")],
    type_constraints=_TYPES,
    attributes=_ATTRIBUTES,
)

OP_TYPES = (OP_TYPE, MASKED_OP_TYPE)

for _schema in (SCHEMA, MASKED_SCHEMA):
    if not onnx.defs.has(_schema.name, VERSION, DOMAIN):
        onnx.defs.register_schema(_schema)

_OPSET = values.Opset(DOMAIN, VERSION)
_BLOCK_SPARSE_ATTENTION = values.Op(_OPSET, OP_TYPE, SCHEMA)
_MASKED_BLOCK_SPARSE_ATTENTION = values.Op(_OPSET, MASKED_OP_TYPE, MASKED_SCHEMA)


def _key_bias(key_mask, like):
    """The additive key bias in `like`'s type: 0 / -inf for a bool mask, the values cast otherwise."""
    if key_mask.dtype == ir.DataType.BOOL:
        zero = op.CastLike(op.Constant(value_float=0.0), like)
        removed = op.CastLike(op.Constant(value_float=-math.inf), like)
        return op.Where(key_mask, zero, removed)
    return op.CastLike(key_mask, like)


def _translate(q, k, v, kv_counts, kv_indices, block_starts, block_size: int, scale: float | None = None,
               key_mask=None):
    """onnxscript translation of ``torch.ops.t4d.block_sparse_attention`` (the layout is filled in later)."""
    scale = float(resolve_scale(scale, q.shape[-1]))
    if key_mask is None:
        return _BLOCK_SPARSE_ATTENTION(q, k, v, kv_counts, kv_indices, block_starts,
                                       block_size=block_size, scale=scale, layout="")
    return _MASKED_BLOCK_SPARSE_ATTENTION(q, k, v, kv_counts, kv_indices, block_starts, _key_bias(key_mask, q),
                                          block_size=block_size, scale=scale, layout="")


TRANSLATION_TABLE = {torch.ops.t4d.block_sparse_attention.default: _translate}


def _table_key(arrays: tuple[np.ndarray, ...]) -> tuple:
    return tuple((a.shape, np.ascontiguousarray(a).tobytes()) for a in arrays)


def annotate_layouts(model: ir.Model, layouts: Iterable[BlockLayout]) -> None:
    """Set the ``layout`` attribute of every ``t4d`` node from the layout whose block table it carries.

    Nodes are matched to layouts by the content of their table initializers: the exporter renames
    buffers and merges those that alias one tensor, so the names cannot be relied on. A node whose
    table matches none of `layouts` is described as ``custom``.
    """
    descriptions = {_table_key(tuple(t.numpy() for t in layout.tensors("cpu"))): layout.describe()
                    for layout in layouts}
    for node in model.graph.all_nodes():
        if node.domain != DOMAIN or node.op_type not in OP_TYPES:
            continue
        constants = [value.const_value if value is not None else None for value in node.inputs[3:6]]
        if all(c is not None for c in constants):
            key = _table_key(tuple(c.numpy() for c in constants))
            node.attributes["layout"] = ir.AttrString("layout", descriptions.get(key, "custom"))
