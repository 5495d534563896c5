"""Block-sparse attention by gathering each query block's kept key blocks.

Query blocks with the same length and the same number of kept key tokens form a group; each
group is one batched SDPA call over its gathered keys and values, so the work done is
proportional to the kept blocks. Written in differentiable torch ops: it is the CPU kernel, the
fallback on devices no faster path covers, and the recomputation behind the op's backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

GATHER_ELEMENTS_PER_CHUNK = 1 << 25


@dataclass(frozen=True)
class BlockGroup:
    query_index: torch.Tensor
    key_index: torch.Tensor


_plans: dict[tuple, list[BlockGroup]] = {}


def _plan(kv_counts: torch.Tensor, kv_indices: torch.Tensor, block_starts: torch.Tensor) -> list[BlockGroup]:
    """Token index tables per group of (query length, key length); cached per block table."""
    key = (kv_counts.data_ptr(), kv_indices.data_ptr(), block_starts.data_ptr(), kv_counts.device,
           tuple(kv_indices.shape), int(kv_counts.sum()), int(block_starts[-1]))
    plan = _plans.get(key)
    if plan is not None:
        return plan
    starts = block_starts.cpu().tolist()
    counts = kv_counts.cpu().tolist()
    indices = kv_indices.cpu().tolist()
    rows: dict[tuple[int, int], tuple[list[list[int]], list[list[int]]]] = {}
    for block, count in enumerate(counts):
        queries = list(range(starts[block], starts[block + 1]))
        keys = [t for j in indices[block][:count] for t in range(starts[j], starts[j + 1])]
        group = rows.setdefault((len(queries), len(keys)), ([], []))
        group[0].append(queries)
        group[1].append(keys)
    device = kv_counts.device
    plan = [BlockGroup(torch.tensor(q, device=device), torch.tensor(k, device=device)) for q, k in rows.values()]
    if len(_plans) > 64:
        _plans.clear()
    _plans[key] = plan
    return plan


def gather_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_counts: torch.Tensor,
    kv_indices: torch.Tensor,
    block_starts: torch.Tensor,
    scale: float | None,
) -> torch.Tensor:
    """out[..., i, :] = softmax(q_i K_S^T * scale) V_S over the key tokens S its block keeps."""
    out = q.new_empty(q.shape[:-1] + (v.shape[-1],))
    batch, heads = q.shape[:2]
    differentiable = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    for group in _plan(kv_counts, kv_indices, block_starts):
        rows, query_len = group.query_index.shape
        per_row = batch * heads * group.key_index.shape[1] * (k.shape[-1] + v.shape[-1])
        step = max(1, GATHER_ELEMENTS_PER_CHUNK // max(per_row, 1))
        for first in range(0, rows, step):
            q_index = group.query_index[first:first + step]
            k_index = group.key_index[first:first + step]
            chunk = q_index.shape[0]
            q_g = q[:, :, q_index].reshape(batch, heads * chunk, query_len, -1)
            k_g = k[:, :, k_index].reshape(batch, heads * chunk, k_index.shape[1], -1)
            v_g = v[:, :, k_index].reshape(batch, heads * chunk, k_index.shape[1], -1)
            result = F.scaled_dot_product_attention(q_g, k_g, v_g, scale=scale)
            result = result.reshape(batch, heads, chunk * query_len, -1)
            if differentiable:
                out = out.index_copy(2, q_index.reshape(-1), result)
            else:
                out.index_copy_(2, q_index.reshape(-1), result)
    return out
