"""Find the cacheable regions of a graph: attention sublayers on the residual stream, and S->C->M chains.

A transformer carries one hidden-state stream through residual additions ``h = h + f(h)``. In
the FX graph, the values every path from the stream input to the output passes through are
the dominators of the output node (networkx, over the subgraph reachable from the stream
input). Between two consecutive ones lies a single-entry single-exit region: everything it
computes from the stream enters through its entry and leaves through its exit. Values that
do not depend on the stream (timestep embedding, modulation, conditioning projections,
parameters) are *lateral*: they can be computed before any region.

A region that ends in a residual addition of its entry (``exit = entry + f(entry)``, casts
allowed, also a cast right after the addition, as in ``(h.float() + f(h)).type_as(h)``) and does
real work (attention, a linear layer, a matmul or a convolution) is a cache *unit*: its exit can
be rebuilt from a new entry and the residual ``exit - entry`` stored when it was last computed.
Adjacent units whose attention mixes space, then views, then time form a *chain* that can be
skipped as a whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import operator

import networkx as nx
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.utils import _pytree as pytree

from t4dopt.fx_utils import (CAST_METHODS, example_tensor, example_value, is_parameter_input, is_size, module_path,
                             named_like_timestep, sizes_of)
from t4dopt.sites import SiteDecision, SiteKind

CHAIN_ORDER = (SiteKind.SPATIAL.value, SiteKind.VIEW.value, SiteKind.TEMPORAL.value)
TOKEN_KINDS = (SiteKind.VIEW, SiteKind.TEMPORAL)
WORK_FUNCTIONS = {F.linear, torch.matmul, torch.bmm, torch.baddbmm, torch.addmm, torch.einsum, F.conv1d, F.conv2d,
                  F.conv3d, F.scaled_dot_product_attention}


@dataclass
class CacheUnit:
    """One residual sublayer: the nodes between `entry` and `exit` (exit included), graph order.

    ``sites`` are its attention sites (none for an MLP); ``module`` the module path of its work.

    ``token_site`` is set when the token level can prune it: camera or temporal attention as
    one SDPA call over [sequences, heads, L, D], no mask, so each sequence is an independent row.
    """

    index: int
    entry: fx.Node
    exit: fx.Node
    nodes: list[fx.Node]
    sites: list[SiteDecision]
    module: str
    token_site: SiteDecision | None = None

    @property
    def kind(self) -> str:
        """The attention's kind ("spatial", "view", ...), "mixed" for several kinds, "other" without attention."""
        kinds = {d.layout.kind.value for d in self.sites}
        return kinds.pop() if len(kinds) == 1 else "mixed" if kinds else "other"

    @property
    def name(self) -> str:
        return self.module or f"region@{self.exit.name}"


@dataclass
class CacheChain:
    """Indices of adjacent units forming a spatial -> camera -> motion chain (or a sub-run of it)."""

    units: tuple[int, ...]


class Rejection(NamedTuple):
    """A stretch of the stream that does work but is no cache unit: its module, and why."""

    module: str
    reason: str


@dataclass
class RegionPlan:
    """The stream input, the nodes computed before any region, and the regions in order.

    ``regions`` lists every region as (nodes, unit index or None); ``reason`` says why the plan
    has no units when it has none.
    """

    stream_input: fx.Node | None
    lateral: list[fx.Node] = field(default_factory=list)
    regions: list[tuple[list[fx.Node], int | None]] = field(default_factory=list)
    units: list[CacheUnit] = field(default_factory=list)
    chains: list[CacheChain] = field(default_factory=list)
    reason: str = ""
    rejected: list[Rejection] = field(default_factory=list)
    """The regions that do work but are no units, each with its reason."""


LIKE_FUNCTIONS = {torch.empty_like, torch.zeros_like, torch.ones_like, torch.full_like, torch.rand_like,
                  torch.randn_like}
NEW_METHODS = {"new_empty", "new_zeros", "new_ones", "new_full"}
AS_METHODS = {"type_as", "expand_as", "view_as", "reshape_as", "to"}


def _metadata_only(node: fx.Node) -> set[fx.Node]:
    """The inputs of `node` it reads only the shape, dtype or device of (``torch.empty_like(x)``, ``y.type_as(x)``)."""
    args = node.args
    if node.op == "call_function" and node.target in LIKE_FUNCTIONS and args and isinstance(args[0], fx.Node):
        return {args[0]}
    if node.op == "call_method" and node.target in NEW_METHODS and isinstance(args[0], fx.Node):
        return {args[0]}
    if node.op == "call_method" and node.target in AS_METHODS and len(args) == 2 and isinstance(args[1], fx.Node):
        if args[1] is not args[0] and example_tensor(args[1]) is not None:
            return {args[1]}
    return set()


