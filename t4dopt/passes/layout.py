"""Decide which axes each attention site mixes, from the token maps of its queries, keys and values.

A site is joint spatio-temporal attention (the one kind made sparse) only when the graph shows:

1. queries, keys and values are one token sequence: their token maps are equal (same roots, same
   coordinates; `t4dopt.passes.sequence_trace`), not merely of equal length;
2. one segment of that map is the video in the order the mask assumes: its outer digit is the
   frames, the digits inside it the tokens of one frame; segments before it are prefix tokens, after it
   suffix tokens (text, global tokens), read from other tensors;
3. which digit is the frames, told by the graph or checked against it:
   - by the graph alone: a Conv3d patch embedding (its depth is time), a per-image Conv2d patch
     embedding (the frames are folded into its batch), or a 5-D latent cut into patches by
     reshapes (diffusers' ``[B, C, F, H, W]`` / ``[B, F, C, H, W]``: the first patched axis is
     time). That is the whole of what "inferred from the graph" means: nothing else in a graph
     tells time from space (a token-major model and a frame-major one with swapped sizes draw
     the same graph);
   - by the layout option, when its sizes meet the graph's axes in exactly one way: the outer
     axis has ``frames`` entries, the axes inside it ``tokens_per_frame`` (``height`` x ``width``
     when given), and no other axis could be the frames.

What the graph contradicts (a reordering op, a token-major or otherwise different reading, a
prefix of another length) stays dense whatever the options. What it cannot confirm (sizes that
coincide, a sequence that is one axis already packed by the caller, an op the walk does not
follow) stays dense too, unless ``trust_layout=True``, which takes the layout option at its
word and says so in a warning. Sites that are not joint are read by their length against the
grid (one frame: spatial; the frames at one position: temporal; the views: view); those stay dense.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from .state import PassState
from t4dopt.fx_utils import shape_of
from t4dopt.options import LayoutHints
from t4dopt.sites import CONFIRMED, CONTRADICTED, UNCONFIRMED, JointReading, Segment, SiteKind, SiteLayout, SiteTokens, Stop, ModelGrid, TokenMap

class Reading(NamedTuple):
    """One segment read as the video: frames x tokens per frame, and how sure the graph makes it."""

    status: str
    frames: int = 0
    tokens: int = 0
    evidence: str = ""
    packed: bool = False
    """Unconfirmed because the segment is one axis (packed by the caller, or text): a weak candidate."""


def _axes_text(segment: Segment) -> str:
    return f"axes {list(segment.sizes)} of {segment.root.name}"


def _graph_frames(segment: Segment) -> tuple[int | None, str]:
    """Which digit is the frames by the graph alone (patch embeddings), and what says so."""
    roles = [d.role for d in segment.digits]
    notes = "; ".join(segment.notes)
    if roles.count("time") == 1 and set(roles) <= {"time", "space"}:
        return roles.index("time"), notes or "a Conv3d patch embedding"
    if "time" not in roles and roles.count("batched") == 1 and set(roles) <= {"batched", "space"}:
        return roles.index("batched"), (notes or "a Conv2d patch embedding") + " (frames folded into its batch)"
    root_shape = shape_of(segment.root)
    axes = [d.axis for d in segment.digits]
    if (segment.stop is Stop.INPUT and segment.root.op == "placeholder" and root_shape is not None
            and len(root_shape) == 5 and len(axes) == 3 and set(roles) == {None} and axes == sorted(set(axes))
            and axes[0] >= 1 and any(d.stride > 1 for d in segment.digits)):
        return 0, (f"patches of the 5-D latent {segment.root.name} {list(root_shape)}, read as diffusers' "
                   "[B, C, F, H, W] / [B, F, C, H, W] (time first)")
    return None, ""


def _frame_shape_problem(rest: tuple[int, ...], hints: LayoutHints) -> str | None:
    """Why the axes inside a frame do not match height x width (None when they do or none was given)."""
    if hints.height is None or hints.width is None:
        return None
    if rest in ((hints.height * hints.width,), (hints.height, hints.width)):
        return None
    return f"a frame is built from axes {list(rest)}, not height={hints.height} x width={hints.width}"


def _sizes_from_hints(length: int, hints: LayoutHints) -> tuple[int, int] | None:
    frames, tokens = hints.frames, hints.tokens_per_frame
    if frames and tokens:
        return (frames, tokens) if frames * tokens == length else None
    if frames and length % frames == 0:
        return frames, length // frames
    if tokens and length % tokens == 0:
        return length // tokens, tokens
    return None


def _hinted(segment: Segment, hints: LayoutHints) -> Reading | None:
    """The segment read with the layout option's sizes (None when they do not fit its length)."""
    sizes_hint = _sizes_from_hints(segment.length, hints)
    if sizes_hint is None:
        return None
    frames, tokens = sizes_hint
    if frames < 2 or tokens < 2:
        return None
    sizes = segment.sizes
    wanted = f"frames={frames} x tokens_per_frame={tokens}"
    others = [j for j in range(1, len(sizes)) if sizes[j] == frames]
    if sizes and sizes[0] == frames:
        problem = _frame_shape_problem(sizes[1:], hints)
        if problem is not None:
            return Reading(CONTRADICTED, evidence=problem)
        if others:
            return Reading(UNCONFIRMED, frames, tokens,
                           f"sizes coincide: in {_axes_text(segment)}, axis {others[0]} has {frames} entries too and "
                           "could as well be the frames")
        return Reading(CONFIRMED, frames, tokens, f"{_axes_text(segment)} match the layout option's {wanted}")
    inner = math.prod(sizes[1:])
    if len(sizes) <= 1 and segment.stop is Stop.INPUT:
        grid = _rotary_grid(segment, frames, tokens, hints)
        if grid is not None:
            return grid
    if len(sizes) <= 1 or (tokens % inner == 0 and sizes[0] % frames == 0):
        if others and len(sizes) > 1:
            return Reading(CONTRADICTED, evidence=f"{_axes_text(segment)} read as token-major: axis {others[0]} "
                                                  f"holds {frames} entries, inside the tokens")
        return Reading(UNCONFIRMED, frames, tokens,
                       f"the graph shows {segment.length} tokens as {_axes_text(segment)}: the split into {wanted} "
                       "is not visible", packed=len(sizes) <= 1)
    return Reading(CONTRADICTED, evidence=f"sequence of {segment.length} tokens is built from axes {list(sizes)}, "
                                          f"not frame-major {wanted}")


