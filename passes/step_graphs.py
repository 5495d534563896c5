"""Whole-call graphs for the cache runtime's two common calls: every sublayer computed, or every one reused.

Run segment by segment, a call loses Inductor's fusion across sublayer boundaries and pays
a Python call per segment. Most calls of a sampling loop are uniform (warm-up and refresh
calls compute everything, the calls between reuse everything), so the runtime runs those as
one lowered graph each:

- `tapped_graph`: the whole graph, also returning the values the runtime stores (each unit's
  entry and exit, and the query and attention rows of token-prunable units);
- `reused_graph`: the graph with each run of adjacent units replaced by its entry plus a
  stored residual (and slope times steps), which also returns the relative drift of each
  run's entry; everything only the units used (modulation, conditioning projections) is
  dead and removed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.fx as fx
from torch.utils import _pytree as pytree

from t4dopt.cache.arithmetic import TERM_NAMES, rebuilt, relative_drift

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


def tapped_graph(gm: fx.GraphModule, taps: Sequence[str]) -> fx.GraphModule:
    """``gm`` returning ``(*output tensor leaves, *values named by taps)`` as one flat tuple."""
    graph, by_name, leaves = _copy(gm)
    graph.output(tuple(leaves) + tuple(by_name[name] for name in taps))
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

