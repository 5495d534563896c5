"""t4dopt.calibrate: thresholds measured against full compute, the fastest within budget, the plot."""

import pytest
import torch

import t4dopt
from t4dopt.models.pretrained import pretrained
from t4dopt.models.sampler import sample_flow_matching

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

OPTIONS = {"target": "eager", "layout": {"frames": 8, "views": 4, "tokens_per_frame": 64}, "cache": {"steps": 10}}


@pytest.fixture(scope="module")
def setup():
    model = pretrained("scm-tiny").eval()
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 4, 8, 64, model.config.in_channels, generator=generator)
    cond = torch.randn(1, 64, model.config.cond_dim, generator=generator)
    return model, lambda m: sample_flow_matching(m, noise, cond, steps=10)


def test_calibrate_picks_the_fastest_point_within_budget(setup, tmp_path):
    model, run = setup
    result = t4dopt.calibrate(model, run, {"psnr": 30.0}, options=OPTIONS, thresholds=(0.05, 0.3), max_reuse=(2, 4),
                              repeats=1, plot=tmp_path / "curve.png")
    assert len(result.points) == 4
    fitting = [p for p in result.points if p.psnr >= 30.0]
    assert fitting, result.table()
    best = max(fitting, key=lambda p: p.speedup)
    assert result.options["cache"] == {"steps": 10, "threshold": best.threshold, "max_reuse": best.max_reuse}
    assert result.options["layout"] == OPTIONS["layout"]
    assert (tmp_path / "curve.png").stat().st_size > 0
    assert all(0 < p.computed <= 1 for p in result.points)
    assert "chosen" in result.table()


def test_calibrate_returns_no_options_when_nothing_meets_the_budget(setup):
    model, run = setup
    result = t4dopt.calibrate(model, run, {"psnr": 500.0}, options=OPTIONS, thresholds=(0.3,), max_reuse=(4,),
                              repeats=1)
    assert result.options is None and len(result.points) == 1


@pytest.mark.parametrize("kwargs, message", [
    ({"budget": {"ssim_db": 1}}, "budget\\['ssim_db'\\]"),
    ({"budget": {"psnr": "high"}}, "budget\\['psnr'\\]"),
    ({"thresholds": (0,)}, "thresholds"),
    ({"max_reuse": (0,)}, "max_reuse"),
])
def test_bad_calibration_settings_raise(setup, kwargs, message):
    model, run = setup
    with pytest.raises(t4dopt.T4DOptionError, match=message):
        t4dopt.calibrate(model, run, **{"budget": {"psnr": 30.0}, "options": OPTIONS, **kwargs})
