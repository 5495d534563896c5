"""Carry two streams (video and text) through the blocks that mix them as one packed tensor.

Two-stream blocks (CogVideoX, HunyuanVideo's double-stream blocks, MMDiT-style models) update
two residual streams in step: ``h' = h + g_h(h, e)`` and ``e' = e + g_e(h, e)``, one joint
attention reading both. No single value separates one sublayer from the next, so the region
analysis (`t4dopt.cache.graph.regions`), which cuts the graph at the dominators of one stream,
finds no unit there. Packing the streams fixes that without changing a number: from the first
joint sublayer on, the pair travels as ``P = cat(h.flatten(), e.flatten())``, each sublayer
reads its views of ``P`` (`unpacked`) and ends in ``P' = P + cat(g_h, g_e)``, a residual
addition of one value, exact element by element (`packed`). The runtime then stores and reuses
both streams' residuals as one.

A run of steps is packed only where the graph shows each step is a region of its own (`_step_body`): every
value it computes from the streams is used inside it or is one of the new stream values.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import NamedTuple

import networkx as nx
import torch
import torch.fx as fx

from t4dopt.cache.graph.regions import dataflow, is_in_place, stream_values
from t4dopt.fx_utils import example_tensor, example_value, is_size, shape_of, sizes_of


class Layout(NamedTuple):
    """How a stream lies in memory: its dimensions in memory order (`order`, outermost first) and its shape."""

    order: tuple[int, ...]
    shape: tuple[int, ...]

    @property
    def stored(self) -> tuple[int, ...]:
        """The shape in memory order."""
        return tuple(self.shape[d] for d in self.order)

    @property
    def inverse(self) -> tuple[int, ...]:
        return tuple(self.order.index(d) for d in range(len(self.order)))


def packed(tensors: Sequence[torch.Tensor], layouts: Sequence[Layout]) -> torch.Tensor:
    """The tensors flattened in the memory order of `layouts` and concatenated (the one value the streams travel as)."""
    return torch.cat([t.permute(layout.order).reshape(-1) for t, layout in zip(tensors, layouts)])


def unpacked(value: torch.Tensor, layouts: Sequence[Layout]) -> tuple[torch.Tensor, ...]:
    """Views of `value`, one per layout, with that layout's shape and strides (the inverse of `packed`)."""
    views, start = [], 0
    for layout in layouts:
        count = 1
        for size in layout.shape:
            count *= size
        views.append(value[start:start + count].view(layout.stored).permute(layout.inverse))
        start += count
    return tuple(views)


def layout_of(value: torch.Tensor) -> Layout | None:
    """`value`'s layout, None when it is not dense (a slice, a broadcast)."""
    shape = tuple(int(s) for s in value.shape)
    order = tuple(sorted(range(value.dim()), key=lambda d: (-value.stride(d), -shape[d])))
    if not value.permute(order).is_contiguous():
        return None
    return Layout(order, shape)


class Residual(NamedTuple):
    """An addition ``add = carry + addend`` where the addend is computed from the carry.

    In a run's closing step a stream that ends (read there, dead after) has none: `add` and
    `addend` are None, and its packed part gets zeros.
    """

    add: fx.Node | None
    carry: fx.Node
    addend: fx.Node | None = None


class Run(NamedTuple):
    """Steps of two or more streams: ``steps[t][i]`` is stream i's residual addition at step t."""

    steps: list[tuple[Residual, ...]]


def _is_add(node: fx.Node) -> bool:
    return ((node.op == "call_function" and node.target in (operator.add, torch.add))
            or (node.op == "call_method" and node.target == "add")) and len(node.args) == 2 and not node.kwargs


def residuals(graph: fx.Graph, flow: nx.DiGraph, on_stream: set[fx.Node]) -> dict[fx.Node, Residual]:
    """Residual additions by their carry: the addend is on the stream and computed from the carry, same shape out."""
    found: dict[fx.Node, Residual] = {}
    repeated: set[fx.Node] = set()
    for node in graph.nodes:
        if not _is_add(node) or not all(isinstance(a, fx.Node) for a in node.args):
            continue
        x, y = node.args
        for carry, addend in ((x, y), (y, x)):
            if addend in on_stream and sizes_of(carry) == sizes_of(node) and sizes_of(node) is not None \
                    and carry in nx.ancestors(flow, addend):
                if carry in found:
                    repeated.add(carry)
                found[carry] = Residual(node, carry, addend)
                break
    for carry in repeated:  # a value carried into two additions forks: no chain goes through it
        del found[carry]
    return found


