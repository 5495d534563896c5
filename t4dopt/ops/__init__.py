"""The ``t4d`` ops and their kernels. Importing this registers ``torch.ops.t4d``."""

from t4dopt.ops.block_sparse import block_sparse_attention, block_sparse_attention_op

__all__ = ["block_sparse_attention", "block_sparse_attention_op"]
