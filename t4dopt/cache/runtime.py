"""Run a segmented graph call after call, reusing work across denoising steps.

One `CacheRuntime` serves one compiled graph. Per call it reads back, in one transfer, the
timestep and the drifts measured during earlier calls (`state.GenerationState.read_back`),
places the call in its generation, step and guidance slot (`schedule.StepTracker`), lets the
policy choose each unit's mode (`policy.choose`), and hands the call to the `Executor`, which
picks its path before running it. Everything else stays on the device.

Where each part lives: per-generation and per-slot state in `state`, the lowered graphs in
`lowered` (whole-call graphs) and `arithmetic` (reuse and save kernels), the paths in
`executor` and `segmented`, the counts users read in `stats`.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from t4dopt.cache import policy
from t4dopt.cache.arithmetic import Arithmetic
from t4dopt.cache.executor import Executor
from t4dopt.cache.lowered import LazyLowered, SegmentRunners, StepGraphs
from t4dopt.cache.program import Program
from t4dopt.cache.schedule import StepTracker
from t4dopt.cache.state import GenerationState
from t4dopt.cache.stats import CacheStats
from t4dopt.errors import T4DWarning
from t4dopt.lowering import Lower
from t4dopt.options import CacheSpec


class CacheRuntime:
    """Callable standing in for a compiled graph: same inputs, same outputs, cached across calls.

    `runners` run the segments of `program` (lowered here, or loaded from a bundle);
    `parameter_ids` are the ids of the parameter tensors among the inputs (to find a model's
    runtimes and to leave them out of the input signature). `spec` may be replaced between
    generations (`t4dopt.calibrate` does), except its ``levels``.
    """

    def __init__(self, program: Program, runners: list[SegmentRunners], spec: CacheSpec, parameter_ids: set[int],
                 lower: Lower | None = None, step_graphs: StepGraphs | None = None):
        self.program, self.spec, self.parameter_ids = program, spec, parameter_ids
        arithmetic = Arithmetic(lambda gm: LazyLowered(gm, lower) if lower is not None else gm,
                                limit=max(spec.max_reuse + 2, 64))
        self.executor = Executor(program, runners, step_graphs, arithmetic, keep_rows="token" in spec.levels)
        self.timestep_index = program.placeholders.index(program.timestep) if program.timestep is not None else None
        self.prunable = [u.token_share is not None for u in program.units]
        self.stats = CacheStats([u.name for u in program.units], [u.kind for u in program.units],
                                [u.flops for u in program.units], [u.token_share or 1.0 for u in program.units])
        self.tracker = StepTracker()
        self.generation = GenerationState(len(program.units), len(program.chains))
        self._warned_grad = False

    def reset(self) -> None:
        """Drop every stored tensor; the next call starts a new generation."""
        self.tracker.reset()
        self.generation.reset()
        self.stats.close_generation()

    def __call__(self, *args: Any) -> Any:
        if self._needs_gradients(args):
            return self.executor.run(self.executor.plan(), args)
        timestep = self.generation.read_back(self._timestep(args))
        position = self.tracker.observe(timestep, self._signature(args))
        if position.new_generation:
            self.stats.close_generation()
            self.generation.reset()
        if self.spec.threshold == 0:
            self.stats.count([policy.Mode.COMPUTE] * len(self.program.units))
            return self.executor.run(self.executor.plan(), args)
        slot = self.generation.slot(position.slot)
        slot.begin_call()
        modes = policy.choose(self.spec, position.step, policy.progress_of(self.spec, position),
                              [m.drift for m in slot.units], [m.drift for m in slot.chains], self.program.chains,
                              self.prunable)
        self.stats.count(modes)
        return self.executor.run(self.executor.plan(slot, modes, self.spec.order), args)

    def _needs_gradients(self, args: tuple) -> bool:
        """Whether autograd records this call (then it computes in full, with a warning the first time)."""
        if not (torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)):
            return False
        if not self._warned_grad:
            self._warned_grad = True
            warnings.warn("turbo4d cache: gradients are enabled, so every call computes in full; "
                          "sample under torch.no_grad() or torch.inference_mode() to reuse work", T4DWarning,
                          stacklevel=3)
        return True

    def _timestep(self, args: tuple) -> torch.Tensor | float | None:
        return args[self.timestep_index] if self.timestep_index is not None else None

    def _signature(self, args: tuple) -> tuple:
        """The input shapes a generation keeps (parameters and the timestep left out)."""
        return tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else a
                     for i, a in enumerate(args) if id(a) not in self.parameter_ids and i != self.timestep_index)
