"""How far a sample is from a reference: PSNR, SSIM and relative L2, in float64."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def psnr(sample: torch.Tensor, reference: torch.Tensor, *, peak: float | None = None) -> float:
    """PSNR in dB; `peak` is the signal's peak value (default: the reference's largest magnitude).

    Identical inputs give ``inf``.
    """
    sample, reference = sample.double(), reference.double()
    peak = float(reference.abs().max()) if peak is None else peak
    mse = float(((sample - reference) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(peak ** 2 / mse)


def relative_l2(sample: torch.Tensor, reference: torch.Tensor) -> float:
    """||sample - reference|| / ||reference||."""
    return float((sample.double() - reference.double()).norm() / reference.double().norm())


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-offsets ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).view(1, 1, size, size)


def ssim(images: torch.Tensor, reference: torch.Tensor, *, window: int = 7, sigma: float = 1.5) -> float:
    """Mean SSIM of images [..., H, W] in [0, 1], gaussian window, valid positions only.

    A 7-pixel window rather than the usual 11 because the trained tiny models make 16 x 16 frames.
    """
    x = images.double().reshape(-1, 1, *images.shape[-2:])
    y = reference.double().reshape(-1, 1, *reference.shape[-2:])
    kernel = _gaussian_window(window, sigma)
    mu_x, mu_y = F.conv2d(x, kernel), F.conv2d(y, kernel)
    var_x = F.conv2d(x * x, kernel) - mu_x ** 2
    var_y = F.conv2d(y * y, kernel) - mu_y ** 2
    cov = F.conv2d(x * y, kernel) - mu_x * mu_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return float(ssim_map.mean())
