"""Decide, per attention site, whether it becomes block-sparse, and with which block table.

Only joint spatio-temporal self-attention is made sparse. The model's own mask is combined, never
dropped: a structured one intersected with the policy's table, a key mask applied by the op
(`t4dopt.passes.attention_masks`). A site we cannot handle (unknown layout, a mask that does not
combine, a causal flag, dropout, an unsupported dtype) stays dense; the decision carries the
reason and whether the user should be warned. A fused aten call always stays dense
(`t4dopt.passes.fused_attention`).
"""

from __future__ import annotations

from functools import lru_cache

from .fused_attention import FUSED, calls_per_query, fused_decision
from .state import PassState
from t4dopt import masks
from t4dopt.block_layout import BlockLayout
from t4dopt.options import Options, SparseSpec
from t4dopt.sites import AttentionSite, SiteDecision, SiteKind, SiteLayout, SiteMask

SUPPORTED_DTYPES = ("float32", "float16", "bfloat16")


@lru_cache(maxsize=64)
def _cached_layout(policy, params: tuple, frames: int, tokens: int, prefix: int, suffix: int) -> BlockLayout:
    return masks.build(policy, frames, tokens, prefix_tokens=prefix, suffix_tokens=suffix, **dict(params))


def block_layout_for(spec: SparseSpec, layout: SiteLayout) -> BlockLayout:
    """The block table of `spec` for a site's token grid (cached: one per model shape)."""
    return _cached_layout(spec.policy, tuple(sorted(spec.params.items())), layout.frames,
                          layout.tokens_per_frame, layout.prefix_tokens, layout.suffix_tokens)


def _unsupported(site: AttentionSite) -> str | None:
    if site.dtype not in SUPPORTED_DTYPES:
        return f"dtype {site.dtype} is not supported by the block-sparse op (allowed: {', '.join(SUPPORTED_DTYPES)})"
    if site.is_causal:
        return "it is causal; Sculpt4D masks are not causal"
    if site.dropout_p:
        return f"it uses dropout_p={site.dropout_p}"
    if site.value_shape[-2] != site.key_len:
        return f"values have {site.value_shape[-2]} tokens, keys {site.key_len}"
    heads_q = site.query_shape[-3] if len(site.query_shape) >= 3 else 1
    heads_k = site.key_shape[-3] if len(site.key_shape) >= 3 else 1
    if heads_q != heads_k and not (site.enable_gqa and len(site.query_shape) == 4 and heads_q % heads_k == 0):
        return f"queries have {heads_q} heads, keys {heads_k}"
    if site.query_shape[:-3] != site.key_shape[:-3]:
        return f"queries {list(site.query_shape)} and keys {list(site.key_shape)} differ in batch dims"
    return None


def _with_mask(block_layout: BlockLayout, mask: SiteMask | None) -> tuple[BlockLayout, str | None]:
    """The policy's table with a structured mask the model passes intersected in (exact, or the reason it is not)."""
    if mask is None or mask.structured is None:
        return block_layout, None
    try:
        structured = BlockLayout.from_token_mask(mask.structured, block_layout.block_starts, block_layout.block_size,
                                                 "model mask", block_layout.grid)
    except ValueError as error:
        return block_layout, f"its mask does not fall on the blocks: {error}"
    return block_layout & structured, None


def decide(site: AttentionSite, layout: SiteLayout, options: Options, mask: SiteMask | None = None,
           fused_calls: int = 1) -> SiteDecision:
    """What to do with one site under `options` (`mask`: what its attention mask means, see `attention_masks`;
    `fused_calls`: for a fused aten call, how many of them read its queries, see `fused_attention`)."""
    if options.sparse is None:
        return SiteDecision(site, layout, "dense", "sparse=None: no mask policy chosen")
    if site.form == FUSED:
        return fused_decision(site, layout, fused_calls)
    if layout.kind is SiteKind.UNKNOWN:
        return SiteDecision(site, layout, "dense", f"layout unknown: {layout.evidence}", warn=True)
    if layout.kind is not SiteKind.SPATIOTEMPORAL:
        return SiteDecision(site, layout, "dense", f"{layout.kind.value} attention is kept dense")
    problem = _unsupported(site) or (mask.reason if mask is not None and not mask.supported else None)
    if problem is not None:
        return SiteDecision(site, layout, "dense", f"joint attention left dense: {problem}", warn=True)
    block_layout, problem = _with_mask(block_layout_for(options.sparse, layout), mask)
    if problem is not None:
        return SiteDecision(site, layout, "dense", f"joint attention left dense: {problem}", warn=True)
    masks_of_model = {"key_mask": mask.keys, "query_mask": mask.queries} if mask is not None else {}
    reason = block_layout.description + (f"; with {mask.evidence}" if mask is not None and not mask.empty else "")
    if layout.trusted:
        return SiteDecision(site, layout, "sparse", f"{reason}; layout taken on trust (trust_layout=True), not "
                            f"confirmed by the graph: {layout.evidence}", block_layout=block_layout, warn=True,
                            **masks_of_model)
    return SiteDecision(site, layout, "sparse", reason, block_layout=block_layout, **masks_of_model)


def decide_sparsity(state: PassState) -> None:
    """Decide per site: block-sparse with a block table, or dense with the reason (and a warning)."""
    calls = calls_per_query(state.sites)
    state.decisions = [decide(site, layout, state.options, mask, fused)
                       for site, layout, mask, fused in zip(state.sites, state.layouts, state.masks, calls)]
