"""An SV4D-like multi-view video DiT with factorized attention: plain torch, no t4dopt imports.

Tokens form a grid [B, V, T, P, C] (views x frames x tokens per image). Each block runs
spatial attention within one image, camera attention across the V views of one frame and
position, motion attention across the T frames of one view and position, cross-attention to
conditioning tokens, and an MLP, each modulated by the timestep (adaLN: shift, scale, gate).
Positions enter as fixed sinusoidal embeddings of the token, view and frame index, so one set
of weights runs any grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from t4dopt.models.sculpt4d_dit import Attention, resolve_config, sinusoid, timestep_embedding


@dataclass(frozen=True)
class SCMConfig:
    """Model sizes; the defaults are the ``"tiny"`` config (16x16 images in 2x2 patches).

    ``views``, ``frames`` and ``tokens_per_frame`` are the nominal grid; the model reads V, T
    and P from its input.
    """

    in_channels: int = 12
    hidden: int = 64
    heads: int = 4
    depth: int = 2
    views: int = 4
    frames: int = 8
    tokens_per_frame: int = 64
    cond_tokens: int = 64
    cond_dim: int = 12
    mlp_ratio: float = 4.0

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


SCM_CONFIGS: dict[str, SCMConfig] = {
    "tiny": SCMConfig(),
    # SV4D: 8 views x 5 frames of 576x576 images, SVD latents (4 channels, 72x72) in 3x3 patches.
    "sv4d": SCMConfig(in_channels=36, hidden=1024, heads=16, depth=10, views=8, frames=5,
                      tokens_per_frame=576, cond_tokens=576, cond_dim=1024),
}

_SUBLAYERS = 5  # spatial, camera, motion, cross, mlp


class SCMBlock(nn.Module):
    def __init__(self, config: SCMConfig):
        super().__init__()
        hidden = config.hidden
        self.norms = nn.ModuleList(nn.LayerNorm(hidden, elementwise_affine=False) for _ in range(_SUBLAYERS))
        self.spatial = Attention(hidden, config.heads)
        self.camera = Attention(hidden, config.heads)
        self.motion = Attention(hidden, config.heads)
        self.cross = Attention(hidden, config.heads, context_dim=config.cond_dim)
        mlp_hidden = int(hidden * config.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden, mlp_hidden), nn.GELU(approximate="tanh"), nn.Linear(mlp_hidden, hidden))
        self.modulation = nn.Linear(hidden, 3 * _SUBLAYERS * hidden)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        b, v, t, p, c = x.shape
        shift, scale, gate = self.modulation(F.silu(temb)).view(b, 1, 1, 1, 3, _SUBLAYERS, c).unbind(dim=4)

        def modulated(i: int) -> torch.Tensor:
            return self.norms[i](x) * (1 + scale[..., i, :]) + shift[..., i, :]

        # Spatial: one sequence per image, [B*V*T, P].
        spatial = self.spatial(modulated(0).reshape(b * v * t, p, c))
        x = x + gate[..., 0, :] * spatial.view(b, v, t, p, c)
        # Camera: one sequence per frame and position, [B*T*P, V].
        camera = self.camera(modulated(1).permute(0, 2, 3, 1, 4).reshape(b * t * p, v, c))
        x = x + gate[..., 1, :] * camera.view(b, t, p, v, c).permute(0, 3, 1, 2, 4)
        # Motion: one sequence per view and position, [B*V*P, T].
        motion = self.motion(modulated(2).permute(0, 1, 3, 2, 4).reshape(b * v * p, t, c))
        x = x + gate[..., 2, :] * motion.view(b, v, p, t, c).permute(0, 1, 3, 2, 4)
        # Cross: all V*T*P tokens of a sample query the conditioning tokens at once.
        crossed = self.cross(modulated(3).reshape(b, v * t * p, c), context=cond)
        x = x + gate[..., 3, :] * crossed.view(b, v, t, p, c)
        return x + gate[..., 4, :] * self.mlp(modulated(4))


class SCMNet(nn.Module):
    """Tokens [B, V, T, P, C_in], timestep [B] in [0, 1], conditioning tokens [B, M, cond_dim] -> velocity."""

    def __init__(self, config: SCMConfig | str = "tiny", **overrides: int | float):
        super().__init__()
        self.config = resolve_config(config, SCM_CONFIGS, overrides)
        hidden = self.config.hidden
        self.embed = nn.Linear(self.config.in_channels, hidden)
        self.time_mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.blocks = nn.ModuleList(SCMBlock(self.config) for _ in range(self.config.depth))
        self.final_norm = nn.LayerNorm(hidden, elementwise_affine=False)
        self.final = nn.Linear(hidden, self.config.in_channels)
        nn.init.normal_(self.final.weight, std=0.02)
        nn.init.zeros_(self.final.bias)

    def position_embedding(self, views: int, frames: int, tokens: int, device: torch.device) -> torch.Tensor:
        """[V, T, P, hidden]: sum of the view, frame and token-index sinusoids."""
        hidden = self.config.hidden
        view = sinusoid(views, hidden, 16.0, device).view(views, 1, 1, hidden)
        frame = sinusoid(frames, hidden, 64.0, device).view(1, frames, 1, hidden)
        token = sinusoid(tokens, hidden, 1024.0, device).view(1, 1, tokens, hidden)
        return view + frame + token

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        _, views, frames, tokens, _ = x.shape
        h = self.embed(x)
        h = h + self.position_embedding(views, frames, tokens, x.device).to(h.dtype)
        temb = self.time_mlp(timestep_embedding(t, self.config.hidden).to(h.dtype))
        for block in self.blocks:
            h = block(h, temb, cond)
        return self.final(self.final_norm(h))
