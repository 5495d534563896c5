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
import reprlib
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


def _rule_name(rule: BlockRule) -> str:
    return getattr(rule, "__qualname__", None) or getattr(rule, "__name__", None) or repr(rule)


def _block_mask(result: object, n: int, name: str) -> torch.Tensor:
    """The rule's answer for all pairs as bool [n, n]; refuses anything but bool values broadcast to the pairs."""
    try:
        mask = torch.as_tensor(result)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"sparse policy {name} returned {reprlib.repr(result)} ({type(result).__name__}); a rule "
                         "returns bool (a bool tensor when called with tensors)") from None
    if mask.dtype != torch.bool:
        raise ValueError(f"sparse policy {name} returned {mask.dtype} values; a rule returns bool "
                         "(use comparisons and &, |, ~ rather than arithmetic)")
    if mask.dim() not in (0, 2) or any(size not in (1, n) for size in mask.shape):
        raise ValueError(f"sparse policy {name} returned a tensor of shape {list(mask.shape)} for {n} blocks; "
                         f"expected one that broadcasts to [{n}, {n}] (query blocks x key blocks)")
    return mask.expand(n, n).clone()


def _as_bool(value: object) -> bool | None:
    """A rule's answer for one pair as a bool (True, False, or a one-element bool tensor / array), else None."""
    if isinstance(value, bool):
        return value
    try:
        mask = torch.as_tensor(value)
    except (RuntimeError, TypeError, ValueError):
        return None
    return bool(mask) if mask.dtype == torch.bool and mask.numel() == 1 else None


def _pair_by_pair(rule: BlockRule, frames: int, blocks_per_frame: int, name: str) -> torch.Tensor:
    """A rule written for Python ints: called once per block pair, each answer checked."""
    blocks = [divmod(index, blocks_per_frame) for index in range(frames * blocks_per_frame)]
    mask = [[False] * len(blocks) for _ in blocks]
    for i, query in enumerate(blocks):
        for j, key in enumerate(blocks):
            coords = (*query, *key)
            try:
                value = rule(*coords)
            except Exception as error:
                raise ValueError(f"sparse policy {name} raised {type(error).__name__} ({error}) for "
                                 f"{_pair(coords)}") from error
            answer = _as_bool(value)
            if answer is None:
                raise ValueError(f"sparse policy {name} returned {reprlib.repr(value)} ({type(value).__name__}) for "
                                 f"{_pair(coords)}; a rule returns True or False")
            mask[i][j] = answer
    return torch.tensor(mask, dtype=torch.bool)


def _pair(coords: tuple[int, int, int, int]) -> str:
    return f"query (frame {coords[0]}, block {coords[1]}) and key (frame {coords[2]}, block {coords[3]})"


def _evaluate(rule: BlockRule, frames: int, blocks_per_frame: int) -> torch.Tensor:
    """bool [frames * blocks_per_frame, same]: the rule on every (query, key) block pair.

    Called once on broadcastable tensors; a rule that fails on tensors or returns None (one written
    for Python ints) is called pair by pair. Anything but bool answers is refused, and an error the
    rule raises is reported with the block pair it raised for.
    """
    n = frames * blocks_per_frame
    name = _rule_name(rule)
    index = torch.arange(n)
    qf, qb = (index // blocks_per_frame).view(n, 1), (index % blocks_per_frame).view(n, 1)
    kf, kb = (index // blocks_per_frame).view(1, n), (index % blocks_per_frame).view(1, n)
    try:
        result = rule(qf, qb, kf, kb)
    except Exception:
        result = None
    if result is None:
        return _pair_by_pair(rule, frames, blocks_per_frame, name)
    return _block_mask(result, n, name)


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
    and are attended by, every block. ValueError when the rule answers anything but bool (None,
    numbers, a tensor of another shape) or raises (naming the block pair). A query block left with
    no key block is allowed here (its rows come out as zeros); `empty_row_reason` finds one.
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


def _video_block(layout: BlockLayout, index: int) -> str:
    """Block `index` of a policy's layout as ``frame f, block b`` (or as a global-token block)."""
    grid = layout.grid
    if grid is None:
        return f"block {index}"
    prefix_blocks = math.ceil(grid.prefix_tokens / layout.block_size)
    blocks_per_frame = math.ceil(grid.tokens_per_frame / layout.block_size)
    video = index - prefix_blocks
    if not 0 <= video < grid.frames * blocks_per_frame:
        return f"global-token block {index}"
    return f"frame {video // blocks_per_frame}, block {video % blocks_per_frame}"


def empty_row_reason(layout: BlockLayout) -> str | None:
    """Where a query block of `layout` keeps no key block (its output rows would be zeros), or None.

    The op allows such rows, a mask policy must not have them: it approximates dense attention.
    """
    empty = (~layout.to_dense().any(dim=1)).nonzero()
    if not len(empty):
        return None
    return (f"query block ({_video_block(layout, int(empty[0]))}) keeps no key block ({len(empty)} such query "
            "blocks): its output rows would be zeros")


def dense_reason(layout: BlockLayout) -> str | None:
    """Why `layout` skips nothing (every query block keeps every key block), or None when it skips some.

    A site rewritten with such a layout is dense attention in another kernel, not a sparse one.
    """
    if not bool(layout.to_dense().all()):
        return None
    grid = layout.grid
    if grid is None:
        return f"{layout.description or 'the layout'} keeps all {layout.num_blocks} x {layout.num_blocks} block pairs"
    why = ""
    if grid.tokens_per_frame <= layout.block_size:
        why = (f" (block_size={layout.block_size} >= tokens_per_frame={grid.tokens_per_frame}: each frame is one "
               f"block)")
    return (f"{layout.description or 'the layout'} keeps every block pair of {grid.frames} frames of "
            f"{math.ceil(grid.tokens_per_frame / layout.block_size)} block(s){why}: density 1.0, nothing to skip")


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