def dataflow(graph: fx.Graph) -> nx.DiGraph:
    """Edges from each value to its users that read its data.

    Sizes read off a tensor (``x.shape``) carry no data from it, nor do the tensors a node reads
    only the shape, dtype or device of (`_metadata_only`): a positional embedding built
    ``.type_as(latents)`` does not depend on the latents.
    """
    flow = nx.DiGraph()
    for node in graph.nodes:
        flow.add_node(node)
        if is_size(example_value(node)):
            continue
        metadata = _metadata_only(node)
        for used in node.all_input_nodes:
            if used not in metadata:
                flow.add_edge(used, node)
    return flow


def stream_values(graph: fx.Graph, source: fx.Node) -> set[fx.Node]:
    """`source` and every value computed from it.

    Membership follows every edge: a size read off a region's tensor belongs to that region.
    """
    on_stream = {source}
    for node in graph.nodes:
        if any(used in on_stream for used in node.all_input_nodes):
            on_stream.add(node)
    return on_stream


def _stream_dominators(flow: nx.DiGraph, source: fx.Node, output: fx.Node) -> list[fx.Node]:
    """Dominators of `output` in the subgraph reachable from `source`, from `source` to `output`."""
    reachable = nx.descendants(flow, source)
    if output not in reachable:
        return []
    dominators = nx.immediate_dominators(flow.subgraph(reachable | {source}), source)
    chain = [output]
    while chain[-1] is not source:
        chain.append(dominators[chain[-1]])
    return chain[::-1]


def _candidate_inputs(graph: fx.Graph) -> list[fx.Node]:
    """Placeholders that can carry the token stream: tensors of rank >= 3 that are not parameters."""
    candidates = []
    for node in graph.nodes:
        if node.op != "placeholder":
            continue
        shape = sizes_of(node)
        if shape is not None and len(shape) >= 3 and not is_parameter_input(node):
            candidates.append(node)
    return candidates


def _token_site(decisions: list[SiteDecision]) -> SiteDecision | None:
    if len(decisions) != 1:
        return None
    decision = decisions[0]
    site = decision.site
    if (decision.layout.kind in TOKEN_KINDS and decision.action == "dense" and site.form == "sdpa"
            and site.attn_mask is None and not site.dropout_p and not site.enable_gqa and len(site.query_shape) == 4
            and site.query_shape[0] > 1 and site.key_shape[:2] == site.query_shape[:2]):
        return decision
    return None


def _chains(units: list[CacheUnit]) -> list[CacheChain]:
    chains: list[CacheChain] = []
    run: list[CacheUnit] = []
    for unit in units + [None]:
        extends = (unit is not None and run and run[-1].exit is unit.entry and unit.kind in CHAIN_ORDER
                   and run[-1].kind in CHAIN_ORDER and CHAIN_ORDER.index(unit.kind) > CHAIN_ORDER.index(run[-1].kind))
        if extends:
            run.append(unit)
            continue
        if len(run) >= 2:
            chains.append(CacheChain(tuple(u.index for u in run)))
        run = [unit] if unit is not None and unit.kind in CHAIN_ORDER else []
    return chains


def _is_cast(node: fx.Node) -> bool:
    return ((node.op == "call_method" and node.target in CAST_METHODS)
            or (node.op == "call_function" and node.target in (torch.Tensor.to, torch.Tensor.float, torch.Tensor.type_as)))


def _strip_casts(node: object) -> object:
    while isinstance(node, fx.Node) and _is_cast(node):
        node = node.args[0]
    return node


def _adds_entry(entry: fx.Node, exit_node: fx.Node) -> bool:
    """Whether `exit_node` is ``entry + something`` up to dtype casts: a residual connection.

    An in-place ``entry += f(entry)`` is not one (its entry and exit are one tensor, so no
    residual could be stored); `functional_residuals` rewrites those that can be rewritten.
    """
    core = _strip_casts(exit_node)
    if not isinstance(core, fx.Node) or not (
            (core.op == "call_function" and core.target in (operator.add, torch.add))
            or (core.op == "call_method" and core.target == "add")):
        return False
    return any(_strip_casts(arg) is _strip_casts(entry) for arg in core.args[:2])


