"""What the passes share: the graph module, the options, and each pass's results, by name."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch.fx as fx

from t4dopt.block_layout import BlockLayout
from t4dopt.options import Options
from t4dopt.sites import AttentionSite, JointReading, ModelGrid, SiteDecision, SiteLayout, SiteMask, SiteTokens

if TYPE_CHECKING:
    from .carried_tokens import CarriedOutput
    from .sequence_trace import TokenWalk


@dataclass
class PassState:
    """One run of the passes over one graph module; a pass reads earlier results and writes its own.

    ``reference`` makes the rewrite pass emit the dense masked reference (SDPA with the explicit
    boolean token mask) instead of the ``t4d`` op: what ``verify`` compares against. ``sites``,
    ``masks`` (what each site's attention mask means, or None), ``tokens`` (token maps of q, k, v), ``readings`` (the sequence read as prefix + frames x tokens
    + suffix, or None), ``layouts`` and ``decisions`` are parallel lists, one entry per attention site.
    The rewrite pass records the node that now computes each rewritten site on its decision
    (``SiteDecision.rewritten_output``). A fresh state is made for every run, so nothing carries
    over between graphs, except what `carried` brings: the token maps earlier graphs proved for this graph's
    inputs (`t4dopt.passes.carried_tokens`; by placeholder name). ``walk`` is the sequence trace's memoised walk,
    ``carried_outputs`` the outputs this graph's calls record for later graphs.
    """

    gm: fx.GraphModule
    options: Options
    reference: bool = False
    sites: list[AttentionSite] = field(default_factory=list)
    masks: list[SiteMask | None] = field(default_factory=list)
    tokens: list[SiteTokens] = field(default_factory=list)
    readings: list[JointReading | None] = field(default_factory=list)
    grid: ModelGrid | None = None
    layouts: list[SiteLayout] = field(default_factory=list)
    decisions: list[SiteDecision] = field(default_factory=list)
    carried: dict[str, CarriedOutput] = field(default_factory=dict)
    walk: TokenWalk | None = None
    carried_outputs: tuple[tuple[int, CarriedOutput], ...] = ()
    ring_layouts: dict[fx.Node, BlockLayout] = field(default_factory=dict)
    """The table each ring chunk call traced without a layout gets (`t4dopt.passes.ring_layouts`)."""
