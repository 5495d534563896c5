"""Block-sparse attention on CPU that computes only the kept blocks.

The block table is turned once per layout into a `cpu_plan.Plan` of dense pieces. Each piece runs
on the fused flash-attention kernel that SDPA uses on CPU (as fast per pair as dense SDPA on large
pieces), which also returns every query row's log-sum-exp, so the pieces of a row merge exactly
into the softmax over the union of their keys. The work is exactly the kept token pairs.

The plan's parts (disjoint query rows), for ranges of batch entries and heads, are tasks that run
on `cpu_pool`'s worker threads, each single-threaded, as many workers as the caller has threads:
no barrier between torch's threads at every piece, so a busy core slows the op no more than it
slows dense SDPA (see `cpu_pool`).

The backward pass recomputes each query block against all of its gathered keys with plain matmuls
(nothing to merge), one bounded chunk at a time, on the calling thread.

A key mask (`t4dopt.ops.key_mask`) enters as an additive bias [B, N] on the keys: each piece adds
its keys' slice of it (the flash kernel's ``attn_mask``), rows of a piece whose keys are all
removed get log-sum-exp -inf, and merges tolerate two such halves. Without a key mask the code
path is the one it always was (`_masked_lse`, `_piece_bias` and `_softmax_of_masked` run only with one).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from functools import partial
from typing import NamedTuple

import numpy as np
import torch

from t4dopt.compat import cpu_flash_attention
from t4dopt.ops import cpu_pool
from t4dopt.ops.cpu_plan import Gathered, Part, Plan

GATHER_BUDGET = 1 << 20
"""Elements of gathered K and V (or of backward score matrices) held at once, per chunk."""

TASKS_PER_WORKER = 2
"""Tasks (a part of the plan, for a range of batch entries and heads) per worker thread of `cpu_pool`, so
that a worker the OS deschedules delays only its task, and the others take over the rest."""


def part_count(q: torch.Tensor) -> int:
    """The plan's parts for q [B, H, N, D] on the caller's threads: with the batch entries and heads split
    too, TASKS_PER_WORKER tasks per worker (one part when it runs on one thread)."""
    workers, heads = torch.get_num_threads(), q.shape[0] * q.shape[1]
    return 1 if workers <= 1 else max(1, -(-TASKS_PER_WORKER * workers // max(heads, 1)))


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
            bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention of one piece: (output in q's dtype, log-sum-exp in float32/float64).

    `bias` (additive, broadcast to [B, H, Nq, Nk]) comes from a key mask; see `_masked_lse`.
    """
    if bias is None:
        return cpu_flash_attention()(q, k, v, scale)
    return cpu_flash_attention()(q, k, v, scale, bias)


