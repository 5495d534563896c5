"""CUDA path: FlexAttention with the block table turned directly into a ``BlockMask``.

No mask function is ever evaluated over N x N tokens (too slow at 65k tokens): the table maps
onto FlexAttention's uniform tiles with a few small tensor operations. FlexAttention's Triton
kernels need tiles that are multiples of their own BLOCK_M / BLOCK_N (128 in the default bf16
configurations), so the tile is the layout's block size when that is a multiple of 128 and 128
otherwise. A tile pair is kept when any of our block pairs under it is kept and "full" (no
mask_mod) when all are; so with equal blocks aligned to the tiles every kept tile is full and no
mask_mod runs. Partial tiles (unequal blocks: a frame's partial last block, prefix blocks; or
blocks smaller than a tile) look ``dense_blocks[block_of_token[q], block_of_token[kv]]`` up in
the mask_mod.

A key mask does not change the ``BlockMask`` (it is per batch element, the BlockMask is not): it is
a ``score_mod`` adding the key bias [B, N] to each score, which FlexAttention applies on full and
partial tiles alike. Rows whose every score is -inf come out of FlexAttention as zeros.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from t4dopt.compat import dispatch_key_sets, force_dispatch_keys

FLEX_TILE = 128

_compiled_flex = None


def tile_size(block_size: int) -> int:
    """The FlexAttention tile for a layout of nominal block size `block_size`."""
    return block_size if block_size % FLEX_TILE == 0 else FLEX_TILE


@dataclass(frozen=True)
class TileTable:
    """Our block table on uniform tiles: per query tile, the key tiles that are partial or full."""

    tile: int
    partial: torch.Tensor
    """bool [tiles, tiles]: some but not all token pairs of the tile pair are kept."""
    full: torch.Tensor
    """bool [tiles, tiles]: every (in-range) token pair of the tile pair is kept."""


def tile_table(dense: torch.Tensor, block_starts: torch.Tensor, tile: int) -> TileTable:
    """Classify every tile pair from bool `dense` [blocks, blocks] and int64 `block_starts`.

    A tile overlaps a range of consecutive blocks; 2-D prefix sums of the block mask count the
    kept block pairs under each tile pair in O(1), so this costs O(tiles^2 + blocks^2).
    """
    dense = dense.cpu().to(torch.bool)
    starts = block_starts.cpu().to(torch.int64)
    seq_len, blocks = int(starts[-1]), dense.shape[0]
    tiles = -(-seq_len // tile)
    first_token = torch.arange(tiles) * tile
    last_token = (first_token + tile).clamp(max=seq_len) - 1
    first = torch.searchsorted(starts, first_token, right=True) - 1
    last = torch.searchsorted(starts, last_token, right=True) - 1
    prefix = torch.zeros(blocks + 1, blocks + 1, dtype=torch.int64)
    prefix[1:, 1:] = dense.to(torch.int64).cumsum(0).cumsum(1)
    top, bottom = first.unsqueeze(1), last.unsqueeze(1) + 1
    left, right = first.unsqueeze(0), last.unsqueeze(0) + 1
    kept = prefix[bottom, right] - prefix[top, right] - prefix[bottom, left] + prefix[top, left]
    area = (bottom - top) * (right - left)
    full = kept == area
    return TileTable(tile, (kept > 0) & ~full, full)


def _ordered(mask: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(counts [1, 1, rows], indices [1, 1, rows, cols]) of a bool tile mask, kept columns first."""
    counts = mask.sum(dim=1).to(torch.int32)
    indices = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices.to(torch.int32)
    return counts[None, None].to(device), indices[None, None].contiguous().to(device)


def build_block_mask(dense: torch.Tensor, block_starts: torch.Tensor, block_size: int, device: torch.device):
    """The FlexAttention ``BlockMask`` for a block table, on `device`; broadcasts over B and H."""
    from torch.nn.attention.flex_attention import BlockMask

    table = tile_table(dense, block_starts, tile_size(block_size))
    seq_len = int(block_starts[-1])
    mask_mod = None
    if bool(table.partial.any()):
        lengths = (block_starts[1:] - block_starts[:-1]).cpu()
        block_of_token = torch.repeat_interleave(torch.arange(lengths.numel(), dtype=torch.int32), lengths).to(device)
        dense_blocks = dense.to(device=device, dtype=torch.bool)

        def mask_mod(b, h, q_idx, kv_idx):
            return dense_blocks[block_of_token[q_idx], block_of_token[kv_idx]]

    partial_counts, partial_indices = _ordered(table.partial, device)
    full_counts, full_indices = _ordered(table.full, device)
    return BlockMask.from_kv_blocks(
        partial_counts, partial_indices, full_counts, full_indices,
        BLOCK_SIZE=table.tile, mask_mod=mask_mod, seq_lengths=(seq_len, seq_len),
    )


def _flex():
    """flex_attention compiled once, on first use."""
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def _score_mod(key_bias: torch.Tensor | None):
    """The score_mod adding the key bias [B, N] (see `t4dopt.ops.key_mask`), or None without one."""
    if key_bias is None:
        return None

    def add_key_bias(score, b, h, q_idx, kv_idx):
        return score + key_bias[b, kv_idx]

    return add_key_bias


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask, scale: float,
            key_bias: torch.Tensor | None = None) -> torch.Tensor:
    """FlexAttention's inference kernel (the op's autograd formula calls `backward`); contiguous output."""
    with torch.no_grad():
        out = _flex()(q.detach(), k.detach(), v.detach(), score_mod=_score_mod(key_bias), block_mask=block_mask,
                      scale=scale)
    return out.contiguous()  # (FlexAttention follows q's stride order; the op's fake promises contiguous)


@contextlib.contextmanager
def _autograd_enabled() -> Iterator[None]:
    """Let autograd record inside an op kernel (the dispatcher excludes it below the op's autograd key)."""
    include, exclude = dispatch_key_sets()
    with force_dispatch_keys(include, exclude), torch.enable_grad():
        yield


def backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask,
             scale: float, key_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) by FlexAttention's own backward kernels, after recomputing the forward; contiguous."""
    with _autograd_enabled():
        inputs = tuple(x.detach().requires_grad_() for x in (q, k, v))
        out = _flex()(*inputs, score_mod=_score_mod(key_bias), block_mask=block_mask, scale=scale)
        dq, dk, dv = torch.autograd.grad(out, inputs, grad_out)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()
