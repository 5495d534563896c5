"""How one call of the cache runtime runs: the path is chosen before it starts (`Executor.plan`), then taken.

- ``PLAIN``: nothing kept (gradients enabled, threshold 0): the whole graph, or every segment
  in full where there are no whole-call graphs (a bundle);
- ``COMPUTED``: every unit computed and every save of one kind: the whole graph, saving as it goes
  (not for a graph that changes tensors in place);
- ``REUSED``: every unit reused or bypassed and each span's terms combinable: the whole graph
  with every span rebuilt from saved tensors;
- ``SEGMENTS``: anything else, segment by segment (`t4dopt.cache.segmented`); also every call
  where there are no whole-call graphs.

Uniform calls, the common ones, thus run as one lowered graph each.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from t4dopt.cache.arithmetic import Arithmetic, SaveKind
from t4dopt.cache.graph.segments import TokenRows
from t4dopt.cache.lowered import SegmentRunners, SpanInputs, StepGraphs
from t4dopt.cache.policy import Mode
from t4dopt.cache.program import Program
from t4dopt.cache.residuals import Residuals, Term, combinable, reused
from t4dopt.cache.segmented import REUSED_MODES, Segments
from t4dopt.cache.state import SlotState


class CallPath(Enum):
    PLAIN = "the whole graph, nothing kept"
    COMPUTED = "the whole graph, saving every unit and chain"
    REUSED = "the whole graph with every span of units rebuilt"
    SEGMENTS = "segment by segment, each unit as its mode says"


@dataclass(frozen=True)
class Plan:
    """How a call runs: its path, and what that path takes (`kind` for COMPUTED, `spans` for REUSED)."""

    path: CallPath
    slot: SlotState | None = None
    modes: Sequence[Mode] = ()
    order: int = 1
    """The ``order`` cache option: how computed units are saved."""
    kind: SaveKind | None = None
    """The kind of every save (COMPUTED)."""
    spans: list[list[Term]] | None = None
    """Per span of `Program.spans`, the terms rebuilding it (REUSED)."""


class Executor:
    """Runs calls of `program`: whole-call `step_graphs` where a path allows (None: never), else segments.

    `keep_rows`: the token level is on, so computed token-prunable units keep their attention rows.
    """

    def __init__(self, program: Program, runners: list[SegmentRunners], step_graphs: StepGraphs | None,
                 arithmetic: Arithmetic, keep_rows: bool):
        self.program, self.step_graphs = program, step_graphs
        self.residuals = Residuals(program, arithmetic)
        self.segments = Segments(program, runners, self.residuals, arithmetic, keep_rows)
        self.spans = program.spans()
        self.saved_values = program.saved_values()

    def plan(self, slot: SlotState | None = None, modes: Sequence[Mode] = (), order: int = 1) -> Plan:
        """The path of a call with `slot`, `modes` and the ``order`` option (no slot: nothing is cached)."""
        graphs = self.step_graphs
        if slot is None:
            return Plan(CallPath.PLAIN)
        if graphs is not None and graphs.computed is not None and all(mode is Mode.COMPUTE for mode in modes):
            kinds = {self.residuals.save_kind(memory, order) for memory in slot.memories}
            if len(kinds) == 1:
                return Plan(CallPath.COMPUTED, slot, modes, order, kind=kinds.pop())
        if graphs is not None and graphs.reused is not None and all(mode in REUSED_MODES for mode in modes):
            spans = [self.residuals.terms(slot, modes, range(span.first, span.last + 1)) for span in self.spans]
            if all(combinable(terms) for terms in spans):
                return Plan(CallPath.REUSED, slot, modes, order, spans=spans)
        return Plan(CallPath.SEGMENTS, slot, modes, order)

    def run(self, plan: Plan, args: tuple) -> Any:
        if plan.path is CallPath.PLAIN:
            if self.step_graphs is None:
                return self.segments.run_plain(args)
            return self.program.output_values(self.step_graphs.plain(*args))
        if plan.path is CallPath.COMPUTED:
            return self._run_computed(args, plan.slot, plan.kind)
        if plan.path is CallPath.REUSED:
            return self._run_reused(args, plan.slot, plan.spans)
        return self.segments.run(args, plan.slot, plan.modes, plan.order)

    def _run_computed(self, args: tuple, slot: SlotState, kind: SaveKind) -> Any:
        """Every unit computed: the whole graph, saving every unit and chain, in one call."""
        memories = slot.memories
        result = self.step_graphs.computed(kind)(args, [self.residuals.save_inputs(kind, m) for m in memories])
        for unit, taps in self.step_graphs.token_taps.items():
            slot.units[unit].saved.rows = TokenRows(result.taps[taps.query], result.taps[taps.rows])
        for memory, value, saved in zip(memories, self.saved_values, result.saves):
            slot.computed(memory, result.taps[value.entry], saved, copy=self.program.mutates)
        return self.program.output_values(result.leaves)

    def _run_reused(self, args: tuple, slot: SlotState, spans: list[list[Term]]) -> Any:
        """Every unit reused: one graph rebuilding each span from its combined terms."""
        inputs = [SpanInputs(terms[0].memory.saved.entry, self.residuals.combined(slot, terms)) for terms in spans]
        result = self.step_graphs.reused(tuple(span.addend.order for span in inputs))(args, inputs)
        for terms, drift in zip(spans, result.drifts):
            reused(slot, terms, drift)
        return self.program.output_values(result.leaves)
