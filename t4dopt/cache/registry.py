"""Find the cache runtimes of a model: `t4dopt.reset(model)` and `t4dopt.cache_report(model)`.

Beside the runtimes, what the cache analysis found in every graph compiled with the cache
(`GraphUnits`, cached or not) is kept by the graph's parameters, for as long as they live.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

from t4dopt.cache.runtime import CacheRuntime
from t4dopt.cache.stats import UnitReport, WorkShare, table

_runtimes: weakref.WeakSet[CacheRuntime] = weakref.WeakSet()


@dataclass(frozen=True)
class UnitFound:
    """A cache unit of a graph: its name (module path) and its attention's kind ("other" without one)."""

    name: str
    kind: str


@dataclass(frozen=True)
class LeftOut:
    """Work on the token stream that is no cache unit: where (a module path, may be empty), and why."""

    module: str
    reason: str


@dataclass(frozen=True)
class GraphUnits:
    """What the cache analysis found in one compiled graph: its units, the work it left out and why.

    ``reason`` says why the graph has no cache runtime ("" when it has one).
    """

    units: tuple[UnitFound, ...]
    left_out: tuple[LeftOut, ...]
    reason: str = ""


_found: dict[int, list[GraphUnits]] = {}
"""By parameter id; an entry goes when its parameter does (tensors compare elementwise: no weak-keyed dict)."""


def register(runtime: CacheRuntime) -> None:
    _runtimes.add(runtime)


def record(found: GraphUnits, parameters: list[torch.Tensor]) -> None:
    """Keep `found` for the graph whose parameter inputs are `parameters`."""
    for parameter in parameters:
        if id(parameter) not in _found:
            _found[id(parameter)] = []
            weakref.finalize(parameter, _found.pop, id(parameter), None)
        _found[id(parameter)].append(found)


def found_in(model: torch.nn.Module) -> list[GraphUnits]:
    """What the analysis found in each graph compiled with the cache from `model`, in compile order."""
    seen: dict[int, GraphUnits] = {}
    for parameter in model.parameters():
        for found in _found.get(id(parameter), ()):
            seen.setdefault(id(found), found)
    return list(seen.values())


def runtimes_of(model: torch.nn.Module | None) -> list[CacheRuntime]:
    """The runtimes compiled from `model`'s graphs (matched by its parameters); all of them for None."""
    if model is None:
        return list(_runtimes)
    parameters = list(model.parameters())
    return [r for r in _runtimes if any(r.parameters.holds(p) for p in parameters)]


def reset(model: torch.nn.Module | None = None) -> int:
    """Drop the cached state of `model` (every compiled model when None); returns how many graphs were reset.

    Not needed between generations: they are told apart on their own (`t4dopt.cache.generations`),
    or marked with ``t4dopt.generation(model)``.
    """
    runtimes = runtimes_of(model)
    for runtime in runtimes:
        runtime.reset()
    return len(runtimes)


@dataclass(frozen=True)
class CacheReport:
    """What the cache did in the last generation, per unit (attention sublayer) of every graph.

    ``held_bytes`` is the device memory the cached state of every graph holds now.
    """

    units: list[UnitReport]
    held_bytes: int = 0
    graphs: list[GraphUnits] = field(default_factory=list)
    """Per graph compiled with the cache, the units found and the work left out with the reasons."""
    work: WorkShare = WorkShare(0.0, 0.0)
    """FLOPs of the last generation's calls, computed and in all, counting the work outside units."""
    total_calls: int = 0
    """Calls (without gradients) the cache runtimes ran since they were compiled, every generation and reset
    included: a check that a compiled model still runs through its cache (a graph dynamo stopped calling adds none)."""

    @property
    def units_found(self) -> list[str]:
        """The names of the units found in every graph (cached or not), in order."""
        return [unit.name for graph in self.graphs for unit in graph.units]

    @property
    def computed(self) -> float:
        """Share of the calls' work computed (matrix products, layers and attention, inside units and out);
        where the work is not known (bundles of earlier versions), the share of unit calls computed."""
        if self.work.total:
            return self.work.computed / self.work.total
        calls = sum(u.calls for u in self.units)
        return sum(u.computed for u in self.units) / calls if calls else 1.0

    @property
    def flops_saved(self) -> float:
        """Fraction of the attention FLOPs the cache did not spend."""
        dense = sum(u.flops_dense for u in self.units)
        return sum(u.flops_saved for u in self.units) / dense if dense else 0.0

    def table(self) -> str:
        text = table(self.units)
        if self.work.total:
            text += (f"\n{100 * self.computed:.1f}% of the calls' work computed (matrix products and attention, "
                     "inside units and out)")
        return text

    def __str__(self) -> str:
        return self.table()


def cache_report(model: torch.nn.Module) -> CacheReport:
    """Per unit of `model`'s compiled graphs: calls computed, reused, pruned and bypassed, FLOPs saved; and per
    graph the units its analysis found and what it left out, with the reasons (`CacheReport.graphs`)."""
    return report_of(runtimes_of(model), found_in(model))


def report_of(runtimes: list[CacheRuntime], graphs: list[GraphUnits] | None = None) -> CacheReport:
    """The `CacheReport` of `runtimes` (with `graphs`, the analyses of the graphs they came from)."""
    shares = [runtime.stats.work_share() for runtime in runtimes]
    return CacheReport([unit for runtime in runtimes for unit in runtime.stats.report()],
                       sum(runtime.held_bytes() for runtime in runtimes), list(graphs or []),
                       WorkShare(sum(s.computed for s in shares), sum(s.total for s in shares)),
                       sum(runtime.stats.total_calls for runtime in runtimes))


def units_found(model: torch.nn.Module, *args, options: dict | None = None, **kwargs) -> list[GraphUnits]:
    """The cache units of `model` called as ``model(*args, **kwargs)``: compiled with the cache (eager target
    unless `options` say otherwise), called once without gradients, the analysis of each graph it compiled.

    For coverage tables: ``[u.name for g in units_found(model, **inputs) for u in g.units]``.
    """
    before = {id(found) for found in found_in(model)}
    compiled = torch.compile(model, backend="turbo4d", options={"target": "eager", "cache": {}, **(options or {})})
    with torch.no_grad():
        compiled(*args, **kwargs)
    return [found for found in found_in(model) if id(found) not in before]