def _rotary_grid(segment: Segment, frames: int, tokens: int, hints: LayoutHints) -> Reading | None:
    """A packed sequence (one axis) read with the option's sizes, checked against the token grid of the
    rotary table the model applies to it (LTX-Video builds it from ``meshgrid(frames, height, width)``)."""
    for grid in segment.grids:
        grid = tuple(g for g in grid if g > 1)
        if grid and grid[0] == frames and math.prod(grid[1:]) == tokens:
            if frames in grid[1:]:
                return Reading(UNCONFIRMED, frames, tokens, f"sizes coincide in the rotary grid {list(grid)}: "
                                                            f"another axis has {frames} entries too")
            problem = _frame_shape_problem(grid[1:], hints)
            if problem is not None:
                return Reading(CONTRADICTED, evidence=f"rotary grid {list(grid)}: {problem}")
            return Reading(CONFIRMED, frames, tokens, f"the option's frames={frames} x tokens_per_frame={tokens} "
                                                      f"match the rotary grid {list(grid)} applied to the packed "
                                                      f"tokens of {segment.root.name}")
    return None


def read_segment(segment: Segment, hints: LayoutHints) -> Reading | None:
    """The segment read as the video (None: it is not a candidate: no patch embedding and no fitting option)."""
    if segment.stop is Stop.REORDER:
        hinted = _hinted(segment, hints)
        index, _ = _graph_frames(segment)
        if hinted is None and index is None:
            return None
        return Reading(CONTRADICTED, evidence=segment.reason)
    index, how = _graph_frames(segment)
    if index is not None:
        sizes = segment.sizes
        if index != 0:
            return Reading(CONTRADICTED, evidence=f"the tokens are not frame-major: {how} puts the frames at axis "
                                                  f"{index} of {_axes_text(segment)}")
        frames, tokens = sizes[0], math.prod(sizes[1:])
        if tokens < 2:
            return None  # the frames at one position: temporal attention, not joint
        given = [(name, value) for name, value in (("frames", hints.frames), ("tokens_per_frame", hints.tokens_per_frame))
                 if value is not None]
        problem = _frame_shape_problem(sizes[1:], hints)
        if any(value != {"frames": frames, "tokens_per_frame": tokens}[name] for name, value in given) or problem:
            said = ", ".join(f"{name}={value}" for name, value in given) or problem
            return Reading(CONTRADICTED, evidence=f"the layout option says {said}; the graph shows {frames} frames x "
                                                  f"{tokens} tokens ({how})")
        return Reading(CONFIRMED, frames, tokens, f"{frames} frames x {tokens} tokens from the graph: {how}")
    hinted = _hinted(segment, hints)
    if hinted is not None and segment.stop is Stop.OPAQUE and hinted.status == CONFIRMED:
        return hinted._replace(status=UNCONFIRMED, evidence=f"the order is not visible past {segment.reason}")
    if hinted is not None and segment.stop is Stop.OPAQUE and hinted.status == UNCONFIRMED:
        return hinted._replace(evidence=f"{hinted.evidence}; the order is not visible past {segment.reason}")
    return hinted


