"""Tell denoising steps, guidance calls and generations apart from the timestep a model is called with.

A sampling loop calls the model once per step (twice when classifier-free guidance runs the
conditional and unconditional halves as separate calls) with a timestep that moves one way
(down from noise for most samplers). A call with the same timestep as the last one is another
*slot* of the same step; a timestep that moves on is the next step; one that moves back, or
inputs of another shape, start a new *generation*, whose state must not see the last one's.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Position:
    """Where a call falls: a new generation or not, the step within it, the call within the step."""

    new_generation: bool
    step: int
    slot: int
    first_timestep: float | None
    timestep: float | None


class StepTracker:
    """Follows one compiled graph's calls; `observe` once per call."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget everything: the next call starts a generation."""
        self._signature: object = None
        self._timestep: float | None = None
        self._first: float | None = None
        self._direction = 0
        self._step = -1
        self._slot = 0

    def observe(self, timestep: float | None, signature: object) -> Position:
        """Place a call with `timestep` (None when the graph has none) and input `signature` (shapes)."""
        started = self._step < 0 or signature != self._signature
        if not started and timestep is not None and self._timestep is not None:
            if timestep == self._timestep:
                self._slot += 1
                return Position(False, self._step, self._slot, self._first, timestep)
            direction = 1 if timestep > self._timestep else -1
            started = self._direction not in (0, direction)
            if not started:
                self._direction = direction
        if started:
            self._signature, self._first, self._direction, self._step = signature, timestep, 0, 0
        else:
            self._step += 1
        self._timestep, self._slot = timestep, 0
        return Position(started, self._step, 0, self._first, timestep)
