"""Plain data the passes hand each other: an attention site, where its tokens come from (token maps),
the token grid, what it mixes, what became of it."""

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
    OTHER = "other"
    """Self-attention over another sequence than the video (text refiners, registers): nothing to mask."""
    UNKNOWN = "unknown"


@dataclass
class AttentionSite:
    """One attention in an FX graph, normalised to q, k, v of shape [..., N, D].

    ``form``: ``"sdpa"``, ``"handwritten"`` or ``"fused"`` (a direct call of aten's fused attention kernel
    ``op``, `t4dopt.compat.FUSED_SDPA_OPS`, never rewritten: its ``output`` node is a tuple, item 0 the
    attention's output and item 1 its log-sum-exp). ``nodes`` are the graph nodes that make up the attention
    (one for SDPA and fused calls; matmul, scale, softmax, matmul for hand-written attention); ``output`` is the
    last of them. ``key_transposed`` is set when the graph holds k^T ([..., D, N]) rather than k.
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
    op: str = ""

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
class Digit:
    """One mixed-radix digit of a token index: it takes `size` values and moves the root's coordinate on
    `axis` by `stride` per value (a patch size, or a slice step).

    ``role`` is what a patch embedding met on the way says the axis is: ``"time"`` (the depth of a
    Conv3d), ``"space"`` (the height and width of a Conv2d / Conv3d / unfold) or ``"batched"`` (folded
    into the batch of a per-image Conv2d: frames or views); None where nothing said.
    """

    axis: int
    size: int
    stride: int = 1
    role: str | None = None


class Stop(str, Enum):
    """Why the walk up from a sequence axis ended at a segment's root."""

    INPUT = "input"
    """a graph input, a parameter or buffer, or a constant (arange, zeros...): the tokens' source."""
    OPAQUE = "opaque"
    """an op whose effect on the token axis the walk does not know: the order beyond it is not visible."""
    REORDER = "reorder"
    """an op that reorders, repeats or mixes the order of tokens (flip, roll, gather, a tensor index...)."""


@dataclass(frozen=True, eq=False)
class Segment:
    """`length` consecutive tokens of a sequence, read from `root`: token t sits at the coordinates
    the `digits` give it (t in mixed radix, outer digit first) plus `offsets` ((axis, start) pairs).

    ``reason`` says where and why the walk stopped when it did not reach an input; ``notes`` what
    the walk learnt on the way (a patch embedding). Two segments are the same tokens when `key`
    is equal: same root, digits and offsets (the notes do not count).
    """

    length: int
    root: fx.Node
    digits: tuple[Digit, ...]
    offsets: tuple[tuple[int, int], ...] = ()
    stop: Stop = Stop.INPUT
    reason: str = ""
    notes: tuple[str, ...] = ()
    grids: tuple[tuple[int, ...], ...] = ()
    """Token grids of positional tables applied to these tokens on the way (a rotary embedding built from
    ``meshgrid(frames, height, width)``): the sizes of their token axes, outer first."""

    @property
    def key(self) -> tuple:
        return (self.length, self.root, self.digits, self.offsets, self.stop)

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(d.size for d in self.digits)


@dataclass(frozen=True, eq=False)
class TokenMap:
    """Where each position of a sequence axis comes from: consecutive segments (text, video, ...)."""

    segments: tuple[Segment, ...]

    @property
    def length(self) -> int:
        return sum(s.length for s in self.segments)

    def same_tokens(self, other: TokenMap) -> bool:
        return [s.key for s in self.segments] == [s.key for s in other.segments]


@dataclass(frozen=True)
class SiteTokens:
    """The token maps of one site's queries, keys and values (along their sequence axes)."""

    query: TokenMap
    key: TokenMap
    value: TokenMap


CONFIRMED, UNCONFIRMED, CONTRADICTED = "confirmed", "unconfirmed", "contradicted"
"""How sure the graph makes a reading of a sequence (`JointReading.status`)."""


@dataclass(frozen=True)
class JointReading:
    """A site's sequence read as prefix + frames x tokens + suffix (None where it is not joint)."""

    status: str
    frames: int = 0
    tokens: int = 0
    prefix: int = 0
    suffix: int = 0
    evidence: str = ""
    video: fx.Node | None = None
    """The tensor the video tokens are read from."""


@dataclass(frozen=True)
class ModelGrid:
    """The grid of the model's tokens the sites are read against: from the layout option, or inferred from the graph
    (``source``). Not `t4dopt.block_layout.TokenGrid`, the grid one block table was built for."""

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
    suffix_tokens: int = 0
    trusted: bool = False
    """Read from the layout option without the graph confirming it (``trust_layout=True``)."""


@dataclass(frozen=True, eq=False)
class SiteMask:
    """What a site's attention mask means to the block table (`t4dopt.passes.attention_masks`): the parts it
    factors into, each combined with the block table in its own way.

    ``keys``: a node constant over heads and queries (per batch element and key), applied by the op as its
    ``key_mask``; ``queries``: a boolean node constant over heads and keys: the query rows it masks out attend
    no key, and get zeros, as from SDPA; ``structured``: a constant mask over queries and keys (bool or additive
    [N, N]), intersected with the block table. ``reason``: why the site stays dense (nothing else is set then).
    A mask with no part keeps every key.
    """

    keys: fx.Node | None = None
    queries: fx.Node | None = None
    structured: object = None
    evidence: str = ""
    reason: str = ""

    @property
    def supported(self) -> bool:
        return not self.reason

    @property
    def empty(self) -> bool:
        return self.keys is None and self.queries is None and self.structured is None and not self.reason


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
    key_mask: fx.Node | None = None
    """The model's key mask the rewritten op applies on top of the block table (`SiteMask.keys`)."""
    query_mask: fx.Node | None = None
    """The model's query mask: rows it masks out get zeros after the rewritten op (`SiteMask.queries`)."""

    @property
    def density(self) -> float:
        return self.block_layout.density if self.block_layout is not None else 1.0


@dataclass(frozen=True)
class HiddenAttention:
    """An attention dynamo left out of the compiled graphs: a graph break inside it (`t4dopt.passes.graph_breaks`).

    ``module``: the attribute path of the attention, relative to the module whose frame was compiled;
    ``where``: ``file.py:line`` of the break; ``reason``: dynamo's reason; ``avoid``: what would keep it in.
    """

    module: str
    where: str
    reason: str
    avoid: str