IN_PLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                      operator.imod, operator.ipow, operator.imatmul, operator.iand, operator.ior, operator.ixor,
                      operator.ilshift, operator.irshift, operator.setitem, operator.delitem}


def is_in_place(node: fx.Node) -> bool:
    """Whether `node` changes a tensor in place (``x += y``, ``x[i] = y``, ``x.add_(y)``, ``out=``).

    ``operator.and_`` and its kin are out of place despite their trailing underscore.
    """
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        if getattr(node.target, "__module__", None) in ("_operator", "operator"):
            return node.target in IN_PLACE_OPERATORS
        return "out" in node.kwargs or (name.endswith("_") and not name.startswith("_"))
    if node.op == "call_method":
        return "out" in node.kwargs or (node.target.endswith("_") and not node.target.startswith("_"))
    return False


def _does_work(node: fx.Node, modules: dict[str, torch.nn.Module]) -> bool:
    if node.op == "call_function":
        return node.target in WORK_FUNCTIONS or node.target is operator.matmul
    if node.op == "call_method":
        return node.target in ("matmul", "bmm")
    if node.op == "call_module":
        return isinstance(modules.get(node.target), (torch.nn.Linear, torch.nn.modules.conv._ConvNd))
    return False


def _common_module(nodes: list[fx.Node]) -> str:
    """The longest module path shared by `nodes` (``blocks.0.mlp`` for the two linears of an MLP)."""
    paths = [module_path(n).split(".") for n in nodes if module_path(n)]
    if not paths:
        return ""
    common = []
    for parts in zip(*paths):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return ".".join(common)


def _not_a_unit(nodes: list[fx.Node], entry: fx.Node, exit_node: fx.Node, output: fx.Node) -> str:
    """Why the region `nodes` from `entry` to `exit_node`, which does work, is no cache unit ("" when it is one)."""
    if exit_node is output:
        return "it ends at the graph's output"
    if sizes_of(entry) != sizes_of(exit_node):
        return f"its exit {exit_node.name} is shaped unlike its entry {entry.name}"
    if not _adds_entry(entry, exit_node):
        return f"its exit {exit_node.name} is no residual addition of its entry {entry.name}"
    inside = set(nodes)
    for node in nodes[:-1]:
        outside = [user for user in node.users if user not in inside]
        if outside:
            return f"{node.name} is used outside it (by {outside[0].name}): it has more than one exit"
    # A region changing a tensor in place could change its entry: nothing could be stored of it.
    for node in nodes:
        if is_in_place(node):
            return f"{node.name} changes a tensor in place ({getattr(node.target, '__name__', node.target)})"
    return ""


def _absorbs_casts(plan: RegionPlan, nodes: list[fx.Node], exit_node: fx.Node, output: fx.Node) -> bool:
    """Whether the region `nodes` only casts the exit of the unit just before it, which then ends at `exit_node`.

    ``h = (h.float() + attn * gate).type_as(h)`` (Wan, and most blocks that add in float32) cuts the
    stream at the addition and again at the cast. Left apart, the cast would sit between every two
    units, so no two would be adjacent and a reused call would rebuild each unit on its own. Only a
    cast back to the entry's dtype and device: a rebuilt exit (entry plus residual) has the entry's.
    """
    if not plan.regions or plan.regions[-1][1] is None or not nodes or not all(_is_cast(n) for n in nodes):
        return False
    unit = plan.units[-1]
    entry, exit_value = example_tensor(unit.entry), example_tensor(exit_node)
    if entry is None or exit_value is None or (entry.dtype, entry.device) != (exit_value.dtype, exit_value.device):
        return False
    return not _not_a_unit(unit.nodes + nodes, unit.entry, exit_node, output)


