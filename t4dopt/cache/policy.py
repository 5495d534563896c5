"""Decide, before a call runs, what each cache unit does: compute, reuse, prune rows, or bypass with its chain.

Decisions are made on the host from drifts measured on the device during earlier calls and
read back once per call, so no segment waits on the device mid-step. A unit's drift is the
relative L1 change of its input since it was last computed; from the last measurement the
policy predicts the drift it will have now, assuming it grows linearly with the steps.

- **chain**: a spatial -> camera -> motion chain is bypassed (its stored residual added to its
  input) when its predicted drift is under the threshold scaled by 0.5 + progress through
  the schedule: stricter than a block early, looser late.
- **block**: a unit reuses its residual when its predicted drift is under the threshold.
- **token**: a camera or motion unit whose predicted drift is under twice the threshold
  recomputes only its most-moved rows.

Warm-up and final steps, units without stored state and units that reached ``max_reuse``
reuses in a row are computed.

With ``decision="step"`` there is one decision per call instead, for every unit: all reuse
when the first unit's predicted drift is under the threshold and every unit may reuse (stored,
under ``max_reuse``), else all compute. The first unit's entry is the model's input to its
blocks, the probe FirstBlockCache, SeaCache and TeaCache read; a reused call measures it as it
rebuilds the first span, a computed one as it saves. Uniform calls each run one whole lowered
graph (`t4dopt.cache.executor`), where mixed ones run segment by segment.
"""

from __future__ import annotations

from enum import StrEnum

from t4dopt.cache.generations import Placement
from t4dopt.cache.state import DriftState
from t4dopt.options import CacheSpec


class Mode(StrEnum):
    """What a unit does in one call; the values are the names reports count them under."""

    COMPUTE = "computed"
    REUSE = "reused"
    PRUNE = "pruned"
    BYPASS = "bypassed"


TOKEN_THRESHOLD_FACTOR = 2.0


def forced(spec: CacheSpec, step: int) -> bool:
    """Whether `step` is a warm-up or final step, always computed."""
    return step < spec.warmup or (spec.steps is not None and step >= spec.steps - spec.final)


def progress_of(spec: CacheSpec, position: Placement) -> float:
    """How far through the schedule a call is, 0 to 1: from the step count, else the timestep, else 0.5."""
    if spec.steps:
        return min(position.step / max(spec.steps - 1, 1), 1.0)
    if position.timestep is not None and position.first_timestep and position.timestep <= position.first_timestep:
        return 1.0 - position.timestep / position.first_timestep
    return 0.5


def choose(spec: CacheSpec, step: int, progress: float, units: list[DriftState], chains: list[DriftState],
           chain_units: list[tuple[int, ...]], prunable: list[bool]) -> list[Mode]:
    """One mode per unit for this call."""
    modes = [Mode.COMPUTE] * len(units)
    if forced(spec, step):
        return modes
    if spec.decision == "step":
        return step_wide(spec, units)
    if "chain" in spec.levels:
        chain_threshold = spec.threshold * (0.5 + progress)
        for state, members in zip(chains, chain_units):
            if state.usable(spec) and state.predicted() < chain_threshold:
                for index in members:
                    modes[index] = Mode.BYPASS
    for index, state in enumerate(units):
        if modes[index] is Mode.BYPASS or not state.usable(spec):
            continue
        drift = state.predicted()
        if "block" in spec.levels and drift < spec.threshold:
            modes[index] = Mode.REUSE
        elif "token" in spec.levels and prunable[index] and drift < TOKEN_THRESHOLD_FACTOR * spec.threshold:
            modes[index] = Mode.PRUNE
    return modes


def step_wide(spec: CacheSpec, units: list[DriftState]) -> list[Mode]:
    """One mode for every unit: reused when the first unit's predicted drift is under the threshold and every
    unit may reuse, else computed (`decision="step"`)."""
    reuse = bool(units) and all(state.usable(spec) for state in units) and units[0].predicted() < spec.threshold
    return [Mode.REUSE if reuse else Mode.COMPUTE] * len(units)
