"""Split a graph into segments at region boundaries, so a runtime can run, skip or prune each one.

The first segment computes every lateral value (those that do not depend on the token stream);
then each region of the `RegionPlan` becomes a segment, adjacent regions without attention
merged into one. A segment is a GraphModule over plain tensors: its inputs and outputs are
named by the nodes of the original graph, so the runtime keeps one environment of values.

A unit whose attention the token level can prune gets two extra variants: ``full`` also
returns the attention's query and output (the `TokenRows` later calls are refreshed against),
``pruned`` takes those rows after its inputs and recomputes only the rows whose query moved
most. Both append the new `TokenRows` to the segment's outputs (`token_outputs` splits them).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.fx as fx
import torch.nn.functional as F

from .regions import CacheUnit, RegionPlan


@dataclass
class Segment:
    """A piece of the graph: ``gm(*values of inputs) -> tuple(values of outputs)``.

    ``token_full`` / ``token_pruned`` are the token-level variants of a unit (see module doc).
    """

    gm: fx.GraphModule
    inputs: list[fx.Node]
    outputs: list[fx.Node]
    unit: int | None = None
    token_full: fx.GraphModule | None = None
    token_pruned: fx.GraphModule | None = None


class TokenRows(NamedTuple):
    """What the token level keeps of a unit's attention: the reference queries and the output rows."""

    query: torch.Tensor
    rows: torch.Tensor


def token_outputs(values: Sequence[Any]) -> tuple[list[Any], TokenRows]:
    """A token variant's results split into the segment's outputs and the `TokenRows` appended to them."""
    *outputs, query, rows = values
    return outputs, TokenRows(query, rows)


def refresh_rows(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, reference_query: torch.Tensor,
                 cached: torch.Tensor, rows: int, scale: float | None,
                 is_causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention for the `rows` sequences whose query moved most since `reference_query`; the rest keep `cached`.

    Rows (dim 0) are independent sequences, so each recomputed row is exact. Returns the new
    output and the new reference queries (those of the recomputed rows replaced).
    """
    moved = (query - reference_query).abs().flatten(1).sum(1)
    index = torch.topk(moved, rows, sorted=False).indices
    fresh_query = query.index_select(0, index)
    fresh = F.scaled_dot_product_attention(fresh_query, key.index_select(0, index), value.index_select(0, index),
                                           scale=scale, is_causal=is_causal)
    return cached.index_copy(0, index, fresh), reference_query.index_copy(0, index, fresh_query)


def _users_outside(nodes: list[fx.Node]) -> list[fx.Node]:
    inside = set(nodes)
    return [n for n in nodes if any(user not in inside for user in n.users)]


def _extract(nodes: list[fx.Node], outputs: list[fx.Node], extra_inputs: int = 0) -> tuple[fx.Graph, dict[fx.Node, fx.Node], list[fx.Node], list[fx.Node]]:
    """A graph computing `outputs` from the values `nodes` take from outside; also the node map and placeholders."""
    inside = set(nodes)
    inputs: list[fx.Node] = []
    for node in nodes:
        for used in node.all_input_nodes:
            if used not in inside and used not in inputs:
                inputs.append(used)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for used in inputs:
        env[used] = graph.placeholder(used.name)
        env[used].meta = dict(used.meta)
    extras = [graph.placeholder(f"_t4d_state{i}") for i in range(extra_inputs)]
    for node in nodes:
        env[node] = graph.node_copy(node, env.__getitem__)
    graph.output(tuple(env[n] for n in outputs))
    return graph, env, inputs, extras


def checked_module(root: fx.GraphModule, graph: fx.Graph) -> fx.GraphModule:
    graph.lint()
    return fx.GraphModule(root, graph)


def _token_variants(root: fx.GraphModule, unit: CacheUnit, outputs: list[fx.Node],
                    rows: int) -> tuple[fx.GraphModule, fx.GraphModule]:
    site = unit.token_site.site
    attention = unit.token_site.rewritten_output or site.output
    graph, env, _, _ = _extract(unit.nodes, outputs)
    result = next(n for n in graph.nodes if n.op == "output")
    result.args = (tuple(result.args[0]) + (env[site.query], env[attention]),)
    full = checked_module(root, graph)

    graph, env, _, (reference, cached) = _extract(unit.nodes, outputs, extra_inputs=2)
    old = env[attention]
    with graph.inserting_before(old):
        pair = graph.call_function(refresh_rows, (env[site.query], env[site.key], env[site.value], reference, cached,
                                                  rows, site.scale, site.is_causal))
        fresh = graph.call_function(operator.getitem, (pair, 0))
        new_reference = graph.call_function(operator.getitem, (pair, 1))
    old.replace_all_uses_with(fresh)
    graph.erase_node(old)
    result = next(n for n in graph.nodes if n.op == "output")
    result.args = (tuple(result.args[0]) + (new_reference, fresh),)
    graph.eliminate_dead_code()
    return full, checked_module(root, graph)


def token_rows(unit: CacheUnit, ratio: float) -> int:
    """How many sequences of `unit`'s attention the token level recomputes at `ratio` (at least one)."""
    sequences = unit.token_site.site.query_shape[0]
    return max(1, min(sequences, round(ratio * sequences)))


def split(gm: fx.GraphModule, plan: RegionPlan, token_ratio: float) -> list[Segment]:
    """The segments of `gm` in execution order."""
    groups: list[tuple[list[fx.Node], int | None]] = []
    if plan.lateral:
        groups.append((plan.lateral, None))
    for nodes, unit in plan.regions:
        if not nodes:
            continue
        if unit is None and groups and groups[-1][1] is None and groups[-1][0] is not plan.lateral:
            groups[-1][0].extend(nodes)
        else:
            groups.append((list(nodes), unit))
    segments = []
    for nodes, unit_index in groups:
        outputs = _users_outside(nodes)
        graph, _, inputs, _ = _extract(nodes, outputs)
        segment = Segment(checked_module(gm, graph), inputs, outputs, unit_index)
        if unit_index is not None and plan.units[unit_index].token_site is not None:
            unit = plan.units[unit_index]
            segment.token_full, segment.token_pruned = _token_variants(gm, unit, outputs, token_rows(unit, token_ratio))
        segments.append(segment)
    return segments
