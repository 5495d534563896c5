"""``torch.ops.t4d.block_sparse_attention_chunk``: one chunk pair of a layout, with its log-sum-exp (ring attention).

Ring context parallelism gives each rank one chunk of the queries, and passes the key/value chunks
around the ring; each step attends the local query chunk to one key/value chunk and merges the
partial results by their log-sum-exp. This op computes one such step of a block-sparse layout: the
queries are tokens ``q_offset : q_offset + Nq`` of the layout's sequence, the keys and values
tokens ``kv_offset : kv_offset + Nk``, and the block table is the layout's own (global) one.

The chunk pair's table is rectangular, and the chunk cuts need not fall on block boundaries:
blocks cut by a chunk boundary become partial blocks. It is run as a square table over a virtual
sequence of ``L = max(Nq, Nk)`` tokens whose blocks are the common refinement of the query and key
cuts (`chunk_table`), so the kernels of the square op run it unchanged: exactly the kept token
pairs of the chunk pair are computed.

Returns ``(out [B, H, Nq, Dv] in q's dtype, lse [B, H, Nq])``; the log-sum-exp (natural log) is
float32 (float64 for float64 inputs). A row that keeps no key of this key chunk comes out as zeros
with log-sum-exp ``-inf``, so merges of the form ``logaddexp`` weigh it 0; a chunk pair that keeps
no block is not computed at all (`pair_keeps_blocks` tells a ring loop to skip it). Differentiable
in q, k and v, the gradient reaching the log-sum-exp included (ring merges differentiate through it).
No key mask: the ring rewrites run only sites without one.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from t4dopt.block_layout import BlockLayout
from t4dopt.ops import cpu_kernel, triton_kernel
from t4dopt.ops.cpu_plan import Plan as CpuPlan, build_plan as build_cpu_plan
from t4dopt.ops.schema import CHUNK_BACKWARD_OP_NAME, CHUNK_OP_NAME, resolve_scale
from t4dopt.ops.tables import BlockTable, layout_tensors, lookup_table


DEFERRED = BlockLayout.from_dense(torch.ones(1, 1, dtype=torch.bool), torch.tensor([0, 1]), 1,
                                  "deferred to the turbo4d backend")
"""The stand-in table a ring traces with when no layout was given (`t4dopt.context_parallel.use_sparse_ring`):
the turbo4d backend replaces it in the graph by the layout it proves (`t4dopt.passes.ring_layouts`); run as it
is, it raises."""


class ChunkTable(NamedTuple):
    """A chunk pair of a block table as a square table over ``length`` virtual tokens.

    Virtual token t is query token t of the chunk (when t < Nq) and key token t (when t < Nk).
    """

    dense: torch.Tensor
    """bool [blocks, blocks]: refined query block i attends refined key block j."""
    block_starts: torch.Tensor
    """int64 [blocks + 1], from 0 to ``length``."""
    length: int
    kept_pairs: int
    """Token pairs the chunk pair keeps (0: nothing to compute)."""


def _refine(table: BlockTable, q_offset: int, q_len: int, kv_offset: int, kv_len: int) -> ChunkTable:
    starts = table.block_starts
    seq_len = table.seq_len
    if q_offset < 0 or kv_offset < 0 or q_offset + q_len > seq_len or kv_offset + kv_len > seq_len:
        raise ValueError(f"{CHUNK_OP_NAME}: query tokens {q_offset}:{q_offset + q_len} and key tokens "
                         f"{kv_offset}:{kv_offset + kv_len} must lie in the layout's {seq_len} tokens (a ring "
                         "traced without a layout runs only under torch.compile(backend='turbo4d'), which "
                         "proves one)")
    length = max(q_len, kv_len)
    cuts = {0, length, q_len, kv_len}
    cuts.update(int(s) - q_offset for s in starts if 0 < int(s) - q_offset < q_len)
    cuts.update(int(s) - kv_offset for s in starts if 0 < int(s) - kv_offset < kv_len)
    refined = torch.tensor(sorted(cuts), dtype=torch.int64)
    first = refined[:-1]
    # The global block of each refined block, as a query (-1 past Nq) and as a key (-1 past Nk).
    q_block = torch.where(first < q_len, torch.searchsorted(starts, first + q_offset, right=True) - 1, -1)
    k_block = torch.where(first < kv_len, torch.searchsorted(starts, first + kv_offset, right=True) - 1, -1)
    dense = table.dense[q_block.clamp(min=0)][:, k_block.clamp(min=0)]
    dense &= (q_block >= 0).unsqueeze(1) & (k_block >= 0).unsqueeze(0)
    lengths = refined[1:] - refined[:-1]
    kept = int((lengths.unsqueeze(1) * lengths.unsqueeze(0))[dense].sum())
    return ChunkTable(dense, refined, length, kept)


def chunk_table(table: BlockTable, q_offset: int, q_len: int, kv_offset: int, kv_len: int) -> ChunkTable:
    """The chunk pair's table, built once per (table, offsets, lengths) and kept with the table."""
    key = ("chunk", q_offset, q_len, kv_offset, kv_len)
    if key not in table.derived:
        table.derived[key] = _refine(table, q_offset, q_len, kv_offset, kv_len)
    return table.derived[key]


