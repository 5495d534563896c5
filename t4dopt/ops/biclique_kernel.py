"""CPU block-sparse attention: dense tiles over bicliques of the block mask, merged by log-sum-exp.

The key blocks are cut into strips (one per frame, plus one for the prefix blocks). Within a
strip, query blocks that keep exactly the same key blocks form a biclique: all of them attend
all of those keys. For Sculpt4D masks these are the stride's residue classes (every s-th block
of a frame attends every s-th block of another), the anchor frame (every query attends it) and
the dense near frames. Each biclique is one dense attention problem over gathered tokens;
bicliques of the same shape run as one batched call of torch's CPU flash kernel, which also
returns each row's log-sum-exp, and the partial results of a query row are merged with those.
The work is the kept blocks' work; nothing N x N is ever formed.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

DEFAULT_STRIP_BLOCKS = 8
FLASH_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass(frozen=True)
class TileBatch:
    """Bicliques of one shape: query token indices [T, Lq] attend key token indices [T, Lk]."""

    query_index: torch.Tensor
    key_index: torch.Tensor


_plans: dict[tuple, list[TileBatch]] = {}


def _strips(num_blocks: int, prefix_blocks: int, frame_blocks: int) -> list[tuple[int, int]]:
    width = frame_blocks or DEFAULT_STRIP_BLOCKS
    edges = ([0] if prefix_blocks else []) + list(range(prefix_blocks, num_blocks, width)) + [num_blocks]
    return [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def _dense(kv_counts: torch.Tensor, kv_indices: torch.Tensor) -> np.ndarray:
    counts = kv_counts.cpu().numpy()
    indices = kv_indices.cpu().numpy()
    n = counts.shape[0]
    dense = np.zeros((n, n), dtype=bool)
    keep = np.arange(indices.shape[1])[None, :] < counts[:, None]
    rows = np.broadcast_to(np.arange(n)[:, None], indices.shape)
    dense[rows[keep], indices[keep]] = True
    return dense


def plan(kv_counts: torch.Tensor, kv_indices: torch.Tensor, block_starts: torch.Tensor,
         prefix_blocks: int = 0, frame_blocks: int = 0) -> list[TileBatch]:
    """The biclique batches of a block table; cached per table."""
    key = (kv_counts.data_ptr(), kv_indices.data_ptr(), block_starts.data_ptr(), tuple(kv_indices.shape),
           int(block_starts[-1]), prefix_blocks, frame_blocks)
    cached = _plans.get(key)
    if cached is not None:
        return cached
    dense = _dense(kv_counts, kv_indices)
    starts = block_starts.cpu().numpy()
    tokens = [np.arange(starts[b], starts[b + 1]) for b in range(dense.shape[0])]
    shapes: dict[tuple[int, int], tuple[list, list]] = defaultdict(lambda: ([], []))
    for first, last in _strips(dense.shape[0], prefix_blocks, frame_blocks):
        strip = dense[first:last]
        groups: dict[bytes, list[int]] = defaultdict(list)
        for column in np.flatnonzero(strip.any(axis=0)):
            groups[strip[:, column].tobytes()].append(column)
        for columns in groups.values():
            rows = np.flatnonzero(strip[:, columns[0]]) + first
            query = np.concatenate([tokens[r] for r in rows])
            keys = np.concatenate([tokens[c] for c in columns])
            bucket = shapes[(query.size, keys.size)]
            bucket[0].append(query)
            bucket[1].append(keys)
    result = [TileBatch(torch.from_numpy(np.stack(q)), torch.from_numpy(np.stack(k))) for q, k in shapes.values()]
    if len(_plans) > 64:
        _plans.clear()
    _plans[key] = result
    return result


def cpu_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_counts: torch.Tensor,
    kv_indices: torch.Tensor,
    block_starts: torch.Tensor,
    scale: float | None,
    prefix_blocks: int = 0,
    frame_blocks: int = 0,
) -> torch.Tensor:
    """Forward of block-sparse attention on CPU tensors [B, H, N, D] (no autograd)."""
    batch, heads, seq_len, _ = q.shape
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    indices, outputs, lses = [], [], []
    q_rows, k_rows, v_rows = (t.reshape(batch * heads, seq_len, t.shape[-1]) for t in (q, k, v))
    for tiles in plan(kv_counts, kv_indices, block_starts, prefix_blocks, frame_blocks):
        count, query_len = tiles.query_index.shape
        key_len = tiles.key_index.shape[1]
        key_index = tiles.key_index.reshape(-1)
        q_t = q_rows.index_select(1, tiles.query_index.reshape(-1)).view(batch, heads * count, query_len, -1)
        k_t = k_rows.index_select(1, key_index).view(batch, heads * count, key_len, -1)
        v_t = v_rows.index_select(1, key_index).view(batch, heads * count, key_len, -1)
        out, lse = flash(q_t, k_t, v_t, scale=scale)
        indices.append(tiles.query_index.reshape(-1))
        outputs.append(out.reshape(batch, heads, count * query_len, -1))
        lses.append(lse.reshape(batch, heads, count * query_len))
    index = torch.cat(indices)
    lse = torch.cat(lses, dim=2)
    out = torch.cat(outputs, dim=2).float()
    row_max = torch.full((batch, heads, seq_len), float("-inf"), dtype=lse.dtype)
    row_max.scatter_reduce_(2, index.expand(batch, heads, -1), lse, reduce="amax")
    weight = torch.exp(lse - row_max[:, :, index])
    total = torch.zeros((batch, heads, seq_len), dtype=lse.dtype).index_add_(2, index, weight)
    merged = torch.zeros((batch, heads, seq_len, v.shape[-1]), dtype=out.dtype)
    merged.index_add_(2, index, out * weight.unsqueeze(-1))
    return (merged / total.unsqueeze(-1)).to(q.dtype)
