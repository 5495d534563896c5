"""CUDA path: FlexAttention with the block table turned directly into a BlockMask.

No mask function is evaluated over N x N tokens: when every block has length ``block_size``
our table is FlexAttention's table (every kept block "full", no mask_mod). When blocks are
unequal (partial last block of a frame, prefix blocks), our blocks are mapped onto
FlexAttention's uniform tiles: a tile pair is kept when any block pair under it is kept, full
when all are, and the partial tiles consult a small [blocks, blocks] lookup in the mask_mod.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_block_masks: dict[tuple, object] = {}
_compiled_flex = None


@dataclass(frozen=True)
class TileTable:
    """Per query tile: kept key tiles that need the mask_mod (partial) and those that do not (full)."""

    partial_counts: torch.Tensor
    partial_indices: torch.Tensor
    full_counts: torch.Tensor
    full_indices: torch.Tensor
    block_of_token: torch.Tensor
    dense_blocks: torch.Tensor

    @property
    def needs_mask_mod(self) -> bool:
        return bool(self.partial_counts.any())


def _dense_blocks(kv_counts: torch.Tensor, kv_indices: torch.Tensor) -> torch.Tensor:
    n = kv_counts.numel()
    keep = torch.arange(kv_indices.shape[1], device=kv_counts.device).unsqueeze(0) < kv_counts.unsqueeze(1)
    dense = torch.zeros(n, n, dtype=torch.bool, device=kv_counts.device)
    rows = torch.arange(n, device=kv_counts.device).unsqueeze(1).expand_as(kv_indices)
    dense[rows[keep], kv_indices.long()[keep]] = True
    return dense


def _table_rows(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    counts = mask.sum(dim=1).to(torch.int32)
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices.to(torch.int32)
    return counts, order


def tile_table(kv_counts: torch.Tensor, kv_indices: torch.Tensor, block_starts: torch.Tensor, tile: int) -> TileTable:
    """Map our (possibly unequal) blocks onto uniform tiles of `tile` tokens."""
    device = kv_counts.device
    seq_len = int(block_starts[-1])
    tiles = -(-seq_len // tile)
    lengths = block_starts[1:] - block_starts[:-1]
    block_of_token = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths)
    dense = _dense_blocks(kv_counts, kv_indices)
    # overlap[t, b]: tokens of block b inside tile t.
    tile_of_token = torch.arange(seq_len, device=device) // tile
    overlap = torch.zeros(tiles, lengths.numel(), dtype=torch.float64, device=device)
    overlap.index_put_((tile_of_token, block_of_token), torch.ones(seq_len, dtype=torch.float64, device=device),
                       accumulate=True)
    kept_pairs = overlap @ dense.to(torch.float64) @ overlap.T
    all_pairs = overlap.sum(1, keepdim=True) @ overlap.sum(1, keepdim=True).T
    full = (kept_pairs == all_pairs) & (all_pairs > 0)
    partial = (kept_pairs > 0) & ~full
    full_counts, full_indices = _table_rows(full)
    partial_counts, partial_indices = _table_rows(partial)
    return TileTable(partial_counts, partial_indices, full_counts, full_indices, block_of_token, dense)


def block_mask_for(kv_counts: torch.Tensor, kv_indices: torch.Tensor, block_starts: torch.Tensor, block_size: int):
    """A FlexAttention BlockMask for the table, cached per table and device."""
    from torch.nn.attention.flex_attention import BlockMask

    key = (kv_counts.data_ptr(), kv_indices.data_ptr(), block_starts.data_ptr(), kv_counts.device, block_size)
    cached = _block_masks.get(key)
    if cached is not None:
        return cached
    table = tile_table(kv_counts, kv_indices, block_starts, block_size)
    seq_len = int(block_starts[-1])
    if table.needs_mask_mod:
        block_of_token, dense = table.block_of_token, table.dense_blocks

        def mask_mod(b, h, q_idx, kv_idx):
            return dense[block_of_token[q_idx], block_of_token[kv_idx]]
    else:
        mask_mod = None
    block_mask = BlockMask.from_kv_blocks(
        table.partial_counts[None, None], table.partial_indices[None, None],
        table.full_counts[None, None], table.full_indices[None, None],
        BLOCK_SIZE=block_size, mask_mod=mask_mod, seq_lengths=(seq_len, seq_len),
    )
    if len(_block_masks) > 64:
        _block_masks.clear()
    _block_masks[key] = block_mask
    return block_mask


def flex_block_sparse_attention(q, k, v, kv_counts, kv_indices, block_starts, block_size, scale, *, compiled=True):
    """Block-sparse attention through FlexAttention (compiled on first use)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    block_mask = block_mask_for(kv_counts, kv_indices, block_starts, block_size)
    if not compiled:
        return flex_attention(q, k, v, block_mask=block_mask, scale=scale)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=block_mask, scale=scale)