def _cpu_plan(table: BlockTable, chunk: ChunkTable, key: tuple, parts: int) -> CpuPlan:
    plan_key = ("chunk-cpu-plan", parts) + key
    if plan_key not in table.derived:
        table.derived[plan_key] = build_cpu_plan(chunk.dense, chunk.block_starts, parts)
    return table.derived[plan_key]


def _padded(x: torch.Tensor, length: int) -> torch.Tensor:
    """x [B, H, n, D] with zero tokens appended up to `length` (they are never attended)."""
    return x if x.shape[2] == length else torch.nn.functional.pad(x, (0, 0, 0, length - x.shape[2]))


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _check(q, k, v, q_offset: int, kv_offset: int) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            raise ValueError(f"{CHUNK_OP_NAME}: {name} must be 4-D [B, H, N, D], got shape {tuple(x.shape)}")
    if k.shape[:3] != v.shape[:3] or k.shape[:2] != q.shape[:2] or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"{CHUNK_OP_NAME}: q [B, H, Nq, D], k [B, H, Nk, D] and v [B, H, Nk, Dv] do not agree: "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not q.dtype == k.dtype == v.dtype or not q.device == k.device == v.device:
        raise TypeError(f"{CHUNK_OP_NAME}: q, k and v must share one dtype and device")
    if q_offset < 0 or kv_offset < 0:
        raise ValueError(f"{CHUNK_OP_NAME}: offsets must be >= 0, got q_offset={q_offset}, kv_offset={kv_offset}")


def _setup(q, k, kv_counts, kv_indices, block_starts, q_offset, kv_offset):
    table = lookup_table((kv_counts, kv_indices, block_starts))
    key = (q_offset, q.shape[2], kv_offset, k.shape[2])
    return table, chunk_table(table, *key), key


def _empty(q, v):
    b, h, n = q.shape[:3]
    return q.new_zeros((b, h, n, v.shape[-1])), q.new_full((b, h, n), -math.inf, dtype=_lse_dtype(q))