def find_regions(graph: fx.Graph, decisions: list[SiteDecision], modules: dict[str, torch.nn.Module]) -> RegionPlan:
    """Split `graph` into lateral nodes and stream regions.

    `decisions` are the graph's attention sites, `modules` its owner's submodules (for
    ``call_module`` nodes).
    """
    output = next(node for node in graph.nodes if node.op == "output")
    flow = dataflow(graph)
    best: tuple[int, fx.Node, list[fx.Node]] | None = None
    for candidate in _candidate_inputs(graph):
        dominators = _stream_dominators(flow, candidate, output)
        # The token stream is the input with the most residual additions on its way to the output.
        residuals = sum(_adds_entry(a, b) for a, b in zip(dominators, dominators[1:]))
        if dominators and (best is None or residuals > best[0]):
            best = (residuals, candidate, dominators)
    if best is None:
        return RegionPlan(None, reason="no tensor input of rank >= 3 reaches the output")
    _, source, dominators = best
    on_stream = stream_values(graph, source)
    dominator_index = {node: index for index, node in enumerate(dominators)}
    plan = RegionPlan(source)
    members: list[list[fx.Node]] = [[] for _ in range(len(dominators) - 1)]
    # level: index of the latest dominator a stream value depends on; a dominator exits the region before it.
    level: dict[fx.Node, int] = {source: 0}
    for node in graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if node not in on_stream:
            plan.lateral.append(node)
            continue
        if node in dominator_index:
            level[node] = dominator_index[node]
            members[level[node] - 1].append(node)
        else:
            level[node] = max(level[used] for used in node.all_input_nodes if used in level)
            members[level[node]].append(node)
    attention_output = {_output_node(d): d for d in decisions}
    for region_index, nodes in enumerate(members):
        entry, exit_node = dominators[region_index], dominators[region_index + 1]
        if _absorbs_casts(plan, nodes, exit_node, output):
            unit = plan.units[-1]
            unit.nodes, unit.exit = unit.nodes + nodes, exit_node
            plan.regions[-1] = (unit.nodes, unit.index)
            continue
        sites = [attention_output[n] for n in nodes if n in attention_output]
        work = [n for n in nodes if n in attention_output or _does_work(n, modules)]
        reason = _not_a_unit(nodes, entry, exit_node, output) if work else "no work"
        if reason:
            if work:
                plan.rejected.append(Rejection(_common_module(work) or f"region@{exit_node.name}", reason))
            plan.regions.append((nodes, None))
            continue
        index = len(plan.units)
        plan.units.append(CacheUnit(index, entry, exit_node, nodes, sites, _common_module(work), _token_site(sites)))
        plan.regions.append((nodes, index))
    if not plan.units:
        plan.reason = "no residual sublayer (single-entry single-exit region of the stream) found"
    plan.chains = _chains(plan.units)
    return plan


def _output_node(decision: SiteDecision) -> fx.Node:
    return decision.rewritten_output or decision.site.output


def find_timestep(gm: fx.GraphModule, plan: RegionPlan) -> fx.Node | None:
    """The input of `gm` holding the timestep, or None.

    A non-parameter tensor input other than the stream: shape [], [1] or [batch], or per element
    (``[batch, frames]`` for diffusion forcing, ``[batch, tokens]`` for Wan 2.2) when it is named
    like a timestep. When several qualify, one named like a timestep (``t``, ``timestep``,
    ``sigma``) wins. A regionally compiled block gets the embedded timestep, not the timestep,
    and has none.
    """
    batch = sizes_of(plan.stream_input)[0]
    candidates = []
    for node in gm.graph.nodes:
        shape = sizes_of(node) if node.op == "placeholder" else None
        if shape is None or node is plan.stream_input or is_parameter_input(node):
            continue
        per_element = len(shape) == 2 and shape[0] in (1, batch) and named_like_timestep(node)
        if shape in ((), (1,), (batch,)) or per_element:
            candidates.append(node)
    named = [n for n in candidates if named_like_timestep(n)]
    return (named or candidates or [None])[0]


def find_prediction(gm: fx.GraphModule, stream_input: fx.Node) -> fx.Node | None:
    """The output leaf holding the model's prediction for its latents (`stream_input`), or None.

    It has the latents' shape, or theirs with one dimension shorter: image-to-video models take
    the latents with conditioning channels appended and predict the latents alone.
    """
    output = next(node for node in gm.graph.nodes if node.op == "output")
    latents = sizes_of(stream_input)
    leaves = [leaf for leaf in pytree.tree_leaves(output.args[0]) if isinstance(leaf, fx.Node)]
    shapes = [(leaf, sizes_of(leaf)) for leaf in leaves]
    for leaf, shape in shapes:
        if shape == latents:
            return leaf
    for leaf, shape in shapes:
        if shape is not None and len(shape) == len(latents):
            shorter = [a != b for a, b in zip(shape, latents)]
            if sum(shorter) == 1 and all(a <= b for a, b in zip(shape, latents) if isinstance(a, int) and isinstance(b, int)):
                return leaf
    return None
