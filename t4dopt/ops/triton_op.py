"""``t4d::block_sparse_attention_planned``: our Triton forward kernel as a ``torch.library.triton_op``.

Compiled ahead of time, ``t4d::block_sparse_attention`` stays an opaque call that the loading
process must answer in Python. A triton_op shows AOTInductor the Triton kernel inside, which it
compiles into the package like its own kernels, so a CUDA package needs no Python at run time.
The op takes the kernel's plan (`triton_kernel.Plan`) instead of the block table;
`t4dopt.export.planned_sites` rewrites a graph's block-sparse calls into it.
"""

from __future__ import annotations

import torch
from torch.library import triton_op, wrap_triton

from t4dopt.ops import triton_kernel
from t4dopt.ops.schema import PLANNED_OP_NAME


@triton_op(PLANNED_OP_NAME, mutates_args=())
def block_sparse_attention_planned(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tiles: torch.Tensor,
                                   full_starts: torch.Tensor, partial_starts: torch.Tensor,
                                   partial_ends: torch.Tensor, block_m: int, block_n: int,
                                   scale: float, key_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Block-sparse attention of q, k, v [B, H, N, D] (last dim contiguous) over a precomputed plan.

    `key_bias`: float32 [B, N], contiguous, added to each key's scores (`t4dopt.ops.key_mask.as_bias`).
    The op cannot look at its data to skip an all-ones mask, so a key mask always runs the masked kernel.
    """
    plan = triton_kernel.Plan(block_m, block_n, q.shape[2], tiles, full_starts, partial_starts, partial_ends)
    out, lse = triton_kernel.empty_outputs(q, v)
    config = triton_kernel.default_config(max(q.shape[-1], v.shape[-1]), q.dtype)
    triton_kernel.launch(wrap_triton(triton_kernel._forward_kernel), q, k, v, out, lse, plan, scale, config,
                         key_bias)
    return out
