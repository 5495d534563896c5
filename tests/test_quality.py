import math

import torch

from t4dopt.quality import psnr, relative_l2, ssim


def test_psnr_against_a_hand_computed_value():
    reference = torch.zeros(4, 4, dtype=torch.float64)
    sample = torch.full((4, 4), 0.1, dtype=torch.float64)
    assert math.isclose(psnr(sample, reference, peak=1.0), 20.0)
    assert psnr(reference + 1, reference + 1) == math.inf
    assert math.isclose(psnr(sample, reference + 2.0), 10 * math.log10(2.0 ** 2 / 1.9 ** 2)), "peak: the reference max"


def test_relative_l2_and_ssim():
    reference = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert relative_l2(reference, reference) == 0.0
    assert math.isclose(relative_l2(reference * 1.5, reference), 0.5, rel_tol=1e-6)
    assert math.isclose(ssim(reference, reference), 1.0)
    noisy = (reference + 0.3 * torch.randn(reference.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    assert ssim(noisy, reference) < 0.8
