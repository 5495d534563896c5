"""Whole-call graphs for the cache runtime's two common calls: every sublayer computed, or every one reused.

Run segment by segment, a call loses Inductor's fusion across sublayer boundaries and pays
a Python call per segment. Most calls of a sampling loop are uniform (warm-up and refresh
calls compute everything, the calls between reuse everything), so the runtime runs those as
one lowered graph each:

- `tapped_graph`: the whole graph, also returning the values the runtime keeps (each unit's
  entry, the query and attention rows of token-prunable units) and computing the saves of
  every unit and chain (residual, slope, drift) where their values are produced;
- `reused_graph`: the graph with each span of adjacent units replaced by its entry plus a
  saved residual (and slope times steps), which also returns the relative drift of each
  span's entry; everything only the units used (modulation, conditioning projections) is
  dead and removed.

A lowered graph returns one flat tuple; each builder returns, beside its graph, the spec
(`TappedOutputs`, `ReusedOutputs`) that reads that tuple back into named parts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from t4dopt.cache.arithmetic import ADDEND_FIELDS, SaveKind, SaveResult, add_save, read_saves, rebuilt, relative_drift

from .regions import RegionPlan
from .segments import checked_module


class Tapped(NamedTuple):
    """A computed call's results: the graph's output leaves, the tapped values by name, each save's results."""

    leaves: list[Any]
    taps: dict[str, torch.Tensor]
    saves: list[SaveResult]


@dataclass(frozen=True)
class TappedOutputs:
    """What a `tapped_graph` returns, in order: `leaves` output leaves, the `taps`, then `saves` saves of `kind`."""

    leaves: int
    taps: tuple[str, ...]
    kind: SaveKind
    saves: int

    def read(self, flat: Sequence[Any]) -> Tapped:
        taps_end = self.leaves + len(self.taps)
        return Tapped(list(flat[:self.leaves]), dict(zip(self.taps, flat[self.leaves:taps_end])),
                      read_saves([self.kind] * self.saves, flat[taps_end:]))


class Reused(NamedTuple):
    """A reused call's results: the graph's output leaves and the drift of each span's entry."""

    leaves: list[Any]
    drifts: list[torch.Tensor]


@dataclass(frozen=True)
class ReusedOutputs:
    """What a `reused_graph` returns, in order: `leaves` output leaves, then one drift per span."""

    leaves: int
    spans: int

    def read(self, flat: Sequence[Any]) -> Reused:
        return Reused(list(flat[:self.leaves]), list(flat[self.leaves:self.leaves + self.spans]))


class WholeGraph(NamedTuple):
    """A whole-call graph and the spec of its outputs."""

    module: fx.GraphModule
    outputs: TappedOutputs | ReusedOutputs


def _copy(gm: fx.GraphModule) -> tuple[fx.Graph, dict[str, fx.Node], list]:
    """A copy of `gm`'s graph without its output node, its nodes by name, and the output's tensor leaves."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    output = None
    for node in gm.graph.nodes:
        if node.op == "output":
            output = node
            continue
        env[node] = graph.node_copy(node, env.__getitem__)
    leaves = [leaf for leaf in pytree.tree_leaves(fx.node.map_arg(output.args[0], env.__getitem__))
              if isinstance(leaf, fx.Node)]
    return graph, {node.name: copied for node, copied in env.items()}, leaves


class _Inputs:
    """Appends placeholders after a copied graph's own inputs, in order."""

    def __init__(self, graph: fx.Graph):
        self.graph = graph
        self.last = [n for n in graph.nodes if n.op == "placeholder"][-1]

    def add(self, name: str) -> fx.Node:
        with self.graph.inserting_after(self.last):
            self.last = self.graph.placeholder(name)
        return self.last


def tapped_graph(gm: fx.GraphModule, taps: Sequence[str], saved: Sequence[tuple[str, str]] = (),
                 kind: SaveKind = SaveKind.FIRST) -> WholeGraph:
    """``gm`` also returning the values named by `taps` and the results of a save of `kind` per `saved` value.

    Each of `saved`, ``(entry, exit)`` by name, is an `arithmetic.add_save`; the graph takes
    their arguments (`SaveKind.arguments`) after ``gm``'s inputs, save after save.
    """
    graph, by_name, leaves = _copy(gm)
    inputs = _Inputs(graph)
    results = []
    for index, (entry, exit_value) in enumerate(saved):
        arguments = [inputs.add(f"_t4d_save{index}_{name}") for name in kind.arguments]
        results += add_save(graph, kind, by_name[exit_value], by_name[entry], arguments)
    graph.output(tuple(leaves) + tuple(by_name[name] for name in taps) + tuple(results))
    return WholeGraph(checked_module(gm, graph), TappedOutputs(len(leaves), tuple(taps), kind, len(saved)))


def reused_graph(gm: fx.GraphModule, plan: RegionPlan, spans: Sequence[tuple[int, int]],
                 orders: Sequence[int]) -> WholeGraph | None:
    """``gm`` with each span of units ``(first, last)`` rebuilt from saved tensors.

    The graph takes ``gm``'s inputs, then per span ``before`` and the arguments of
    `arithmetic.rebuilt` for its extrapolation order (``ADDEND_FIELDS[order]``). None when a
    unit's nodes would still be needed (nothing then to gain); that depends on `spans`, not
    on `orders`.
    """
    graph, by_name, leaves = _copy(gm)
    inputs = _Inputs(graph)
    drifts = []
    rebuilt_exits: dict[fx.Node, fx.Node] = {}
    """A span's exit -> the value rebuilding it: the entry of a next span that starts there (spans that touch
    but are not one span, where another segment also reads the value between them)."""
    for index, ((first, last), order) in enumerate(zip(spans, orders)):
        before = inputs.add(f"_t4d_span{index}_before")
        addend = [inputs.add(f"_t4d_span{index}_{name}") for name in ADDEND_FIELDS[order]]
        entry, exit_node = by_name[plan.units[first].entry.name], by_name[plan.units[last].exit.name]
        entry = rebuilt_exits.get(entry, entry)
        with graph.inserting_before(exit_node):
            value = graph.call_function(rebuilt, (entry, *addend))
            drifts.append(graph.call_function(relative_drift, (entry, before)))
        exit_node.replace_all_uses_with(value)
        rebuilt_exits[exit_node] = value
        leaves = [value if leaf is exit_node else leaf for leaf in leaves]
    graph.output(tuple(leaves) + tuple(drifts))
    graph.eliminate_dead_code()
    remaining = {node.name for node in graph.nodes}
    if any(node.name in remaining for first, last in spans for unit in plan.units[first:last + 1] for node in unit.nodes):
        return None
    return WholeGraph(checked_module(gm, graph), ReusedOutputs(len(leaves), len(spans)))
