"""`t4dopt.calibrate`: measure the cache threshold for a model instead of guessing it.

The model is compiled once with the cache on; each candidate setting then reruns the
user's sampling function (the graphs stay compiled, only the runtime's settings change)
and is scored against the full-compute sample of the same function: time (median of
interleaved rounds, full compute timed in the same rounds), quality, share of the work
computed. The fastest setting within the quality budget wins, if it beats full compute. The
settings span thresholds, ``max_reuse``, ``order`` and ``decision`` (per unit or step-wide,
`t4dopt.cache.policy`): which decision wins is measured, not assumed.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from t4dopt.backend import turbo4d
from t4dopt.cache.registry import report_of, runtimes_of
from t4dopt.cache.runtime import CacheRuntime
from t4dopt.errors import T4DOptionError
from t4dopt.options import DECISIONS, ORDERS, CacheSpec, parse_options
from t4dopt.quality import psnr, relative_l2

BUDGET_KEYS = {"psnr": "at least this many dB", "relative_l2": "at most this relative L2 error"}
DEFAULT_THRESHOLDS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
DEFAULT_MAX_REUSE = (4, 8, 12)
DEFAULT_TOLERANCE = 0.03
"""Relative timing differences below this are taken as noise (`pick`)."""
PSNR_TIES = 99.0
"""Above this many dB, samples count as equally good (exact ones are infinitely close)."""


@dataclass(frozen=True)
class CalibrationPoint:
    """One setting: seconds per run (median of interleaved rounds), quality against full compute, work computed.

    ``computed`` is the share of the calls' work (matrix products and attention, inside cache
    units and out) the setting computed, from the graphs' shapes and the modes the calls took.
    """

    threshold: float
    max_reuse: int
    seconds: float
    speedup: float
    psnr: float
    relative_l2: float
    computed: float
    order: int = 1
    decision: str = "unit"

    def within(self, budget: Mapping[str, float]) -> bool:
        return self.psnr >= budget.get("psnr", -math.inf) and self.relative_l2 <= budget.get("relative_l2", math.inf)


@dataclass(frozen=True)
class Calibration:
    """The options to compile with (None when no setting met the budget and beat full compute), every point,
    the plot, and why nothing was chosen."""

    options: dict[str, Any] | None
    points: list[CalibrationPoint]
    baseline_seconds: float
    plot: str | None
    reason: str = ""

    def table(self) -> str:
        lines = ["threshold  max_reuse  order  decision  s/run     speedup  PSNR dB  rel L2   computed"]
        for p in self.points:
            lines.append(f"{p.threshold:<9g}  {p.max_reuse:<9d}  {p.order:<5d}  {p.decision:<8}  {p.seconds:<8.3f}  "
                         f"{p.speedup:<7.2f}  {p.psnr:<7.1f}  {p.relative_l2:<7.4f}  {100 * p.computed:.0f}%")
        chosen = ({k: self.options["cache"][k] for k in ("threshold", "max_reuse", "order", "decision")
                   if k in self.options["cache"]} if self.options else None)
        lines.append(f"full compute {self.baseline_seconds:.3f} s/run; chosen: {chosen}"
                     + (f" ({self.reason})" if self.reason else ""))
        return "\n".join(lines)


def _check_budget(budget: Mapping[str, float]) -> dict[str, float]:
    if not isinstance(budget, Mapping) or not budget:
        raise T4DOptionError(f"calibrate budget={budget!r} is not valid; allowed: a dict with keys {list(BUDGET_KEYS)}")
    for key, value in budget.items():
        if key not in BUDGET_KEYS:
            raise T4DOptionError(f"calibrate budget[{key!r}] is not valid; allowed: {BUDGET_KEYS}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise T4DOptionError(f"calibrate budget[{key!r}]={value!r} is not valid; allowed: a finite number")
    return dict(budget)


def _check_grid(thresholds: Sequence[float], max_reuse: Sequence[int], orders: Sequence[int],
                decisions: Sequence[str], repeats: int, tolerance: float) -> None:
    if not thresholds or any(isinstance(t, bool) or not isinstance(t, (int, float)) or t <= 0 for t in thresholds):
        raise T4DOptionError(f"calibrate thresholds={thresholds!r} is not valid; allowed: numbers > 0")
    if not max_reuse or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in max_reuse):
        raise T4DOptionError(f"calibrate max_reuse={max_reuse!r} is not valid; allowed: integers >= 1")
    if not orders or any(isinstance(o, bool) or o not in ORDERS for o in orders):
        raise T4DOptionError(f"calibrate orders={orders!r} is not valid; allowed: a non-empty list of {ORDERS}")
    if isinstance(decisions, str) or not decisions or any(d not in DECISIONS for d in decisions):
        raise T4DOptionError(f"calibrate decisions={decisions!r} is not valid; allowed: a non-empty list drawn from "
                             f"{list(DECISIONS)}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise T4DOptionError(f"calibrate repeats={repeats!r} is not valid; allowed: an integer >= 1")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < 1:
        raise T4DOptionError(f"calibrate tolerance={tolerance!r} is not valid; allowed: a number in [0, 1)")


class _Setting(NamedTuple):
    threshold: float
    max_reuse: int
    order: int
    decision: str


def _run(run_fn: Callable[[Callable], torch.Tensor], model: Callable, clock: Callable[[], float]) -> tuple[float, Any]:
    start = clock()
    result = run_fn(model)
    if isinstance(result, torch.Tensor) and result.is_cuda:
        torch.cuda.synchronize(result.device)
    return clock() - start, result


def pick(points: Sequence[CalibrationPoint], budget: Mapping[str, float],
         tolerance: float = DEFAULT_TOLERANCE) -> tuple[CalibrationPoint | None, str]:
    """The point to choose, or None with the reason.

    Only points within `budget` that reuse work and beat full compute by more than `tolerance`
    qualify (a point within the timing noise of full compute is not worth its quality cost).
    Of those, the points within `tolerance` of the fastest are equally fast as far as the
    timing can tell: of them, the one computing the least work wins, then the best quality,
    so that timing noise alone does not change the pick from run to run.
    """
    fitting = [p for p in points if p.within(budget)]
    if not fitting:
        return None, "no setting within the budget"
    faster = [p for p in fitting if p.computed < 1.0 and p.speedup > 1.0 + tolerance]
    if not faster:
        return None, f"no setting within the budget ran faster than full compute by more than {tolerance:.0%}"
    fastest = max(p.speedup for p in faster)
    tied = [p for p in faster if p.speedup >= fastest * (1.0 - tolerance)]
    return min(tied, key=lambda p: (p.computed, -min(p.psnr, PSNR_TIES), p.relative_l2, p.threshold, p.max_reuse,
                                    p.order, p.decision)), ""


def calibrate(
    model: torch.nn.Module,
    run_fn: Callable[[Callable], torch.Tensor],
    budget: Mapping[str, float] | None = None,
    *,
    options: Mapping[str, Any] | None = None,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    max_reuse: Sequence[int] = DEFAULT_MAX_REUSE,
    orders: Sequence[int] | None = None,
    decisions: Sequence[str] = DECISIONS,
    repeats: int = 3,
    tolerance: float = DEFAULT_TOLERANCE,
    plot: str | os.PathLike | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> Calibration:
    """Find the fastest cache setting whose samples stay within `budget` of full compute.

    `run_fn(model)` runs one complete sampling loop with the model it is given and returns
    the sample; it must be deterministic (fixed seeds). `options` are the other backend
    options (layout, sparse, cache levels...); `budget` holds ``"psnr"`` (dB, at least) and/or
    ``"relative_l2"`` (at most), default ``{"psnr": 30.0}``. Every combination of
    `thresholds`, `max_reuse` and `orders` (the ``order`` cache option: how reused residuals
    are extrapolated; default the one in `options`) and `decisions` (the ``decision`` cache
    option: per unit or step-wide; default both) is run once to compile and score it,
    then `repeats` interleaved rounds time every setting and full compute (threshold 0: the
    graph as dynamo gave it, lowered once) once each, in an order rotated per round; each is timed by its
    median. The pick is made by `pick` (never a setting that is not faster than full compute
    in the same run). `clock` reads seconds (a fake one makes tests independent of the
    machine). With `plot`, writes the speed-vs-quality curve there (PNG).
    """
    budget = _check_budget({"psnr": 30.0} if budget is None else budget)
    base = parse_options(dict(options or {}))
    cache = base.cache or CacheSpec()
    orders = (cache.order,) if orders is None else tuple(orders)
    _check_grid(thresholds, max_reuse, orders, decisions, repeats, tolerance)
    compiled = torch.compile(model, backend=functools.partial(turbo4d, options=dataclasses.replace(base, cache=cache)))
    earlier = set(runtimes_of(model))
    decisions = [d for d in DECISIONS if d in decisions]
    settings = [_Setting(float(t), m, o, d) for d in decisions for o in sorted(set(orders))
                for m in sorted(set(max_reuse)) for t in sorted(set(float(t) for t in thresholds))]
    baseline = _Setting(0.0, cache.max_reuse, cache.order, cache.decision)
    with torch.no_grad():
        reference = run_fn(model)
        run_fn(compiled)
        runtimes = [r for r in runtimes_of(model) if r not in earlier]
        if not runtimes:
            raise T4DOptionError("calibrate: the model compiled to no cache runtime (see the warnings for why); "
                                 "pass options['layout'] and check t4dopt.explain(model, ...)")
        scored = {}
        for setting in [baseline] + settings:
            _configure(runtimes, setting)
            _, sample = _run(run_fn, compiled, clock)
            scored[setting] = (sample, report_of(runtimes).computed)
        seconds: dict[_Setting, list[float]] = {setting: [] for setting in scored}
        order = list(scored)
        for round_index in range(repeats):
            shift = round_index % len(order)
            for setting in order[shift:] + order[:shift]:
                _configure(runtimes, setting)
                elapsed, _ = _run(run_fn, compiled, clock)
                seconds[setting].append(elapsed)
    for runtime in runtimes:
        runtime.reset()
    base_seconds = statistics.median(seconds[baseline])
    points = []
    for setting in settings:
        sample, computed = scored[setting]
        median = statistics.median(seconds[setting])
        points.append(CalibrationPoint(setting.threshold, setting.max_reuse, median,
                                       base_seconds / median if median > 0 else math.inf,
                                       psnr(sample, reference), relative_l2(sample, reference), computed,
                                       setting.order, setting.decision))
    best, reason = pick(points, budget, tolerance)
    chosen = None
    if best is not None:
        chosen = dict(options or {})
        chosen["cache"] = {**dict((options or {}).get("cache") or {}), "threshold": best.threshold,
                           "max_reuse": best.max_reuse} | ({"order": best.order} if len(set(orders)) > 1 else {}) \
            | ({"decision": best.decision} if len(decisions) > 1 else {})
    plot_path = None
    if plot is not None:
        from t4dopt.plotting import draw_speed_quality_curve

        curves: dict[str, list[tuple[str, float, float]]] = {}
        for p in points:
            label = (f"max_reuse {p.max_reuse}" + (f", order {p.order}" if len(set(orders)) > 1 else "")
                     + (f", per {p.decision}" if len(decisions) > 1 else ""))
            curves.setdefault(label, []).append((f"{p.threshold:g}", p.speedup, min(p.psnr, 99.0)))
        plot_path = str(draw_speed_quality_curve(curves, plot))
    return Calibration(chosen, points, base_seconds, plot_path, reason)


def _configure(runtimes: list[CacheRuntime], setting: _Setting) -> None:
    """Change cache settings of `runtimes` (the compiled segments stay), each starting a fresh generation."""
    for runtime in runtimes:
        runtime.spec = dataclasses.replace(runtime.spec, **setting._asdict())
        runtime.reset()
