"""``t4d::block_sparse_attention_chunk``: one chunk pair of a global layout, with its log-sum-exp (ring attention).

Checked against the explicit token mask's rectangle in float64 (`reference`), for chunk cuts that fall inside
blocks and frames; merged over the key chunks it must give the whole-sequence rows; rows that keep no key
of a chunk give zeros and -inf; gradients (the log-sum-exp's included) by gradcheck in float64.
"""

import math

import pytest
import torch

from reference import dense_masked_attention, grid_labels, sculpt4d_token_mask
from t4dopt.block_layout import BlockLayout
from t4dopt.context_parallel import ring_plan
from t4dopt.errors import T4DOptionError
from t4dopt.masks import sculpt4d
from t4dopt.ops.chunk import block_sparse_attention_chunk, merge_chunks, pair_keeps_blocks, rows_without_keys

FRAMES, TOKENS, BLOCK, STRIDES = 5, 12, 5, (1, 2, 4)


@pytest.fixture(scope="module")
def layout():
    return sculpt4d(FRAMES, TOKENS, block_size=BLOCK, strides=STRIDES, anchor_frames=0)


@pytest.fixture(scope="module")
def mask():
    return sculpt4d_token_mask(grid_labels(FRAMES, TOKENS), block_size=BLOCK, strides=STRIDES, anchor_frames=0)


def _qkv(n, dtype=torch.float32, seed=0, batch=2, heads=3, head_dim=8):
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, heads, n, head_dim, generator=generator, dtype=dtype) for _ in range(3))


def _lse(q, k, mask):
    scores = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
    return torch.logsumexp(scores.masked_fill(~mask, -math.inf), dim=-1)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_chunk_pairs_equal_the_mask_and_merge_to_the_whole_rows(layout, mask, world):
    n = layout.seq_len
    q, k, v = _qkv(n)
    whole = dense_masked_attention(q, k, v, mask)
    size = n // world  # 30, 20, 15 tokens: cuts inside blocks (5) and frames (12)
    for rank in range(world):
        rows = slice(rank * size, (rank + 1) * size)
        out = lse = None
        for j in range(world):
            keys = slice(j * size, (j + 1) * size)
            part, part_lse = block_sparse_attention_chunk(q[:, :, rows], k[:, :, keys], v[:, :, keys], layout,
                                                          rank * size, j * size)
            sub = mask[rows, keys]
            torch.testing.assert_close(part.double(), dense_masked_attention(q[:, :, rows], k[:, :, keys],
                                                                             v[:, :, keys], sub), rtol=0, atol=1e-5)
            assert part_lse.dtype == torch.float32
            torch.testing.assert_close(part_lse.double(), _lse(q[:, :, rows], k[:, :, keys], sub), rtol=0, atol=1e-5)
            out, lse = merge_chunks(out, lse, part, part_lse)
        torch.testing.assert_close(out.double(), whole[:, :, rows], rtol=0, atol=1e-5)


def test_rows_without_keys_give_zeros_and_minus_infinity():
    # Query block 0 keeps only key block 2, query block 2 nothing: chunk [0, 8) x [0, 8) leaves rows 0:4 empty.
    dense = torch.tensor([[0, 0, 1], [1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    layout = BlockLayout.from_dense(dense, torch.tensor([0, 4, 8, 12]), 4)
    q, k, v = _qkv(12)
    out, lse = block_sparse_attention_chunk(q[:, :, :8], k[:, :, :8], v[:, :, :8], layout, 0, 0)
    assert rows_without_keys(layout, 0, 8, 0, 8) == 4
    assert torch.isneginf(lse[:, :, :4]).all() and torch.isfinite(lse[:, :, 4:]).all()
    assert (out[:, :, :4] == 0).all()
    # Merged with a chunk that does keep keys for them: the keys of that chunk alone, no NaN.
    rest, rest_lse = block_sparse_attention_chunk(q[:, :, :8], k[:, :, 8:], v[:, :, 8:], layout, 0, 8)
    merged, merged_lse = merge_chunks(out, lse, rest, rest_lse)
    want = dense_masked_attention(q[:, :, :8], k, v, layout.token_mask()[:8])
    torch.testing.assert_close(merged.double(), want, rtol=0, atol=1e-5)
    assert not merged.isnan().any() and not merged_lse.isnan().any()
    # A pair that keeps no block at all: nothing to compute, and the ring skips it.
    assert not pair_keeps_blocks(layout, 8, 4, 8, 4)
    out, lse = block_sparse_attention_chunk(q[:, :, 8:], k[:, :, 8:], v[:, :, 8:], layout, 8, 8)
    assert (out == 0).all() and torch.isneginf(lse).all()


def test_gradients_of_out_and_lse(layout):
    small = sculpt4d(3, 6, block_size=4, strides=(1, 2), anchor_frames=0)
    q, k, v = (x.requires_grad_() for x in _qkv(small.seq_len, torch.float64, seed=1, batch=1, heads=1, head_dim=4))

    def chunk(q, k, v):  # query tokens 3:11, key tokens 7:16: both cut inside blocks
        out, lse = block_sparse_attention_chunk(q[:, :, 3:11], k[:, :, 7:16], v[:, :, 7:16], small, 3, 7)
        return out, lse

    assert rows_without_keys(small, 3, 8, 7, 9) == 0
    torch.autograd.gradcheck(chunk, (q, k, v))


def test_ring_plan_skips_pairs_that_keep_no_block():
    # Frame-local attention (window 0): a query chunk of whole frames keeps only its own key chunk.
    from t4dopt.masks import window

    local = window(4, 8, block_size=4, window=0)
    assert [ring_plan(local, r, 4).kept for r in range(4)] == [(0,), (1,), (2,), (3,)]
    assert ring_plan(sculpt4d(4, 8, block_size=4), 1, 2).kept == (1, 0)
    with pytest.raises(T4DOptionError, match="ring_degree"):
        ring_plan(local, 0, 3)