def _step_body(step: Sequence[Residual], order: dict[fx.Node, int], on_stream: set[fx.Node]) -> set[fx.Node] | None:
    """The nodes a step computes from its carries, or None when it is no region of its own.

    It is one when every value it computes from the carries is used only inside it (or is
    one of its additions), and it reads no stream value other than its carries.
    """
    carries = {r.carry for r in step}
    adds = {r.add for r in step if r.add is not None}
    start = min(order[c] for c in carries)
    # Backwards from the addends, not below the earliest carry; then forwards from the carries within that.
    # Every argument counts here (``torch.empty_like(q)`` belongs where q is), not only data.
    behind, todo = set(), [r.addend for r in step if r.addend is not None]
    while todo:
        node = todo.pop()
        if node in behind or node in carries or order[node] < start:
            continue
        behind.add(node)
        todo.extend(node.all_input_nodes)
    body, todo = set(), [user for c in carries for user in c.users]
    while todo:
        node = todo.pop()
        if node in body or node not in behind:
            continue
        body.add(node)
        todo.extend(node.users)
    for node in body:
        if any(user not in body and user not in adds for user in node.users):
            return None
        for used in node.all_input_nodes:
            if used in on_stream and used not in body and used not in carries and not is_size(example_value(used)):
                return None
    return body


def find_runs(graph: fx.Graph, flow: nx.DiGraph, on_stream: set[fx.Node]) -> list[Run]:
    """Runs of two-stream steps: adjacent steps, each one's additions the next one's carries (see the module doc)."""
    order = {node: index for index, node in enumerate(graph.nodes)}
    by_carry = residuals(graph, flow, on_stream)
    chains: list[list[Residual]] = []
    heads = set(by_carry) - {r.add for r in by_carry.values()}
    for head in sorted(heads, key=order.__getitem__):
        chain, node = [], head
        while node in by_carry:
            chain.append(by_carry[node])
            node = by_carry[node].add
        chains.append(chain)
    runs: list[Run] = []
    used: set[fx.Node] = set()
    for first_index, first in enumerate(chains):
        for second in chains[first_index + 1:]:
            runs += _pair_runs(first, second, flow, order, on_stream, used)
    return runs


def _joint(a: Residual, b: Residual, flow: nx.DiGraph) -> bool:
    """Whether each addition's addend reads the other's carry: one sublayer mixes the two streams."""
    return a.carry in nx.ancestors(flow, b.addend) and b.carry in nx.ancestors(flow, a.addend)


def _pair_runs(first: list[Residual], second: list[Residual], flow: nx.DiGraph, order: dict[fx.Node, int],
               on_stream: set[fx.Node], used: set[fx.Node]) -> list[Run]:
    """The runs of two chains: from each joint step on, the steps in lockstep while each is a region."""
    runs = []
    i = j = 0
    while i < len(first) and j < len(second):
        a, b = first[i], second[j]
        if a.add in used or b.add in used or not _joint(a, b, flow):
            # Advance the chain whose next addition comes first.
            if order[a.add] <= order[b.add]:
                i += 1
            else:
                j += 1
            continue
        steps = []
        while i < len(first) and j < len(second):
            step = (first[i], second[j])
            if _step_body(step, order, on_stream) is None:
                break
            steps.append(step)
            i, j = i + 1, j + 1
        closing = _closing_step(steps, first[i:], second[j:], order, on_stream) if steps else None
        if closing is not None:
            steps.append(closing)
            i, j = i + (closing[0].add is not None), j + (closing[1].add is not None)
        if steps:
            runs.append(Run(steps))
            used.update(r.add for step in steps for r in step if r.add is not None)
        else:
            i, j = i + 1, j + 1
    return runs


