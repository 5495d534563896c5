"""Block-sparse mask policies for joint spatio-temporal attention, as data.

A policy is a rule on block coordinates: query block (frame i, block u) attends key block
(frame j, block v) or not. Each public function here evaluates its rule over all block pairs
at once and returns a `BlockLayout`; nothing here knows about kernels or graphs.

Token order is the one video DiTs use for joint attention: ``prefix_tokens`` first (text or
global tokens, as CogVideoX puts its text), then frame after frame, ``tokens_per_frame`` tokens
each, then ``suffix_tokens`` (text after the video, as HunyuanVideo, Mochi, Framepack and
MotifVideo join ``[video, text]``). Each frame is cut into ``ceil(tokens_per_frame / block_size)``
blocks (the last one partial when the division is not exact); prefix and suffix tokens form
blocks of their own that attend, and are attended by, everything.

Besides the policies (approximations of dense attention, chosen with ``sparse``), `frame_causal`
builds the structured mask a model may pass itself (block-causal over frames, for diffusion
forcing), to intersect with a policy: ``policy_layout & frame_causal(...)``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence

import torch

from t4dopt.block_layout import BlockLayout, TokenGrid

BlockRule = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

SCULPT4D_STRIDES = (1, 1, 2, 4, 8, 16)


def _check_positive(name: str, value: int, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r}: expected an integer >= {minimum}")
    return value


def _block_starts(grid: TokenGrid, block_size: int) -> torch.Tensor:
    prefix = list(range(0, grid.prefix_tokens, block_size))
    frame = list(range(0, grid.tokens_per_frame, block_size))
    video_end = grid.prefix_tokens + grid.frames * grid.tokens_per_frame
    video = [grid.prefix_tokens + f * grid.tokens_per_frame + s for f in range(grid.frames) for s in frame]
    suffix = [video_end + s for s in range(0, grid.suffix_tokens, block_size)]
    return torch.tensor(prefix + video + suffix + [grid.seq_len], dtype=torch.int64)


def _evaluate(rule: BlockRule, frames: int, blocks_per_frame: int) -> torch.Tensor:
    """bool [frames * blocks_per_frame, same]: the rule on every (query, key) block pair."""
    n = frames * blocks_per_frame
    index = torch.arange(n)
    qf, qb = (index // blocks_per_frame).view(n, 1), (index % blocks_per_frame).view(n, 1)
    kf, kb = (index // blocks_per_frame).view(1, n), (index % blocks_per_frame).view(1, n)
    try:
        result = torch.as_tensor(rule(qf, qb, kf, kb))
        if result.shape != (n, n):
            result = result.expand(n, n)
        return result.to(torch.bool).clone()
    except (RuntimeError, TypeError, ValueError):
        # A rule written for Python ints rather than tensors: evaluate pair by pair.
        pairs = [
            [bool(rule(i // blocks_per_frame, i % blocks_per_frame, j // blocks_per_frame, j % blocks_per_frame))
             for j in range(n)]
            for i in range(n)
        ]
        return torch.tensor(pairs, dtype=torch.bool)


def from_rule(
    rule: BlockRule,
    frames: int,
    tokens_per_frame: int,
    *,
    block_size: int = 128,
    prefix_tokens: int = 0,
    suffix_tokens: int = 0,
    description: str = "custom",
) -> BlockLayout:
    """Layout from a rule ``rule(query_frame, query_block, key_frame, key_block) -> bool``.

    The rule is called once with broadcastable int64 tensors (columns for the query, rows for
    the key) and should return a bool tensor; a rule that only handles Python ints is called
    pair by pair instead. The rule covers the video blocks; prefix and suffix blocks attend,
    and are attended by, every block.
    """
    _check_positive("frames", frames)
    _check_positive("tokens_per_frame", tokens_per_frame)
    _check_positive("block_size", block_size)
    _check_positive("prefix_tokens", prefix_tokens, minimum=0)
    _check_positive("suffix_tokens", suffix_tokens, minimum=0)
    grid = TokenGrid(frames, tokens_per_frame, prefix_tokens, suffix_tokens)
    blocks_per_frame = math.ceil(tokens_per_frame / block_size)
    video = _evaluate(rule, frames, blocks_per_frame)
    prefix_blocks = math.ceil(prefix_tokens / block_size)
    video_end = prefix_blocks + video.shape[0]
    total = video_end + math.ceil(suffix_tokens / block_size)
    dense = torch.ones(total, total, dtype=torch.bool)
    dense[prefix_blocks:video_end, prefix_blocks:video_end] = video
    return BlockLayout.from_dense(dense, _block_starts(grid, block_size), block_size, description, grid)


def sculpt4d(
    frames: int,
    tokens_per_frame: int,
    *,
    block_size: int = 128,
    strides: Sequence[int] = SCULPT4D_STRIDES,
    anchor_frames: int = 1,
    prefix_tokens: int = 0,
    suffix_tokens: int = 0,
) -> BlockLayout:
    """Sculpt4D: first-frame anchor plus a time-decaying strided diagonal.

    (i, u) attends (j, v) iff ``j < anchor_frames`` or ``(u - v) % s == 0`` with
    ``s = strides[min(|i - j|, len(strides) - 1)]``.
    """
    strides = tuple(strides)
    if not strides or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in strides):
        raise ValueError(f"strides={strides!r}: expected a non-empty sequence of integers >= 1")
    _check_positive("anchor_frames", anchor_frames, minimum=0)
    stride_table = torch.tensor(strides)

    def rule(qf, qb, kf, kb):
        stride = stride_table[(qf - kf).abs().clamp(max=len(strides) - 1)]
        return (kf < anchor_frames) | ((qb - kb) % stride == 0)

    name = "sculpt4d" if anchor_frames else "sculpt4d-no-anchor"
    return from_rule(rule, frames, tokens_per_frame, block_size=block_size,
                     prefix_tokens=prefix_tokens, suffix_tokens=suffix_tokens,
                     description=f"{name}(strides={list(strides)}, anchor_frames={anchor_frames})")


def sculpt4d_no_anchor(
    frames: int,
    tokens_per_frame: int,
    *,
    block_size: int = 128,
    strides: Sequence[int] = SCULPT4D_STRIDES,
    prefix_tokens: int = 0,
    suffix_tokens: int = 0,
) -> BlockLayout:
    """Sculpt4D's ablation without the first-frame anchor."""
    return sculpt4d(frames, tokens_per_frame, block_size=block_size, strides=strides,
                    anchor_frames=0, prefix_tokens=prefix_tokens, suffix_tokens=suffix_tokens)


