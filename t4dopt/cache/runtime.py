"""Run a segmented graph call after call, reusing work across denoising steps.

One `CacheRuntime` serves one compiled graph. It keeps, per guidance slot of the current
generation, each unit's stored input and residual (``exit - entry``), each token unit's
reference queries and attention rows, each chain's residual, and the drifts measured on the
device. Each call reads back, in one transfer, the timestep and the drifts measured during
the previous call; everything else stays on the device.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from t4dopt.cache import policy
from t4dopt.cache.arithmetic import Arithmetic
from t4dopt.cache.program import Program, SegmentSpec
from t4dopt.cache.schedule import Position, StepTracker
from t4dopt.cache.stats import CacheStats
from t4dopt.errors import T4DWarning
from t4dopt.options import CacheSpec

Lower = Callable[[fx.GraphModule, list[Any]], Callable]


@dataclass
class _Stored:
    """Tensors kept for a unit or chain since its last compute."""

    entry: torch.Tensor | None = None
    residual: torch.Tensor | None = None
    slope: torch.Tensor | None = None
    gap: int = 1
    """Steps between the two computations the slope comes from: it is not carried farther than that."""
    rows: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class _Slot:
    """State of one guidance slot (the n-th call of each step) within a generation."""

    units: list[policy.DriftState]
    chains: list[policy.DriftState]
    unit_tensors: list[_Stored]
    chain_tensors: list[_Stored]
    pending: list[tuple[policy.DriftState, int, torch.Tensor]] = field(default_factory=list)


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
                 lower: Lower | None = None):
        self.program, self.spec, self.parameter_ids = program, spec, parameter_ids
        self.arithmetic = Arithmetic(lambda gm: LazyLowered(gm, lower) if lower is not None else gm,
                                     limit=max(spec.max_reuse + 2, 64))
        self.timestep_index = program.placeholders.index(program.timestep) if program.timestep is not None else None
        self.chain_of = {unit: chain for chain, members in enumerate(program.chains) for unit in members}
        self.prunable = [u.token_share is not None for u in program.units]
        self.runs = self._adjacent_runs()
        self.run_plain = [r[0] for r in runners]
        self.run_full = [r[1] for r in runners]
        self.run_pruned = [r[2] for r in runners]
        self.stats = CacheStats([u.name for u in program.units], [u.kind for u in program.units],
                                [u.flops for u in program.units], [u.token_share or 1.0 for u in program.units])
        self.tracker = StepTracker()
        self.slots: list[_Slot] = []
        self._warned_grad = False

    def _adjacent_runs(self) -> dict[int, int]:
        """First segment -> last segment of each run of two or more adjacent unit segments (exit i is entry i+1)."""
        runs: dict[int, int] = {}
        segments, units = self.program.segments, self.program.units
        start = None
        for index, segment in enumerate(segments + [None]):
            joined = (start is not None and segment is not None and segment.unit is not None
                      and units[segments[index - 1].unit].exit == units[segment.unit].entry)
            if joined:
                continue
            if start is not None and index - 1 > start:
                runs[start] = index - 1
            start = index if segment is not None and segment.unit is not None else None
        return runs

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
        return self._run(args, (slot, modes))

    def _run(self, args: tuple, cached: tuple[_Slot, list[str]] | None) -> Any:
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
            index += 1
        return self.program.outputs(env)

    def _all_reused(self, first: int, modes: list[str]) -> bool:
        segments = self.program.segments[first:self.runs[first] + 1]
        return all(modes[s.unit] in (policy.REUSE, policy.BYPASS) for s in segments)

    def _rebuild_run(self, first: int, last: int, env: dict, slot: _Slot, modes: list[str]) -> None:
        """Rebuild a run of reused sublayers in one sum; only the run's first input drift is measured."""
        units = [self.program.segments[i].unit for i in range(first, last + 1)]
        terms: list[tuple[policy.DriftState, _Stored]] = []
        position = 0
        while position < len(units):
            unit = units[position]
            chain = self.chain_of.get(unit)
            if modes[unit] == policy.BYPASS and chain is not None and self.program.chains[chain][0] == unit:
                terms.append((slot.chains[chain], slot.chain_tensors[chain]))
                for member in self.program.chains[chain]:
                    slot.units[member].reuses += 1
                position += len(self.program.chains[chain])
            else:
                terms.append((slot.units[unit], slot.unit_tensors[unit]))
                position += 1
        env[self.program.units[units[-1]].exit] = self._rebuild(slot, terms, env[self.program.units[units[0]].entry])

    def _measure(self, slot: _Slot, state: policy.DriftState, stored: _Stored, entry: torch.Tensor) -> None:
        if stored.entry is not None:
            slot.pending.append((state, state.since, self.arithmetic.drift(entry, stored.entry)[0]))

    def _kept(self, entry: torch.Tensor) -> torch.Tensor:
        """`entry` as stored: a copy only when the graph mutates tensors in place (it could change later)."""
        return entry.detach().clone() if self.program.mutates else entry.detach()

    def _rebuild(self, slot: _Slot, terms: list[tuple[policy.DriftState, _Stored]], entry: torch.Tensor) -> torch.Tensor:
        """`entry` plus the stored residuals of `terms` (extrapolated with ``order=1``) in one kernel.

        Records the drift of `entry` for the first term and counts a reuse for each term.
        """
        arguments: list[torch.Tensor] = [entry, terms[0][1].entry]
        for state, stored in terms:
            arguments.append(stored.residual)
            if stored.slope is not None:
                arguments += [stored.slope, self.arithmetic.steps(min(state.since, stored.gap), entry)]
        exit_value, moved = self.arithmetic.reuse(tuple(stored.slope is not None for _, stored in terms))(*arguments)
        slot.pending.append((terms[0][0], terms[0][0].since, moved))
        for state, _ in terms:
            state.reuses += 1
        return exit_value

    def _keep(self, slot: _Slot, state: policy.DriftState, stored: _Stored, entry: torch.Tensor,
              exit_value: torch.Tensor) -> None:
        """Store a computation's residual (and, with ``order=1``, its change per step); records the drift."""
        before, previous = stored.entry, stored.residual
        if before is None:
            stored.residual, _ = self.arithmetic.store(exit_value, entry, entry)
        elif self.spec.order == 1:
            inverse_gap = self.arithmetic.inverse(state.since, entry)
            stored.gap = state.since
            stored.residual, stored.slope, moved = self.arithmetic.store_slope(exit_value, entry, before, previous,
                                                                               inverse_gap)
            slot.pending.append((state, state.since, moved))
        else:
            stored.residual, moved = self.arithmetic.store(exit_value, entry, before)
            slot.pending.append((state, state.since, moved))
        stored.entry = self._kept(entry)
        state.computed()

    def _run_unit(self, index: int, segment: SegmentSpec, env: dict, slot: _Slot, modes: list[str]) -> None:
        unit_index = segment.unit
        unit = self.program.units[unit_index]
        mode = modes[unit_index]
        state, stored = slot.units[unit_index], slot.unit_tensors[unit_index]
        chain = self.chain_of.get(unit_index)
        chain_members = self.program.chains[chain] if chain is not None else ()
        starts_chain = chain is not None and unit_index == chain_members[0]
        if mode == policy.BYPASS:
            state.reuses += 1
            if starts_chain:
                last_exit = self.program.units[chain_members[-1]].exit
                env[last_exit] = self._rebuild(slot, [(slot.chains[chain], slot.chain_tensors[chain])], env[unit.entry])
            return
        entry = env[unit.entry]
        if starts_chain and any(modes[i] != policy.COMPUTE for i in chain_members):
            # Otherwise the chain is stored at its end, which records this drift.
            self._measure(slot, slot.chains[chain], slot.chain_tensors[chain], entry)
        inputs = [env[n] for n in segment.inputs]
        if mode == policy.REUSE:
            env[unit.exit] = self._rebuild(slot, [(state, stored)], entry)
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
