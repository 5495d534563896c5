"""The ``t4d::block_sparse_attention`` op: one graph node for Inductor and export, two device paths.

CPU runs the gather kernel (work proportional to the kept blocks); CUDA runs FlexAttention
with the block table as its BlockMask. The backward recomputes the forward in differentiable
torch ops and differentiates that, which is exact on every device.
"""

from __future__ import annotations

import torch

from t4dopt.block_layout import BlockLayout
from t4dopt.ops.flex_path import flex_block_sparse_attention
from t4dopt.ops.gather_kernel import gather_block_sparse_attention

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check(q, k, v, kv_counts, kv_indices, block_starts) -> None:
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if tensor.dim() != 4:
            raise ValueError(f"block_sparse_attention: {name} must be [B, H, N, D], got shape {list(tensor.shape)}")
        if tensor.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"block_sparse_attention: {name} has dtype {tensor.dtype}; "
                            f"allowed: {', '.join(str(d) for d in SUPPORTED_DTYPES)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"block_sparse_attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"block_sparse_attention: shapes q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)} "
                         "do not fit self-attention [B, H, N, D]")
    seq_len = block_starts.shape[0] and int(block_starts[-1])
    if q.shape[2] != seq_len or k.shape[2] != seq_len:
        raise ValueError(f"block_sparse_attention: the layout covers {seq_len} tokens, q has {q.shape[2]}, k {k.shape[2]}")
    if kv_counts.shape[0] != block_starts.shape[0] - 1 or kv_indices.shape[0] != kv_counts.shape[0]:
        raise ValueError("block_sparse_attention: kv_counts, kv_indices and block_starts disagree on the block count")


@torch.library.custom_op("t4d::block_sparse_attention", mutates_args=())
def block_sparse_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_counts: torch.Tensor,
    kv_indices: torch.Tensor,
    block_starts: torch.Tensor,
    block_size: int,
    scale: float | None = None,
) -> torch.Tensor:
    _check(q, k, v, kv_counts, kv_indices, block_starts)
    if q.is_cuda and q.dtype != torch.float64:
        return flex_block_sparse_attention(q, k, v, kv_counts, kv_indices, block_starts, block_size, scale)
    with torch.no_grad():
        return gather_block_sparse_attention(q, k, v, kv_counts, kv_indices, block_starts, scale)


@block_sparse_attention_op.register_fake
def _(q, k, v, kv_counts, kv_indices, block_starts, block_size, scale=None):
    return q.new_empty(q.shape[:-1] + (v.shape[-1],))


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, kv_counts, kv_indices, block_starts, block_size, scale = inputs
    ctx.save_for_backward(q, k, v, kv_counts, kv_indices, block_starts)
    ctx.scale = scale


def _backward(ctx, grad_out):
    q, k, v, kv_counts, kv_indices, block_starts = ctx.saved_tensors
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_() for t in (q, k, v)]
        out = gather_block_sparse_attention(*inputs, kv_counts, kv_indices, block_starts, ctx.scale)
        grads = torch.autograd.grad(out, inputs, grad_out)
    return (*grads, None, None, None, None, None)


block_sparse_attention_op.register_autograd(_backward, setup_context=_setup_context)

_device_tables: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of q, k, v ([B, H, N, D]) restricted to the blocks `layout` keeps.

    Equal to softmax(q k^T * scale + mask) v with mask = 0 where ``layout.token_mask()`` is
    True and -inf elsewhere; scale defaults to 1 / sqrt(D), as in SDPA.
    """
    key = (id(layout), q.device)
    tables = _device_tables.get(key)
    if tables is None:
        tables = layout.tensors(q.device)
        _device_tables[key] = tables
    return block_sparse_attention_op(q, k, v, *tables, layout.block_size, scale)
