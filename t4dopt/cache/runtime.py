"""Run a segmented graph call after call, reusing work across denoising steps.

One `CacheRuntime` serves one compiled graph. It keeps, per guidance slot of the current
generation, each unit's stored input and residual (``exit - entry``), each token unit's
reference queries and attention rows, each chain's residual, and the drifts measured on the
device. Each call reads back, in one transfer, the timestep and the drifts measured during
the previous call; everything else stays on the device.

A call whose sublayers are all computed, or all reused, runs as one lowered graph
(`StepGraphs`) when the runtime has them; mixed calls run segment by segment.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from t4dopt.cache import policy
from t4dopt.cache.arithmetic import TERM_NAMES, Arithmetic
from t4dopt.cache.program import Program, SegmentSpec
from t4dopt.cache.schedule import Position, StepTracker
from t4dopt.cache.stats import CacheStats
from t4dopt.errors import T4DWarning
from t4dopt.lowering import Lower
from t4dopt.options import CacheSpec



@dataclass
class _Stored:
    """Tensors kept for a unit or chain since its last compute."""

    entry: torch.Tensor | None = None
    residual: torch.Tensor | None = None
    slope: torch.Tensor | None = None
    gap: int = 1
    """Steps between the two computations the slope comes from: it is not carried farther than that."""
    rows: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def order(self) -> int:
        """How the residual is extrapolated: 0 as stored, 1 along its slope."""
        return 1 if self.slope is not None else 0


@dataclass
class _Slot:
    """State of one guidance slot (the n-th call of each step) within a generation.

    ``totals`` keeps, per group of terms reused together, their residuals and slopes summed
    (with the tensors they were summed from: a recomputed term invalidates the sum).
    """

    units: list[policy.DriftState]
    chains: list[policy.DriftState]
    unit_tensors: list[_Stored]
    chain_tensors: list[_Stored]
    pending: list[tuple[policy.DriftState, int, torch.Tensor]] = field(default_factory=list)
    totals: dict[tuple[int, ...], tuple[tuple, torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)


@dataclass(frozen=True)
class _Extrapolated:
    """A residual to add and how to extrapolate it (the arguments of `arithmetic.rebuilt` after the entry)."""

    residual: torch.Tensor
    order: int = 0
    slope: torch.Tensor | None = None
    steps: torch.Tensor | None = None

    def arguments(self) -> list[torch.Tensor]:
        return [self.residual, self.slope, self.steps][:len(TERM_NAMES[self.order])]


@dataclass
class _Term:
    """One addend of a rebuild: a unit's or a chain's stored tensors; `counted` are the states a reuse counts for."""

    state: policy.DriftState
    stored: _Stored
    counted: list[policy.DriftState]


@dataclass
class _Store:
    """A computation to keep: which store (`arithmetic.STORE_KINDS`), its arguments, and where results go."""

    kind: str
    arguments: list[torch.Tensor]
    slot: _Slot
    state: policy.DriftState
    stored: _Stored
    entry: torch.Tensor


@dataclass(frozen=True)
class StepGraphs:
    """Whole-call graphs (`t4dopt.cache.graph.step_graphs`), lowered on first use.

    `plain` runs the whole graph (for calls that keep nothing); `computed(kind)` runs it and
    returns its output leaves, the values named by `taps`, then the results of a store of
    `kind` for each of `Program.stored_values` (taking their arguments after the graph's
    inputs); `token_taps` names, per token-prunable unit, its query and attention rows among
    the taps. `reused(orders)` is the graph rebuilding every run of `Program.runs`, each
    extrapolated to its order (None where it cannot be built).
    """

    plain: Callable
    computed: Callable[[str], Callable]
    taps: list[str]
    token_taps: dict[int, tuple[str, str]]
    reused: Callable[[tuple[int, ...]], Callable | None]


class LazyLowered:
    """A segment lowered on its first call with each input signature (shapes, dtypes, integer values).

    A graph with dynamic shapes runs its segments at several sizes; each size gets its own
    lowering instead of reusing one specialised to another size.
    """

    def __init__(self, gm: fx.GraphModule, lower: Lower):
        self.gm, self.lower = gm, lower
        self.lowered: dict[tuple, Callable] = {}

    def __call__(self, *args: Any) -> Any:
        signature = tuple((tuple(a.shape), a.dtype, a.device) if isinstance(a, torch.Tensor) else a for a in args)
        fn = self.lowered.get(signature)
        if fn is None:
            fn = self.lowered[signature] = self.lower(self.gm, list(args))
        return fn(*args)


SegmentRunners = tuple[Callable, Callable | None, Callable | None]
"""Per segment: how to run it in full, its token ``full`` variant and its ``pruned`` variant (None without)."""


class CacheRuntime:
    """Callable standing in for a compiled graph: same inputs, same outputs, cached across calls.

    `runners` run the segments of `program` (lowered here, or loaded from a bundle);
    `parameter_ids` are the ids of the parameter tensors among the inputs (to find a model's
    runtimes and to leave them out of the input signature).
    """

    def __init__(self, program: Program, runners: list[SegmentRunners], spec: CacheSpec, parameter_ids: set[int],
                 lower: Lower | None = None, step_graphs: StepGraphs | None = None):
        self.program, self.spec, self.parameter_ids, self.step_graphs = program, spec, parameter_ids, step_graphs
        self.arithmetic = Arithmetic(lambda gm: LazyLowered(gm, lower) if lower is not None else gm,
                                     limit=max(spec.max_reuse + 2, 64))
        self.timestep_index = program.placeholders.index(program.timestep) if program.timestep is not None else None
        self.chain_of = {unit: chain for chain, members in enumerate(program.chains) for unit in members}
        self.prunable = [u.token_share is not None for u in program.units]
        self.unit_runs = program.runs()
        segment_of = {segment.unit: index for index, segment in enumerate(program.segments) if segment.unit is not None}
        self.runs = {segment_of[first]: segment_of[last] for first, last in self.unit_runs if last > first}
        self.leaf_count = sum(isinstance(leaf, dict) for leaf in program.output_leaves)
        self._stores: list[_Store] = []
        self.run_plain = [r[0] for r in runners]
        # Attention rows are kept for the token level only.
        self.run_full = [r[1] if "token" in spec.levels else None for r in runners]
        self.run_pruned = [r[2] for r in runners]
        self.stats = CacheStats([u.name for u in program.units], [u.kind for u in program.units],
                                [u.flops for u in program.units], [u.token_share or 1.0 for u in program.units])
        self.tracker = StepTracker()
        self.slots: list[_Slot] = []
        self._warned_grad = False

    def reset(self) -> None:
        """Drop every stored tensor; the next call starts a new generation."""
        self.tracker.reset()
        self.slots = []
        self.stats.close_generation()

    def _slot(self, index: int) -> _Slot:
        while len(self.slots) <= index:
            units, chains = len(self.program.units), len(self.program.chains)
            self.slots.append(_Slot([policy.DriftState() for _ in range(units)], [policy.DriftState() for _ in range(chains)],
                                    [_Stored() for _ in range(units)], [_Stored() for _ in range(chains)]))
        return self.slots[index]

    def _read_back(self, args: tuple) -> tuple[float | None, list[float]]:
        """The timestep and every slot's pending drifts, in one device-to-host transfer."""
        parts = [slot_pending for slot in self.slots for slot_pending in (m[2] for m in slot.pending)]
        timestep = None
        if self.timestep_index is not None:
            t = args[self.timestep_index]
            timestep = t if isinstance(t, (int, float)) else t.reshape(-1)[:1].float()
        if not parts and not isinstance(timestep, torch.Tensor):
            return timestep, []
        device = parts[0].device if parts else timestep.device
        tensors = ([timestep.to(device)] if isinstance(timestep, torch.Tensor) else []) + [p.reshape(1) for p in parts]
        values = torch.cat(tensors).tolist()
        if isinstance(timestep, torch.Tensor):
            return values[0], values[1:]
        return timestep, values

    def _apply_measurements(self, drifts: list[float]) -> None:
        it = iter(drifts)
        for slot in self.slots:
            for state, distance, _ in slot.pending:
                state.measured(next(it), distance)
            slot.pending = []

    def _progress(self, position: Position) -> float:
        if self.spec.steps:
            return min(position.step / max(self.spec.steps - 1, 1), 1.0)
        if position.timestep is not None and position.first_timestep and position.timestep <= position.first_timestep:
            return 1.0 - position.timestep / position.first_timestep
        return 0.5

    def __call__(self, *args: Any) -> Any:
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            if not self._warned_grad:
                self._warned_grad = True
                warnings.warn("turbo4d cache: gradients are enabled, so every call computes in full; "
                              "sample under torch.no_grad() or torch.inference_mode() to reuse work", T4DWarning,
                              stacklevel=2)
            return self._run(args, None)
        timestep, drifts = self._read_back(args)
        self._apply_measurements(drifts)
        signature = tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else a
                          for i, a in enumerate(args) if id(a) not in self.parameter_ids and i != self.timestep_index)
        position = self.tracker.observe(timestep, signature)
        if position.new_generation:
            self.stats.close_generation()
            self.slots = []
        if self.spec.threshold == 0:
            self.stats.record([policy.COMPUTE] * len(self.program.units))
            return self._run(args, None)
        slot = self._slot(position.slot)
        for state in slot.units + slot.chains:
            state.since += 1
        modes = policy.choose(self.spec, position.step, self._progress(position), slot.units, slot.chains,
                              self.program.chains, self.prunable)
        self.stats.record(modes)
        if self.step_graphs is not None:
            result = None
            if all(mode == policy.COMPUTE for mode in modes):
                result = self._run_computed(args, slot)
            elif all(mode in (policy.REUSE, policy.BYPASS) for mode in modes):
                result = self._run_reused(args, slot, modes)
            if result is not None:
                return result
        return self._run(args, (slot, modes))

    def _run_computed(self, args: tuple, slot: _Slot) -> Any | None:
        """Every unit computed: the whole graph, storing every unit and chain, in one call.

        None when the stores are not all of one kind (then the call runs segment by segment).
        """
        terms = ([(state, stored) for state, stored in zip(slot.units, slot.unit_tensors)]
                 + [(state, stored) for state, stored in zip(slot.chains, slot.chain_tensors)])
        kinds = {self._store_kind(stored) for _, stored in terms}
        if len(kinds) > 1:
            return None
        kind = kinds.pop()
        arguments = [a for state, stored in terms for a in self._store_arguments(kind, state, stored)]
        outputs = self.step_graphs.computed(kind)(*args, *arguments)
        taps = self.step_graphs.taps
        env = dict(zip(taps, outputs[self.leaf_count:]))
        for index, (query, rows) in self.step_graphs.token_taps.items():
            slot.unit_tensors[index].rows = (env[query], env[rows])
        results = iter(outputs[self.leaf_count + len(taps):])
        for (state, stored), (entry, _) in zip(terms, self.program.stored_values()):
            self._stored(kind, slot, state, stored, env[entry], results)
        return self.program.output_values(outputs[:self.leaf_count])

    def _run_reused(self, args: tuple, slot: _Slot, modes: list[str]) -> Any | None:
        """Every unit reused: one graph rebuilding each run from summed residuals (None where it cannot)."""
        groups, extras, orders = [], [], []
        for first, last in self.unit_runs:
            terms = self._terms(slot, modes, range(first, last + 1))
            combined = self._combined(slot, terms)
            if combined is None:
                return None
            extras += [terms[0].stored.entry, *combined.arguments()]
            orders.append(combined.order)
            groups.append(terms)
        graph = self.step_graphs.reused(tuple(orders))
        if graph is None:
            return None
        outputs = graph(*args, *extras)
        for terms, moved in zip(groups, outputs[self.leaf_count:]):
            self._reused(slot, terms, moved)
        return self.program.output_values(outputs[:self.leaf_count])

    def _run(self, args: tuple, cached: tuple[_Slot, list[str]] | None) -> Any:
        if cached is None and self.step_graphs is not None:
            return self.program.output_values(self.step_graphs.plain(*args))
        env: dict[str, Any] = dict(zip(self.program.placeholders, args))
        segments = self.program.segments
        index = 0
        while index < len(segments):
            segment = segments[index]
            if segment.unit is None or cached is None:
                outputs = self.run_plain[index](*(env[n] for n in segment.inputs))
                env.update(zip(segment.outputs, outputs))
            elif index in self.runs and self._all_reused(index, cached[1]):
                self._rebuild_run(index, self.runs[index], env, *cached)
                index = self.runs[index]
            else:
                self._run_unit(index, segment, env, *cached)
                self._flush_stores()
            index += 1
        return self.program.outputs(env)

    def _all_reused(self, first: int, modes: list[str]) -> bool:
        segments = self.program.segments[first:self.runs[first] + 1]
        return all(modes[s.unit] in (policy.REUSE, policy.BYPASS) for s in segments)

    def _rebuild_run(self, first: int, last: int, env: dict, slot: _Slot, modes: list[str]) -> None:
        """Rebuild a run of reused sublayers in one sum; only the run's first input drift is measured."""
        units = [self.program.segments[i].unit for i in range(first, last + 1)]
        terms = self._terms(slot, modes, units)
        env[self.program.units[units[-1]].exit] = self._rebuild(slot, terms, env[self.program.units[units[0]].entry])

    def _chain_term(self, slot: _Slot, chain: int) -> _Term:
        members = [slot.units[member] for member in self.program.chains[chain]]
        return _Term(slot.chains[chain], slot.chain_tensors[chain], [slot.chains[chain], *members])

    def _terms(self, slot: _Slot, modes: list[str], units: Sequence[int]) -> list[_Term]:
        """What rebuilds a run of reused `units`: a bypassed chain as one term, each other unit as one."""
        terms: list[_Term] = []
        position = 0
        while position < len(units):
            unit = units[position]
            chain = self.chain_of.get(unit)
            if modes[unit] == policy.BYPASS and chain is not None and self.program.chains[chain][0] == unit:
                terms.append(self._chain_term(slot, chain))
                position += len(self.program.chains[chain])
            else:
                terms.append(_Term(slot.units[unit], slot.unit_tensors[unit], [slot.units[unit]]))
                position += 1
        return terms

    @staticmethod
    def _steps_ahead(term: _Term) -> int:
        """How far a slope is carried: the steps since its computation, never more than the gap it spans."""
        return min(term.state.since, term.stored.gap)

    def _extrapolated(self, term: _Term) -> _Extrapolated:
        stored = term.stored
        if stored.order == 0:
            return _Extrapolated(stored.residual)
        return _Extrapolated(stored.residual, 1, stored.slope, self.arithmetic.steps(self._steps_ahead(term),
                                                                                     stored.residual))

    def _combined(self, slot: _Slot, terms: list[_Term]) -> _Extrapolated | None:
        """The terms as one: residuals and slopes summed, when the slopes extrapolate by the same steps.

        None when they do not (different steps since their computations). Sums are kept in the
        slot until one of their tensors is replaced by a computation.
        """
        if len(terms) == 1:
            return self._extrapolated(terms[0])
        extrapolated = [t for t in terms if t.stored.order == 1]
        ahead = {self._steps_ahead(t) for t in extrapolated}
        if len(ahead) > 1:
            return None
        key = tuple(id(t.stored) for t in terms)
        sources = tuple(tensor for t in terms for tensor in (t.stored.residual, t.stored.slope))
        kept = slot.totals.get(key)
        if kept is None or any(a is not b for a, b in zip(kept[0], sources)):
            sums = (self._total([t.stored.residual for t in terms]), self._total([t.stored.slope for t in extrapolated]))
            kept = slot.totals[key] = (sources, *sums)
        if not extrapolated:
            return _Extrapolated(kept[1])
        return _Extrapolated(kept[1], 1, kept[2], self.arithmetic.steps(ahead.pop(), kept[1]))

    def _total(self, tensors: list[torch.Tensor]) -> torch.Tensor | None:
        return self.arithmetic.total(len(tensors))(*tensors)[0] if tensors else None

    def _measure(self, slot: _Slot, state: policy.DriftState, stored: _Stored, entry: torch.Tensor) -> None:
        if stored.entry is not None:
            slot.pending.append((state, state.since, self.arithmetic.drift(entry, stored.entry)[0]))

    def _kept(self, entry: torch.Tensor) -> torch.Tensor:
        """`entry` as stored: a copy only when the graph mutates tensors in place (it could change later)."""
        return entry.detach().clone() if self.program.mutates else entry.detach()

    def _rebuild(self, slot: _Slot, terms: list[_Term], entry: torch.Tensor) -> torch.Tensor:
        """`entry` plus the stored residuals of `terms` (extrapolated with ``order=1``) in one kernel.

        Records the drift of `entry` for the first term and counts a reuse for each term.
        """
        combined = self._combined(slot, terms)
        parts = [self._extrapolated(term) for term in terms] if combined is None else [combined]
        arguments = [entry, terms[0].stored.entry] + [a for part in parts for a in part.arguments()]
        pattern = tuple(part.order for part in parts)
        exit_value, moved = self.arithmetic.reuse(pattern)(*arguments)
        self._reused(slot, terms, moved)
        return exit_value

    @staticmethod
    def _reused(slot: _Slot, terms: list[_Term], moved: torch.Tensor) -> None:
        """Record the first term's measured drift and count a reuse for every term."""
        first = terms[0].state
        slot.pending.append((first, first.since, moved))
        for term in terms:
            for state in term.counted:
                state.reuses += 1

    def _store_kind(self, stored: _Stored) -> str:
        if stored.entry is None:
            return "first"
        return "slope" if self.spec.order == 1 else "plain"

    def _store_arguments(self, kind: str, state: policy.DriftState, stored: _Stored) -> list[torch.Tensor]:
        """What a store of `kind` takes after ``(exit, entry)`` (`arithmetic.STORE_KINDS`)."""
        if kind == "first":
            return []
        if kind == "plain":
            return [stored.entry]
        return [stored.entry, stored.residual, self.arithmetic.inverse(state.since, stored.entry)]

    def _stored(self, kind: str, slot: _Slot, state: policy.DriftState, stored: _Stored, entry: torch.Tensor,
                results: Iterator[torch.Tensor]) -> None:
        """Take a store's results: the residual (and slope) kept, the entry's drift recorded, `entry` kept."""
        stored.residual = next(results)
        if kind == "slope":
            stored.slope = next(results)
            stored.gap = state.since
        if kind != "first":
            slot.pending.append((state, state.since, next(results)))
        stored.entry = self._kept(entry)
        state.computed()

    def _keep(self, slot: _Slot, state: policy.DriftState, stored: _Stored, entry: torch.Tensor,
              exit_value: torch.Tensor) -> None:
        """Queue the store of a computation's residual (and, with ``order=1``, its change per step).

        Stores run in `_flush_stores`, together; they record the entry's drift.
        """
        kind = self._store_kind(stored)
        arguments = [exit_value, entry, *self._store_arguments(kind, state, stored)]
        self._stores.append(_Store(kind, arguments, slot, state, stored, entry))

    def _flush_stores(self) -> None:
        """Run the queued stores in one lowered graph."""
        if not self._stores:
            return
        stores, self._stores = self._stores, []
        results = iter(self.arithmetic.stores(tuple(s.kind for s in stores))(*(a for s in stores for a in s.arguments)))
        for store in stores:
            self._stored(store.kind, store.slot, store.state, store.stored, store.entry, results)

    def _run_unit(self, index: int, segment: SegmentSpec, env: dict, slot: _Slot, modes: list[str]) -> None:
        unit_index = segment.unit
        unit = self.program.units[unit_index]
        mode = modes[unit_index]
        state, stored = slot.units[unit_index], slot.unit_tensors[unit_index]
        chain = self.chain_of.get(unit_index)
        chain_members = self.program.chains[chain] if chain is not None else ()
        starts_chain = chain is not None and unit_index == chain_members[0]
        if mode == policy.BYPASS:
            if starts_chain:
                last_exit = self.program.units[chain_members[-1]].exit
                env[last_exit] = self._rebuild(slot, [self._chain_term(slot, chain)], env[unit.entry])
            return
        entry = env[unit.entry]
        if starts_chain and any(modes[i] != policy.COMPUTE for i in chain_members):
            # Otherwise the chain is stored at its end, which records this drift.
            self._measure(slot, slot.chains[chain], slot.chain_tensors[chain], entry)
        inputs = [env[n] for n in segment.inputs]
        if mode == policy.REUSE:
            env[unit.exit] = self._rebuild(slot, [_Term(state, stored, [state])], entry)
        elif mode == policy.PRUNE:
            self._measure(slot, state, stored, entry)
            *outputs, reference, rows = self.run_pruned[index](*inputs, *stored.rows)
            env.update(zip(segment.outputs, outputs))
            stored.rows = (reference, rows)
            state.reuses += 1
        else:
            run = self.run_full[index] or self.run_plain[index]
            outputs = list(run(*inputs))
            if self.run_full[index] is not None:
                stored.rows = (outputs[-2], outputs[-1])
                outputs = outputs[:-2]
            env.update(zip(segment.outputs, outputs))
            self._keep(slot, state, stored, entry, env[unit.exit])
        if chain is not None and unit_index == chain_members[-1]:
            self._close_chain(slot, chain, chain_members, modes, env)

    def _close_chain(self, slot: _Slot, chain: int, members: tuple[int, ...], modes: list[str], env: dict) -> None:
        """Store the chain's residual when every unit of it was computed in full this call."""
        if any(modes[i] != policy.COMPUTE for i in members):
            return
        first, last = self.program.units[members[0]], self.program.units[members[-1]]
        state, stored = slot.chains[chain], slot.chain_tensors[chain]
        self._keep(slot, state, stored, env[first.entry], env[last.exit])