def _closing_step(steps: list[tuple[Residual, ...]], first: list[Residual], second: list[Residual],
                  order: dict[fx.Node, int], on_stream: set[fx.Node]) -> tuple[Residual, ...] | None:
    """A last step where one stream ends: the other's next addition reads it, and nothing after does."""
    ends = [not first, not second]
    if ends.count(True) != 1:
        return None
    last = steps[-1]
    going = first[0] if second == [] else second[0]
    position = 0 if first else 1
    if going.carry is not last[position].add:
        return None
    ended = Residual(None, last[1 - position].add)
    step = (going, ended) if position == 0 else (ended, going)
    body = _step_body(step, order, on_stream)
    if body is None or any(user not in body for user in ended.carry.users):
        return None
    return step


def why_not_packed(run: Run) -> str:
    """Why `run` cannot be packed without changing a number or a layout ("" when it can).

    Every new stream value keeps its dtype and its strides (the views of the packed value are
    laid out as the first step's additions were), so what reads them computes as before.
    """
    first = run.steps[0]
    dtype = example_tensor(first[0].carry).dtype
    layouts = []
    for step in run.steps:
        for position, residual in enumerate(step):
            if residual.add is None:
                continue
            carry, add = example_tensor(residual.carry), example_tensor(residual.add)
            addend = example_tensor(residual.addend)
            if carry is None or add is None or addend is None:
                return f"{residual.add.name} has no recorded tensor value"
            if shape_of(residual.add) is None:
                return f"{residual.add.name} has a symbolic shape"
            if carry.dtype != dtype or add.dtype != dtype or carry.device != add.device:
                return f"the streams' dtypes or devices differ at {residual.add.name}"
            if len(layouts) <= position:
                layouts.append(layout_of(add))
                if layouts[position] is None:
                    return f"{residual.add.name} is not dense in memory"
            elif add.stride() != example_tensor(first[position].add).stride():
                return f"{residual.add.name} is laid out unlike {first[position].add.name}"
        promoted = dtype
        for residual in step:
            if residual.addend is not None:
                promoted = torch.promote_types(promoted, example_tensor(residual.addend).dtype)
        if promoted != dtype:
            return f"the step ending at {step[0].add.name} adds in {promoted}, not the streams' {dtype}"
    return ""


def layouts_of(run: Run) -> tuple[Layout, ...]:
    return tuple(layout_of(example_tensor(r.add)) for r in run.steps[0])


def _readers_before(graph: fx.Graph, values: Sequence[fx.Node], order: dict[fx.Node, int]) -> list[fx.Node] | None:
    """The nodes made from `values` before the last of them is made (in graph order), or None when the last
    one is itself made from them: then the values are no cut of the graph."""
    last = max(values, key=order.__getitem__)
    nodes = list(graph.nodes)
    early: set[fx.Node] = set()
    for node in nodes[order[min(values, key=order.__getitem__)] + 1:order[last] + 1]:
        if any(used in early or used in values for used in node.all_input_nodes):
            if node is last:
                return None
            early.add(node)
    return sorted(early, key=order.__getitem__)


def pack_run(graph: fx.Graph, run: Run) -> str:
    """Rewrite `run` to travel packed (module doc); "", or why not with the graph unchanged (the order of its
    nodes does not allow it)."""
    order = {node: index for index, node in enumerate(graph.nodes)}
    layouts = layouts_of(run)
    # A stream's new value may be read before the other's is made: those readers move after both.
    cuts = [[r.carry for r in run.steps[0]]] + [[r.add for r in step if r.add is not None] for step in run.steps]
    moves = [_readers_before(graph, values, order) for values in cuts]
    if any(move is None for move in moves):
        return "one stream's new value is made from the other's"
    blocker = _order_matters(graph) if any(moves) else None
    if blocker is not None:
        return f"its streams' new values are read in between, and {blocker.name} keeps the graph's order"
    carries = cuts[0]
    anchor = max(carries, key=order.__getitem__)
    with graph.inserting_before(anchor.next):
        state = graph.call_function(packed, (tuple(carries), layouts))
    _with_value(state, anchor, packed([example_tensor(c) for c in carries], layouts))
    views = _views(graph, state, layouts, anchor)
    _move_after(views[-1], moves[0])
    for carry, view in zip(carries, views):
        for user in list(carry.users):
            if user is not state:
                user.replace_input_with(carry, view)
    for step, early in zip(run.steps, moves[1:]):
        last = max((r.add for r in step if r.add is not None), key=order.__getitem__)
        with graph.inserting_before(last.next):
            addends = [graph.call_function(torch.broadcast_to, (r.addend, layout.shape)) if r.add is not None
                       else graph.call_function(torch.zeros_like, (view,))
                       for r, layout, view in zip(step, layouts, views)]
            total = graph.call_function(packed, (tuple(addends), layouts))
            new_state = graph.call_function(operator.add, (state, total))
        for addend, residual, layout, view in zip(addends, step, layouts, views):
            _with_value(addend, last, torch.broadcast_to(example_tensor(residual.addend), layout.shape)
                        if residual.add is not None else torch.zeros_like(example_tensor(view)))
        _with_value(total, last, packed([example_tensor(a) for a in addends], layouts))
        _with_value(new_state, last, example_tensor(state) + example_tensor(total))
        views = _views(graph, new_state, layouts, last)
        _move_after(views[-1], early)
        for residual, view in zip(step, views):
            if residual.add is not None:
                residual.add.replace_all_uses_with(view)
                graph.erase_node(residual.add)
        state = new_state
    graph.lint()
    return ""


