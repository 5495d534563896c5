"""The ``t4d`` operators; importing this package registers ``torch.ops.t4d.block_sparse_attention`` and
``torch.ops.t4d.block_sparse_attention_chunk`` (one chunk pair of a layout, for ring attention)."""

from t4dopt.ops.block_sparse import block_sparse_attention
from t4dopt.ops.chunk import block_sparse_attention_chunk

__all__ = ["block_sparse_attention", "block_sparse_attention_chunk"]
