"""Find the cache runtimes of a model: `t4dopt.reset(model)` and `t4dopt.cache_report(model)`."""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from t4dopt.cache.runtime import CacheRuntime
from t4dopt.cache.stats import UnitReport, WorkShare, table

_runtimes: weakref.WeakSet[CacheRuntime] = weakref.WeakSet()


def register(runtime: CacheRuntime) -> None:
    _runtimes.add(runtime)


def runtimes_of(model: torch.nn.Module | None) -> list[CacheRuntime]:
    """The runtimes compiled from `model`'s graphs (matched by its parameters); all of them for None."""
    if model is None:
        return list(_runtimes)
    ids = {id(p) for p in model.parameters()}
    return [r for r in _runtimes if r.parameter_ids & ids]


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
    work: WorkShare = WorkShare(0.0, 0.0)
    """FLOPs of the last generation's calls, computed and in all, counting the work outside units."""

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
    """Per unit of `model`'s compiled graphs: calls computed, reused, pruned and bypassed, FLOPs saved."""
    return report_of(runtimes_of(model))


def report_of(runtimes: list[CacheRuntime]) -> CacheReport:
    """The `CacheReport` of `runtimes`."""
    shares = [runtime.stats.work_share() for runtime in runtimes]
    return CacheReport([unit for runtime in runtimes for unit in runtime.stats.report()],
                       sum(runtime.held_bytes() for runtime in runtimes),
                       WorkShare(sum(s.computed for s in shares), sum(s.total for s in shares)))
