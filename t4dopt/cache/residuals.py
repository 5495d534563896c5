"""From a slot's memories to the arguments of the arithmetic: what a save takes, what a reuse adds.

A computed unit (or chain) is saved with a `SaveKind` chosen from what it already holds; a
reused one contributes an `Addend`. Consecutive reused units are rebuilt in one sum, and a
bypassed chain is one `Term` for all its units. Terms whose slopes are carried by the same
number of steps combine into one addend, summed once and kept in the slot (`SlotState.sums`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from t4dopt.cache.arithmetic import Addend, Arithmetic, SaveInputs, SaveKind
from t4dopt.cache.policy import Mode
from t4dopt.cache.program import Program
from t4dopt.cache.state import DriftState, Memory, SlotState, Sum


@dataclass(frozen=True)
class Term:
    """One addend of a rebuild: a unit's or a chain's memory; `counted` are the states a reuse counts for."""

    memory: Memory
    counted: tuple[DriftState, ...]


def steps_ahead(memory: Memory) -> int:
    """How far a slope is carried: the steps since its computation, never more than the gap it spans."""
    return min(memory.drift.since, memory.saved.gap)


def bend(memory: Memory) -> int:
    """``s * (s + gap)`` for a curvature carried `steps_ahead` steps s (`t4dopt.cache.arithmetic.rebuilt`)."""
    ahead = steps_ahead(memory)
    return ahead * (ahead + memory.saved.gap)


def combinable(terms: Sequence[Term]) -> bool:
    """Whether `terms` can be one addend: their slopes (if any) are carried by the same number of steps, and
    their curvatures (if any) bent alike."""
    return (len({steps_ahead(t.memory) for t in terms if t.memory.saved.order >= 1}) <= 1
            and len({bend(t.memory) for t in terms if t.memory.saved.order == 2}) <= 1)


def reused(slot: SlotState, terms: Sequence[Term], drift: torch.Tensor) -> None:
    """`terms` were reused: the first one's entry moved by `drift`; each counts a reuse.

    The other terms' entries were never made (the span was rebuilt in one sum), so `drift` is what
    each of them measures too: left unmeasured, their rates would go stale while the span is reused,
    and per-unit decisions would compute them at the wrong steps.
    """
    for term in terms:
        slot.expect(term.memory.drift, drift)
        for state in term.counted:
            state.reused()


class Residuals:
    """The save and reuse arguments of `program`'s units and chains, with the lowered `arithmetic`."""

    def __init__(self, program: Program, arithmetic: Arithmetic):
        self.program, self.arithmetic = program, arithmetic

    @staticmethod
    def save_kind(memory: Memory, order: int) -> SaveKind:
        """The save after computing `memory`'s unit or chain, with ``order`` as the cache option."""
        if memory.saved.entry is None:
            return SaveKind.FIRST
        if order == 2 and memory.saved.slope is not None:
            return SaveKind.CURVATURE
        return SaveKind.SLOPE if order >= 1 else SaveKind.RESIDUAL

    def save_inputs(self, kind: SaveKind, memory: Memory) -> SaveInputs:
        """What a save of `kind` takes from `memory` after ``(exit, entry)``."""
        saved = memory.saved
        if kind is SaveKind.FIRST:
            return SaveInputs()
        if kind is SaveKind.RESIDUAL:
            return SaveInputs(saved.entry)
        since = memory.drift.since
        inverse = self.arithmetic.inverse(since, saved.entry)
        if kind is SaveKind.SLOPE:
            return SaveInputs(saved.entry, saved.residual, inverse)
        return SaveInputs(saved.entry, saved.residual, inverse, saved.slope,
                          self.arithmetic.inverse(since + saved.gap, saved.entry))

    def chain_term(self, slot: SlotState, chain: int) -> Term:
        members = tuple(slot.units[member].drift for member in self.program.chains[chain])
        return Term(slot.chains[chain], (slot.chains[chain].drift, *members))

    def terms(self, slot: SlotState, modes: Sequence[Mode], units: Sequence[int]) -> list[Term]:
        """What rebuilds adjacent reused `units`: a bypassed chain as one term, each other unit as one."""
        terms: list[Term] = []
        position = 0
        while position < len(units):
            unit = units[position]
            chain = self.program.chain_of.get(unit)
            if modes[unit] is Mode.BYPASS and chain is not None and self.program.chains[chain][0] == unit:
                terms.append(self.chain_term(slot, chain))
                position += len(self.program.chains[chain])
            else:
                terms.append(Term(slot.units[unit], (slot.units[unit].drift,)))
                position += 1
        return terms

    def addend(self, memory: Memory) -> Addend:
        saved = memory.saved
        if saved.order == 0:
            return Addend(saved.residual)
        steps = self.arithmetic.steps(steps_ahead(memory), saved.residual)
        if saved.order == 1:
            return Addend(saved.residual, saved.slope, steps)
        return Addend(saved.residual, saved.slope, steps, saved.curvature,
                      self.arithmetic.steps(bend(memory), saved.residual))

    def combined(self, slot: SlotState, terms: Sequence[Term]) -> Addend:
        """`terms` (which must be `combinable`) as one addend: residuals and slopes summed.

        The sums are kept in `slot` until one of the tensors they were summed from is replaced.
        """
        if len(terms) == 1:
            return self.addend(terms[0].memory)
        extrapolated = [t.memory for t in terms if t.memory.saved.order >= 1]
        bent = [m for m in extrapolated if m.saved.order == 2]
        key = tuple(id(t.memory.saved) for t in terms)
        sources = tuple(tensor for t in terms
                        for tensor in (t.memory.saved.residual, t.memory.saved.slope, t.memory.saved.curvature))
        kept = slot.sums.get(key)
        if kept is None or any(a is not b for a, b in zip(kept.sources, sources)):
            residual = self.arithmetic.total([t.memory.saved.residual for t in terms])
            slope = self.arithmetic.total([m.saved.slope for m in extrapolated]) if extrapolated else None
            curvature = self.arithmetic.total([m.saved.curvature for m in bent]) if bent else None
            kept = slot.sums[key] = Sum(sources, residual, slope, curvature)
        if not extrapolated:
            return Addend(kept.residual)
        steps = self.arithmetic.steps(steps_ahead(extrapolated[0]), kept.residual)
        if not bent:
            return Addend(kept.residual, kept.slope, steps)
        return Addend(kept.residual, kept.slope, steps, kept.curvature,
                      self.arithmetic.steps(bend(bent[0]), kept.residual))

    def addends(self, slot: SlotState, terms: Sequence[Term]) -> list[Addend]:
        """`terms` as one combined addend where they combine, else one addend each."""
        if combinable(terms):
            return [self.combined(slot, terms)]
        return [self.addend(term.memory) for term in terms]