def _masked_lse(lse: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """`lse` with -inf on the rows whose keys the bias removes entirely.

    torch's CPU flash kernel returns zeros and a log-sum-exp of 0 for such rows; 0 would weigh them
    in a merge as if they had keys. `bias` is [..., 1, Nk] with `lse`'s leading dims.
    """
    return lse.masked_fill(torch.isneginf(bias).all(dim=-1), -math.inf)


def _piece_bias(key_bias: torch.Tensor, kv_tokens: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, N] -> [B, H * pieces, 1, kv_len]: the key bias of each gathered piece, in `_gather`'s head-major order."""
    b, pieces = key_bias.shape[0], kv_tokens.shape[0]
    bias = key_bias.index_select(1, kv_tokens.reshape(-1)).view(b, 1, pieces, -1)
    return bias.expand(b, heads, pieces, bias.shape[-1]).reshape(b, heads * pieces, 1, bias.shape[-1])


def _merge_(acc: torch.Tensor, acc_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
            masked: bool = False) -> None:
    """(acc, acc_lse) <- the softmax-weighted union of (acc, acc_lse) and (out, lse), in place.

    The two weights exp(acc_lse - total) and exp(lse - total) sum to one: one lerp pass. With a key
    mask (`masked`) both halves of a row may have no key (-inf): its weight, NaN, is taken as 0.
    """
    total = torch.logaddexp(acc_lse, lse)
    weight = (lse - total).exp_()
    if masked:
        weight = weight.nan_to_num_(0.0)
    acc.lerp_(out.to(acc.dtype), weight.unsqueeze(-1))
    acc_lse.copy_(total)


class _Chunk(NamedTuple):
    q_index: torch.Tensor
    kv_index: torch.Tensor
    q_tokens: torch.Tensor
    """Flat: the query tokens of the chunk's pieces, in order."""
    kv_tokens: torch.Tensor
    """[pieces, kv_len]."""


def _chunks(group: Gathered, per_block: int) -> Iterator[_Chunk]:
    """Slices of `group`'s pieces with at most GATHER_BUDGET elements of work each."""
    step = max(1, GATHER_BUDGET // max(per_block, 1))
    for begin in range(0, group.q_index.shape[0], step):
        pieces = slice(begin, begin + step)
        yield _Chunk(group.q_index[pieces], group.kv_index[pieces], group.q_tokens[pieces].reshape(-1),
                     group.kv_tokens[pieces])


class _Workspace(threading.local):
    """Gather buffers kept between calls (per thread): fresh large allocations cost page faults, as much as the copy."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def take(self, name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        buffer = self.buffers.get((name, dtype))
        if buffer is None or buffer.numel() < numel:
            # A normal tensor, also when made in inference mode: it is written in and out of it.
            with torch.inference_mode(False):
                buffer = self.buffers[(name, dtype)] = torch.empty(numel, dtype=dtype)
        return buffer[:numel]


_workspace = _Workspace()


def _gather(x: torch.Tensor, index: torch.Tensor, unit: int, name: str) -> torch.Tensor:
    """[B, H, N, D] -> [B, H * blocks, len, D]: the units `index` ([blocks, len / unit]) of x, per block.

    Gathering runs of `unit` tokens (rows of unit * D elements) copies far faster than token by
    token. CPU results live in the workspace buffer `name` until the next gather into it.
    """
    b, h, n, d = x.shape
    units = x.view(b, h, n // unit, unit * d)
    shape = (b, h, index.numel(), unit * d)
    if x.device.type == "cpu":
        out = _workspace.take(name, math.prod(shape), x.dtype).view(shape)
        torch.index_select(units, 2, index.reshape(-1), out=out)
    else:
        out = units.index_select(2, index.reshape(-1))
    return out.view(b, h * index.shape[0], index.shape[1] * unit, d)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _forward_part(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, part: Part, unit: int, scale: float,
                  key_bias: torch.Tensor | None, acc: torch.Tensor, acc_lse: torch.Tensor) -> None:
    """Attention of the part's query rows, written into their rows of (acc, acc_lse) and nowhere else."""
    b, h, _, d = q.shape
    acc_dtype = acc.dtype
    for group in part.gathered:
        for chunk in _chunks(group, b * h * group.kv_index.shape[1] * unit * 2 * d):
            bias = None if key_bias is None else _piece_bias(key_bias, chunk.kv_tokens, h)
            out, lse = _attend(_gather(q, chunk.q_index, unit, "q"), _gather(k, chunk.kv_index, unit, "k"),
                               _gather(v, chunk.kv_index, unit, "v"), scale, bias)
            if bias is not None:
                lse = _masked_lse(lse, bias)
            rows = chunk.q_tokens
            out, lse = out.reshape(b, h, rows.numel(), d), lse.reshape(b, h, rows.numel())
            if group.fresh:
                acc.index_copy_(2, rows, out.to(acc_dtype))
                acc_lse.index_copy_(2, rows, lse.to(acc_dtype))
            else:
                merged, merged_lse = acc.index_select(2, rows), acc_lse.index_select(2, rows)
                _merge_(merged, merged_lse, out, lse, key_bias is not None)
                acc.index_copy_(2, rows, merged)
                acc_lse.index_copy_(2, rows, merged_lse)
    for rect in part.rects:
        rows = slice(rect.q_start, rect.q_end)
        keys = slice(rect.k_start, rect.k_end)
        bias = None if key_bias is None else key_bias[:, None, None, keys]
        out, lse = _attend(q[:, :, rows], k[:, :, keys], v[:, :, keys], scale, bias)
        if bias is not None:
            lse = _masked_lse(lse, bias)
        if rect.fresh:
            acc[:, :, rows] = out
            acc_lse[:, :, rows] = lse
        else:
            _merge_(acc[:, :, rows], acc_lse[:, :, rows], out, lse, key_bias is not None)


def _head_slices(batch: int, heads: int, count: int) -> list[tuple[slice, slice]]:
    """About `count` (at most batch * heads) disjoint (batch, head) index ranges that cover all of them."""
    if count <= batch:
        bounds = np.linspace(0, batch, min(count, batch) + 1).round().astype(int)
        return [(slice(lo, hi), slice(0, heads)) for lo, hi in zip(bounds[:-1], bounds[1:])]
    per_entry = min(heads, -(-count // batch))
    bounds = np.linspace(0, heads, per_entry + 1).round().astype(int)
    return [(slice(entry, entry + 1), slice(lo, hi)) for entry in range(batch) for lo, hi in zip(bounds[:-1], bounds[1:])]


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Plan, scale: float,
            key_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Block-sparse attention of [B, H, N, D] CPU tensors; returns [B, H, N, Dv] in q's dtype, contiguous.

    `key_bias` [B, N] (accumulation dtype: float32, float64 for float64) is added to each key's scores.
    """
    return forward_with_lse(q, k, v, plan, scale, key_bias)[0]


def forward_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Plan, scale: float,
                     key_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`forward`, and each query row's log-sum-exp [B, H, N] in the accumulation dtype (-inf: no key).

    `key_bias` [B, N] (accumulation dtype: float32, float64 for float64) is added to each key's scores.
    The parts run on `cpu_pool`'s workers, one intra-op thread each, as many as the caller has.
    """
    head_dim, value_dim = q.shape[-1], v.shape[-1]
    if value_dim != head_dim:
        # The fused kernel wants one head size: zero columns change neither scores nor outputs.
        width = max(head_dim, value_dim)
        q, k, v = (torch.nn.functional.pad(x, (0, width - x.shape[-1])) for x in (q, k, v))
    q, k, v = (x.contiguous() for x in (q, k, v))
    b, h, n, d = q.shape
    acc_dtype = _accumulation_dtype(q.dtype)
    # Rows no part writes keep no key: zeros.
    acc = q.new_zeros((b, h, n, d), dtype=acc_dtype)
    acc_lse = q.new_full((b, h, n), -math.inf, dtype=acc_dtype)
    workers = torch.get_num_threads()
    tasks = []  # (work, task): the most work first, so that the last tasks to start are short
    for entries, heads in _head_slices(b, h, 1 if workers <= 1 else -(-TASKS_PER_WORKER * workers // len(plan.parts))):
        bias = None if key_bias is None else key_bias[entries]
        view = (entries, heads)
        size = (entries.stop - entries.start) * (heads.stop - heads.start)
        tasks += [(part.pairs * size, partial(_forward_part, q[view], k[view], v[view], part, plan.unit, scale,
                                              bias, acc[view], acc_lse[view])) for part in plan.parts]
    tasks.sort(key=lambda task: -task[0])
    cpu_pool.pool.run([task for _, task in tasks], workers)
    # (contiguous: the fake implementation promises it, also when the value dim was padded above)
    return acc[..., :value_dim].to(q.dtype).contiguous(), acc_lse


def _softmax_of_masked(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim where whole rows may be -inf (a key mask removed every key): those give 0."""
    top = scores.amax(dim=-1, keepdim=True)
    probs = (scores - top.masked_fill_(torch.isneginf(top), 0.0)).exp_()
    total = probs.sum(dim=-1, keepdim=True)
    return probs.div_(total.masked_fill_(total == 0, 1.0))


def _backward_heads(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Plan,
                    scale: float, key_bias: torch.Tensor | None, grad_lse: torch.Tensor | None,
                    dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor) -> None:
    """Gradients of a range of batch entries and heads, written into (dq, dk, dv), views of the same range."""
    b, h, _, d = q.shape
    value_dim, dtype, unit = v.shape[-1], dq.dtype, plan.unit

    def gathered(x: torch.Tensor, index: torch.Tensor, name: str) -> torch.Tensor:
        return _gather(x, index, unit, name).to(dtype)

    for group in plan.rows:
        q_len, kv_len = group.q_index.shape[1] * unit, group.kv_index.shape[1] * unit
        per_block = b * h * max(q_len * kv_len * 3, kv_len * (d + value_dim))
        for chunk in _chunks(group, per_block):
            q_index, kv_index = chunk.q_index.to(q.device), chunk.kv_index.to(q.device)
            rows, keys = chunk.q_tokens.to(q.device), chunk.kv_tokens.to(q.device).reshape(-1)
            qg, kg, vg = gathered(q, q_index, "q"), gathered(k, kv_index, "k"), gathered(v, kv_index, "v")
            grad = gathered(grad_out, q_index, "grad")
            scores = torch.matmul(qg, kg.transpose(-1, -2)) * scale
            if key_bias is None:
                probs = torch.softmax(scores, dim=-1)
            else:
                pieces = q_index.shape[0]
                bias = key_bias.index_select(1, keys).view(b, 1, pieces, 1, kv_len)
                scores = scores.view(b, h, pieces, q_len, kv_len).add_(bias).view(b, h * pieces, q_len, kv_len)
                probs = _softmax_of_masked(scores)
            out = torch.matmul(probs, vg)
            dv_g = torch.matmul(probs.transpose(-1, -2), grad)
            dprobs = torch.matmul(grad, vg.transpose(-1, -2))
            delta = (grad * out).sum(-1, keepdim=True)
            if grad_lse is not None:  # d lse_i / d score_ij = probs_ij
                delta = delta - gathered(grad_lse, q_index, "grad_lse")
            dscores = probs.mul_(dprobs.sub_(delta)).mul_(scale)
            dq_g = torch.matmul(dscores, kg)
            dk_g = torch.matmul(dscores.transpose(-1, -2), qg)
            dq.index_copy_(2, rows, dq_g.reshape(b, h, rows.numel(), d))
            dk.index_add_(2, keys, dk_g.reshape(b, h, keys.numel(), d))
            dv.index_add_(2, keys, dv_g.reshape(b, h, keys.numel(), value_dim))


def backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: Plan,
    scale: float,
    key_bias: torch.Tensor | None = None,
    grad_lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of `forward`, recomputing attention one chunk of query blocks at a time.

    `grad_lse` [B, H, N]: the gradient reaching the log-sum-exp of `forward_with_lse`, if any.

    Plain tensor ops, so it runs on any device; it accumulates in float32 (float64 for float64).
    The gradients are contiguous. On CPU, ranges of batch entries and heads (whose gradients share
    no memory) run as tasks on `cpu_pool`'s workers.
    """
    q, k, v, grad_out = (x.contiguous() for x in (q, k, v, grad_out))
    b, h = q.shape[:2]
    dtype = _accumulation_dtype(q.dtype)
    if grad_lse is not None:
        grad_lse = grad_lse.to(dtype).unsqueeze(-1).contiguous()
    dq = torch.zeros(q.shape, dtype=dtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=dtype, device=q.device)
    dv = torch.zeros(v.shape, dtype=dtype, device=q.device)
    workers = torch.get_num_threads() if q.device.type == "cpu" else 1
    tasks = []
    for entries, heads in _head_slices(b, h, TASKS_PER_WORKER * workers if workers > 1 else 1):
        view = (entries, heads)
        bias = None if key_bias is None else key_bias[entries]
        lse_view = None if grad_lse is None else grad_lse[view]
        tasks.append(partial(_backward_heads, grad_out[view], q[view], k[view], v[view], plan, scale, bias,
                             lse_view, dq[view], dk[view], dv[view]))
    cpu_pool.pool.run(tasks, workers)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
