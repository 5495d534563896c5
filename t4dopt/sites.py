"""Plain data the passes hand each other: an attention site, where its sequence came from, the token
grid, what it mixes, what became of it."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch.fx as fx

from t4dopt.block_layout import BlockLayout


class SiteKind(str, Enum):
    """Which axes of the 4D token grid an attention mixes."""

    SPATIAL = "spatial"
    VIEW = "view"
    TEMPORAL = "temporal"
    SPATIOTEMPORAL = "spatiotemporal"
    CROSS = "cross"
    UNKNOWN = "unknown"


@dataclass
class AttentionSite:
    """One attention in an FX graph, normalised to q, k, v of shape [..., N, D].

    ``nodes`` are the graph nodes that make up the attention (one for SDPA; matmul, scale,
    softmax, matmul for hand-written attention); ``output`` is the last of them.
    ``key_transposed`` is set when the graph holds k^T ([..., D, N]) rather than k.
    """

    name: str
    form: str
    query: fx.Node
    key: fx.Node
    value: fx.Node
    output: fx.Node
    nodes: list[fx.Node]
    query_shape: tuple[int, ...]
    key_shape: tuple[int, ...]
    value_shape: tuple[int, ...]
    dtype: str
    scale: float | None = None
    attn_mask: fx.Node | None = None
    is_causal: bool = False
    dropout_p: float = 0.0
    enable_gqa: bool = False
    key_transposed: bool = False
    module_path: str = ""

    @property
    def query_len(self) -> int:
        return self.query_shape[-2]

    @property
    def key_len(self) -> int:
        return self.key_shape[-1] if self.key_transposed else self.key_shape[-2]

    @property
    def head_dim(self) -> int:
        return self.query_shape[-1]

    @property
    def batch(self) -> int:
        """Product of the leading dims: independent sequences x heads."""
        total = 1
        for size in self.query_shape[:-2]:
            total *= size
        return total

    def dense_flops(self) -> float:
        """Multiply-adds of QK^T and PV, counted as 2 FLOPs each."""
        return 2.0 * self.batch * self.query_len * self.key_len * (self.head_dim + self.value_shape[-1])


@dataclass(frozen=True)
class SequenceOrigin:
    """The sequence axis is ``prefix`` concatenated tokens, then the merge of ``factors`` (outer first)."""

    prefix: int
    factors: tuple[int, ...]

    @property
    def merged(self) -> bool:
        return len(self.factors) > 1


@dataclass(frozen=True)
class TokenGrid:
    """The token grid the sites are read against: from the layout option, or inferred from the graph (``source``)."""

    frames: int | None
    views: int | None
    tokens_per_frame: int | None
    prefix_tokens: int | None
    source: str


@dataclass
class SiteLayout:
    """What a site mixes, with the token grid it was read against."""

    kind: SiteKind
    frames: int | None = None
    tokens_per_frame: int | None = None
    prefix_tokens: int = 0
    evidence: str = ""


@dataclass
class SiteDecision:
    """What the sparsify pass made of one site."""

    site: AttentionSite
    layout: SiteLayout
    action: str
    reason: str = ""
    block_layout: BlockLayout | None = None
    warn: bool = False
    rewritten_output: fx.Node | None = None
    """The node computing the attention after the rewrite, when the rewrite replaced the site's nodes."""

    @property
    def density(self) -> float:
        return self.block_layout.density if self.block_layout is not None else 1.0
