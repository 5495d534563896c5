"""The layout given to the ring backend, checked against the one the graph proves.

`t4dopt.context_parallel.use_sparse_ring` takes the layout from the user: the ring backend runs while
dynamo traces the model, before this backend sees any graph, and must then already know the chunk size,
the block table and which chunk pairs to skip (see that module). The graph it leaves behind still
shows what the layout should be: the sequence diffusers' split hook cuts into ``world`` equal shards
(``x.chunk(world, dim)[rank]``) is the whole sequence, read here as on one GPU
(`t4dopt.passes.layout.read_joint`, patch embeddings and the layout option). Each
``t4d::block_sparse_attention_chunk`` call of the graph is checked: its layout's token grid must be
the proven one (frames, tokens per frame, prefix and suffix tokens), or the compile stops with a
`T4DOptionError` naming both; a grid the graph cannot confirm is reported (`T4DWarning`, an error
under ``strict=True``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.fx as fx

from .layout import read_joint
from .sequence_trace import SPLITS, TokenWalk
from .state import PassState
from t4dopt.block_layout import BlockLayout, TokenGrid
from t4dopt.compat import placeholder_origin
from t4dopt.errors import T4DOptionError, warn_unconfirmed
from t4dopt.fx_utils import example_value, op_name, shape_of
from t4dopt.ops.tables import layout_of
from t4dopt.sites import CONFIRMED

import t4dopt.ops  # noqa: F401  (registers torch.ops.t4d)

CHUNK_TARGETS = frozenset({torch.ops.t4d.block_sparse_attention_chunk, torch.ops.t4d.block_sparse_attention_chunk.default})
BLOCK_STARTS_ARGUMENT = 5


class Proof(NamedTuple):
    """What the graph shows of the sharded sequence: the grid (None when unproven) and why."""

    grid: TokenGrid | None
    evidence: str


def _tensor(node: object, gm: fx.GraphModule) -> torch.Tensor | None:
    """The real tensor behind a graph input or attribute (while the backend compiles the graph)."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "get_attr":
        value = gm
        for part in str(node.target).split("."):
            value = getattr(value, part, None)
        return value if isinstance(value, torch.Tensor) else None
    origin = placeholder_origin(node) if node.op == "placeholder" else None
    return origin[1] if origin is not None and isinstance(origin[1], torch.Tensor) else None


def _sharded(query: fx.Node, length: int, shard: int) -> list[tuple[fx.Node, int]]:
    """(sequence, dim) of each cut of a `length`-token sequence into equal shards of `shard` tokens that the
    queries are computed from (``x.chunk(world, dim)[rank]``, or a split into equal pieces)."""
    found, seen, stack = [], set(), [query]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        stack.extend(node.all_input_nodes)
        pieces = node.args[0] if op_name(node) == "getitem" and node.args else None
        if not isinstance(pieces, fx.Node) or op_name(pieces) not in SPLITS or not pieces.args:
            continue
        source, values = pieces.args[0], example_value(pieces)
        shape = shape_of(source)
        if not isinstance(source, fx.Node) or shape is None or not isinstance(values, (tuple, list)):
            continue
        dim = pieces.kwargs.get("dim", pieces.args[2] if len(pieces.args) > 2 else 0) % len(shape)
        if shape[dim] == length and all(int(v.shape[dim]) == shard for v in values):
            found.append((source, dim))
    return found


def prove(walk: TokenWalk, state: PassState, query: fx.Node, layout: BlockLayout) -> Proof:
    """The grid of the sequence the queries are one shard of, read as on one GPU."""
    shard = shape_of(query)[-2]
    readings = []
    for source, dim in _sharded(query, layout.seq_len, shard):
        reading = read_joint(walk.sequence(source, dim), state.options.layout)
        if reading is not None and reading.status == CONFIRMED:
            readings.append((source, TokenGrid(reading.frames, reading.tokens, reading.prefix, reading.suffix),
                             reading.evidence))
    grids = {grid for _, grid, _ in readings}
    if len(grids) == 1:
        source, grid, evidence = readings[0]
        return Proof(grid, f"the sequence {source.name} the ring shards: {evidence}")
    if grids:
        return Proof(None, "the sharded sequences read as different grids: " +
                     "; ".join(f"{s.name}: {g.describe()}" for s, g, _ in readings))
    return Proof(None, f"no sequence of {layout.seq_len} tokens cut into shards of {shard} that the graph reads "
                       "as frames x tokens (a patch embedding, or the layout option) was found behind the queries")


def check_ring_layouts(state: PassState) -> None:
    """Check the layout of each ring chunk call against the grid of the sequence the graph shards."""
    walk, checked = None, set()
    for node in state.gm.graph.nodes:
        if node.op != "call_function" or node.target not in CHUNK_TARGETS:
            continue
        layout = layout_of(_tensor(node.args[BLOCK_STARTS_ARGUMENT], state.gm))
        if layout is None or layout.grid is None or id(layout) in checked:
            continue
        checked.add(id(layout))
        walk = walk or TokenWalk(state.gm.graph)
        proof = prove(walk, state, node.args[0], layout)
        given = layout.grid
        if proof.grid is None:
            warn_unconfirmed(f"turbo4d: the ring layout ({given.describe()}) is not confirmed by the graph: "
                             f"{proof.evidence}", state.options)
        elif proof.grid != given:
            raise T4DOptionError(f"use_sparse_ring: the layout says {given.describe()}, but the graph shows "
                                 f"{proof.grid.describe()} ({proof.evidence})", option="layout",
                                 value=given.describe(), allowed=proof.grid.describe())
