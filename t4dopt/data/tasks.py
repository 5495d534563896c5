"""The learning task of the tiny trained models: denoise procedural scenes by flow matching.

A sample is the token grid of one scene, conditioned on the clean tokens of view 0, frame 0,
each followed by a code of its position in the image (`position_code`): [B, P, C + 12].
``"scm"`` models see every view, [B, V, T, P, C]; ``"joint"`` models see view 0 only,
[B, T, P, C]; the diffusers testbeds see view 0 as a video in pixels (`video_batch`). Flow matching as in `t4dopt.models.sample_flow_matching`: x_t = (1 - t) x_0 +
t noise, velocity target noise - x_0.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from t4dopt.data.procedural import render_scenes, to_tokens

Model = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
POSITION_FEATURES = 12  # channels `position_code` appends to each conditioning token


def position_code(grid: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[grid * grid, 12]: sin, cos of pi (column, row) x 1/2, 1, 2 (both in [-1, 1]), row-major as `to_tokens`.

    Cross-attention is blind to the order of its keys, so without this code a model would see
    the conditioning image as a bag of patches: which colours, but not where.
    """
    axis = (torch.arange(grid, device=device, dtype=torch.float32) + 0.5) / grid * 2 - 1
    row, column = torch.meshgrid(axis, axis, indexing="ij")
    angles = torch.stack([column.flatten(), row.flatten()], dim=-1).unsqueeze(-1) * (
        math.pi * 2.0 ** torch.arange(-1, 2, device=device, dtype=torch.float32))  # [P, 2, 3]
    return torch.cat([angles.sin(), angles.cos()], dim=-1).reshape(grid * grid, POSITION_FEATURES)


def scene_batch(
    kind: str,
    batch: int,
    *,
    views: int = 4,
    frames: int = 8,
    size: int = 16,
    patch: int = 2,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean tokens x_0 and conditioning tokens [B, P, C + 12] for `kind` ``"scm"`` or ``"joint"``."""
    if kind not in ("scm", "joint"):
        raise ValueError(f"kind={kind!r}: expected 'scm' or 'joint'")
    # View 0 of a scene does not depend on how many views are rendered, so joint models need only it.
    rendered = views if kind == "scm" else 1
    tokens = to_tokens(render_scenes(batch, views=rendered, frames=frames, size=size, seed=seed, device=device), patch)
    return (tokens if kind == "scm" else tokens[:, 0]), _first_frame_condition(tokens[:, 0, 0], size // patch)


def video_batch(
    batch: int,
    *,
    frames: int = 8,
    size: int = 16,
    patch: int = 2,
    channels_first: bool = False,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """View 0 of `batch` scenes as videos and the conditioning of `scene_batch` (same scenes for a seed).

    Videos are [B, F, 3, size, size], or [B, 3, F, size, size] with `channels_first` (Wan's order;
    CogVideoX takes the other). The conditioning is [B, P, 3 patch^2 + 12]:
    the clean first frame's patches with their positions.
    """
    video = render_scenes(batch, views=1, frames=frames, size=size, seed=seed, device=device)[:, 0]
    cond = _first_frame_condition(to_tokens(video[:, 0], patch), size // patch)
    return (video.transpose(1, 2).contiguous() if channels_first else video), cond


def _first_frame_condition(first: torch.Tensor, grid: int) -> torch.Tensor:
    """[B, P, C] first-frame tokens -> [B, P, C + 12], each followed by the code of its position."""
    return torch.cat([first, position_code(grid, first.device).expand(first.shape[0], -1, -1)], dim=-1)


def flow_matching_loss(model: Model, x0: torch.Tensor, cond: torch.Tensor, t: torch.Tensor,
                       noise: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the predicted velocity at times t [B]."""
    t_grid = t.view(-1, *([1] * (x0.dim() - 1)))
    x_t = (1 - t_grid) * x0 + t_grid * noise
    return F.mse_loss(model(x_t, t, cond), noise - x0)


@torch.no_grad()
def loss_at(model: Model, x0: torch.Tensor, cond: torch.Tensor, t: float = 0.5, *, seed: int = 0) -> float:
    """Flow-matching loss with every sample at time `t` and noise drawn from `seed`."""
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(x0)
    return float(flow_matching_loss(model, x0, cond, torch.full((x0.shape[0],), t, device=x0.device), noise))


EVAL_SEED = 999_999_999  # scenes for evaluation; training draws scene seeds from `training_seed`


def training_seed(seed: int, step: int) -> int:
    """Scene seed of one training step; distinct from `EVAL_SEED` for seeds < 999."""
    return seed * 1_000_000 + step