def _global_problem(video: Segment, others: list[Segment]) -> str | None:
    for other in others:
        if other.root is video.root and other.stop is Stop.INPUT:
            return f"global tokens are read from the video tensor {video.root.name} itself"
    return None


def read_joint(tokens: TokenMap, hints: LayoutHints) -> JointReading | None:
    """The sequence read as prefix + video (frames x tokens) + suffix, or None when no segment is a candidate."""
    segments = [s for s in tokens.segments if s.length]
    readings = [(i, r) for i, s in enumerate(segments) if (r := read_segment(s, hints)) is not None]
    if not readings:
        return None
    confirmed = [(i, r) for i, r in readings if r.status == CONFIRMED]
    strong = [(i, r) for i, r in readings if not r.packed]
    if len(confirmed) == 1 and all(r.packed for i, r in readings if i != confirmed[0][0]):
        chosen = confirmed[0]
    elif len(readings) == 1:
        chosen = readings[0]
    elif len(strong) == 1 and strong[0][1].status != CONFIRMED and all(r.packed for i, r in readings if r is not strong[0][1]):
        chosen = strong[0]
    else:
        lengths = ", ".join(f"{segments[i].length} tokens of {segments[i].root.name}" for i, _ in readings)
        return JointReading(CONTRADICTED, evidence=f"several segments could be the video ({lengths})")
    index, reading = chosen
    if reading.status == CONTRADICTED:
        return JointReading(CONTRADICTED, evidence=reading.evidence)
    prefix = sum(s.length for s in segments[:index])
    suffix = sum(s.length for s in segments[index + 1:])
    for name, given, found in (("prefix_tokens", hints.prefix_tokens, prefix), ("suffix_tokens", hints.suffix_tokens, suffix)):
        if given is not None and given != found:
            where = "in front of" if name == "prefix_tokens" else "behind"
            return JointReading(CONTRADICTED, evidence=f"the layout option says {name}={given}; the graph "
                                                       f"concatenates {found} {where} the video")
    problem = _global_problem(segments[index], segments[:index] + segments[index + 1:])
    if problem is not None:
        return JointReading(CONTRADICTED, evidence=problem)
    parts = [f"{prefix} prefix + " if prefix else "", f"{reading.frames} frames x {reading.tokens} tokens",
             f" + {suffix} suffix" if suffix else ""]
    return JointReading(reading.status, reading.frames, reading.tokens, prefix, suffix,
                        f"{''.join(parts)}: {reading.evidence}", segments[index].root)


def _same_sequence(tokens: SiteTokens) -> str | None:
    """Why keys or values are not the queries' token sequence (None when they are)."""
    for name, other in (("keys", tokens.key), ("values", tokens.value)):
        if not other.same_tokens(tokens.query):
            query = ", ".join(s.root.name for s in tokens.query.segments)
            theirs = ", ".join(s.root.name for s in other.segments)
            return f"{name} are not the queries' tokens (queries from {query}; {name} from {theirs})"
    return None


def _untraced(tokens: SiteTokens) -> str | None:
    for segment in (s for m in (tokens.query, tokens.key, tokens.value) for s in m.segments):
        if segment.stop is not Stop.INPUT:
            return segment.reason
    return None


