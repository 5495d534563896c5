"""``torch.ops.t4d.block_sparse_attention``: attention restricted to the kept blocks of a layout.

The op takes the block table as three tensors (``BlockLayout.tensors()``), so graph passes can
store it as buffers and Inductor or export keep the op as one opaque node (see the fake
implementation). CPU tensors run `cpu_kernel`; on CUDA the forward runs our Triton kernel
(`triton_kernel`) where it supports the inputs and FlexAttention (`flex_path`) otherwise, and the
backward runs FlexAttention. What the kernels derive from a table (the CPU plan, the Triton
plan, the FlexAttention ``BlockMask``) is built once and cached: by the identity of the table
tensors while they live, and by their content otherwise.
"""

from __future__ import annotations

import hashlib
import math
import os
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property, partial

import torch

from t4dopt.block_layout import BlockLayout
from t4dopt.ops import cpu_kernel, flex_path, triton_kernel

OP_NAME = "t4d::block_sparse_attention"

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
                  kv_indices: torch.Tensor, block_starts: torch.Tensor) -> None:
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


def _resolve_scale(scale: float | None, q: torch.Tensor) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


@dataclass(eq=False)
class BlockTable:
    """A decoded block table and what the kernels derived from it."""

    dense: torch.Tensor
    """bool [blocks, blocks] on CPU: query block i attends key block j."""
    block_starts: torch.Tensor
    """int64 [blocks + 1] on CPU."""
    derived: dict = field(default_factory=dict)

    @property
    def seq_len(self) -> int:
        return int(self.block_starts[-1])

    @cached_property
    def longest_block(self) -> int:
        return int((self.block_starts[1:] - self.block_starts[:-1]).max())

    def cpu_plan(self) -> cpu_kernel.Plan:
        if "cpu-plan" not in self.derived:
            self.derived["cpu-plan"] = cpu_kernel.build_plan(self.dense, self.block_starts)
        return self.derived["cpu-plan"]

    def triton_plan(self, device: torch.device, *, block_m: int | None = None,
                    block_n: int | None = None) -> triton_kernel.Plan:
        default_m, default_n = triton_kernel.tile_sizes(self.longest_block)
        key = ("triton-plan", block_m or default_m, block_n or default_n, device)
        if key not in self.derived:
            self.derived[key] = triton_kernel.build_plan(self.dense, self.block_starts, block_m=key[1],
                                                         block_n=key[2], device=device)
        return self.derived[key]

    def block_mask(self, block_size: int, device: torch.device):
        key = ("block-mask", block_size, device)
        if key not in self.derived:
            self.derived[key] = flex_path.build_block_mask(self.dense, self.block_starts, block_size, device)
        return self.derived[key]


def _decode(kv_counts: torch.Tensor, kv_indices: torch.Tensor, block_starts: torch.Tensor) -> BlockTable:
    counts, indices, starts = kv_counts.long(), kv_indices.long(), block_starts.long()
    blocks, width = indices.shape
    if blocks == 0 or int(starts[0]) != 0 or bool((starts[1:] <= starts[:-1]).any()):
        raise ValueError(f"{OP_NAME}: block_starts must start at 0 and increase strictly, got {starts.tolist()[:16]}")
    if bool((counts < 0).any()) or bool((counts > width).any()):
        raise ValueError(f"{OP_NAME}: kv_counts must lie in [0, {width}] (the width of kv_indices)")
    kept = torch.arange(width).unsqueeze(0) < counts.unsqueeze(1)
    if bool(((indices < 0) | (indices >= blocks))[kept].any()):
        raise ValueError(f"{OP_NAME}: kv_indices must name key blocks in [0, {blocks})")
    dense = torch.zeros(blocks, blocks, dtype=torch.bool)
    dense[torch.arange(blocks).unsqueeze(1).expand(blocks, width)[kept], indices[kept]] = True
    return BlockTable(dense, starts.contiguous())


def _version(tensor: torch.Tensor) -> int:
    try:
        return tensor._version
    except RuntimeError:  # inference tensors keep no version counter (and cannot change outside inference mode)
        return -1


class _TableCache:
    """`BlockTable`s keyed by the identity of the table tensors (while they live, unchanged) and by content."""

    def __init__(self, capacity: int = 64) -> None:
        self._capacity = capacity
        self._by_identity: dict[tuple[int, ...], tuple[tuple[weakref.ref, ...], tuple[int, ...], BlockTable]] = {}
        self._by_content: OrderedDict[bytes, BlockTable] = OrderedDict()

    def lookup(self, tensors: tuple[torch.Tensor, ...]) -> BlockTable:
        key = tuple(id(t) for t in tensors)
        versions = tuple(_version(t) for t in tensors)
        entry = self._by_identity.get(key)
        if entry is not None and entry[1] == versions and all(ref() is t for ref, t in zip(entry[0], tensors)):
            return entry[2]
        table = self._lookup_content(tuple(t.detach().cpu() for t in tensors))
        refs = tuple(weakref.ref(t, partial(self._forget, key)) for t in tensors)
        self._by_identity[key] = (refs, versions, table)
        return table

    def _lookup_content(self, tensors: tuple[torch.Tensor, ...]) -> BlockTable:
        digest = hashlib.blake2b(digest_size=16)
        for t in tensors:
            digest.update(repr((t.dtype, tuple(t.shape))).encode())
            digest.update(t.contiguous().numpy().tobytes())
        key = digest.digest()
        table = self._by_content.get(key)
        if table is None:
            table = _decode(*tensors)
            self._by_content[key] = table
            while len(self._by_content) > self._capacity:
                self._by_content.popitem(last=False)
        self._by_content.move_to_end(key)
        return table

    def _forget(self, key: tuple[int, ...], ref: weakref.ref) -> None:
        entry = self._by_identity.get(key)
        if entry is not None and any(r is ref for r in entry[0]):
            del self._by_identity[key]


