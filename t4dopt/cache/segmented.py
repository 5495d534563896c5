"""A call run segment by segment: each unit computed, reused, pruned or bypassed as its mode says.

The calls that mix modes run this way, and every call where the runtime has no whole-call
graphs (a graph that changes tensors in place, a bundle). Values pass between segments in
one environment keyed by value name (`Program`). A span of adjacent reused units is rebuilt
in one sum; the saves of a computed unit (and of the chain it closes) run together in one
lowered graph, right after it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from t4dopt.cache.arithmetic import Arithmetic, Save
from t4dopt.cache.graph.segments import token_outputs
from t4dopt.cache.lowered import SegmentRunners
from t4dopt.cache.policy import Mode
from t4dopt.cache.program import Program, SegmentSpec
from t4dopt.cache.residuals import Residuals, Term, reused
from t4dopt.cache.state import Memory, SlotState

REUSED_MODES = (Mode.REUSE, Mode.BYPASS)


class _Pending(NamedTuple):
    """A save to run once the unit's segment has run, and the memory its results go to."""

    memory: Memory
    save: Save


@dataclass
class _Call:
    """One cached call in progress: its values by name, its slot, each unit's mode, the ``order`` option."""

    env: dict[str, Any]
    slot: SlotState
    modes: Sequence[Mode]
    order: int


class Segments:
    """Runs `program`'s segments with their `runners`; `keep_rows`: the token level is on."""

    def __init__(self, program: Program, runners: list[SegmentRunners], residuals: Residuals,
                 arithmetic: Arithmetic, keep_rows: bool):
        self.program, self.runners, self.residuals, self.arithmetic = program, runners, residuals, arithmetic
        self.keep_rows = keep_rows
        segment_of = {segment.unit: index for index, segment in enumerate(program.segments) if segment.unit is not None}
        self.span_end = {segment_of[span.first]: segment_of[span.last] for span in program.spans() if span.last > span.first}
        """Segment index of a span's first unit -> of its last (spans of two units or more)."""

    def run_plain(self, args: tuple) -> Any:
        """Every segment in full; nothing kept."""
        env: dict[str, Any] = dict(zip(self.program.placeholders, args))
        for segment, runners in zip(self.program.segments, self.runners):
            env.update(zip(segment.outputs, runners.plain(*(env[n] for n in segment.inputs))))
        return self.program.outputs(env)

    def run(self, args: tuple, slot: SlotState, modes: Sequence[Mode], order: int) -> Any:
        call = _Call(dict(zip(self.program.placeholders, args)), slot, modes, order)
        segments = self.program.segments
        index = 0
        while index < len(segments):
            segment = segments[index]
            if segment.unit is None:
                call.env.update(zip(segment.outputs, self.runners[index].plain(*(call.env[n] for n in segment.inputs))))
            elif index in self.span_end and self._span_reused(index, modes):
                self._rebuild_span(call, index)
                index = self.span_end[index]
            else:
                self._save(call, self._unit(call, index, segment))
            index += 1
        return self.program.outputs(call.env)

    def _span_reused(self, first: int, modes: Sequence[Mode]) -> bool:
        return all(modes[s.unit] in REUSED_MODES for s in self.program.segments[first:self.span_end[first] + 1])

    def _rebuild_span(self, call: _Call, first: int) -> None:
        """Rebuild a span of reused units in one sum; only the span's first entry drift is measured."""
        units = [self.program.segments[i].unit for i in range(first, self.span_end[first] + 1)]
        terms = self.residuals.terms(call.slot, call.modes, units)
        entry = call.env[self.program.units[units[0]].entry]
        call.env[self.program.units[units[-1]].exit] = self._rebuild(call, terms, entry)

    def _rebuild(self, call: _Call, terms: list[Term], entry: torch.Tensor) -> torch.Tensor:
        """`entry` plus the saved residuals of `terms` in one kernel; records the first term's drift."""
        result = self.arithmetic.reuse(entry, terms[0].memory.saved.entry, self.residuals.addends(call.slot, terms))
        reused(call.slot, terms, result.drift)
        return result.exit

    def _measure(self, call: _Call, memory: Memory, entry: torch.Tensor) -> None:
        """Expect the drift of `entry` from `memory`'s saved entry (when it has one)."""
        if memory.saved.entry is not None:
            call.slot.expect(memory.drift, self.arithmetic.drift(entry, memory.saved.entry))

    def _unit(self, call: _Call, index: int, segment: SegmentSpec) -> list[_Pending]:
        """Run the unit of segment `index` as its mode says; the saves it (and a chain it closes) needs."""
        unit_index, env, slot = segment.unit, call.env, call.slot
        unit, mode, memory = self.program.units[unit_index], call.modes[unit_index], slot.units[unit_index]
        chain = self.program.chain_of.get(unit_index)
        members = self.program.chains[chain] if chain is not None else ()
        chain_computed = all(call.modes[i] is Mode.COMPUTE for i in members)
        if mode is Mode.BYPASS:
            if members and unit_index == members[0]:
                last_exit = self.program.units[members[-1]].exit
                env[last_exit] = self._rebuild(call, [self.residuals.chain_term(slot, chain)], env[unit.entry])
            return []
        entry = env[unit.entry]
        if members and unit_index == members[0] and not chain_computed:
            # Otherwise the chain is saved at its end, which records this drift.
            self._measure(call, slot.chains[chain], entry)
        inputs = [env[n] for n in segment.inputs]
        pending = []
        if mode is Mode.REUSE:
            env[unit.exit] = self._rebuild(call, [Term(memory, (memory.drift,))], entry)
        elif mode is Mode.PRUNE:
            self._measure(call, memory, entry)
            outputs, rows = token_outputs(self.runners[index].pruned(*inputs, *memory.saved.rows))
            env.update(zip(segment.outputs, outputs))
            slot.pruned(memory, rows)
        else:
            env.update(zip(segment.outputs, self._compute(index, memory, inputs)))
            pending.append(self._pending(call, memory, entry, env[unit.exit]))
        if members and unit_index == members[-1] and chain_computed:
            first, last = self.program.units[members[0]], self.program.units[members[-1]]
            pending.append(self._pending(call, slot.chains[chain], env[first.entry], env[last.exit]))
        return pending

    def _compute(self, index: int, memory: Memory, inputs: list[torch.Tensor]) -> Sequence[Any]:
        """The segment's outputs computed in full (keeping its token rows where the token level is on)."""
        runners = self.runners[index]
        if self.keep_rows and runners.full is not None:
            outputs, memory.saved.rows = token_outputs(runners.full(*inputs))
            return outputs
        return runners.plain(*inputs)

    def _pending(self, call: _Call, memory: Memory, entry: torch.Tensor, exit_value: torch.Tensor) -> _Pending:
        kind = self.residuals.save_kind(memory, call.order)
        return _Pending(memory, Save(kind, exit_value, entry, self.residuals.save_inputs(kind, memory)))

    def _save(self, call: _Call, pending: list[_Pending]) -> None:
        """Run the pending saves in one lowered graph and keep their results."""
        if not pending:
            return
        results = self.arithmetic.save([p.save for p in pending])
        for p, result in zip(pending, results):
            call.slot.computed(p.memory, p.save.entry, result, copy=self.program.mutates)