RANDOM = ("rand", "randn", "rand_like", "randn_like", "randint", "randint_like", "randperm", "bernoulli", "normal",
          "multinomial", "dropout", "uniform_", "normal_", "bernoulli_")


def _draws(node: fx.Node, name: str) -> bool:
    """Whether `node` draws random numbers: a dropout does only when training with p > 0 (``F.dropout(x, p,
    training)``, ``torch.dropout(x, p, train)``; diffusers' eval-mode ``to_out[1]`` is the identity)."""
    if name not in RANDOM:
        return False
    if name != "dropout" or node.op != "call_function":
        return True
    p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
    training = node.kwargs.get("training", node.kwargs.get("train", node.args[2] if len(node.args) > 2 else True))
    return not (training is False or p == 0)


def _order_matters(graph: fx.Graph) -> fx.Node | None:
    """A node whose place in the graph matters beyond its arguments (a tensor changed in place, a random draw),
    or None: then nodes may move as long as each follows its arguments."""
    for node in graph.nodes:
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
        if node.op in ("call_function", "call_method") and (is_in_place(node) or _draws(node, name)):
            return node
    return None


def _move_after(anchor: fx.Node, nodes: list[fx.Node]) -> None:
    for node in nodes:
        anchor.append(node)
        anchor = node


def _with_value(node: fx.Node, like: fx.Node, value: torch.Tensor) -> None:
    """Give a new node `like`'s module and stack, and its own recorded value."""
    node.meta = {k: v for k, v in like.meta.items() if k not in ("example_value", "val")}
    node.meta["example_value"] = value


def _views(graph: fx.Graph, state: fx.Node, layouts: tuple[Layout, ...], like: fx.Node) -> list[fx.Node]:
    with graph.inserting_before(state.next):
        pieces = graph.call_function(unpacked, (state, layouts))
        views = [graph.call_function(operator.getitem, (pieces, index)) for index in range(len(layouts))]
    values = unpacked(example_tensor(state), layouts)
    _with_value(pieces, like, values)
    for view, value in zip(views, values):
        _with_value(view, like, value)
    return views


class Packing(NamedTuple):
    """What `pack_streams` did: how many steps it packed, and why it left other runs of two streams alone."""

    packed: int
    refused: list[str]


def pack_streams(graph: fx.Graph, source: fx.Node) -> Packing:
    """Pack every run of two-stream steps of the stream from `source` that can be (module doc)."""
    packed_steps, refused, seen = 0, [], set()
    while True:
        runs = [run for run in find_runs(graph, dataflow(graph), stream_values(graph, source))
                if run.steps[0][0].add.name not in seen]
        if not runs:
            return Packing(packed_steps, refused)
        run = runs[0]
        seen.add(run.steps[0][0].add.name)
        reason = why_not_packed(run) or pack_run(graph, run)
        if reason:
            refused.append(f"two streams from {run.steps[0][0].add.name} left unpacked: {reason}")
        else:
            packed_steps += len(run.steps)
