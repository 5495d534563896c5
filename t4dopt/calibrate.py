"""`t4dopt.calibrate`: measure the cache threshold for a model instead of guessing it.

The model is compiled once with the cache on; each candidate threshold then reruns the
user's sampling function (the graphs stay compiled, only the runtime's threshold changes)
and is scored against the full-compute sample of the same function: time, quality, share of
sublayer calls computed. The fastest threshold within the quality budget wins.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from t4dopt.backend import turbo4d
from t4dopt.cache.registry import runtimes_of
from t4dopt.cache.runtime import CacheRuntime
from t4dopt.errors import T4DOptionError
from t4dopt.options import CacheSpec, parse_options
from t4dopt.quality import psnr, relative_l2

BUDGET_KEYS = {"psnr": "at least this many dB", "relative_l2": "at most this relative L2 error"}
DEFAULT_THRESHOLDS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
DEFAULT_MAX_REUSE = (4, 8, 12)


@dataclass(frozen=True)
class CalibrationPoint:
    """One threshold: seconds per run (best of the repeats), quality against full compute, share computed."""

    threshold: float
    max_reuse: int
    seconds: float
    speedup: float
    psnr: float
    relative_l2: float
    computed: float

    def within(self, budget: Mapping[str, float]) -> bool:
        return self.psnr >= budget.get("psnr", -math.inf) and self.relative_l2 <= budget.get("relative_l2", math.inf)


@dataclass(frozen=True)
class Calibration:
    """The options to compile with (None when no threshold met the budget), every point, and the plot."""

    options: dict[str, Any] | None
    points: list[CalibrationPoint]
    baseline_seconds: float
    plot: str | None

    def table(self) -> str:
        lines = ["threshold  max_reuse  s/run     speedup  PSNR dB  rel L2   computed"]
        for p in self.points:
            lines.append(f"{p.threshold:<9g}  {p.max_reuse:<9d}  {p.seconds:<8.3f}  {p.speedup:<7.2f}  {p.psnr:<7.1f}  "
                         f"{p.relative_l2:<7.4f}  {100 * p.computed:.0f}%")
        chosen = {k: self.options["cache"][k] for k in ("threshold", "max_reuse")} if self.options else None
        lines.append(f"full compute {self.baseline_seconds:.3f} s/run; chosen: {chosen}")
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


def _timed(run_fn: Callable[[Callable], torch.Tensor], model: Callable, repeats: int) -> tuple[float, torch.Tensor]:
    best, result = math.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run_fn(model)
        if isinstance(result, torch.Tensor) and result.is_cuda:
            torch.cuda.synchronize(result.device)
        best = min(best, time.perf_counter() - start)
    return best, result


def calibrate(
    model: torch.nn.Module,
    run_fn: Callable[[Callable], torch.Tensor],
    budget: Mapping[str, float] | None = None,
    *,
    options: Mapping[str, Any] | None = None,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    max_reuse: Sequence[int] = DEFAULT_MAX_REUSE,
    repeats: int = 2,
    plot: str | os.PathLike | None = None,
) -> Calibration:
    """Find the fastest cache threshold and ``max_reuse`` whose samples stay within `budget` of full compute.

    `run_fn(model)` runs one complete sampling loop with the model it is given and returns
    the sample; it must be deterministic (fixed seeds). `options` are the other backend
    options (layout, sparse, cache levels...); `budget` holds ``"psnr"`` (dB, at least) and/or
    ``"relative_l2"`` (at most), default ``{"psnr": 30.0}``. Each pair of `thresholds` and
    `max_reuse` is run `repeats` times after a warm-up run and timed by its best run. With `plot`, writes the
    speed-vs-quality curve there (PNG).
    """
    budget = _check_budget({"psnr": 30.0} if budget is None else budget)
    base = parse_options(dict(options or {}))
    cache = base.cache or CacheSpec()
    if not thresholds or any(isinstance(t, bool) or not isinstance(t, (int, float)) or t <= 0 for t in thresholds):
        raise T4DOptionError(f"calibrate thresholds={thresholds!r} is not valid; allowed: numbers > 0")
    if not max_reuse or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in max_reuse):
        raise T4DOptionError(f"calibrate max_reuse={max_reuse!r} is not valid; allowed: integers >= 1")
    compiled = torch.compile(model, backend=functools.partial(turbo4d, options=dataclasses.replace(base, cache=cache)))
    earlier = set(runtimes_of(model))
    with torch.no_grad():
        reference = run_fn(model)
        run_fn(compiled)
        runtimes = [r for r in runtimes_of(model) if r not in earlier]
        if not runtimes:
            raise T4DOptionError("calibrate: the model compiled to no cache runtime (see the warnings for why); "
                                 "pass options['layout'] and check t4dopt.explain(model, ...)")
        _configure(runtimes, threshold=0.0)
        baseline, _ = _timed(run_fn, compiled, repeats)
        points = []
        for reuses in sorted(set(max_reuse)):
            for threshold in sorted(float(t) for t in thresholds):
                _configure(runtimes, threshold=threshold, max_reuse=reuses)
                run_fn(compiled)
                seconds, sample = _timed(run_fn, compiled, repeats)
                units = [u for runtime in runtimes for u in runtime.stats.report()]
                computed = sum(u.computed for u in units) / max(sum(u.calls for u in units), 1)
                points.append(CalibrationPoint(threshold, reuses, seconds, baseline / seconds,
                                               psnr(sample, reference), relative_l2(sample, reference), computed))
    for runtime in runtimes:
        runtime.reset()
    fitting = [p for p in points if p.within(budget)]
    best = max(fitting, key=lambda p: p.speedup, default=None)
    chosen = None
    if best is not None:
        chosen = dict(options or {})
        chosen["cache"] = {**dict((options or {}).get("cache") or {}), "threshold": best.threshold,
                           "max_reuse": best.max_reuse}
    plot_path = None
    if plot is not None:
        from t4dopt.plotting import draw_speed_quality_curve

        curves: dict[str, list[tuple[str, float, float]]] = {}
        for p in points:
            curves.setdefault(f"max_reuse {p.max_reuse}", []).append((f"{p.threshold:g}", p.speedup, min(p.psnr, 99.0)))
        plot_path = str(draw_speed_quality_curve(curves, plot))
    return Calibration(chosen, points, baseline, plot_path)


def _configure(runtimes: list[CacheRuntime], **settings: float) -> None:
    """Change cache settings of `runtimes` (the compiled segments stay), each starting a fresh generation."""
    for runtime in runtimes:
        runtime.spec = dataclasses.replace(runtime.spec, **settings)
        runtime.reset()
