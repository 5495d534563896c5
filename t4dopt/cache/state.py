"""What the cache runtime holds between calls, in small objects each with its own reset.

Each track (one guidance branch of one generation, `t4dopt.cache.generations`) has one
`SlotState`. A slot holds one `Memory` per unit and per chain: the policy's host-side
`DriftState` and the tensors `Saved` on the device since its last computation. Drifts
measured on the device wait in the slot as `DriftReading`s until the next call reads them
all back in one transfer (`t4dopt.cache.readback`).

A `DriftState` changes only through its own methods, called from the slot's methods here and
from `t4dopt.cache.residuals.reused`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from t4dopt.cache.arithmetic import SaveResult
from t4dopt.cache.graph.segments import TokenRows
from t4dopt.options import CacheSpec


@dataclass
class DriftState:
    """What the policy knows of one unit or chain within one generation (host values only)."""

    rate: float | None = None
    """Drift per step of its entry, from the last measurement."""
    since: int = 0
    """Calls of its slot since it was last computed."""
    reuses: int = 0
    """Reuses (or prunes) in a row since it was last computed."""
    stored: bool = False

    def predicted(self) -> float:
        """Drift expected at this call: the last measured rate times the steps since the last compute."""
        return math.inf if self.rate is None else self.rate * self.since

    def usable(self, spec: CacheSpec) -> bool:
        return self.stored and self.reuses < spec.max_reuse

    def tick(self) -> None:
        """A call of its slot begins."""
        self.since += 1

    def measured(self, drift: float, distance: int) -> None:
        """A drift read back, measured `distance` calls after its last computation."""
        self.rate = drift / max(distance, 1)

    def reused(self) -> None:
        self.reuses += 1

    def computed(self) -> None:
        self.since, self.reuses, self.stored = 0, 0, True


@dataclass
class Saved:
    """Tensors kept for a unit or chain since its last computation."""

    entry: torch.Tensor | None = None
    residual: torch.Tensor | None = None
    slope: torch.Tensor | None = None
    curvature: torch.Tensor | None = None
    """The slope's change over the last three computations (``order=2``)."""
    gap: int = 1
    """Steps between the two computations the slope comes from: it is not carried farther than that."""
    rows: TokenRows | None = None
    """The token level's reference queries and attention rows (token-prunable units only)."""

    @property
    def order(self) -> int:
        """How the residual is extrapolated: 0 as saved, 1 along its slope, 2 also along its curvature."""
        return 0 if self.slope is None else 1 if self.curvature is None else 2


@dataclass
class Memory:
    """One unit's (or chain's) state in one slot: what the policy reads and what the device keeps."""

    drift: DriftState = field(default_factory=DriftState)
    saved: Saved = field(default_factory=Saved)


class DriftReading(NamedTuple):
    """A drift measured on the device, waiting to be read back into `state`."""

    state: DriftState
    distance: int
    """Calls since `state` was last computed, when it was measured."""
    drift: torch.Tensor


class Sum(NamedTuple):
    """Residuals (and slopes, curvatures) of terms reused together, summed once; `sources` are the tensors summed."""

    sources: tuple[torch.Tensor | None, ...]
    residual: torch.Tensor
    slope: torch.Tensor | None
    curvature: torch.Tensor | None = None


@dataclass
class SlotState:
    """State of one track (a guidance branch of a generation).

    ``sums`` keeps, per group of terms reused together, their summed residuals and slopes; a
    sum is valid while its `Sum.sources` are still the saved tensors.
    """

    units: list[Memory]
    chains: list[Memory]
    readings: list[DriftReading] = field(default_factory=list)
    sums: dict[tuple[int, ...], Sum] = field(default_factory=dict)

    @classmethod
    def empty(cls, units: int, chains: int) -> SlotState:
        return cls([Memory() for _ in range(units)], [Memory() for _ in range(chains)])

    @property
    def memories(self) -> list[Memory]:
        """Every unit's memory, then every chain's (the order of `Program.saved_values`)."""
        return self.units + self.chains

    def begin_call(self) -> None:
        for memory in self.memories:
            memory.drift.tick()

    def expect(self, state: DriftState, drift: torch.Tensor) -> None:
        """`drift`, measured now for `state`, is read back at the next call."""
        self.readings.append(DriftReading(state, state.since, drift))

    def computed(self, memory: Memory, entry: torch.Tensor, result: SaveResult, copy: bool) -> None:
        """`memory` was computed from `entry` and saved: keep the residual (and slope), expect the drift.

        `entry` is kept as it is, or as a copy with `copy` (when the graph changes tensors in
        place, it could change later).
        """
        state, saved = memory.drift, memory.saved
        saved.residual = result.residual
        if result.slope is not None:
            saved.slope, saved.curvature, saved.gap = result.slope, result.curvature, state.since
        if result.drift is not None:
            self.expect(state, result.drift)
        saved.entry = entry.detach().clone() if copy else entry.detach()
        state.computed()

    def pruned(self, memory: Memory, rows: TokenRows) -> None:
        """`memory`'s unit recomputed only its most-moved rows: keep them; it counts as a reuse."""
        memory.saved.rows = rows
        memory.drift.reused()