@torch.library.custom_op(CHUNK_OP_NAME, mutates_args=())
def block_sparse_attention_chunk_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_counts: torch.Tensor,
    kv_indices: torch.Tensor,
    block_starts: torch.Tensor,
    block_size: int,
    q_offset: int,
    kv_offset: int,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of query tokens ``q_offset:`` over key tokens ``kv_offset:`` of the layout's blocks."""
    _check(q, k, v, q_offset, kv_offset)
    table, chunk, key = _setup(q, k, kv_counts, kv_indices, block_starts, q_offset, kv_offset)
    if chunk.kept_pairs == 0:
        return _empty(q, v)
    scale = resolve_scale(scale, q.shape[-1])
    n = q.shape[2]
    qp, kp, vp = (_padded(x, chunk.length) for x in (q, k, v))
    if q.device.type == "cpu":
        out, lse = cpu_kernel.forward_with_lse(qp, kp, vp, _cpu_plan(table, chunk, key, cpu_kernel.part_count(q)),
                                               scale)
    elif triton_kernel.supports(qp, vp, scale) is None:
        plan_key = ("chunk-triton-plan", q.device) + key
        if plan_key not in table.derived:
            block_m, block_n = triton_kernel.tile_sizes(int((chunk.block_starts[1:] - chunk.block_starts[:-1]).max()))
            table.derived[plan_key] = triton_kernel.build_plan(chunk.dense, chunk.block_starts, block_m=block_m,
                                                               block_n=block_n, device=q.device)
        out, lse = triton_kernel.forward(qp, kp, vp, table.derived[plan_key], scale)
    else:
        out, lse = _reference(qp, kp, vp, chunk, scale)
    return out[:, :, :n].contiguous(), lse[:, :, :n].to(_lse_dtype(q)).contiguous()


