"""The collectives of a graph (context parallelism), and what the cache must do about them.

Under diffusers' context parallelism every rank runs the same graph on a shard of the sequence, with
collectives (``_c10d_functional`` ops: Ulysses' all-to-all, ring attention's all-gather, the gather
at the output) between. A cache unit that holds a collective is safe only when every rank decides
alike for it: a rank that reuses the unit while another computes it would wait in the collective
forever. So the runtime reduces what it reads back before each call over the graph's group
(`t4dopt.cache.readback`): every rank reads the same drifts and makes the same decisions. That needs
one group: a graph whose collectives run over several groups (or one this process cannot resolve)
is left uncached. The token level recomputes rows each rank picks from its own shard, so it is
refused for units that hold a collective.
"""

from __future__ import annotations

import torch.fx as fx

from t4dopt.compat import process_group


def _group_name(node: fx.Node) -> str | None:
    """The process group a functional collective names (its last string argument), None for other nodes."""
    if node.op != "call_function" or not str(node.target).startswith("_c10d_functional."):
        return None
    names = [a for a in list(node.args) + list(node.kwargs.values()) if isinstance(a, str)]
    return names[-1] if names else ""


def is_collective(node: fx.Node) -> bool:
    return _group_name(node) is not None and "wait_tensor" not in str(node.target)


def collective_group(graph: fx.Graph) -> tuple[object | None, str | None]:
    """(the process group the graph's collectives run over, None) or (None, why the graph cannot be cached);
    (None, None) for a graph without collectives."""
    names = {_group_name(node) for node in graph.nodes if is_collective(node)}
    if not names:
        return None, None
    if len(names) > 1:
        return None, (f"the graph's collectives run over {len(names)} process groups ({sorted(names)}); the cache "
                      "keeps the ranks' decisions equal over one group only, and a rank that reuses a sublayer "
                      "holding a collective that another computes would wait forever")
    group = process_group(names.pop())
    if group is None:
        return None, ("the graph's collectives name a process group this process cannot resolve, so the ranks' "
                      "decisions cannot be kept equal")
    return group, None
