"""The runtime's own tensor arithmetic, as small graphs lowered like the segments (one fused kernel each).

Run eagerly, each reuse or save would be several separate small ops per sublayer and call;
lowered by Inductor they are one kernel each. Step counts enter as 0-d tensors picked from a
table on the device, so neither a new value nor a host-to-device copy is needed per call.

Two operations, and what travels in and out of them by name:

- a **save**, after a computation: the residual ``exit - entry`` to keep, by `SaveKind` also
  its change per step (slope), the change of that (curvature) and the entry's drift
  (`SaveInputs` in, `SaveResult` out);
- a **reuse**: a new entry plus saved residuals, each an `Addend` extrapolated to its order,
  and the entry's drift (`Rebuilt` out).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from enum import StrEnum
from typing import NamedTuple

import torch
import torch.fx as fx

EPSILON = 1e-12


def relative_drift(now: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """The relative L1 drift |now - before|_1 / |before|_1 as its two sums: float32 [2] on the tensors' device.

    Kept apart until the host reads them (`drift_ratio`), so that ranks holding shards of one sequence
    (context parallelism) add theirs up first: the drift of the whole sequence, the same on every rank.
    """
    return torch.stack([(now - before).abs().sum(dtype=torch.float32), before.abs().sum(dtype=torch.float32)])


def drift_ratio(change: float, norm: float) -> float:
    """The relative drift of the two sums `relative_drift` returns (summed over ranks, when sharded)."""
    return change / max(norm, EPSILON)


def rebuilt(entry: torch.Tensor, residual: torch.Tensor, slope: torch.Tensor | None = None,
            steps: torch.Tensor | None = None, curvature: torch.Tensor | None = None,
            bend: torch.Tensor | None = None) -> torch.Tensor:
    """A reused sublayer's (or span's) exit: its new entry plus the saved residual, extrapolated by
    ``slope * steps`` and (order 2) ``curvature * bend``.

    With the last three computations at steps t0 < t1 < t2, Newton's interpolating polynomial
    through their residuals at ``t2 + s`` is ``r2 + slope * s + curvature * s * (s + t2 - t1)``,
    with ``slope = (r2 - r1) / (t2 - t1)`` and ``curvature = (slope - previous slope) / (t2 - t0)``:
    `bend` is ``s * (s + t2 - t1)``.
    """
    if slope is None:
        return entry + residual
    if curvature is None:
        return entry + residual + slope * steps.type_as(slope)
    return entry + residual + slope * steps.type_as(slope) + curvature * bend.type_as(curvature)


def drift(now: torch.Tensor, before: torch.Tensor) -> tuple[torch.Tensor]:
    return (relative_drift(now, before),)


def save(exit_value: torch.Tensor, entry: torch.Tensor, before: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual to keep after a computation, and how far the entry moved since the last one."""
    return exit_value - entry, relative_drift(entry, before)