def _reference(q, k, v, chunk: ChunkTable, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain tensor ops over the token mask of the chunk pair (devices and dtypes the kernels do not take)."""
    block = torch.repeat_interleave(torch.arange(chunk.dense.shape[0]), chunk.block_starts[1:] - chunk.block_starts[:-1])
    mask = chunk.dense[block.unsqueeze(1), block.unsqueeze(0)].to(q.device)
    scores = torch.matmul(q.to(_lse_dtype(q)), k.to(_lse_dtype(q)).transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)
    probs = (scores - lse.unsqueeze(-1).masked_fill(torch.isneginf(lse).unsqueeze(-1), 0.0)).exp()
    return torch.matmul(probs, v.to(probs.dtype)).to(q.dtype), lse


@block_sparse_attention_chunk_op.register_fake
def _chunk_fake(q, k, v, kv_counts, kv_indices, block_starts, block_size, q_offset, kv_offset, scale=None):
    _check(q, k, v, q_offset, kv_offset)
    b, h, n = q.shape[:3]
    return q.new_empty((b, h, n, v.shape[-1])), q.new_empty((b, h, n), dtype=_lse_dtype(q))


@torch.library.custom_op(CHUNK_BACKWARD_OP_NAME, mutates_args=())
def block_sparse_attention_chunk_backward_op(
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_counts: torch.Tensor,
    kv_indices: torch.Tensor,
    block_starts: torch.Tensor,
    block_size: int,
    q_offset: int,
    kv_offset: int,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of ``t4d::block_sparse_attention_chunk`` for the gradients of its out and lse, contiguous."""
    _check(q, k, v, q_offset, kv_offset)
    table, chunk, key = _setup(q, k, kv_counts, kv_indices, block_starts, q_offset, kv_offset)
    if chunk.kept_pairs == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    n, length = q.shape[2], chunk.length
    padded = [_padded(x, length) for x in (grad_out, q, k, v)]
    grad_lse = torch.nn.functional.pad(grad_lse, (0, length - n)) if length != n else grad_lse
    dq, dk, dv = cpu_kernel.backward(*padded, _cpu_plan(table, chunk, key, 1), resolve_scale(scale, q.shape[-1]),
                                     None, grad_lse)
    return dq[:, :, :n].contiguous(), dk[:, :, :k.shape[2]].contiguous(), dv[:, :, :v.shape[2]].contiguous()


@block_sparse_attention_chunk_backward_op.register_fake
def _chunk_backward_fake(grad_out, grad_lse, q, k, v, kv_counts, kv_indices, block_starts, block_size, q_offset,
                         kv_offset, scale=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, kv_counts, kv_indices, block_starts, block_size, q_offset, kv_offset, scale = inputs
    ctx.save_for_backward(q, k, v, kv_counts, kv_indices, block_starts)
    ctx.arguments = (block_size, q_offset, kv_offset, scale)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, kv_counts, kv_indices, block_starts = ctx.saved_tensors
    grad_out = torch.zeros_like(q[..., :1].expand(*q.shape[:3], v.shape[-1])) if grad_out is None else grad_out
    grad_lse = q.new_zeros(q.shape[:3], dtype=_lse_dtype(q)) if grad_lse is None else grad_lse
    dq, dk, dv = torch.ops.t4d.block_sparse_attention_chunk_backward(
        grad_out, grad_lse, q, k, v, kv_counts, kv_indices, block_starts, *ctx.arguments)
    return dq, dk, dv, None, None, None, None, None, None, None


block_sparse_attention_chunk_op.register_autograd(_backward, setup_context=_setup_context)


def pair_keeps_blocks(layout: BlockLayout, q_offset: int, q_len: int, kv_offset: int, kv_len: int) -> bool:
    """Whether query tokens ``q_offset:+q_len`` keep any key of tokens ``kv_offset:+kv_len`` (else: skip the step)."""
    table = lookup_table(layout_tensors(layout, torch.device("cpu")))
    return chunk_table(table, q_offset, q_len, kv_offset, kv_len).kept_pairs > 0


def rows_without_keys(layout: BlockLayout, q_offset: int, q_len: int, kv_offset: int, kv_len: int) -> int:
    """How many of the query tokens keep no key of the key chunk (their log-sum-exp is -inf)."""
    table = lookup_table(layout_tensors(layout, torch.device("cpu")))
    chunk = chunk_table(table, q_offset, q_len, kv_offset, kv_len)
    lengths = chunk.block_starts[1:] - chunk.block_starts[:-1]
    rows = torch.arange(chunk.dense.shape[0])
    empty = ~chunk.dense.any(dim=1) & (chunk.block_starts[:-1] < q_len)
    return int(lengths[rows[empty]].sum())


def block_sparse_attention_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    q_offset: int,
    kv_offset: int,
    *,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse): attention of query tokens ``q_offset : q_offset + Nq`` of `layout`'s sequence over its key
    tokens ``kv_offset : kv_offset + Nk``, restricted to the blocks `layout` keeps (q [B, H, Nq, D], k and v
    [B, H, Nk, D|Dv]).

    Equals SDPA over that rectangle of ``layout.token_mask()``, except that rows which keep no key come out
    as zeros with log-sum-exp -inf. Merging the chunk pairs of a query chunk by their log-sum-exp gives the
    rows of `t4dopt.block_sparse_attention` over the whole sequence.
    """
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"layout must be a t4dopt.BlockLayout, got {type(layout).__name__}")
    kv_counts, kv_indices, block_starts = layout_tensors(layout, q.device)
    return torch.ops.t4d.block_sparse_attention_chunk(q, k, v, kv_counts, kv_indices, block_starts,
                                                      layout.block_size, int(q_offset), int(kv_offset), scale)


def merge_chunks(out: torch.Tensor | None, lse: torch.Tensor | None, part_out: torch.Tensor,
                 part_lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The softmax-weighted union of two partial attentions of the same rows (lse [B, H, N] beside out
    [B, H, N, Dv]); rows with -inf on both sides stay zeros with -inf (no NaN), unlike a sigmoid merge."""
    if out is None:
        return part_out, part_lse
    total = torch.logaddexp(lse, part_lse)
    safe = total.masked_fill(torch.isneginf(total), 0.0)
    weight, part_weight = (lse - safe).exp(), (part_lse - safe).exp()
    merged = out * weight.unsqueeze(-1).to(out.dtype) + part_out * part_weight.unsqueeze(-1).to(out.dtype)
    return merged, total
