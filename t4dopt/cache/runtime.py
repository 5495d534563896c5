"""Run a segmented graph call after call, reusing work across denoising steps.

One `CacheRuntime` serves one compiled graph. At threshold 0 a call only runs the whole graph
(nothing could be reused, so nothing is placed or kept). Otherwise, per call it reads back, in one transfer, the
timestep, what identifies the call and the drifts measured during earlier calls
(`readback`), places the call in its generation, guidance branch and step
(`generations.Generations`, honouring explicit scopes from `scope`), lets the policy choose
each unit's mode (`policy.choose`), and hands the call to the `Executor`, which picks its
path before running it. Everything else stays on the device.

Where each part lives: per-track state in `state`, the lowered graphs in `lowered`
(whole-call graphs) and `arithmetic` (reuse and save kernels), the paths in `executor` and
`segmented`, the counts users read in `stats`.

Calls from several threads are safe: placing a call and counting it hold a lock; running it
does not (each thread's calls go to its own tracks).
"""

from __future__ import annotations

import threading
import warnings
from typing import Any

import torch

from t4dopt.cache import policy
from t4dopt.cache.arithmetic import Arithmetic
from t4dopt.cache.executor import Executor
from t4dopt.cache.generations import Generations
from t4dopt.cache.lowered import LazyLowered, SegmentRunners, StepGraphs
from t4dopt.cache.parameters import ParameterSet
from t4dopt.cache.program import Program
from t4dopt.cache.scope import Scope, generation
from t4dopt.cache.stats import CacheStats
from t4dopt.errors import T4DWarning
from t4dopt.lowering import Lower
from t4dopt.options import CacheSpec


class CacheRuntime:
    """Callable standing in for a compiled graph: same inputs, same outputs, cached across calls.

    `runners` run the segments of `program` (lowered here, or loaded from a bundle);
    `parameters` are the parameter tensors among the inputs (to find a model's runtimes;
    calls with other modules' parameters add theirs). `spec` may be replaced between
    generations (`t4dopt.calibrate` does), except its ``levels``.
    """

    def __init__(self, program: Program, runners: list[SegmentRunners], spec: CacheSpec, parameters: ParameterSet,
                 lower: Lower | None = None, step_graphs: StepGraphs | None = None):
        self.program, self.spec, self.parameters = program, spec, parameters
        arithmetic = Arithmetic(lambda gm: LazyLowered(gm, lower) if lower is not None else gm,
                                limit=max(spec.max_reuse + 2, 64))
        self.executor = Executor(program, runners, step_graphs, arithmetic, keep_rows="token" in spec.levels)
        self.prunable = [u.token_share is not None for u in program.units]
        self.stats = CacheStats([u.name for u in program.units], [u.kind for u in program.units],
                                [u.flops for u in program.units], [u.token_share or 1.0 for u in program.units],
                                [u.work for u in program.units], program.work)
        self.generations = Generations(program, self, parameters)
        self._lock = threading.Lock()
        self._warned_grad = False
        names = program.placeholders
        self._timestep = names.index(program.timestep) if program.timestep in names else None
        self._last_timestep: float | None = None
        """The last timestep of a threshold-0 call (`_uncached`)."""

    def reset(self) -> None:
        """Drop every stored tensor; each next call starts a new generation."""
        with self._lock:
            self.generations.reset()
            self.stats.close_generation()
            self._last_timestep = None

    def end_scope(self, scope: Scope) -> None:
        """`scope` ended: free the state its calls kept."""
        with self._lock:
            self.generations.end_scope(scope)

    def generation(self) -> Any:
        """``with runtime.generation():`` the calls inside are one generation (for runtimes outside a model)."""
        return generation(self)

    def held_bytes(self) -> int:
        """Device memory the cached state holds now."""
        with self._lock:
            return self.generations.held_bytes()

    def __call__(self, *args: Any) -> Any:
        if self._needs_gradients(args):
            return self.executor.run(self.executor.plan(), args)
        if self.spec.threshold == 0:
            return self._uncached(args)
        units, chains = len(self.program.units), len(self.program.chains)
        with self._lock:
            placement = self.generations.place(args, units, chains)
            if placement.new_epoch:
                self.stats.close_generation()
            slot = placement.track.slot
            slot.begin_call()
            modes = policy.choose(self.spec, placement.step, policy.progress_of(self.spec, placement),
                                  [m.drift for m in slot.units], [m.drift for m in slot.chains],
                                  self.program.chains, self.prunable)
            plan = self.executor.plan(slot, modes, self.spec.order)
            self.stats.count(modes)
        outputs = self.executor.run(plan, args)
        with self._lock:
            if self.spec.steps is not None and placement.step >= self.spec.steps - 1:
                self.generations.free(placement)
            else:
                self.generations.recorded(placement, args, outputs)
        return outputs

    def _uncached(self, args: tuple) -> Any:
        """A call at threshold 0: nothing can be reused, so nothing is placed or kept; the whole graph runs.

        The report still counts per generation: one ends where the timestep goes up (the next
        generation's first step), which is all a report of computed calls needs.
        """
        timestep = args[self._timestep] if self._timestep is not None else None
        now = float(timestep.max()) if isinstance(timestep, torch.Tensor) else timestep
        with self._lock:
            # As placing a call would: a graph serving another module's parameters is found from that module too.
            self.parameters.update_from_call(args, self.generations.static)
            if isinstance(now, (int, float)) and self._last_timestep is not None and now > self._last_timestep:
                self.stats.close_generation()
            self._last_timestep = now
            self.stats.count([policy.Mode.COMPUTE] * len(self.program.units))
        return self.executor.run(self.executor.plan(), args)

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
