"""Flow-matching Euler sampling for the reference models (x_1 = noise, x_0 = data)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from t4dopt.models.sculpt4d_dit import Sculpt4DConfig


def flow_matching_timesteps(steps: int, shift: float = 1.0) -> torch.Tensor:
    """steps + 1 times from 1 down to 0; shift > 1 spends more steps at high noise (SD3-style)."""
    if steps < 1:
        raise ValueError(f"steps={steps}: expected an integer >= 1")
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return (shift * t / (1 + (shift - 1) * t)).float()


def sample_flow_matching(
    model: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    cond: torch.Tensor,
    *,
    steps: int = 8,
    shift: float = 1.0,
    callback: Callable[[int, float, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Integrate dx/dt = v(x, t) from t = 1 (noise) to t = 0 with Euler steps."""
    times = flow_matching_timesteps(steps, shift).tolist()
    x = noise
    for index, (t, t_next) in enumerate(zip(times[:-1], times[1:])):
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype)
        x = x + (t_next - t) * model(x, t_batch, cond)
        if callback is not None:
            callback(index, t, x)
    return x


def make_inputs(
    config: Sculpt4DConfig,
    batch: int = 1,
    seed: int = 0,
    frames: int | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic noise [B, F, P, C_in] and image tokens [B, image_tokens, cond_dim] for a seed."""
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, config.frames if frames is None else frames, config.tokens_per_frame, config.in_channels)
    noise = torch.randn(shape, generator=generator)
    cond = torch.randn((batch, config.image_tokens, config.cond_dim), generator=generator)
    return noise.to(device=device, dtype=dtype), cond.to(device=device, dtype=dtype)
