"""Mask policies against a reference written directly from each rule, token by token.

The reference maps every token to (frame, block in frame), or marks it as a prefix token, with
plain loops, and evaluates the rules on Python ints; it shares no code with `t4dopt.masks`.
"""

import re
from collections.abc import Callable

import pytest
import torch

from t4dopt import masks
from t4dopt.block_layout import BlockLayout

IntRule = Callable[[int, int, int, int], bool]
Coord = tuple[int | None, int]

FRAMES = (1, 2, 5, 16)
PREFIXES = (0, 7, 32)
# (tokens_per_frame, block_size): a partial last block per frame, and an exact multiple.
SHAPES = ((40, 16), (48, 16))


def token_coords(frames: int, tokens_per_frame: int, block_size: int, prefix: int) -> list[Coord]:
    """(frame, block in frame) of every token; prefix tokens get frame None and their prefix block."""
    coords: list[Coord] = []
    for token in range(prefix + frames * tokens_per_frame):
        if token < prefix:
            coords.append((None, token // block_size))
        else:
            frame, offset = divmod(token - prefix, tokens_per_frame)
            coords.append((frame, offset // block_size))
    return coords


def reference_mask(rule: IntRule, frames: int, tokens_per_frame: int, block_size: int, prefix: int) -> torch.Tensor:
    """bool [seq, seq]: token q attends token k; prefix tokens attend and are attended by all."""
    coords = token_coords(frames, tokens_per_frame, block_size, prefix)
    rows: dict[Coord, list[bool]] = {}
    mask = []
    for query in coords:
        if query not in rows:
            rows[query] = [
                query[0] is None or key[0] is None or bool(rule(query[0], query[1], key[0], key[1]))
                for key in coords
            ]
        mask.append(rows[query])
    return torch.tensor(mask, dtype=torch.bool)


def reference_block_starts(frames: int, tokens_per_frame: int, block_size: int, prefix: int) -> list[int]:
    coords = token_coords(frames, tokens_per_frame, block_size, prefix)
    starts = [t for t in range(len(coords)) if t == 0 or coords[t] != coords[t - 1]]
    return starts + [len(coords)]


def sculpt4d_rule(strides=(1, 1, 2, 4, 8, 16), anchor_frames=1) -> IntRule:
    def rule(i, u, j, v):
        stride = strides[min(abs(i - j), len(strides) - 1)]
        return j < anchor_frames or (u - v) % stride == 0
    return rule


def fixed_stride_rule(stride=4, anchor_frames=1) -> IntRule:
    return lambda i, u, j, v: j < anchor_frames or i == j or (u - v) % stride == 0


def window_rule(width=1) -> IntRule:
    return lambda i, u, j, v: abs(i - j) <= width


def radial_rule(blocks_per_frame: int) -> IntRule:
    def rule(i, u, j, v):
        distance = abs(i - j)
        if distance <= 1:
            return True
        band = max(blocks_per_frame // 2 ** (distance.bit_length() - 1), 1)
        return abs(u - v) < band
    return rule


def tensor_friendly_user_rule(i, u, j, v):
    return (i == j) | ((u + 2 * v) % 3 == 0)


def int_only_user_rule(i, u, j, v):
    if i == j:
        return u >= v
    return (u * v + i) % 2 == 0


# (name, policy for masks.build, its parameters, reference rule from blocks_per_frame)
CASES = [
    ("sculpt4d", "sculpt4d", {}, lambda bpf: sculpt4d_rule()),
    ("sculpt4d-strides", "sculpt4d", {"strides": (1, 2, 3), "anchor_frames": 2},
     lambda bpf: sculpt4d_rule((1, 2, 3), 2)),
    ("sculpt4d-no-anchor", "sculpt4d-no-anchor", {}, lambda bpf: sculpt4d_rule(anchor_frames=0)),
    ("fixed-stride", "fixed-stride", {}, lambda bpf: fixed_stride_rule()),
    ("fixed-stride-3", "fixed-stride", {"stride": 3, "anchor_frames": 0}, lambda bpf: fixed_stride_rule(3, 0)),
    ("temporal-only", "temporal-only", {}, lambda bpf: lambda i, u, j, v: u == v),
    ("window", "window", {}, lambda bpf: window_rule()),
    ("window-0", "window", {"window": 0}, lambda bpf: window_rule(0)),
    ("window-2", "window", {"window": 2}, lambda bpf: window_rule(2)),
    ("radial", "radial", {}, radial_rule),
    ("user-tensor", tensor_friendly_user_rule, {}, lambda bpf: tensor_friendly_user_rule),
    ("user-int", int_only_user_rule, {}, lambda bpf: int_only_user_rule),
]


def build(policy, frames, tokens_per_frame, block_size, prefix, params) -> BlockLayout:
    return masks.build(policy, frames, tokens_per_frame, prefix_tokens=prefix, block_size=block_size, **params)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"tpf{s[0]}-bs{s[1]}")
@pytest.mark.parametrize("prefix", PREFIXES, ids=lambda p: f"prefix{p}")
@pytest.mark.parametrize("frames", FRAMES, ids=lambda f: f"F{f}")
@pytest.mark.parametrize("name, policy, params, make_rule", CASES, ids=[c[0] for c in CASES])
def test_token_mask_matches_reference(name, policy, params, make_rule, frames, prefix, shape):
    tokens_per_frame, block_size = shape
    blocks_per_frame = -(-tokens_per_frame // block_size)
    layout = build(policy, frames, tokens_per_frame, block_size, prefix, params)
    expected = reference_mask(make_rule(blocks_per_frame), frames, tokens_per_frame, block_size, prefix)
    mask = layout.token_mask()
    assert mask.shape == expected.shape
    mismatches = (mask != expected).nonzero()
    assert mismatches.numel() == 0, f"{name}: {len(mismatches)} token pairs differ, first {mismatches[:5].tolist()}"
    assert layout.block_starts.tolist() == reference_block_starts(frames, tokens_per_frame, block_size, prefix)
    assert layout.density == pytest.approx(mask.double().mean().item(), rel=1e-12)


@pytest.mark.parametrize("frames, expected", [(8, 0.581), (16, 0.352), (32, 0.215), (64, 0.141)])
def test_sculpt4d_known_densities(frames, expected):
    assert round(masks.sculpt4d(frames, 4096, block_size=128).density, 3) == expected


def test_sculpt4d_no_anchor_known_density():
    assert round(masks.sculpt4d_no_anchor(16, 4096, block_size=128).density, 3) == 0.304


@pytest.mark.parametrize("policy", sorted(masks.POLICIES))
@pytest.mark.parametrize("prefix", PREFIXES)
def test_kv_indices_consistent_with_dense(policy, prefix):
    layout = masks.build(policy, 5, 40, prefix_tokens=prefix, block_size=16)
    dense = layout.to_dense()
    assert layout.kv_counts.tolist() == dense.sum(dim=1).tolist()
    assert layout.kv_indices.shape[0] == layout.num_blocks
    for row in range(layout.num_blocks):
        count = int(layout.kv_counts[row])
        kept = layout.kv_indices[row, :count].tolist()
        assert kept == sorted(set(kept)), f"row {row} not strictly ascending: {kept}"
        assert kept == dense[row].nonzero().flatten().tolist()
        assert not layout.kv_indices[row, count:].any()


@pytest.mark.parametrize("strides", [masks.SCULPT4D_STRIDES, (1, 3, 2)])
@pytest.mark.parametrize("prefix", (0, 7))
def test_sculpt4d_without_anchor_is_symmetric_in_time(strides, prefix):
    layout = masks.sculpt4d(9, 40, block_size=8, strides=strides, anchor_frames=0, prefix_tokens=prefix)
    dense = layout.to_dense()
    assert torch.equal(dense, dense.T)
    mask = layout.token_mask()
    assert torch.equal(mask, mask.T)


def test_sculpt4d_anchor_breaks_symmetry():
    dense = masks.sculpt4d(9, 40, block_size=8).to_dense()
    assert not torch.equal(dense, dense.T)


@pytest.mark.parametrize("tokens_per_frame, block_size", [(40, 16), (40, 8), (40, 64), (100, 32)])
@pytest.mark.parametrize("prefix", PREFIXES)
def test_block_size_respected(tokens_per_frame, block_size, prefix):
    frames = 3
    layout = masks.sculpt4d(frames, tokens_per_frame, block_size=block_size, prefix_tokens=prefix)
    blocks_per_frame = -(-tokens_per_frame // block_size)
    assert layout.block_size == block_size
    assert layout.num_blocks == -(-prefix // block_size) + frames * blocks_per_frame
    assert int(layout.block_lengths.max()) == min(block_size, max(tokens_per_frame, prefix))
    assert int(layout.block_lengths.min()) >= 1
    assert layout.seq_len == prefix + frames * tokens_per_frame


def test_strides_and_anchor_respected():
    frames, tokens_per_frame, block_size = 6, 64, 8
    blocks_per_frame = tokens_per_frame // block_size
    assert masks.sculpt4d(frames, tokens_per_frame, block_size=block_size, strides=(1,)).density == 1.0
    assert masks.sculpt4d(frames, tokens_per_frame, block_size=block_size, anchor_frames=frames).density == 1.0
    for anchor in (1, 2):
        dense = masks.sculpt4d(frames, tokens_per_frame, block_size=block_size, anchor_frames=anchor).to_dense()
        assert dense[:, : anchor * blocks_per_frame].all()
        assert not dense[:, anchor * blocks_per_frame:].all()
    # Frames 5 apart use stride 16 > blocks_per_frame: only the block at the same position.
    dense = masks.sculpt4d(frames, tokens_per_frame, block_size=block_size, anchor_frames=0).to_dense()
    assert torch.equal(dense[5 * blocks_per_frame:, :blocks_per_frame], torch.eye(blocks_per_frame, dtype=torch.bool))
    sparser = masks.sculpt4d(frames, tokens_per_frame, block_size=block_size, strides=(1, 4))
    denser = masks.sculpt4d(frames, tokens_per_frame, block_size=block_size, strides=(1, 2))
    assert sparser.density < denser.density


def test_description_names_policy_and_parameters():
    layout = masks.sculpt4d(4, 40, block_size=16, strides=(1, 2), anchor_frames=2)
    assert "sculpt4d" in layout.description
    assert "[1, 2]" in layout.description and "anchor_frames=2" in layout.description
    assert "no-anchor" in masks.sculpt4d(4, 40, block_size=16, anchor_frames=0).description


@pytest.mark.parametrize(
    "policy, params, named",
    [
        ("sculpt4d", {"block_size": 0}, "block_size=0"),
        ("sculpt4d", {"strides": ()}, "strides=()"),
        ("sculpt4d", {"strides": []}, "strides=()"),
        ("sculpt4d", {"strides": (0,)}, "strides=(0,)"),
        ("sculpt4d", {"strides": (1, -2)}, "strides=(1, -2)"),
        ("sculpt4d", {"anchor_frames": -1}, "anchor_frames=-1"),
        ("sculpt4d", {"prefix_tokens": -1}, "prefix_tokens=-1"),
        ("fixed-stride", {"stride": 0}, "stride=0"),
        ("fixed-stride", {"anchor_frames": -1}, "anchor_frames=-1"),
        ("window", {"window": -1}, "window=-1"),
        ("temporal-only", {"block_size": 0}, "block_size=0"),
        ("nope", {}, "policy 'nope'"),
    ],
)
def test_bad_parameters_raise_naming_parameter(policy, params, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        masks.build(policy, 4, 40, **params)


@pytest.mark.parametrize("frames, tokens_per_frame, named", [(0, 40, "frames=0"), (4, 0, "tokens_per_frame=0")])
def test_bad_shape_raises(frames, tokens_per_frame, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        masks.sculpt4d(frames, tokens_per_frame)


def test_token_mask_refuses_huge_layouts():
    layout = masks.sculpt4d(16, 4096, block_size=128)
    with pytest.raises(ValueError, match=r"token_mask\(\).*65536"):
        layout.token_mask()
    assert layout.to_dense().shape == (512, 512)