def read_layouts(state: PassState) -> None:
    """Read each self-attention's sequence as prefix + frames x tokens + suffix, checked against the graph."""
    state.readings = []
    for site, tokens in zip(state.sites, state.tokens):
        same = site.query_len == site.key_len and _same_sequence(tokens) is None
        state.readings.append(read_joint(tokens.query, state.options.layout) if same else None)


def _grid_of(hints: LayoutHints, readings: list[JointReading | None]) -> ModelGrid:
    """The hinted grid when frames and tokens per frame are given; else the first one the graph confirms."""
    if hints.frames and hints.tokens_per_frame:
        return ModelGrid(hints.frames, hints.views, hints.tokens_per_frame, hints.prefix_tokens, "layout option")
    for reading in readings:
        if reading is not None and reading.status == CONFIRMED:
            return ModelGrid(reading.frames, hints.views, reading.tokens, reading.prefix,
                             f"inferred from the graph (frames={reading.frames}, tokens_per_frame={reading.tokens})")
    return ModelGrid(hints.frames, hints.views, hints.tokens_per_frame, hints.prefix_tokens, "layout option")


def _other_kinds(n: int, grid: ModelGrid) -> SiteLayout:
    """A self-attention that is not joint, read by its length against the grid."""
    frames, views, tokens = grid.frames, grid.views, grid.tokens_per_frame
    if not frames and not tokens and not views:
        return SiteLayout(SiteKind.UNKNOWN, evidence="no layout given and none could be inferred from the graph; "
                                                     "pass options['layout'] = {'frames': F, 'tokens_per_frame': P}")
    candidates: list[SiteLayout] = []
    if tokens and n == tokens:
        candidates.append(SiteLayout(SiteKind.SPATIAL, frames, tokens, 0, f"{n} tokens of one frame"))
    if frames and frames > 1 and n == frames:
        candidates.append(SiteLayout(SiteKind.TEMPORAL, frames, tokens, 0, f"{n} frames at one position"))
    if views and views > 1 and n == views:
        candidates.append(SiteLayout(SiteKind.VIEW, frames, tokens, 0, f"{n} views at one frame and position"))
    if len(candidates) == 1:
        return candidates[0]
    if candidates:
        kinds = " and ".join(c.kind.value for c in candidates)
        return SiteLayout(SiteKind.UNKNOWN, evidence=f"sequence of {n} tokens could be {kinds}")
    prefix = grid.prefix_tokens or 0
    if views and views > 1 and frames and tokens and n == prefix + views * frames * tokens:
        return SiteLayout(SiteKind.UNKNOWN, evidence="joint attention over views x frames x tokens: "
                                                     "no mask policy covers the view axis")
    return SiteLayout(SiteKind.UNKNOWN, evidence=f"sequence of {n} tokens matches no axis of the layout "
                                                 f"(frames={frames}, views={views}, tokens_per_frame={tokens}, "
                                                 f"prefix_tokens={prefix})")


def _kind_by_roles(tokens: TokenMap) -> SiteLayout | None:
    """A self-attention that is not joint, read by what a patch embedding said of its axes: the patches of one
    frame (spatial) or the frames at one patch (temporal)."""
    if len(tokens.segments) != 1:
        return None
    segment = tokens.segments[0]
    roles = {d.role for d in segment.digits}
    how = "; ".join(segment.notes)
    if roles == {"space"}:
        return SiteLayout(SiteKind.SPATIAL, None, segment.length, 0, f"{segment.length} patches of one frame ({how})")
    if len(segment.digits) == 1 and roles <= {"time", "batched"}:
        return SiteLayout(SiteKind.TEMPORAL, segment.length, None, 0, f"{segment.length} frames at one patch ({how})")
    return None


