"""Decide which axes each attention site mixes: space, views, time, all of them jointly, or another sequence.

The sequence length is read against the layout hints (frames, views, tokens_per_frame,
prefix_tokens), and the query's sequence axis is traced back through the graph to check the
token order: joint attention must be frame-major (``frame * tokens_per_frame + token``) after the
prefix tokens. Where the hints are missing, frames and tokens per frame are taken from the
graph when a reshape merges two axes into the sequence and another site attends over exactly
the inner one with the frames folded into its batch (per-frame attention). Anything ambiguous is ``unknown`` and stays dense.
"""

from __future__ import annotations

from .sequence_trace import factors_match, trace_sequence
from .state import PassState
from t4dopt.options import LayoutHints
from t4dopt.sites import AttentionSite, SequenceOrigin, SiteKind, SiteLayout, TokenGrid


def _folds_frames_into_batch(site: AttentionSite, frames: int) -> bool:
    """Whether the batch axis of `site` ends in an axis of `frames` (``x.reshape(b * f, p, c)``): per-frame attention.

    Sizes alone cannot tell per-frame attention from another site that happens to attend over
    as many tokens (Latte's temporal attention over F frames when the patch grid is H x F):
    the frames must be visibly folded into the batch.
    """
    if len(site.query_shape) < 3:
        return False
    return trace_sequence(site.query, 0).factors[-1] == frames


def _grid_of(hints: LayoutHints, sites: list[AttentionSite], origins: list[SequenceOrigin]) -> TokenGrid:
    """The hinted grid when frames and tokens per frame are given; else the first one the graph shows.

    A self-attention whose sequence merges frames x inner tokens proves the grid only when
    another site attends over exactly the inner tokens with the frames folded into its batch.
    """
    if hints.frames and hints.tokens_per_frame:
        return TokenGrid(hints.frames, hints.views, hints.tokens_per_frame, hints.prefix_tokens, "layout option")
    self_sites = [s for s in sites if s.query_len == s.key_len]
    for site, origin in zip(sites, origins):
        if site.query_len != site.key_len or not origin.merged:
            continue
        outer = origin.factors[0]
        inner = site.query_len - origin.prefix
        inner //= outer
        if hints.frames not in (None, outer) or hints.tokens_per_frame not in (None, inner):
            continue
        # frames == tokens_per_frame: the per-frame site could as well be temporal; do not guess.
        if outer > 1 and outer != inner and any(
            s.query_len == inner and _folds_frames_into_batch(s, outer) for s in self_sites
        ):
            return TokenGrid(outer, hints.views, inner, hints.prefix_tokens,
                             f"inferred from the graph (frames={outer}, tokens_per_frame={inner})")
    return TokenGrid(hints.frames, hints.views, hints.tokens_per_frame, hints.prefix_tokens, "layout option")


def _classify(site: AttentionSite, origin: SequenceOrigin, grid: TokenGrid) -> SiteLayout:
    n = site.query_len
    if site.key_len != n:
        return SiteLayout(SiteKind.CROSS, evidence=f"{n} queries attend {site.key_len} keys of another sequence")
    frames, views, tokens = grid.frames, grid.views, grid.tokens_per_frame
    if not frames and not tokens and not views:
        return SiteLayout(SiteKind.UNKNOWN, evidence="no layout given and none could be inferred from the graph; "
                                                     "pass options['layout'] = {'frames': F, 'tokens_per_frame': P}")
    prefix = grid.prefix_tokens if grid.prefix_tokens is not None else origin.prefix
    candidates: list[SiteLayout] = []
    if frames and tokens and frames > 1 and n == prefix + frames * tokens:
        joint = SiteLayout(SiteKind.SPATIOTEMPORAL, frames, tokens, prefix)
        if origin.prefix and origin.prefix != prefix:
            return SiteLayout(SiteKind.UNKNOWN, evidence=f"layout says {prefix} prefix tokens, the graph concatenates "
                                                         f"{origin.prefix} in front")
        if origin.merged and not factors_match(origin.factors, frames, tokens):
            return SiteLayout(SiteKind.UNKNOWN, evidence=f"sequence of {n} tokens is built from axes {list(origin.factors)}, "
                                                         f"not frame-major frames={frames} x tokens_per_frame={tokens}")
        joint.evidence = (f"{n} = {prefix} prefix + {frames} frames x {tokens} tokens, "
                          + ("frame-major in the graph" if origin.merged else "order not visible in the graph")
                          + f"; {grid.source}")
        candidates.append(joint)
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
    if views and views > 1 and frames and tokens and n == prefix + views * frames * tokens:
        return SiteLayout(SiteKind.UNKNOWN, evidence="joint attention over views x frames x tokens: "
                                                     "no mask policy covers the view axis")
    return SiteLayout(SiteKind.UNKNOWN, evidence=f"sequence of {n} tokens matches no axis of the layout "
                                                 f"(frames={frames}, views={views}, tokens_per_frame={tokens}, "
                                                 f"prefix_tokens={prefix})")


def infer_grid(state: PassState) -> None:
    """Settle the token grid (frames x tokens per frame): from the layout option, else from the graph."""
    state.grid = _grid_of(state.options.layout, state.sites, state.origins)


def classify_layouts(state: PassState) -> None:
    """Decide which axes each site mixes: spatial, view, temporal, spatiotemporal, cross or unknown."""
    state.layouts = [_classify(site, origin, state.grid) for site, origin in zip(state.sites, state.origins)]