def fixed_stride(
    frames: int,
    tokens_per_frame: int,
    *,
    block_size: int = 128,
    stride: int = 4,
    anchor_frames: int = 1,
    prefix_tokens: int = 0,
    suffix_tokens: int = 0,
) -> BlockLayout:
    """Sculpt4D's fixed-stride ablation: dense within a frame, one stride for every other frame."""
    _check_positive("stride", stride)
    _check_positive("anchor_frames", anchor_frames, minimum=0)

    def rule(qf, qb, kf, kb):
        return (kf < anchor_frames) | (qf == kf) | ((qb - kb) % stride == 0)

    return from_rule(rule, frames, tokens_per_frame, block_size=block_size,
                     prefix_tokens=prefix_tokens, suffix_tokens=suffix_tokens,
                     description=f"fixed-stride(stride={stride}, anchor_frames={anchor_frames})")


def temporal_only(
    frames: int,
    tokens_per_frame: int,
    *,
    block_size: int = 128,
    prefix_tokens: int = 0,
    suffix_tokens: int = 0,
) -> BlockLayout:
    """Each block attends only the block at the same position in every frame."""

    def rule(qf, qb, kf, kb):
        return qb == kb

    return from_rule(rule, frames, tokens_per_frame, block_size=block_size,
                     prefix_tokens=prefix_tokens, suffix_tokens=suffix_tokens, description="temporal-only")


