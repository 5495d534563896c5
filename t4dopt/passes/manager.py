"""The passes, in data-flow order: detect -> layout -> sparsify -> rewrite."""

from __future__ import annotations

import torch.fx as fx

from .detect import find_attention
from .layout import infer_layouts
from .rewrite import rewrite
from .sparsify import decide_all
from t4dopt.options import Options
from t4dopt.sites import SiteDecision


def analyze(gm: fx.GraphModule, options: Options) -> list[SiteDecision]:
    """Find the attention sites of `gm` and decide what each becomes; the graph is not changed."""
    sites = find_attention(gm.graph)
    return decide_all(sites, infer_layouts(sites, options.layout), options)


def run_passes(gm: fx.GraphModule, options: Options, *, reference: bool = False) -> list[SiteDecision]:
    """Analyze and rewrite `gm` in place; returns the decisions, one per site."""
    decisions = analyze(gm, options)
    rewrite(gm, decisions, reference=reference)
    return decisions
