"""t4dopt.calibrate: settings measured against full compute, the fastest within budget, the plot."""

import dataclasses
import random

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

import t4dopt
from t4dopt.cache.registry import runtimes_of
from t4dopt.calibrate import CalibrationPoint, pick
from t4dopt.models.pretrained import pretrained
from t4dopt.models.sampler import sample_flow_matching

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

OPTIONS = {"target": "eager", "layout": {"frames": 8, "views": 4, "tokens_per_frame": 64}, "cache": {"steps": 10}}


SHORT = 6
"""Steps of the runs timed by a fake clock (their speed does not matter)."""


def _inputs(model):
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 4, 8, 64, model.config.in_channels, generator=generator)
    return noise, torch.randn(1, 64, model.config.cond_dim, generator=generator)


@pytest.fixture(scope="module")
def setup():
    model = pretrained("scm-tiny").eval()
    noise, cond = _inputs(model)
    return model, lambda m: sample_flow_matching(m, noise, cond, steps=10)


@pytest.fixture(scope="module")
def short(setup):
    model, _ = setup
    noise, cond = _inputs(model)
    return model, lambda m: sample_flow_matching(m, noise, cond, steps=SHORT), {**OPTIONS, "cache": {"steps": SHORT}}


class WorkClock:
    """A clock whose runs take as long as the work they computed (read from the cache report), with noise.

    Full compute takes 1 + `overhead` seconds, a setting its computed share + `overhead`.
    """

    def __init__(self, model, seed: int, noise: float = 0.01, overhead: float = 0.0):
        self.model, self.random, self.noise, self.overhead = model, random.Random(seed), noise, overhead
        self.now, self.reads = 0.0, 0

    def __call__(self) -> float:
        self.reads += 1
        if self.reads % 2 == 0:  # the end of a run
            share = t4dopt.cache_report(self.model).computed
            self.now += (share + self.overhead) * (1 + self.random.uniform(-self.noise, self.noise))
        return self.now


@pytest.fixture(scope="module")
def calibrated(short, tmp_path_factory):
    model, run, options = short
    plot = tmp_path_factory.mktemp("calibrate") / "curve.png"
    result = t4dopt.calibrate(model, run, {"psnr": 30.0}, options=options, thresholds=(0.05, 0.3), max_reuse=(3,),
                              repeats=2, plot=plot, clock=WorkClock(model, seed=1))
    return result, plot


def test_calibrate_picks_the_fastest_point_within_budget(calibrated):
    result, plot = calibrated
    # Both decisions (per unit, step-wide) are measured at every threshold, and the pick names its decision.
    assert sorted((p.decision, p.threshold) for p in result.points) == [
        ("step", 0.05), ("step", 0.3), ("unit", 0.05), ("unit", 0.3)]
    faster = [p for p in result.points if p.psnr >= 30.0 and p.speedup > 1.03 and p.computed < 1]
    assert faster, result.table()
    best = max(faster, key=lambda p: p.speedup)
    chosen = result.options["cache"]
    assert chosen.keys() == {"steps", "threshold", "max_reuse", "decision"} and chosen["steps"] == SHORT
    picked = next(p for p in result.points if (p.threshold, p.max_reuse, p.decision)
                  == (chosen["threshold"], chosen["max_reuse"], chosen["decision"]))
    assert picked.speedup >= 0.97 * best.speedup and picked.psnr >= 30.0
    assert result.options["layout"] == OPTIONS["layout"]
    assert plot.stat().st_size > 0
    assert "chosen" in result.table()


def test_calibrate_timings_are_medians_against_full_compute_in_the_same_rounds(calibrated):
    result, _ = calibrated
    # Under the work clock full compute takes 1 s (noise 1%), each point its computed share.
    assert result.baseline_seconds == pytest.approx(1.0, rel=0.011)
    for p in result.points:
        assert p.seconds == pytest.approx(p.computed, rel=0.011)
        assert p.speedup == pytest.approx(result.baseline_seconds / p.seconds)