def window(
    frames: int,
    tokens_per_frame: int,
    *,
    block_size: int = 128,
    window: int = 1,
    prefix_tokens: int = 0,
    suffix_tokens: int = 0,
) -> BlockLayout:
    """Dense attention to the frames within temporal distance ``window``."""
    _check_positive("window", window, minimum=0)

    def rule(qf, qb, kf, kb):
        return (qf - kf).abs() <= window

    return from_rule(rule, frames, tokens_per_frame, block_size=block_size,
                     prefix_tokens=prefix_tokens, suffix_tokens=suffix_tokens,
                     description=f"window(window={window})")


def radial(
    frames: int,
    tokens_per_frame: int,
    *,
    block_size: int = 128,
    prefix_tokens: int = 0,
    suffix_tokens: int = 0,
) -> BlockLayout:
    """Radial Attention's decaying bands, for comparison.

    Frames at distance 0 or 1 are dense; at distance d >= 2 a block attends the blocks within
    ``blocks_per_frame / 2**floor(log2 d)`` positions of its own, so the band's width (and its
    density) halves each time the temporal distance doubles.
    """
    blocks_per_frame = math.ceil(tokens_per_frame / block_size)

    def rule(qf, qb, kf, kb):
        distance = (qf - kf).abs()
        band = torch.floor(torch.log2(distance.clamp(min=1).double())).long()
        width = torch.div(blocks_per_frame, 2 ** band, rounding_mode="floor").clamp(min=1)
        return (distance <= 1) | ((qb - kb).abs() < width)

    return from_rule(rule, frames, tokens_per_frame, block_size=block_size,
                     prefix_tokens=prefix_tokens, suffix_tokens=suffix_tokens, description="radial")


def frame_causal(
    frames: int,
    tokens_per_frame: int,
    *,
    block_size: int = 128,
    frames_per_block: int = 1,
    prefix_tokens: int = 0,
    suffix_tokens: int = 0,
) -> BlockLayout:
    """Block-causal over frames: frame i attends frame j iff ``j // frames_per_block <= i // frames_per_block``.

    Not a policy but the structured mask diffusion-forcing models pass themselves (SkyReels-V2's
    ``num_frame_per_block``), to intersect with a policy: ``layout & frame_causal(...)``.
    """
    _check_positive("frames_per_block", frames_per_block)

    def rule(qf, qb, kf, kb):
        return torch.div(kf, frames_per_block, rounding_mode="floor") <= torch.div(qf, frames_per_block,
                                                                                  rounding_mode="floor")

    return from_rule(rule, frames, tokens_per_frame, block_size=block_size, prefix_tokens=prefix_tokens,
                     suffix_tokens=suffix_tokens, description=f"frame-causal(frames_per_block={frames_per_block})")


POLICIES: dict[str, Callable[..., BlockLayout]] = {
    "sculpt4d": sculpt4d,
    "sculpt4d-no-anchor": sculpt4d_no_anchor,
    "fixed-stride": fixed_stride,
    "temporal-only": temporal_only,
    "window": window,
    "radial": radial,
}


GRID_PARAMETERS = ("prefix_tokens", "suffix_tokens")
"""Keyword parameters of every policy that describe the token grid, not the policy."""


def policy_parameters(policy: str) -> tuple[str, ...]:
    """The keyword parameters a named policy accepts (besides the token grid: frames, tokens_per_frame,
    prefix_tokens, suffix_tokens)."""
    signature = inspect.signature(POLICIES[policy])
    return tuple(name for name, p in signature.parameters.items()
                 if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in GRID_PARAMETERS)


def build(
    policy: str | BlockRule,
    frames: int,
    tokens_per_frame: int,
    *,
    prefix_tokens: int = 0,
    suffix_tokens: int = 0,
    **params,
) -> BlockLayout:
    """Layout for a named policy (with its parameters) or a user rule on block coordinates."""
    if callable(policy):
        return from_rule(policy, frames, tokens_per_frame, prefix_tokens=prefix_tokens,
                         suffix_tokens=suffix_tokens, **params)
    if policy not in POLICIES:
        raise ValueError(f"sparse policy {policy!r} is unknown; allowed: {sorted(POLICIES)} or a callable")
    return POLICIES[policy](frames, tokens_per_frame, prefix_tokens=prefix_tokens, suffix_tokens=suffix_tokens,
                            **params)
