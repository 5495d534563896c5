"""``torch.ops.t4d.block_sparse_attention``: attention restricted to the kept blocks of a layout.

The op takes the block table as three tensors (``BlockLayout.tensors()``), so graph passes can
store it as buffers and Inductor or export keep the op as one opaque node (see the fake
implementation). CPU tensors run `cpu_kernel`; on CUDA the forward runs our Triton kernel
(`triton_kernel`) where it supports the inputs and FlexAttention (`flex_path`) otherwise, and the
backward runs FlexAttention. The tables are decoded and planned once (`tables`).

An optional ``key_mask`` [B, N] (bool, or additive) removes keys per batch element on top of the
block mask, such as a text-padding mask; `t4dopt.ops.key_mask` says exactly what it computes.
Every kernel takes it; a mask that keeps every key runs the unmasked path.

Outputs are contiguous on every path, forward and backward, and the fake implementations say so
(Inductor checks the strides of what an opaque op returns against its fake).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from t4dopt.block_layout import BlockLayout
from t4dopt.ops import cpu_kernel, flex_path, key_mask as key_masks, triton_kernel
from t4dopt.ops.schema import BACKWARD_OP_NAME, OP_NAME, resolve_scale
from t4dopt.ops.tables import layout_tensors, table_for

CUDA_KERNEL_ENV = "T4D_CUDA_KERNEL"
"""``flex`` or ``triton`` forces the CUDA forward kernel (for benchmarks); unset or ``auto``:
Triton where it supports the inputs in float16 or bfloat16, FlexAttention otherwise."""

SUPPORTED_DTYPES: dict[str, tuple[torch.dtype, ...]] = {
    "cpu": (torch.float32, torch.float16, torch.bfloat16, torch.float64),
    "cuda": (torch.float32, torch.float16, torch.bfloat16),
}


def _dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(str(dtype).removeprefix("torch.") for dtype in dtypes)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_counts: torch.Tensor,
                  kv_indices: torch.Tensor, block_starts: torch.Tensor, key_mask: torch.Tensor | None = None) -> None:
    """Shape, dtype and device checks that need no tensor data (they also run on fake tensors)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            raise ValueError(f"{OP_NAME}: {name} must be 4-D [B, H, N, D], got shape {tuple(x.shape)}")
    allowed = SUPPORTED_DTYPES.get(q.device.type, SUPPORTED_DTYPES["cuda"])
    if q.dtype not in allowed:
        raise TypeError(f"{OP_NAME}: q has dtype {q.dtype}; on {q.device.type} it supports "
                        f"{_dtype_names(allowed)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"{OP_NAME}: q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"{OP_NAME}: q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape[:3] != q.shape[:3] or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"{OP_NAME}: q, k and v must agree on [B, H, N] (self-attention; expand grouped "
            f"key/value heads first), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"{OP_NAME}: q and k must have the same head size, got {q.shape[-1]} and {k.shape[-1]}")
    for name, x, dim in (("kv_counts", kv_counts, 1), ("kv_indices", kv_indices, 2), ("block_starts", block_starts, 1)):
        if x.dim() != dim or x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
            raise ValueError(f"{OP_NAME}: {name} must be a {dim}-D integer tensor, "
                             f"got {x.dtype} of shape {tuple(x.shape)}")
    blocks = kv_counts.shape[0]
    if kv_indices.shape[0] != blocks or block_starts.shape[0] != blocks + 1:
        raise ValueError(
            f"{OP_NAME}: block table of {blocks} blocks needs kv_indices [{blocks}, max_kv] and "
            f"block_starts [{blocks + 1}], got {tuple(kv_indices.shape)} and {tuple(block_starts.shape)}")
    key_masks.check(key_mask, q)


def _bias_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _key_bias(key_mask: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor | None:
    """The additive key bias [B, N] the kernels take, or None for no mask (or one that keeps every key)."""
    key_mask = key_masks.effective(key_mask)
    return None if key_mask is None else key_masks.as_bias(key_mask, q.shape[0], _bias_dtype(q))


@torch.library.custom_op(OP_NAME, mutates_args=())
def block_sparse_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_counts: torch.Tensor,
    kv_indices: torch.Tensor,
    block_starts: torch.Tensor,
    block_size: int,
    scale: float | None = None,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of q [B, H, N, D] over k, v [B, H, N, D|Dv] restricted to the kept blocks (and keys).

    Rows that keep no key come out as zeros. `key_mask`: see `t4dopt.ops.key_mask`.
    """
    raise NotImplementedError(f"{OP_NAME} runs on CPU and CUDA tensors, not on {q.device.type}")


@block_sparse_attention_op.register_kernel("cpu")
def _forward_cpu(q, k, v, kv_counts, kv_indices, block_starts, block_size, scale=None, key_mask=None):
    _check_inputs(q, k, v, kv_counts, kv_indices, block_starts, key_mask)
    table = table_for(q, kv_counts, kv_indices, block_starts)
    return cpu_kernel.forward(q, k, v, table.cpu_plan(cpu_kernel.part_count(q)), resolve_scale(scale, q.shape[-1]),
                              _key_bias(key_mask, q))


def cuda_forward_kernel(q: torch.Tensor, v: torch.Tensor, scale: float) -> str:
    """``"triton"`` or ``"flex"``: the kernel the op's CUDA forward runs on these inputs (see `CUDA_KERNEL_ENV`)."""
    choice = os.environ.get(CUDA_KERNEL_ENV, "auto")
    if choice not in ("auto", "flex", "triton"):
        raise ValueError(f"{CUDA_KERNEL_ENV}={choice!r}: expected auto, flex or triton")
    if choice == "flex":
        return "flex"
    reason = triton_kernel.supports(q, v, scale)
    if choice == "triton":
        if reason is not None:
            raise ValueError(f"{CUDA_KERNEL_ENV}=triton, but the Triton kernel does not run {reason}")
        return "triton"
    return "triton" if reason is None and q.dtype in triton_kernel.FAST_DTYPES else "flex"


@block_sparse_attention_op.register_kernel("cuda")
def _forward_cuda(q, k, v, kv_counts, kv_indices, block_starts, block_size, scale=None, key_mask=None):
    _check_inputs(q, k, v, kv_counts, kv_indices, block_starts, key_mask)
    table = table_for(q, kv_counts, kv_indices, block_starts)
    scale = resolve_scale(scale, q.shape[-1])
    key_bias = _key_bias(key_mask, q)
    if cuda_forward_kernel(q, v, scale) == "triton":
        return triton_kernel.forward(q, k, v, table.triton_plan(q.device), scale, key_bias=key_bias)[0]
    return flex_path.forward(q, k, v, table.block_mask(block_size, q.device), scale, key_bias)


@block_sparse_attention_op.register_fake
def _forward_fake(q, k, v, kv_counts, kv_indices, block_starts, block_size, scale=None, key_mask=None):
    _check_inputs(q, k, v, kv_counts, kv_indices, block_starts, key_mask)
    return q.new_empty(q.shape[:-1] + (v.shape[-1],))  # contiguous, as every kernel returns it


@torch.library.custom_op(BACKWARD_OP_NAME, mutates_args=())
def block_sparse_attention_backward_op(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_counts: torch.Tensor,
    kv_indices: torch.Tensor,
    block_starts: torch.Tensor,
    block_size: int,
    scale: float | None = None,
    key_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of ``t4d::block_sparse_attention`` for the output gradient `grad_out`, contiguous."""
    _check_inputs(q, k, v, kv_counts, kv_indices, block_starts, key_mask)
    table = table_for(q, kv_counts, kv_indices, block_starts)
    return cpu_kernel.backward(grad_out, q, k, v, table.cpu_plan(), resolve_scale(scale, q.shape[-1]),
                               _key_bias(key_mask, q))


@block_sparse_attention_backward_op.register_kernel("cuda")
def _backward_cuda(grad_out, q, k, v, kv_counts, kv_indices, block_starts, block_size, scale=None, key_mask=None):
    _check_inputs(q, k, v, kv_counts, kv_indices, block_starts, key_mask)
    table = table_for(q, kv_counts, kv_indices, block_starts)
    return flex_path.backward(grad_out, q, k, v, table.block_mask(block_size, q.device),
                              resolve_scale(scale, q.shape[-1]), _key_bias(key_mask, q))


@block_sparse_attention_backward_op.register_fake
def _backward_fake(grad_out, q, k, v, kv_counts, kv_indices, block_starts, block_size, scale=None, key_mask=None):
    # Contiguous, as the kernels return them (not empty_like: that would keep q's strides).
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, kv_counts, kv_indices, block_starts, block_size, scale, key_mask = inputs
    key_masks.refuse_gradient(key_mask)
    ctx.save_for_backward(q, k, v, kv_counts, kv_indices, block_starts, key_mask)
    ctx.block_size, ctx.scale = block_size, scale


def _backward(ctx, grad_out):
    q, k, v, kv_counts, kv_indices, block_starts, key_mask = ctx.saved_tensors
    dq, dk, dv = torch.ops.t4d.block_sparse_attention_backward(
        grad_out, q, k, v, kv_counts, kv_indices, block_starts, ctx.block_size, ctx.scale, key_mask)
    return dq, dk, dv, None, None, None, None, None, None


block_sparse_attention_op.register_autograd(_backward, setup_context=_setup_context)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    *,
    scale: float | None = None,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of q, k, v [B, H, N, D] restricted to the blocks `layout` keeps.

    Equals SDPA with ``attn_mask=layout.token_mask()`` (softmax scale `scale`, by default
    ``1 / sqrt(D)``), except that rows which keep no key come out as zeros; but it computes only
    the kept blocks. `key_mask` ([B, N], or SDPA's key-padding shape [B, 1, 1, N]; bool or
    additive) also removes keys per batch element, as SDPA would with it combined into the mask
    (`t4dopt.ops.key_mask`). float32, float16 and bfloat16 (float64 too on CPU); differentiable
    in q, k and v.
    """
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"layout must be a t4dopt.BlockLayout, got {type(layout).__name__}")
    # (The op checks this too; checked here first for the clearer message, outside of tracing.)
    if not torch.compiler.is_compiling() and q.dim() == 4 and q.shape[2] != layout.seq_len:
        raise ValueError(f"q/k/v have N={q.shape[2]} tokens but {layout!r} covers {layout.seq_len}")
    kv_counts, kv_indices, block_starts = layout_tensors(layout, q.device)
    key_mask = key_masks.as_op_argument(key_mask, q) if q.dim() == 4 else key_mask
    return torch.ops.t4d.block_sparse_attention(q, k, v, kv_counts, kv_indices, block_starts,
                                                layout.block_size, scale, key_mask)
