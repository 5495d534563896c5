"""The layout of the ring backend's chunk calls: proven from the graph, or the one given checked against it.

`t4dopt.context_parallel.use_sparse_ring` runs while dynamo traces the model, before this backend sees
any graph. The graph it leaves behind still shows what the layout is: the sequence diffusers' split
hook cuts into equal shards (``x.chunk(world, dim)[rank]``) is the whole sequence, read here as on one
GPU (`t4dopt.passes.layout.read_joint`: patch embeddings and the layout option). For each
``t4d::block_sparse_attention_chunk`` call:

- traced without a layout (the stand-in table `t4dopt.ops.chunk.DEFERRED`): the proven grid gets the
  ``options['sparse']`` policy's table (`rewrite_ring_layouts` puts it in the call); a grid the graph
  does not prove, or ``sparse=None``, gets a dense table (the exact dense ring) and a `T4DWarning`
  (an error under ``strict=True``). Every chunk pair is then called, those that keep no block return
  at once (the explicit form skips them when tracing);
- traced with a layout: its token grid must be the proven one (frames, tokens per frame, prefix and
  suffix tokens), or the compile stops with a `T4DOptionError` naming both; a grid the graph cannot
  confirm is reported (`T4DWarning`, an error under ``strict=True``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.fx as fx

from .layout import read_joint
from .rewrite import add_buffer
from .sequence_trace import SPLITS, TokenWalk
from .sparsify import block_layout_for
from .state import PassState
from t4dopt.block_layout import BlockLayout, TokenGrid
from t4dopt.compat import placeholder_origin
from t4dopt.errors import T4DOptionError, warn_unless_strict
from t4dopt.fx_utils import device_of, example_value, op_name, shape_of
from t4dopt.ops.chunk import DEFERRED
from t4dopt.ops.schema import TABLE_ARGUMENTS
from t4dopt.ops.tables import layout_of
from t4dopt.sites import CONFIRMED, SiteKind, SiteLayout

import t4dopt.ops  # noqa: F401  (registers torch.ops.t4d)

CHUNK_TARGETS = frozenset({torch.ops.t4d.block_sparse_attention_chunk,
                           torch.ops.t4d.block_sparse_attention_chunk.default})
TABLES_AT, BLOCK_STARTS_ARGUMENT, BLOCK_SIZE_ARGUMENT, KV_OFFSET_ARGUMENT = 3, 5, 6, 8


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


def _sharded(query: fx.Node, length: int | None, shard: int) -> list[tuple[fx.Node, int]]:
    """(sequence, dim) of each cut of a `length`-token sequence (None: of any length) into equal shards of `shard`
    tokens that the queries are computed from (``x.chunk(world, dim)[rank]``, or a split into equal pieces)."""
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
        if (length is None or shape[dim] == length) and len(values) > 1 and all(
                int(v.shape[dim]) == shard for v in values):
            found.append((source, dim))
    return found


def prove(walk: TokenWalk, state: PassState, query: fx.Node, length: int | None) -> Proof:
    """The grid of the `length`-token sequence (None: of any length) the queries are one shard of, read as on one
    GPU."""
    shard = shape_of(query)[-2]
    readings = []
    for source, dim in _sharded(query, length, shard):
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
    return Proof(None, f"no sequence{f' of {length} tokens' if length else ''} cut into shards of {shard} that the "
                       "graph reads as frames x tokens (a patch embedding, or the layout option) was found behind "
                       "the queries")


def _proven_layout(calls: list[fx.Node], proof: Proof, state: PassState) -> BlockLayout:
    """The table the chunk calls of one ring attention traced without a layout get (one query shard, every key
    chunk): the policy's on the proven grid, else dense, over the tokens their chunks cover."""
    shard = shape_of(calls[0].args[0])[-2]
    length = max(call.args[KV_OFFSET_ARGUMENT] for call in calls) + shard
    spec, grid = state.options.sparse, proof.grid
    if grid is not None and spec is not None and grid.seq_len == length:
        return block_layout_for(spec, SiteLayout(SiteKind.SPATIOTEMPORAL, grid.frames, grid.tokens_per_frame,
                                                 grid.prefix_tokens, suffix_tokens=grid.suffix_tokens))
    if grid is None:
        why = proof.evidence
    elif spec is None:
        why = "sparse=None: no mask policy chosen"
    else:
        why = f"the graph shows {grid.describe()} ({grid.seq_len} tokens), but the ring's chunks cover {length}"
    warn_unless_strict(f"turbo4d: ring attention {calls[0].name} left dense (use_sparse_ring without a layout): "
                       f"{why}", state.options)
    return BlockLayout.from_dense(torch.ones(1, 1, dtype=torch.bool), torch.tensor([0, length]), length,
                                  "dense ring (no layout proven)")


def check_ring_layouts(state: PassState) -> None:
    """Prove the layout of each ring chunk call from the sequence the graph shards (check a given one against it)."""
    checked, deferred = set(), {}
    chunk_calls = [n for n in state.gm.graph.nodes if n.op == "call_function" and n.target in CHUNK_TARGETS]
    walk = TokenWalk(state.gm.graph) if chunk_calls else None
    state.ring_layouts = {}
    for node in chunk_calls:
        layout = layout_of(_tensor(node.args[BLOCK_STARTS_ARGUMENT], state.gm))
        if layout is DEFERRED:
            deferred.setdefault(node.args[0], []).append(node)
        if layout is None or layout is DEFERRED or layout.grid is None or id(layout) in checked:
            continue
        checked.add(id(layout))
        proof = prove(walk, state, node.args[0], layout.seq_len)
        given = layout.grid
        if proof.grid is None:
            warn_unless_strict(f"turbo4d: the ring layout ({given.describe()}) is not confirmed by the graph: "
                               f"{proof.evidence}", state.options)
        elif proof.grid != given:
            raise T4DOptionError(f"use_sparse_ring: the layout says {given.describe()}, but the graph shows "
                                 f"{proof.grid.describe()} ({proof.evidence})", option="layout",
                                 value=given.describe(), allowed=proof.grid.describe())
    for query, calls in deferred.items():
        layout = _proven_layout(calls, prove(walk, state, query, None), state)
        state.ring_layouts.update((call, layout) for call in calls)


def rewrite_ring_layouts(state: PassState) -> None:
    """Give each ring chunk call traced without a layout the table proven for it (`check_ring_layouts`)."""
    gm, buffers = state.gm, {}
    first = next(n for n in gm.graph.nodes if n.op != "placeholder")
    for node, layout in state.ring_layouts.items():
        device = device_of(node.args[0])
        if (id(layout), device) not in buffers:  # one set of table buffers per layout and device
            index = len(buffers)
            with gm.graph.inserting_before(first):
                buffers[id(layout), device] = [add_buffer(gm, f"_t4d_ring{index}_{name}", tensor)
                                               for name, tensor in zip(TABLE_ARGUMENTS, layout.tensors(device))]
        tables = buffers[id(layout), device]
        args = list(node.args)
        args[TABLES_AT:BLOCK_SIZE_ARGUMENT + 1] = [*tables, layout.block_size]
        node.args = tuple(args)
    if state.ring_layouts:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
