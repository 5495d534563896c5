"""The ``t4d`` operators; importing this package registers ``torch.ops.t4d.block_sparse_attention``."""

from t4dopt.ops.block_sparse import block_sparse_attention

__all__ = ["block_sparse_attention"]
