"""The runtime's own tensor arithmetic, as small graphs lowered like the segments (one fused kernel each).

Run eagerly, each reuse or store would be several separate small ops per sublayer and call;
lowered by Inductor they are one kernel each. Step counts enter as 0-d tensors picked from a
table on the device, so neither a new value nor a host-to-device copy is needed per call.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
import torch.fx as fx

EPSILON = 1e-12


def relative_drift(now: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """|now - before|_1 / |before|_1 as a 0-d float32 tensor on the tensors' device."""
    change = (now - before).abs().sum(dtype=torch.float32)
    return change / before.abs().sum(dtype=torch.float32).clamp_min(EPSILON)


def rebuilt(entry: torch.Tensor, residual: torch.Tensor, slope: torch.Tensor | None = None,
            steps: torch.Tensor | None = None) -> torch.Tensor:
    """A reused sublayer's (or run's) exit: its new entry plus the stored residual, extrapolated by ``slope * steps``."""
    if slope is None:
        return entry + residual
    return entry + residual + slope * steps.type_as(slope)


def drift(now: torch.Tensor, before: torch.Tensor) -> tuple[torch.Tensor]:
    return (relative_drift(now, before),)


def store(exit_value: torch.Tensor, entry: torch.Tensor, before: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual to keep after a computation, and how far the entry moved since the last one."""
    return exit_value - entry, relative_drift(entry, before)


def store_slope(exit_value: torch.Tensor, entry: torch.Tensor, before: torch.Tensor, previous: torch.Tensor,
                inverse_gap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As `store`, plus the residual's change per step since the `previous` one, `1 / inverse_gap` steps ago."""
    residual = exit_value - entry
    return residual, (residual - previous) * inverse_gap.to(residual.dtype), relative_drift(entry, before)


TERM_NAMES = (("residual",), ("residual", "slope", "steps"))
"""The arguments of a reused term by its extrapolation order (the arguments of `rebuilt` after the entry)."""


def reuse_graph(orders: tuple[int, ...]) -> fx.GraphModule:
    """``(entry, before, *term 0, *term 1, ...) -> (entry + sum of terms, drift of entry)``.

    A reused sublayer adds its stored residual to its new entry, and consecutive reused
    sublayers only add residuals, so one or a run of them is one sum: term i is
    ``TERM_NAMES[orders[i]]``, its residual extrapolated to that order (`rebuilt`).
    """
    graph = fx.Graph()
    entry, before = graph.placeholder("entry"), graph.placeholder("before")
    terms = []
    for index, order in enumerate(orders):
        terms.append([graph.placeholder(f"{name}{index}") for name in TERM_NAMES[order]])
    total = entry
    for term in terms:
        total = graph.call_function(rebuilt, (total, *term))
    graph.output((total, graph.call_function(relative_drift, (entry, before))))
    return fx.GraphModule(torch.nn.Module(), graph)


STORE_KINDS = {"first": (store, (), 1), "plain": (store, ("before",), 2),
               "slope": (store_slope, ("before", "previous", "inverse_gap"), 3)}
"""Per kind of store: its function, what it takes after ``(exit, entry)`` and how many results:
``first`` (no earlier entry: the residual), ``plain`` (residual, drift) and ``slope``
(residual, slope, drift)."""


def add_store(graph: fx.Graph, kind: str, exit_value: fx.Node, entry: fx.Node,
              arguments: list[fx.Node]) -> list[fx.Node]:
    """Append one store of `kind` to `graph`; its result nodes."""
    function, _, returned = STORE_KINDS[kind]
    value = graph.call_function(function, (exit_value, entry, *(arguments or [entry])))
    return [graph.call_function(operator.getitem, (value, i)) for i in range(returned)]


def store_graph(kinds: tuple[str, ...]) -> fx.GraphModule:
    """Every store of a call in one graph: the arguments of each kind in turn -> all their results in turn."""
    graph = fx.Graph()
    results = []
    for index, kind in enumerate(kinds):
        exit_value, entry = graph.placeholder(f"exit{index}"), graph.placeholder(f"entry{index}")
        arguments = [graph.placeholder(f"{name}{index}") for name in STORE_KINDS[kind][1]]
        results += add_store(graph, kind, exit_value, entry, arguments)
    graph.output(tuple(results))
    return fx.GraphModule(torch.nn.Module(), graph)


def total_graph(count: int) -> fx.GraphModule:
    """``(*tensors) -> (their sum,)``: the residuals (or slopes) of a run of reused sublayers, summed once."""
    graph = fx.Graph()
    values = [graph.placeholder(f"term{i}") for i in range(count)]
    total = values[0]
    for value in values[1:]:
        total = graph.call_function(operator.add, (total, value))
    graph.output((total,))
    return fx.GraphModule(torch.nn.Module(), graph)


class Arithmetic:
    """The graphs above, each built and lowered by `make(gm)` on first use (and per input signature).

    `steps(n, like)` and `inverse(n, like)` are n and 1/n as 0-d tensors on `like`'s device.
    """

    def __init__(self, make: Callable[[fx.GraphModule], Callable], limit: int):
        self.drift = make(fx.symbolic_trace(drift))
        self.limit = limit
        self._make = make
        self._graphs: dict[tuple, Callable] = {}
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _graph(self, key: tuple, build: Callable[[], fx.GraphModule]) -> Callable:
        if key not in self._graphs:
            self._graphs[key] = self._make(build())
        return self._graphs[key]

    def _table(self, like: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The tables on `like`'s device, rebuilt twice as long when `count` is past their end."""
        if count > self.limit:
            self.limit, self._tables = 2 * count, {}
        if like.device not in self._tables:
            counts = torch.arange(self.limit + 1, dtype=torch.float32)
            self._tables[like.device] = (counts.to(like.device), (1 / counts.clamp_min(1)).to(like.device))
        return self._tables[like.device]

    def reuse(self, orders: tuple[int, ...]) -> Callable:
        """The lowered `reuse_graph` for terms of these extrapolation orders."""
        return self._graph(("reuse", orders), lambda: reuse_graph(orders))

    def stores(self, kinds: tuple[str, ...]) -> Callable:
        """The lowered `store_graph` for these kinds of store."""
        return self._graph(("store", kinds), lambda: store_graph(kinds))

    def total(self, count: int) -> Callable:
        """The lowered `total_graph` of `count` tensors."""
        return self._graph(("total", count), lambda: total_graph(count))

    def steps(self, count: int, like: torch.Tensor) -> torch.Tensor:
        return self._table(like, count)[0][count]

    def inverse(self, count: int, like: torch.Tensor) -> torch.Tensor:
        count = max(count, 1)
        return self._table(like, count)[1][count]
