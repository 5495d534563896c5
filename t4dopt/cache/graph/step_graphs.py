"""Whole-call graphs for the cache runtime's two common calls: every sublayer computed, or every one reused.

Run segment by segment, a call loses Inductor's fusion across sublayer boundaries and pays
a Python call per segment. Most calls of a sampling loop are uniform (warm-up and refresh
calls compute everything, the calls between reuse everything), so the runtime runs those as
one lowered graph each:

- `tapped_graph`: the whole graph, also returning the values the runtime keeps (each unit's
  entry, the query and attention rows of token-prunable units) and computing the stores of
  every unit and chain (residual, slope, drift) where their values are produced;
- `reused_graph`: the graph with each run of adjacent units replaced by its entry plus a
  stored residual (and slope times steps), which also returns the relative drift of each
  run's entry; everything only the units used (modulation, conditioning projections) is
  dead and removed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.fx as fx
from torch.utils import _pytree as pytree

from t4dopt.cache.arithmetic import STORE_KINDS, TERM_NAMES, add_store, rebuilt, relative_drift

from .regions import RegionPlan
from .segments import checked_module


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


def tapped_graph(gm: fx.GraphModule, taps: Sequence[str], stores: Sequence[tuple[str, str]] = (),
                 kind: str = "first") -> fx.GraphModule:
    """``gm`` returning ``(*output tensor leaves, *values named by taps, *store results)`` as one flat tuple.

    Each of `stores`, ``(entry, exit)`` by name, is an `arithmetic.add_store` of `kind`; the
    graph takes their arguments after ``gm``'s inputs, store after store.
    """
    graph, by_name, leaves = _copy(gm)
    last_input = [n for n in graph.nodes if n.op == "placeholder"][-1]
    results = []
    for index, (entry, exit_value) in enumerate(stores):
        arguments = []
        for name in STORE_KINDS[kind][1]:
            with graph.inserting_after(last_input):
                last_input = graph.placeholder(f"_t4d_store{index}_{name}")
            arguments.append(last_input)
        results += add_store(graph, kind, by_name[exit_value], by_name[entry], arguments)
    graph.output(tuple(leaves) + tuple(by_name[name] for name in taps) + tuple(results))
    return checked_module(gm, graph)


def reused_graph(gm: fx.GraphModule, plan: RegionPlan, runs: Sequence[tuple[int, int]],
                 orders: Sequence[int]) -> fx.GraphModule | None:
    """``gm`` with each run of units ``(first, last)`` rebuilt from stored tensors.

    The graph takes ``gm``'s inputs, then per run ``before`` and the arguments of
    `arithmetic.rebuilt` for its extrapolation order (``TERM_NAMES[order]``), and returns
    ``(*output tensor leaves, *drift of each run's entry from before)``. None when a unit's
    nodes would still be needed (nothing then to gain).
    """
    graph, by_name, leaves = _copy(gm)
    last_input = [n for n in graph.nodes if n.op == "placeholder"][-1]
    drifts = []
    for index, ((first, last), order) in enumerate(zip(runs, orders)):
        names = ("before", *TERM_NAMES[order])
        extras = []
        for name in names:
            with graph.inserting_after(last_input):
                last_input = graph.placeholder(f"_t4d_run{index}_{name}")
            extras.append(last_input)
        entry, exit_node = by_name[plan.units[first].entry.name], by_name[plan.units[last].exit.name]
        with graph.inserting_before(exit_node):
            value = graph.call_function(rebuilt, (entry, *extras[1:]))
            drifts.append(graph.call_function(relative_drift, (entry, extras[0])))
        exit_node.replace_all_uses_with(value)
        leaves = [value if leaf is exit_node else leaf for leaf in leaves]
    graph.output(tuple(leaves) + tuple(drifts))
    graph.eliminate_dead_code()
    remaining = {node.name for node in graph.nodes}
    if any(node.name in remaining for first, last in runs for unit in plan.units[first:last + 1] for node in unit.nodes):
        return None
    return checked_module(gm, graph)
