"""An independent dense reference for masked attention, shared by the tests."""

from __future__ import annotations

import math

import torch


def dense_masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    token_mask: torch.Tensor,
    scale: float | None = None,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + bias, over the keys `token_mask` keeps) v, computed in float64.

    q, k: [..., N, D]; v: [..., N, Dv]; token_mask: bool [N, N] (query, key), or anything that
    broadcasts to the scores. `key_mask` [B, N] (q being [B, H, N, D]): bool (True keeps the
    key) or additive (added to the scaled scores; -inf removes the key). Rows that keep no key
    come out as zeros (as in FlexAttention). Differentiable; returns float64.
    """
    q, k, v = (x.to(torch.float64) for x in (q, k, v))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    mask = token_mask.to(device=q.device, dtype=torch.bool)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if key_mask is not None:
        key_mask = key_mask.to(q.device)
        if key_mask.dtype == torch.bool:
            keep = key_mask
        else:
            keep = key_mask != -math.inf
            scores = scores + key_mask.to(torch.float64).masked_fill(~keep, 0.0)[:, None, None, :]
        mask = mask & keep[:, None, None, :]
    has_keys = mask.any(dim=-1, keepdim=True)
    # Rows without keys keep all scores (no -inf-only rows, so no NaN) and are zeroed afterwards.
    scores = scores.masked_fill(~(mask | ~has_keys), -math.inf)
    probs = torch.softmax(scores, dim=-1) * has_keys
    return torch.matmul(probs, v)


def random_qkv(layout, batch=2, heads=3, head_dim=16, value_dim=None, dtype=torch.float32, device="cpu", seed=0):
    """Seeded random q, k, v [batch, heads, layout.seq_len, head_dim] (v: value_dim) for op tests."""
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, heads, layout.seq_len)
    q, k = (torch.randn(*shape, head_dim, generator=generator) for _ in range(2))
    v = torch.randn(*shape, value_dim or head_dim, generator=generator)
    return tuple(x.to(device=device, dtype=dtype) for x in (q, k, v))


def grid_labels(frames: int, tokens_per_frame: int, prefix: int = 0, suffix: int = 0) -> list:
    """(frame, token in frame) of each position of prefix + frames x tokens + suffix, frame-major; None: global."""
    video = [(f, p) for f in range(frames) for p in range(tokens_per_frame)]
    return [None] * prefix + video + [None] * suffix


def sculpt4d_token_mask(queries: list, keys: list | None = None, *, block_size: int,
                        strides=(1, 1, 2, 4, 8, 16), anchor_frames: int = 1) -> torch.Tensor:
    """bool [N, M]: the Sculpt4D rule evaluated token by token on position labels (see `grid_labels`).

    Query token (frame i, token p) attends key token (frame j, token r) iff ``j < anchor_frames`` or
    ``(p // block_size - r // block_size) % strides[min(|i - j|, len(strides) - 1)] == 0``; a global token
    (label None) attends and is attended by every token. Written here, independently of t4dopt.masks.
    """
    keys = queries if keys is None else keys

    def columns(labels):
        frame = torch.tensor([-1 if x is None else x[0] for x in labels])
        block = torch.tensor([-1 if x is None else x[1] // block_size for x in labels])
        return frame, block

    qf, qb = columns(queries)
    kf, kb = columns(keys)
    stride = torch.tensor(strides)[(qf[:, None] - kf[None, :]).abs().clamp(max=len(strides) - 1)]
    keep = (kf[None, :] < anchor_frames) | ((qb[:, None] - kb[None, :]) % stride == 0)
    return keep | (qf[:, None] < 0) | (kf[None, :] < 0)
