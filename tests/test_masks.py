"""Mask policies against a reference written directly from each rule, token by token.

The reference maps every token to (frame, block in frame), or marks it as a global token (before
or after the video), with plain loops, and evaluates the rules on Python ints; it shares no code
with `t4dopt.masks`.
"""

import re
from collections.abc import Callable

import pytest
import torch

from t4dopt import masks
from t4dopt.block_layout import BlockLayout, TokenGrid

IntRule = Callable[[int, int, int, int], bool]
Coord = tuple[int | None, int]

FRAMES = (1, 2, 5, 16)
# (prefix_tokens, suffix_tokens): none, before the video (one partial block, two whole blocks),
# after it (one partial block), and both (a whole and a partial suffix block).
GLOBALS = ((0, 0), (7, 0), (32, 0), (0, 5), (7, 21))
# (tokens_per_frame, block_size): a partial last block per frame, and an exact multiple.
SHAPES = ((40, 16), (48, 16))


def token_coords(frames: int, tokens_per_frame: int, block_size: int, prefix: int, suffix: int = 0) -> list[Coord]:
    """(frame, block in frame) of every token; global tokens get frame None (-1 before the video,
    -2 after it, in the block position) and their block among the global tokens on their side."""
    coords: list[Coord] = []
    video_end = prefix + frames * tokens_per_frame
    for token in range(video_end + suffix):
        if token < prefix:
            coords.append((None, token // block_size))
        elif token >= video_end:
            coords.append((None, -1 - (token - video_end) // block_size))
        else:
            frame, offset = divmod(token - prefix, tokens_per_frame)
            coords.append((frame, offset // block_size))
    return coords


def reference_mask(rule: IntRule, frames: int, tokens_per_frame: int, block_size: int, prefix: int,
                   suffix: int = 0) -> torch.Tensor:
    """bool [seq, seq]: token q attends token k; global tokens attend and are attended by all."""
    coords = token_coords(frames, tokens_per_frame, block_size, prefix, suffix)
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


def reference_block_starts(frames: int, tokens_per_frame: int, block_size: int, prefix: int,
                           suffix: int = 0) -> list[int]:
    coords = token_coords(frames, tokens_per_frame, block_size, prefix, suffix)
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


def build(policy, frames, tokens_per_frame, block_size, prefix, params, suffix=0) -> BlockLayout:
    return masks.build(policy, frames, tokens_per_frame, prefix_tokens=prefix, suffix_tokens=suffix,
                       block_size=block_size, **params)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"tpf{s[0]}-bs{s[1]}")
@pytest.mark.parametrize("prefix, suffix", GLOBALS, ids=[f"prefix{p}-suffix{s}" for p, s in GLOBALS])
@pytest.mark.parametrize("frames", FRAMES, ids=lambda f: f"F{f}")
@pytest.mark.parametrize("name, policy, params, make_rule", CASES, ids=[c[0] for c in CASES])
def test_token_mask_matches_reference(name, policy, params, make_rule, frames, prefix, suffix, shape):
    tokens_per_frame, block_size = shape
    blocks_per_frame = -(-tokens_per_frame // block_size)
    layout = build(policy, frames, tokens_per_frame, block_size, prefix, params, suffix)
    expected = reference_mask(make_rule(blocks_per_frame), frames, tokens_per_frame, block_size, prefix, suffix)
    mask = layout.token_mask()
    assert mask.shape == expected.shape
    mismatches = (mask != expected).nonzero()
    assert mismatches.numel() == 0, f"{name}: {len(mismatches)} token pairs differ, first {mismatches[:5].tolist()}"
    assert layout.block_starts.tolist() == reference_block_starts(frames, tokens_per_frame, block_size, prefix,
                                                                  suffix)
    assert layout.density == pytest.approx(mask.double().mean().item(), rel=1e-12)
    assert layout.grid == TokenGrid(frames, tokens_per_frame, prefix, suffix)


def test_global_tokens_against_a_mask_written_out():
    # window=0 over 2 frames of 2 tokens (blocks of 2): each frame attends itself only. One prefix
    # token (0), frame 0 (1, 2), frame 1 (3, 4), three suffix tokens (5, 6 | 7: a block of 2 and a
    # partial one of 1).
    layout = masks.window(2, 2, block_size=2, window=0, prefix_tokens=1, suffix_tokens=3)
    expected = torch.tensor([
        # 0  1  2  3  4  5  6  7
        [1, 1, 1, 1, 1, 1, 1, 1],  # prefix
        [1, 1, 1, 0, 0, 1, 1, 1],  # frame 0
        [1, 1, 1, 0, 0, 1, 1, 1],
        [1, 0, 0, 1, 1, 1, 1, 1],  # frame 1
        [1, 0, 0, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1, 1, 1],  # suffix
        [1, 1, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1, 1, 1],
    ], dtype=torch.bool)
    assert layout.block_starts.tolist() == [0, 1, 3, 5, 7, 8]
    assert torch.equal(layout.token_mask(), expected)
    assert layout.describe() == ("window(window=0); frames=2, tokens_per_frame=2, prefix_tokens=1, "
                                 "suffix_tokens=3, block_size=2")


@pytest.mark.parametrize("frames_per_block", [1, 2, 3])
@pytest.mark.parametrize("prefix, suffix", [(0, 0), (7, 0), (0, 5), (7, 21)])
def test_frame_causal_matches_reference(frames_per_block, prefix, suffix):
    layout = masks.frame_causal(5, 40, block_size=16, frames_per_block=frames_per_block, prefix_tokens=prefix,
                                suffix_tokens=suffix)
    rule = lambda i, u, j, v: j // frames_per_block <= i // frames_per_block  # noqa: E731
    assert torch.equal(layout.token_mask(), reference_mask(rule, 5, 40, 16, prefix, suffix))
    assert f"frames_per_block={frames_per_block}" in layout.description


def test_frame_causal_rejects_bad_block():
    with pytest.raises(ValueError, match=re.escape("frames_per_block=0")):
        masks.frame_causal(4, 40, frames_per_block=0)


@pytest.mark.parametrize("policy", sorted(masks.POLICIES))
def test_policy_intersected_with_frame_causal_is_exact(policy):
    # SkyReels-V2's diffusion forcing: block-causal over groups of 2 frames, as the model builds it.
    frames, tokens, block_size, prefix, suffix = 6, 40, 16, 7, 5
    layout = masks.build(policy, frames, tokens, block_size=block_size, prefix_tokens=prefix, suffix_tokens=suffix)
    causal = masks.frame_causal(frames, tokens, block_size=block_size, frames_per_block=2, prefix_tokens=prefix,
                                suffix_tokens=suffix)
    both = layout & causal
    frame = torch.tensor([-1] * prefix + [f for f in range(frames) for _ in range(tokens)] + [-1] * suffix)
    video = frame >= 0
    model_mask = (frame.view(1, -1) // 2 <= frame.view(-1, 1) // 2) | ~video.view(1, -1) | ~video.view(-1, 1)
    assert torch.equal(both.token_mask(), layout.token_mask() & model_mask)
    assert both.grid == layout.grid and " & frame-causal" in both.description
    # The model's own token mask, lifted to blocks, gives the same intersection.
    lifted = BlockLayout.from_token_mask(model_mask[None, None], layout.block_starts, block_size)
    assert torch.equal((layout & lifted).to_dense(), both.to_dense())


def test_from_token_mask_takes_additive_masks_and_refuses_what_is_not_block_aligned():
    layout = masks.window(3, 8, block_size=4, window=0, suffix_tokens=3)
    mask = layout.token_mask()
    additive = torch.zeros(mask.shape).masked_fill(~mask, -torch.inf)
    assert torch.equal(BlockLayout.from_token_mask(additive, layout.block_starts, 4).to_dense(), layout.to_dense())
    ragged = mask.clone()
    ragged[5, 0] = not ragged[5, 0]
    with pytest.raises(ValueError, match=r"not block-aligned: query block 1 .* key block 0"):
        BlockLayout.from_token_mask(ragged, layout.block_starts, 4)
    with pytest.raises(ValueError, match="bias, not a block mask"):
        BlockLayout.from_token_mask(additive - 1.0, layout.block_starts, 4)
    with pytest.raises(ValueError, match=r"not \[N, N\]"):
        BlockLayout.from_token_mask(mask[:-1], layout.block_starts, 4)


def test_intersection_needs_the_same_blocks_and_grid():
    a = masks.sculpt4d(3, 40, block_size=16, suffix_tokens=5)
    with pytest.raises(ValueError, match="different blocks"):
        a & masks.sculpt4d(3, 40, block_size=8, suffix_tokens=5)
    # Same blocks (5 + 3 x 40 = 3 x 40 + 5 tokens in blocks of 5 and 40), other grid.
    b = masks.window(3, 40, block_size=40, prefix_tokens=5)
    c = masks.window(3, 40, block_size=40, suffix_tokens=5)
    assert b.seq_len == c.seq_len
    with pytest.raises(ValueError):
        b & c


def test_grid_must_cover_the_blocks():
    layout = masks.sculpt4d(2, 40, block_size=16)
    with pytest.raises(ValueError, match="has 85 tokens, the blocks cover 80"):
        BlockLayout.from_dense(layout.to_dense(), layout.block_starts, 16, grid=TokenGrid(2, 40, 0, 5))


@pytest.mark.parametrize("frames, expected", [(8, 0.581), (16, 0.352), (32, 0.215), (64, 0.141)])
def test_sculpt4d_known_densities(frames, expected):
    assert round(masks.sculpt4d(frames, 4096, block_size=128).density, 3) == expected


def test_sculpt4d_no_anchor_known_density():
    assert round(masks.sculpt4d_no_anchor(16, 4096, block_size=128).density, 3) == 0.304


@pytest.mark.parametrize("policy", sorted(masks.POLICIES))
@pytest.mark.parametrize("prefix, suffix", GLOBALS)
def test_kv_indices_consistent_with_dense(policy, prefix, suffix):
    layout = masks.build(policy, 5, 40, prefix_tokens=prefix, suffix_tokens=suffix, block_size=16)
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
@pytest.mark.parametrize("prefix, suffix", [(0, 0), (7, 0), (0, 11), (7, 11)])
def test_sculpt4d_without_anchor_is_symmetric_in_time(strides, prefix, suffix):
    layout = masks.sculpt4d(9, 40, block_size=8, strides=strides, anchor_frames=0, prefix_tokens=prefix,
                            suffix_tokens=suffix)
    dense = layout.to_dense()
    assert torch.equal(dense, dense.T)
    mask = layout.token_mask()
    assert torch.equal(mask, mask.T)


def test_sculpt4d_anchor_breaks_symmetry():
    dense = masks.sculpt4d(9, 40, block_size=8).to_dense()
    assert not torch.equal(dense, dense.T)


@pytest.mark.parametrize("tokens_per_frame, block_size", [(40, 16), (40, 8), (40, 64), (100, 32)])
@pytest.mark.parametrize("prefix, suffix", GLOBALS)
def test_block_size_respected(tokens_per_frame, block_size, prefix, suffix):
    frames = 3
    layout = masks.sculpt4d(frames, tokens_per_frame, block_size=block_size, prefix_tokens=prefix,
                            suffix_tokens=suffix)
    blocks_per_frame = -(-tokens_per_frame // block_size)
    assert layout.block_size == block_size
    assert layout.num_blocks == -(-prefix // block_size) + frames * blocks_per_frame + -(-suffix // block_size)
    assert int(layout.block_lengths.max()) == min(block_size, max(tokens_per_frame, prefix, suffix))
    assert int(layout.block_lengths.min()) >= 1
    assert layout.seq_len == prefix + frames * tokens_per_frame + suffix


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
        ("sculpt4d", {"suffix_tokens": -1}, "suffix_tokens=-1"),
        ("radial", {"suffix_tokens": 2.5}, "suffix_tokens=2.5"),
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


# --- Callable policies: only bool answers, errors named with the block pair -------------------

def _ints_on_tensors(qf, qb, kf, kb):
    return (qb - kb) % 2


def _floats_on_tensors(qf, qb, kf, kb):
    return (qf == kf).float()


def _wrong_shape(qf, qb, kf, kb):
    return (qf == kf).flatten()


def _extra_dimension(qf, qb, kf, kb):
    return (qf == kf).unsqueeze(-1)


def _int_per_pair(i, u, j, v):
    return 1 if i == j else 0


def _none_per_pair(i, u, j, v):
    return None


def _text_per_pair(i, u, j, v):
    return "yes"


def _forgets_to_return(qf, qb, kf, kb):
    qf == kf  # noqa: B015  (a rule without its return: None on tensors and on ints)


@pytest.mark.parametrize("rule, named", [
    (_ints_on_tensors, "returned torch.int64 values"),
    (_floats_on_tensors, "returned torch.float32 values"),
    (_wrong_shape, "returned a tensor of shape [144] for 12 blocks"),
    (_extra_dimension, "returned a tensor of shape [12, 12, 1]"),
    (_int_per_pair, "returned 1 (int) for query (frame 0, block 0) and key (frame 0, block 0)"),
    (_none_per_pair, "returned None (NoneType) for query (frame 0, block 0)"),
    (_forgets_to_return, "returned None (NoneType) for query (frame 0, block 0)"),
    (_text_per_pair, "returned 'yes' (str)"),
    (lambda qf, qb, kf, kb: "yes", "returned 'yes' (str)"),
])
def test_a_rule_answering_anything_but_bool_is_refused(rule, named):
    with pytest.raises(ValueError, match=re.escape(named)) as error:
        masks.build(rule, 4, 48, block_size=16)
    assert rule.__name__ in str(error.value)


def _divides_by_frame_distance(i, u, j, v):
    return 1 / (i - j) > 0 or u == v


def _looks_up_a_missing_key(i, u, j, v):
    return {0: True, 1: u == v}[abs(i - j)]


@pytest.mark.parametrize("rule, error_type, where", [
    (_divides_by_frame_distance, ZeroDivisionError, "query (frame 0, block 0) and key (frame 0, block 0)"),
    (_looks_up_a_missing_key, KeyError, "query (frame 0, block 0) and key (frame 2, block 0)"),
])
def test_a_rule_that_raises_is_named_with_the_block_pair_it_raised_for(rule, error_type, where):
    with pytest.raises(ValueError) as error:
        masks.build(rule, 4, 48, block_size=16)
    message = str(error.value)
    assert rule.__name__ in message and error_type.__name__ in message and where in message
    assert isinstance(error.value.__cause__, error_type)


def test_bool_answers_of_every_kind_are_taken():
    """Python bools pair by pair, 0-d bool tensors, numpy bools, and broadcastable bool tensors."""
    import numpy as np

    expected = masks.build(lambda qf, qb, kf, kb: qf == kf, 3, 40, block_size=16).to_dense()
    rules = [lambda i, u, j, v: i == j, lambda i, u, j, v: torch.as_tensor(i == j), lambda i, u, j, v: np.bool_(i == j),
             lambda qf, qb, kf, kb: (qf == kf).numpy()]
    for rule in rules:
        assert torch.equal(masks.build(rule, 3, 40, block_size=16).to_dense(), expected)
    assert masks.build(lambda qf, qb, kf, kb: True, 3, 40, block_size=16).density == 1.0
    assert torch.equal(masks.build(lambda qf, qb, kf, kb: kf < 1, 3, 40, block_size=16).to_dense()[:, :3],
                       torch.ones(9, 3, dtype=torch.bool))


# --- Layouts a policy must not be rewritten with --------------------------------------------

def test_empty_row_reason_names_the_first_query_block_that_keeps_nothing():
    layout = masks.from_rule(lambda qf, qb, kf, kb: (qb == kb) & (qb != 1), 3, 40, block_size=16, prefix_tokens=0)
    assert masks.empty_row_reason(layout) == ("query block (frame 0, block 1) keeps no key block (3 such query "
                                              "blocks): its output rows would be zeros")
    # global tokens attend everything: the video's empty rows are still named by frame and block
    layout = masks.from_rule(lambda qf, qb, kf, kb: qf < 0, 2, 40, block_size=16, prefix_tokens=20)
    assert masks.empty_row_reason(layout) is None  # every video block keeps the prefix blocks
    for policy in sorted(masks.POLICIES):
        for frames in (1, 3, 9):
            assert masks.empty_row_reason(masks.build(policy, frames, 40, block_size=16, prefix_tokens=5)) is None


@pytest.mark.parametrize("layout, named", [
    (masks.sculpt4d(4, 64, block_size=10**9), "block_size=1000000000 >= tokens_per_frame=64: each frame is one block"),
    (masks.sculpt4d(4, 64, block_size=128), "block_size=128 >= tokens_per_frame=64"),
    (masks.sculpt4d(4, 64, block_size=16, anchor_frames=5), "anchor_frames=5"),
    (masks.sculpt4d(4, 64, block_size=16, anchor_frames=4), "keeps every block pair of 4 frames of 4 block(s)"),
    (masks.fixed_stride(3, 64, block_size=16, anchor_frames=7), "anchor_frames=7"),
    (masks.window(5, 64, block_size=16, window=4), "window(window=4) keeps every block pair"),
    (masks.sculpt4d(6, 64, block_size=8, strides=(1,)), "strides=[1]"),
    (masks.temporal_only(3, 40, block_size=64, prefix_tokens=9), "temporal-only keeps every block pair"),
])
def test_dense_reason_says_why_a_policy_skips_nothing(layout, named):
    assert layout.density == 1.0
    reason = masks.dense_reason(layout)
    assert named in reason and "nothing to skip" in reason


@pytest.mark.parametrize("policy", sorted(masks.POLICIES))
def test_dense_reason_is_none_where_a_policy_skips_blocks(policy):
    layout = masks.build(policy, 8, 64, block_size=16)
    assert layout.density < 1.0 and masks.dense_reason(layout) is None
