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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from t4dopt.options import CacheSpec

COMPUTE, REUSE, PRUNE, BYPASS = "computed", "reused", "pruned", "bypassed"
MODES = (COMPUTE, REUSE, PRUNE, BYPASS)
TOKEN_THRESHOLD_FACTOR = 2.0


@dataclass
class DriftState:
    """What the policy knows of one unit or chain within one generation."""

    rate: float | None = None
    since: int = 0
    reuses: int = 0
    stored: bool = False

    def predicted(self) -> float:
        """Drift expected at this call: the last measured rate times the steps since the last compute."""
        return math.inf if self.rate is None else self.rate * self.since

    def usable(self, spec: CacheSpec) -> bool:
        return self.stored and self.reuses < spec.max_reuse

    def measured(self, drift: float, distance: int) -> None:
        self.rate = drift / max(distance, 1)

    def computed(self) -> None:
        self.since, self.reuses, self.stored = 0, 0, True


def forced(spec: CacheSpec, step: int) -> bool:
    """Whether `step` is a warm-up or final step, always computed."""
    return step < spec.warmup or (spec.steps is not None and step >= spec.steps - spec.final)


def choose(spec: CacheSpec, step: int, progress: float, units: list[DriftState], chains: list[DriftState],
           chain_units: list[tuple[int, ...]], prunable: list[bool]) -> list[str]:
    """One mode per unit for this call."""
    modes = [COMPUTE] * len(units)
    if forced(spec, step):
        return modes
    if "chain" in spec.levels:
        chain_threshold = spec.threshold * (0.5 + progress)
        for state, members in zip(chains, chain_units):
            if state.usable(spec) and state.predicted() < chain_threshold:
                for index in members:
                    modes[index] = BYPASS
    for index, state in enumerate(units):
        if modes[index] == BYPASS or not state.usable(spec):
            continue
        drift = state.predicted()
        if "block" in spec.levels and drift < spec.threshold:
            modes[index] = REUSE
        elif "token" in spec.levels and prunable[index] and drift < TOKEN_THRESHOLD_FACTOR * spec.threshold:
            modes[index] = PRUNE
    return modes
