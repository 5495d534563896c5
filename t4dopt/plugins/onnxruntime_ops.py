"""ONNX Runtime custom ops for ``t4d.BlockSparseAttention`` and ``t4d.MaskedBlockSparseAttention``, through
onnxruntime-extensions' Python ops.

Importing this module registers both ops (float32 q, k, v) with onnxruntime-extensions; a
session runs them once the extensions library is registered on its options::

    import onnxruntime as ort
    from t4dopt.plugins.onnxruntime_ops import session_options

    session = ort.InferenceSession("model.onnx", session_options(), providers=["CPUExecutionProvider"])

The compute is numpy, one query block at a time over the key blocks it keeps: masked blocks
are never touched. The masked op adds its key bias [B, N] to the scores of each key (-inf
removes it) and returns zeros for rows left with no key. The module imports only numpy,
onnxruntime and onnxruntime-extensions, so it also works copied beside a deployment without torch.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op

ONNX_DOMAIN = "t4d"
ONNX_OP_TYPE = "BlockSparseAttention"
ONNX_MASKED_OP_TYPE = "MaskedBlockSparseAttention"
"""Spelled here rather than imported from ``t4dopt.ops.schema``: this file runs copied beside a
deployment without t4dopt or torch (a test checks the two agree)."""


def block_sparse_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, kv_counts: np.ndarray,
                           kv_indices: np.ndarray, block_starts: np.ndarray, scale: float,
                           key_bias: np.ndarray | None = None) -> np.ndarray:
    """Attention of q [B, H, N, D] over k, v [B, H, N, D|Dv] restricted to the kept blocks; empty rows are zeros.

    `key_bias` [B, N] (or [1, N]) is added to the scaled scores of each key; -inf removes the key.
    """
    starts = block_starts.astype(np.int64)
    if q.shape[-2] != int(starts[-1]):
        raise ValueError(f"t4d.BlockSparseAttention: q has N={q.shape[-2]} tokens but the block table "
                         f"covers {int(starts[-1])}")
    out = np.zeros(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype)
    for block, count in enumerate(kv_counts.tolist()):
        if count == 0:
            continue
        rows = slice(int(starts[block]), int(starts[block + 1]))
        keys = np.concatenate([np.arange(starts[j], starts[j + 1]) for j in kv_indices[block, :count].tolist()])
        scores = (q[..., rows, :] * np.asarray(scale, q.dtype)) @ np.swapaxes(k[..., keys, :], -1, -2)
        if key_bias is not None:
            scores = scores + key_bias[:, None, None, keys].astype(q.dtype)
        top = scores.max(axis=-1, keepdims=True)
        top = np.where(np.isneginf(top), 0, top)  # rows with no key left: every weight exp(-inf) = 0
        weights = np.exp(scores - top)
        total = weights.sum(axis=-1, keepdims=True)
        weights /= np.where(total > 0, total, 1)
        out[..., rows, :] = weights @ v[..., keys, :]
    return out


_TABLE_TYPES = [PyCustomOpDef.dt_int32, PyCustomOpDef.dt_int32, PyCustomOpDef.dt_int64]
_ATTRIBUTES = {"block_size": PyCustomOpDef.dt_int64, "scale": PyCustomOpDef.dt_float, "layout": PyCustomOpDef.dt_string}


@onnx_op(op_type=f"{ONNX_DOMAIN}::{ONNX_OP_TYPE}", inputs=[PyCustomOpDef.dt_float] * 3 + _TABLE_TYPES,
         outputs=[PyCustomOpDef.dt_float], attrs=_ATTRIBUTES)
def _block_sparse_attention_op(q, k, v, kv_counts, kv_indices, block_starts, **attributes):
    return block_sparse_attention(q, k, v, kv_counts, kv_indices, block_starts, attributes["scale"])


@onnx_op(op_type=f"{ONNX_DOMAIN}::{ONNX_MASKED_OP_TYPE}",
         inputs=[PyCustomOpDef.dt_float] * 3 + _TABLE_TYPES + [PyCustomOpDef.dt_float],
         outputs=[PyCustomOpDef.dt_float], attrs=_ATTRIBUTES)
def _masked_block_sparse_attention_op(q, k, v, kv_counts, kv_indices, block_starts, key_bias, **attributes):
    return block_sparse_attention(q, k, v, kv_counts, kv_indices, block_starts, attributes["scale"], key_bias)


def session_options(options: ort.SessionOptions | None = None) -> ort.SessionOptions:
    """`options` (or new ones) with the onnxruntime-extensions library, and so ``t4d`` ops, registered."""
    options = options or ort.SessionOptions()
    options.register_custom_ops_library(get_library_path())
    return options