def _suggestion(tokens: TokenMap) -> str:
    """A layout option to try, from the axes the graph shows (outer axis as the frames)."""
    video = max(tokens.segments, key=lambda s: s.length)
    grids = [tuple(g for g in grid if g > 1) for grid in video.grids]
    if len(video.sizes) < 2 and grids and len(grids[0]) == 3:
        frames, height, width = grids[0]
        return (f"the tokens arrive packed ({video.length} tokens of {video.root.name}); the rotary grid applied to "
                f"them is {list(grids[0])}: if its first axis is time, pass options['layout'] = "
                f"{{'frames': {frames}, 'height': {height}, 'width': {width}}}")
    if len(video.sizes) < 2:
        return (f"the tokens arrive packed ({video.length} tokens of {video.root.name}): pass options['layout'] = "
                "{'frames': F, 'tokens_per_frame': P}")
    frames, rest = video.sizes[0], math.prod(video.sizes[1:])
    return (f"if the outer axis of {_axes_text(video)} is time, pass options['layout'] = "
            f"{{'frames': {frames}, 'tokens_per_frame': {rest}}}")


def classify(site, tokens: SiteTokens, reading: JointReading | None, grid: ModelGrid, trust: bool,
             videos: frozenset = frozenset()) -> SiteLayout:
    """What one site mixes (see the module docstring for the rule); `videos`: the tensors the graph shows
    video tokens are read from (by the sites read as joint)."""
    n = site.query_len
    if site.key_len != n:
        return SiteLayout(SiteKind.CROSS, evidence=f"{n} queries attend {site.key_len} keys of another sequence")
    different = _same_sequence(tokens)
    if different is not None:
        untraced = _untraced(tokens)
        if untraced:
            return SiteLayout(SiteKind.UNKNOWN, evidence=f"{different}; not shown to be one sequence: {untraced}")
        return SiteLayout(SiteKind.CROSS, evidence=f"{n} queries attend {n} keys of another sequence: {different}")
    if reading is not None and reading.status == CONFIRMED or reading is not None and reading.status == UNCONFIRMED and trust:
        trusted = reading.status == UNCONFIRMED
        evidence = reading.evidence + ("; not confirmed by the graph, taken on trust (trust_layout=True)" if trusted else "")
        return SiteLayout(SiteKind.SPATIOTEMPORAL, reading.frames, reading.tokens, reading.prefix, evidence,
                          suffix_tokens=reading.suffix, trusted=trusted)
    if reading is not None and reading.status == UNCONFIRMED:
        return SiteLayout(SiteKind.UNKNOWN, evidence=f"the layout option is not confirmed by the graph: {reading.evidence} "
                                                     "(trust_layout=True would use it anyway)")
    if reading is not None:
        return SiteLayout(SiteKind.UNKNOWN, evidence=reading.evidence)
    by_roles = _kind_by_roles(tokens.query)
    if by_roles is not None:
        return by_roles
    roots = {s.root for s in tokens.query.segments}
    if videos and not roots & videos and all(s.stop is Stop.INPUT for s in tokens.query.segments):
        names = ", ".join(sorted(r.name for r in roots))
        return SiteLayout(SiteKind.OTHER, evidence=f"self-attention over {n} tokens of {names}, not the video")
    layout = _other_kinds(n, grid)
    longest = max(tokens.query.segments, key=lambda x: x.length)
    if layout.kind is SiteKind.UNKNOWN and longest.stop is not Stop.INPUT:  # say where the walk stopped
        layout.evidence = f"the token order is not visible: {longest.reason}"
    elif layout.kind is SiteKind.UNKNOWN and not grid.frames and not grid.tokens_per_frame:
        layout.evidence = f"no layout given and the graph shows no patch embedding that tells the frames; {_suggestion(tokens.query)}"
    return layout


def infer_grid(state: PassState) -> None:
    """Settle the token grid the other sites are read against: the layout option, else the first the graph shows."""
    state.grid = _grid_of(state.options.layout, state.readings)


def classify_layouts(state: PassState) -> None:
    """Decide which axes each site mixes: spatial, view, temporal, spatiotemporal, cross or unknown.

    The video tensors are those the graph reads as video at a joint site, or in an output it carries to later
    graphs (HunyuanVideo 1.5's first graph holds the patch embedding and only a text self-attention)."""
    trust = state.options.trust_layout
    videos = frozenset(r.video for r in state.readings if r is not None and r.status == CONFIRMED)
    videos |= frozenset(s.root for _, output in state.carried_outputs for tokens in output.maps.values()
                        for s in tokens.segments if (r := read_segment(s, LayoutHints())) and r.status == CONFIRMED)
    state.layouts = [classify(site, tokens, reading, state.grid, trust, videos)
                     for site, tokens, reading in zip(state.sites, state.tokens, state.readings)]