_tables = _TableCache()


def _table_for(q: torch.Tensor, kv_counts: torch.Tensor, kv_indices: torch.Tensor,
               block_starts: torch.Tensor) -> BlockTable:
    table = _tables.lookup((kv_counts, kv_indices, block_starts))
    if table.seq_len != q.shape[2]:
        raise ValueError(f"{OP_NAME}: q/k/v have N={q.shape[2]} tokens but the block table covers {table.seq_len}")
    return table


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
) -> torch.Tensor:
    """Attention of q [B, H, N, D] over k, v [B, H, N, D|Dv] restricted to the kept blocks.

    Rows of a query block that keeps no key block come out as zeros.
    """
    raise NotImplementedError(f"{OP_NAME} runs on CPU and CUDA tensors, not on {q.device.type}")


@block_sparse_attention_op.register_kernel("cpu")
def _forward_cpu(q, k, v, kv_counts, kv_indices, block_starts, block_size, scale=None):
    _check_inputs(q, k, v, kv_counts, kv_indices, block_starts)
    table = _table_for(q, kv_counts, kv_indices, block_starts)
    return cpu_kernel.forward(q, k, v, table.cpu_plan(), _resolve_scale(scale, q))


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
def _forward_cuda(q, k, v, kv_counts, kv_indices, block_starts, block_size, scale=None):
    _check_inputs(q, k, v, kv_counts, kv_indices, block_starts)
    table = _table_for(q, kv_counts, kv_indices, block_starts)
    scale = _resolve_scale(scale, q)
    if cuda_forward_kernel(q, v, scale) == "triton":
        return triton_kernel.forward(q, k, v, table.triton_plan(q.device), scale)[0]
    return flex_path.forward(q, k, v, table.block_mask(block_size, q.device), scale)


@block_sparse_attention_op.register_fake
def _forward_fake(q, k, v, kv_counts, kv_indices, block_starts, block_size, scale=None):
    _check_inputs(q, k, v, kv_counts, kv_indices, block_starts)
    return q.new_empty(q.shape[:-1] + (v.shape[-1],))


@torch.library.custom_op("t4d::block_sparse_attention_backward", mutates_args=())
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of ``t4d::block_sparse_attention`` for the output gradient `grad_out`."""
    table = _table_for(q, kv_counts, kv_indices, block_starts)
    return cpu_kernel.backward(grad_out, q, k, v, table.cpu_plan(), _resolve_scale(scale, q))


@block_sparse_attention_backward_op.register_kernel("cuda")
def _backward_cuda(grad_out, q, k, v, kv_counts, kv_indices, block_starts, block_size, scale=None):
    table = _table_for(q, kv_counts, kv_indices, block_starts)
    return flex_path.backward(grad_out, q, k, v, table.block_mask(block_size, q.device), _resolve_scale(scale, q))


@block_sparse_attention_backward_op.register_fake
def _backward_fake(grad_out, q, k, v, kv_counts, kv_indices, block_starts, block_size, scale=None):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, kv_counts, kv_indices, block_starts, block_size, scale = inputs
    ctx.save_for_backward(q, k, v, kv_counts, kv_indices, block_starts)
    ctx.block_size, ctx.scale = block_size, scale


def _backward(ctx, grad_out):
    q, k, v, kv_counts, kv_indices, block_starts = ctx.saved_tensors
    dq, dk, dv = torch.ops.t4d.block_sparse_attention_backward(
        grad_out, q, k, v, kv_counts, kv_indices, block_starts, ctx.block_size, ctx.scale)
    return dq, dk, dv, None, None, None, None, None


block_sparse_attention_op.register_autograd(_backward, setup_context=_setup_context)

LAYOUT_CACHE_SIZE = 256

_layout_tensors: dict[int, tuple[BlockLayout, dict[torch.device, tuple[torch.Tensor, ...]]]] = {}


def layout_tensors(layout: BlockLayout, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``layout.tensors(device)``, copied once per (layout, device).

    Repeated calls hand the op the same tensors, so its per-table caches hit without a copy or a
    device sync. A plain dict keyed by ``id(layout)`` (holding the layout, so the id is not
    reused) rather than a WeakKeyDictionary, which torch.compile cannot trace.
    """
    entry = _layout_tensors.get(id(layout))
    if entry is None or entry[0] is not layout:
        if len(_layout_tensors) >= LAYOUT_CACHE_SIZE:
            del _layout_tensors[next(iter(_layout_tensors))]
        entry = _layout_tensors[id(layout)] = (layout, {})
    per_device = entry[1]
    if device not in per_device:
        per_device[device] = layout.tensors(device)
    return per_device[device]


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of q, k, v [B, H, N, D] restricted to the blocks `layout` keeps.

    Equals SDPA with ``attn_mask=layout.token_mask()`` (softmax scale `scale`, by default
    ``1 / sqrt(D)``), except that rows which keep no key come out as zeros; but it computes only
    the kept blocks. float32, float16 and bfloat16 (float64 too on CPU); differentiable.
    """
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"layout must be a t4dopt.BlockLayout, got {type(layout).__name__}")
    # (The op checks this too; checked here first for the clearer message, outside of tracing.)
    if not torch.compiler.is_compiling() and q.dim() == 4 and q.shape[2] != layout.seq_len:
        raise ValueError(f"q/k/v have N={q.shape[2]} tokens but {layout!r} covers {layout.seq_len}")
    kv_counts, kv_indices, block_starts = layout_tensors(layout, q.device)
    return torch.ops.t4d.block_sparse_attention(q, k, v, kv_counts, kv_indices, block_starts,
                                                layout.block_size, scale)