def test_computed_share_counts_the_work_outside_units(setup):
    """The share computed is of the whole call's FLOPs: at full compute the graph's work is what
    torch's flop counter counts on the eager model, and units cover only part of it."""
    model, _ = setup
    noise, cond = _inputs(model)
    compiled = torch.compile(model, backend="turbo4d", options={**OPTIONS, "sparse": None,
                                                                "cache": {"steps": 4, "threshold": 0.5, "warmup": 1}})
    earlier = set(runtimes_of(model))
    with torch.no_grad():
        sample_flow_matching(compiled, noise, cond, steps=4)
    runtime = next(r for r in runtimes_of(model) if r not in earlier)
    # torch's counter has no formula for the CPU attention kernel: it gets the one of the others.
    cpu_attention = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    counter = FlopCounterMode(display=False, custom_mapping={
        cpu_attention: lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v)})
    with torch.no_grad(), counter:
        model(noise, torch.tensor([0.5]), cond)
    assert runtime.program.work == counter.get_total_flops()
    report = t4dopt.cache_report(model)
    units_work = sum(u.work for u in runtime.program.units)
    assert 0 < units_work < runtime.program.work
    unit_share = sum(u.computed for u in report.units) / sum(u.calls for u in report.units)
    outside = 1 - units_work / runtime.program.work
    by_unit = sum(u.work * u.computed for u in report.units) / (units_work * report.units[0].calls)
    assert report.computed == pytest.approx(outside + (1 - outside) * by_unit)
    assert report.computed > unit_share and sum(u.reused for u in report.units) > 0


def _point(threshold, speedup, computed, psnr=40.0, max_reuse=4):
    return CalibrationPoint(threshold, max_reuse, 1 / speedup, speedup, psnr, 0.01, computed)


def test_pick_never_returns_a_setting_not_faster_than_full_compute():
    budget = {"psnr": 30.0}
    slower = [_point(0.1, 0.95, 0.6), _point(0.2, 1.02, 0.5), _point(0.3, 1.5, 1.0)]
    assert pick(slower, budget) == (None, "no setting within the budget ran faster than full compute by more than 3%")
    assert pick([_point(0.5, 2.0, 0.3, psnr=20.0)], budget)[0] is None
    assert pick(slower + [_point(0.4, 1.2, 0.7)], budget)[0].threshold == 0.4


def test_pick_is_stable_under_timing_noise_below_the_tolerance():
    """Points within the tolerance of the fastest are tied: the least work computed wins, whatever the noise."""
    points = [_point(0.1, 1.30, 0.70), _point(0.2, 1.52, 0.55), _point(0.3, 1.55, 0.50), _point(0.5, 1.56, 0.52),
              _point(0.6, 1.9, 0.3, psnr=25.0)]
    picks = set()
    for seed in range(20):
        noise = random.Random(seed)
        noisy = [dataclasses.replace(p, speedup=p.speedup * (1 + noise.uniform(-0.01, 0.01))) for p in points]
        picks.add(pick(noisy, {"psnr": 30.0})[0].threshold)
    assert picks == {0.3}


def test_calibrate_picks_the_same_setting_on_two_runs(short, calibrated):
    """Another run, with other timing noise and a machine overhead on every run: the same pick."""
    model, run, options = short
    again = t4dopt.calibrate(model, run, {"psnr": 30.0}, options=options, thresholds=(0.05, 0.3), max_reuse=(3,),
                             repeats=1, clock=WorkClock(model, seed=2, overhead=0.05))
    assert again.options == calibrated[0].options


def test_calibrate_returns_no_options_when_nothing_meets_the_budget(short):
    model, run, options = short
    result = t4dopt.calibrate(model, run, {"psnr": 500.0}, options=options, thresholds=(0.3,), max_reuse=(4,),
                              decisions=("unit",), repeats=1)
    assert result.options is None and len(result.points) == 1 and result.reason == "no setting within the budget"


@pytest.mark.parametrize("kwargs, message", [
    ({"budget": {"ssim_db": 1}}, "budget\\['ssim_db'\\]"),
    ({"budget": {"psnr": "high"}}, "budget\\['psnr'\\]"),
    ({"thresholds": (0,)}, "thresholds"),
    ({"max_reuse": (0,)}, "max_reuse"),
    ({"orders": (3,)}, "orders"),
    ({"decisions": ("block",)}, "decisions"),
    ({"repeats": 0}, "repeats"),
    ({"tolerance": 1.5}, "tolerance"),
])
def test_bad_calibration_settings_raise(setup, kwargs, message):
    model, run = setup
    with pytest.raises(t4dopt.T4DOptionError, match=message):
        t4dopt.calibrate(model, run, **{"budget": {"psnr": 30.0}, "options": OPTIONS, **kwargs})
