"""Direct calls of aten's fused attention kernels: found, reported, left dense, never rewritten.

diffusers' context-parallel attention (``models/attention_dispatch.py``: its ``_native_flash``,
``_native_cudnn`` and ``_native_efficient`` backends under ring or Ulysses) calls aten's fused kernels
directly (`t4dopt.compat.FUSED_SDPA_OPS`, such as ``torch.ops.aten._scaled_dot_product_flash_attention``),
and so may a model. Each returns a tuple (output, logsumexp, ...). They stay as they are:

- under ring, one call attends the rank's queries to one key/value chunk, and which chunk is the ring
  loop's counter, which the graph does not show (the chunks are slices of an all-gathered buffer): no
  block table of the chunk pair can be proven. Several fused calls over the same query tensor (up to
  transposes, copies and casts: each call of diffusers' loop transposes it anew) are read as such chunks;
- any other call returns more than the op does (the log-sum-exp its caller may merge by, the kernels'
  sequence and RNG bookkeeping), so it is not replaced either.

Each is reported, with what it is and the supported way instead, as a site left dense with a
`T4DWarning` (an error under ``strict=True``). Its outputs are read downstream as attention outputs:
item 0 and item 1 (the log-sum-exp) carry the queries' tokens (`t4dopt.passes.sequence_trace`).
"""

from __future__ import annotations

import torch.fx as fx

from t4dopt.fx_utils import op_name, shape_of
from t4dopt.sites import AttentionSite, SiteDecision, SiteKind, SiteLayout

FUSED = "fused"
"""`AttentionSite.form` of a fused aten call."""

RING_WAY = ("for block-sparse ring attention call t4dopt.context_parallel.use_sparse_ring(model) after "
            "enable_parallelism (the turbo4d diffusers attention backend)")


SAME_VALUES = frozenset({"transpose", "permute", "contiguous", "clone", "detach", "to", "float", "half", "bfloat16"})
"""Ops that hand on the same values (moved axes, a copy, a cast): queries read through them are the same queries."""


def _queries(site: AttentionSite) -> tuple[fx.Node, tuple[int, ...] | None]:
    node = site.query
    while op_name(node) in SAME_VALUES and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node, shape_of(site.query)


def calls_per_query(sites: list[AttentionSite]) -> list[int]:
    """For each fused site, how many fused sites of the graph read the same query tensor, of one shape (itself
    included); 0 for the other sites."""
    fused = [(i, _queries(site)) for i, site in enumerate(sites) if site.form == FUSED]
    counts = [0] * len(sites)
    for i, queries in fused:
        counts[i] = sum(1 for _, other in fused if other == queries)
    return counts


def fused_decision(site: AttentionSite, layout: SiteLayout, calls: int) -> SiteDecision:
    """A fused site left dense, with what it is (`calls`: fused calls over its queries) and what to do instead."""
    if calls > 1:
        what = (f"a fused aten call ({site.op}), one of {calls} over the same queries: key/value "
                "chunks of a ring attention (diffusers' templated ring calls one per chunk), whose place in the "
                "sequence the graph does not show")
        chunk = SiteLayout(SiteKind.UNKNOWN, evidence=f"one of {calls} key/value chunks of a ring attention over "
                                                      "the same queries: the chunk's keys are not located")
        return SiteDecision(site, chunk, "dense", f"{what}; {RING_WAY}", warn=True)
    proven = f" (the graph proves it joint: {layout.evidence})" if layout.kind is SiteKind.SPATIOTEMPORAL else ""
    what = (f"a direct fused aten call ({site.op}), which returns (output, logsumexp, ...) and is not rewritten"
            f"{proven}")
    instead = ("call F.scaled_dot_product_attention instead (in diffusers: the default 'native' attention backend, "
               f"also under Ulysses); {RING_WAY}")
    return SiteDecision(site, layout, "dense", f"{what}; {instead}", warn=True)
