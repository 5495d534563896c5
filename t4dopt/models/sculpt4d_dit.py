"""A Hunyuan3D-2.1-like 4D DiT after Sculpt4D: plain torch, no t4dopt imports.

Each block runs per-frame spatial self-attention, cross-attention to image tokens, joint
temporal self-attention over all frames x tokens (1-D RoPE on the frame index) and an MLP,
each modulated by the timestep (adaLN: shift, scale, gate). A fixed sinusoidal embedding of
each token's index within its frame is added to the embedded tokens; without it the model
would be equivariant to shuffling the tokens of a frame and could not place what it draws.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Sculpt4DConfig:
    """Model sizes; the defaults are the ``"tiny"`` config.

    ``frames`` and ``tokens_per_frame`` are the nominal latent grid (what `make_inputs` builds);
    the model itself reads F and P from its input, so one set of weights runs any grid.
    """

    in_channels: int = 8
    hidden: int = 64
    heads: int = 4
    depth: int = 2
    frames: int = 4
    tokens_per_frame: int = 64
    image_tokens: int = 16
    cond_dim: int = 32
    mlp_ratio: float = 4.0
    rope_base: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


CONFIGS: dict[str, Sculpt4DConfig] = {
    "tiny": Sculpt4DConfig(),
    "hunyuan3d-2.1": Sculpt4DConfig(in_channels=64, hidden=2048, heads=16, depth=21, frames=16,
                                    tokens_per_frame=4096, image_tokens=1370, cond_dim=1024),
}


TOKEN_BASE = 1024.0  # longest wavelength of the token-index sinusoid (in tokens)


def resolve_config(config, known: dict, overrides: dict):
    """A config object from itself or a name in `known`, with `overrides` replacing fields."""
    if isinstance(config, str) and config not in known:
        raise ValueError(f"unknown config {config!r}; known: {', '.join(known)}")
    base = known[config] if isinstance(config, str) else config
    return dataclasses.replace(base, **overrides)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of t in [0, 1] (scaled to 0..1000 like DiT timesteps)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = 1000.0 * t.float().unsqueeze(-1) * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def sinusoid(positions: int, dim: int, base: float, device: torch.device) -> torch.Tensor:
    """[positions, dim] sin/cos embedding of 0..positions-1; `base` sets the longest wavelength."""
    half = dim // 2
    freqs = torch.exp(-math.log(base) * torch.arange(half, device=device, dtype=torch.float32) / half)
    angles = torch.arange(positions, device=device, dtype=torch.float32).unsqueeze(1) * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


class Attention(nn.Module):
    """Multi-head attention through F.scaled_dot_product_attention; keys from `context` if given.

    ``attn_mask`` (a non-persistent buffer, None by default) is handed to SDPA: a bool [N, N]
    mask restricts self-attention the way Sculpt4D trains its joint attention.
    """

    def __init__(self, hidden: int, heads: int, context_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(hidden, hidden)
        self.kv = nn.Linear(context_dim or hidden, 2 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.q_norm = nn.LayerNorm(hidden // heads, elementwise_affine=False)
        self.k_norm = nn.LayerNorm(hidden // heads, elementwise_affine=False)
        self.register_buffer("attn_mask", None, persistent=False)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.view(b, n, self.heads, c // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        q = self.q_norm(self._split(self.q(x)))
        k, v = self.kv(x if context is None else context).chunk(2, dim=-1)
        k, v = self.k_norm(self._split(k)), self._split(v)
        if rope is not None:
            cos, sin = rope
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        if self.attn_mask is not None and self.attn_mask.shape[-2:] != (q.shape[-2], k.shape[-2]):
            raise ValueError(f"attention mask is for {list(self.attn_mask.shape)} tokens, "
                             f"got {q.shape[-2]} queries and {k.shape[-2]} keys")
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.attn_mask)
        return self.out(out.transpose(1, 2).reshape(x.shape))


class Sculpt4DBlock(nn.Module):
    def __init__(self, config: Sculpt4DConfig):
        super().__init__()
        hidden = config.hidden
        self.norms = nn.ModuleList(nn.LayerNorm(hidden, elementwise_affine=False) for _ in range(4))
        self.spatial = Attention(hidden, config.heads)
        self.cross = Attention(hidden, config.heads, context_dim=config.cond_dim)
        self.temporal = Attention(hidden, config.heads)
        mlp_hidden = int(hidden * config.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden, mlp_hidden), nn.GELU(approximate="tanh"), nn.Linear(mlp_hidden, hidden))
        self.modulation = nn.Linear(hidden, 3 * 4 * hidden)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, cond: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        b, f, p, c = x.shape
        shift, scale, gate = self.modulation(F.silu(temb)).view(b, 1, 1, 3, 4, c).unbind(dim=3)

        def modulated(i: int) -> torch.Tensor:
            return self.norms[i](x) * (1 + scale[..., i, :]) + shift[..., i, :]

        x = x + gate[..., 0, :] * self.spatial(modulated(0).reshape(b * f, p, c)).view(b, f, p, c)
        # Each query attends the image tokens on its own, so all frames share one [B, F*P] query
        # sequence and the image keys/values are projected once per sample, not once per frame.
        x = x + gate[..., 1, :] * self.cross(modulated(1).reshape(b, f * p, c), context=cond).view(b, f, p, c)
        x = x + gate[..., 2, :] * self.temporal(modulated(2).reshape(b, f * p, c), rope=rope).view(b, f, p, c)
        return x + gate[..., 3, :] * self.mlp(modulated(3))


class Sculpt4DDiT(nn.Module):
    """The block stack: latent tokens [B, F, P, C_in], timestep [B] in [0, 1], image tokens -> velocity.

    Token positions: a fixed sinusoid of the index within a frame (added to the embedded tokens,
    no parameters) and RoPE on the frame index in the joint attention.
    """

    def __init__(self, config: Sculpt4DConfig | str = "tiny", **overrides: int | float):
        super().__init__()
        self.config = resolve_config(config, CONFIGS, overrides)
        hidden = self.config.hidden
        self.embed = nn.Linear(self.config.in_channels, hidden)
        self.time_mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.blocks = nn.ModuleList(Sculpt4DBlock(self.config) for _ in range(self.config.depth))
        self.final_norm = nn.LayerNorm(hidden, elementwise_affine=False)
        self.final = nn.Linear(hidden, self.config.in_channels)
        nn.init.normal_(self.final.weight, std=0.02)
        nn.init.zeros_(self.final.bias)

    def frame_rope(self, frames: int, tokens_per_frame: int, device: torch.device,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [F * P, D] of 1-D RoPE on each token's frame index (frame-major order)."""
        dim = self.config.head_dim
        inv_freq = self.config.rope_base ** (-torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
        angles = torch.arange(frames, device=device, dtype=torch.float32).unsqueeze(1) * inv_freq
        angles = torch.cat([angles, angles], dim=-1).repeat_interleave(tokens_per_frame, dim=0)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        _, frames, tokens, _ = x.shape
        h = self.embed(x)
        h = h + sinusoid(tokens, self.config.hidden, TOKEN_BASE, x.device).to(h.dtype)
        temb = self.time_mlp(timestep_embedding(t, self.config.hidden).to(h.dtype))
        rope = self.frame_rope(frames, tokens, x.device, h.dtype)
        for block in self.blocks:
            h = block(h, temb, cond, rope)
        return self.final(self.final_norm(h))