def save_slope(exit_value: torch.Tensor, entry: torch.Tensor, before: torch.Tensor, previous: torch.Tensor,
               inverse_gap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As `save`, plus the residual's change per step since the `previous` one, `1 / inverse_gap` steps ago."""
    residual = exit_value - entry
    return residual, (residual - previous) * inverse_gap.to(residual.dtype), relative_drift(entry, before)


def save_curvature(exit_value: torch.Tensor, entry: torch.Tensor, before: torch.Tensor, previous: torch.Tensor,
                   inverse_gap: torch.Tensor, previous_slope: torch.Tensor,
                   inverse_span: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """As `save_slope`, plus the slope's change since the `previous_slope`, divided by the steps the three
    computations span (``1 / inverse_span``): the second divided difference (`rebuilt`)."""
    residual = exit_value - entry
    slope = (residual - previous) * inverse_gap.to(residual.dtype)
    curvature = (slope - previous_slope) * inverse_span.to(residual.dtype)
    return residual, slope, curvature, relative_drift(entry, before)


class SaveInputs(NamedTuple):
    """What a save may take after ``(exit, entry)``; each `SaveKind` takes the fields it names."""

    before: torch.Tensor | None = None
    """The entry at the last computation."""
    previous: torch.Tensor | None = None
    """The residual saved then."""
    inverse_gap: torch.Tensor | None = None
    """1 / the steps since then, as a 0-d tensor."""
    previous_slope: torch.Tensor | None = None
    """The slope saved then."""
    inverse_span: torch.Tensor | None = None
    """1 / the steps since the computation before that one, as a 0-d tensor."""


class SaveResult(NamedTuple):
    """What a save returns; fields its `SaveKind` does not produce are None."""

    residual: torch.Tensor
    slope: torch.Tensor | None = None
    drift: torch.Tensor | None = None
    curvature: torch.Tensor | None = None


class SaveKind(StrEnum):
    """Which save follows a computation."""

    FIRST = "first"
    """Nothing saved before: the residual only."""
    RESIDUAL = "residual"
    """The residual and the entry's drift (``order=0``)."""
    SLOPE = "slope"
    """Also the residual's change per step (``order=1``, and ``order=2`` until a slope is saved)."""
    CURVATURE = "curvature"
    """Also the slope's change (``order=2``)."""

    @property
    def function(self) -> Callable:
        return _SAVE_FUNCTIONS[self]

    @property
    def arguments(self) -> tuple[str, ...]:
        """The `SaveInputs` fields it takes after ``(exit, entry)``."""
        return _SAVE_ARGUMENTS[self]

    @property
    def results(self) -> tuple[str, ...]:
        """The `SaveResult` fields it returns, in the order its graph returns them."""
        return _SAVE_RESULTS[self]

    def inputs(self, given: SaveInputs) -> list[torch.Tensor]:
        """The arguments it takes after ``(exit, entry)``, from `given`."""
        return [getattr(given, name) for name in self.arguments]


_SAVE_FUNCTIONS = {SaveKind.FIRST: save, SaveKind.RESIDUAL: save, SaveKind.SLOPE: save_slope,
                   SaveKind.CURVATURE: save_curvature}
_SAVE_ARGUMENTS = {SaveKind.FIRST: (), SaveKind.RESIDUAL: ("before",),
                   SaveKind.SLOPE: ("before", "previous", "inverse_gap"),
                   SaveKind.CURVATURE: ("before", "previous", "inverse_gap", "previous_slope", "inverse_span")}
_SAVE_RESULTS = {SaveKind.FIRST: ("residual",), SaveKind.RESIDUAL: ("residual", "drift"),
                 SaveKind.SLOPE: ("residual", "slope", "drift"),
                 SaveKind.CURVATURE: ("residual", "slope", "curvature", "drift")}


def add_save(graph: fx.Graph, kind: SaveKind, exit_value: fx.Node, entry: fx.Node,
             arguments: list[fx.Node]) -> list[fx.Node]:
    """Append one save of `kind` to `graph`; its result nodes (`SaveKind.results`)."""
    # A first save has no earlier entry: its drift is taken against the entry itself and dropped.
    value = graph.call_function(kind.function, (exit_value, entry, *(arguments or [entry])))
    return [graph.call_function(operator.getitem, (value, i)) for i in range(len(kind.results))]


def read_saves(kinds: Sequence[SaveKind], flat: Sequence[torch.Tensor]) -> list[SaveResult]:
    """The results of saves of `kinds`, one after another in `flat`, each as a `SaveResult`."""
    results, start = [], 0
    for kind in kinds:
        end = start + len(kind.results)
        results.append(SaveResult(**dict(zip(kind.results, flat[start:end]))))
        start = end
    return results


class Addend(NamedTuple):
    """A saved residual to add on reuse, and how to extrapolate it (the arguments of `rebuilt` after the entry)."""

    residual: torch.Tensor
    slope: torch.Tensor | None = None
    steps: torch.Tensor | None = None
    curvature: torch.Tensor | None = None
    bend: torch.Tensor | None = None

    @property
    def order(self) -> int:
        return 0 if self.slope is None else 1 if self.curvature is None else 2

    def arguments(self) -> list[torch.Tensor]:
        return [getattr(self, name) for name in ADDEND_FIELDS[self.order]]


ADDEND_FIELDS = (("residual",), ("residual", "slope", "steps"), ("residual", "slope", "steps", "curvature", "bend"))
"""The `Addend` fields a reuse of each extrapolation order takes (its graph's inputs per addend)."""


class Rebuilt(NamedTuple):
    """What a reuse returns: the rebuilt exit, and the drift of the new entry from the saved one."""

    exit: torch.Tensor
    drift: torch.Tensor


def reuse_graph(orders: tuple[int, ...]) -> fx.GraphModule:
    """``(entry, before, *addend 0, *addend 1, ...) -> (entry + sum of addends, drift of entry)`` (a `Rebuilt`).

    A reused sublayer adds its saved residual to its new entry, and consecutive reused
    sublayers only add residuals, so one or a span of them is one sum: addend i takes
    ``ADDEND_FIELDS[orders[i]]``, its residual extrapolated to that order (`rebuilt`).
    """
    graph = fx.Graph()
    entry, before = graph.placeholder("entry"), graph.placeholder("before")
    addends = []
    for index, order in enumerate(orders):
        addends.append([graph.placeholder(f"{name}{index}") for name in ADDEND_FIELDS[order]])
    total = entry
    for addend in addends:
        total = graph.call_function(rebuilt, (total, *addend))
    graph.output((total, graph.call_function(relative_drift, (entry, before))))
    return fx.GraphModule(torch.nn.Module(), graph)


def save_graph(kinds: tuple[SaveKind, ...]) -> fx.GraphModule:
    """Every save of a call in one graph: ``(exit, entry, *arguments)`` of each in turn -> their results (`read_saves`)."""
    graph = fx.Graph()
    results = []
    for index, kind in enumerate(kinds):
        exit_value, entry = graph.placeholder(f"exit{index}"), graph.placeholder(f"entry{index}")
        arguments = [graph.placeholder(f"{name}{index}") for name in kind.arguments]
        results += add_save(graph, kind, exit_value, entry, arguments)
    graph.output(tuple(results))
    return fx.GraphModule(torch.nn.Module(), graph)


def total_graph(count: int) -> fx.GraphModule:
    """``(*tensors) -> (their sum,)``: the residuals (or slopes) of a span of reused sublayers, summed once."""
    graph = fx.Graph()
    values = [graph.placeholder(f"term{i}") for i in range(count)]
    total = values[0]
    for value in values[1:]:
        total = graph.call_function(operator.add, (total, value))
    graph.output((total,))
    return fx.GraphModule(torch.nn.Module(), graph)


class Save(NamedTuple):
    """One save to run: its kind, the computation's exit and entry, and what else it takes."""

    kind: SaveKind
    exit: torch.Tensor
    entry: torch.Tensor
    inputs: SaveInputs


class Arithmetic:
    """The graphs above, each built and lowered by `make(gm)` on first use (and per input signature).

    `steps(n, like)` and `inverse(n, like)` are n and 1/n as 0-d tensors on `like`'s device.
    """

    def __init__(self, make: Callable[[fx.GraphModule], Callable], limit: int):
        self._drift = make(fx.symbolic_trace(drift))
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

    def drift(self, now: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
        """`relative_drift`, lowered."""
        return self._drift(now, before)[0]

    def reuse(self, entry: torch.Tensor, before: torch.Tensor, addends: Sequence[Addend]) -> Rebuilt:
        """`entry` plus every addend, and the drift of `entry` from `before`, in one lowered `reuse_graph`."""
        orders = tuple(addend.order for addend in addends)
        graph = self._graph(("reuse", orders), lambda: reuse_graph(orders))
        return Rebuilt(*graph(entry, before, *(a for addend in addends for a in addend.arguments())))

    def save(self, saves: Sequence[Save]) -> list[SaveResult]:
        """Every save in `saves`, in one lowered `save_graph`."""
        kinds = tuple(s.kind for s in saves)
        graph = self._graph(("save", kinds), lambda: save_graph(kinds))
        return read_saves(kinds, graph(*(a for s in saves for a in (s.exit, s.entry, *s.kind.inputs(s.inputs)))))

    def total(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """The sum of `tensors`, in one lowered `total_graph`."""
        return self._graph(("total", len(tensors)), lambda: total_graph(len(tensors)))(*tensors)[0]

    def steps(self, count: int, like: torch.Tensor) -> torch.Tensor:
        return self._table(like, count)[0][count]

    def inverse(self, count: int, like: torch.Tensor) -> torch.Tensor:
        count = max(count, 1)
        return self._table(like, count)[1][count]
