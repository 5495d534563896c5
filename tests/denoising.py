"""Test support for the cache: a small denoiser and sampling loops whose generations tests compare.

`TinyDenoiser` is a timestep- and text-conditioned transformer with random weights; `CACHE`
reuses most steps after the warm-up, so stale state would change a sample. `fresh` is a
fresh compile: ``torch._dynamo.reset()`` and compile again, so nothing of an earlier one survives.
"""

import torch
import torch.nn.functional as F
from torch import nn

import t4dopt

FRAMES, TOKENS, CHANNELS, WIDTH, TEXT = 2, 8, 4, 32, 5
STEPS = 8
CACHE = {"threshold": 0.6, "max_reuse": 3, "warmup": 1, "final": 0}


class TinyDenoiser(nn.Module):
    """Latents [B, F, P, C], timestep [B] (or per frame [B, F], or per token [B, F*P]), text [B, L, D]."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed, self.head = nn.Linear(CHANNELS, WIDTH), nn.Linear(WIDTH, CHANNELS)
        self.time = nn.Sequential(nn.Linear(1, WIDTH), nn.SiLU(), nn.Linear(WIDTH, WIDTH))
        self.qkv = nn.ModuleList(nn.Linear(WIDTH, 3 * WIDTH) for _ in range(2))
        self.cross = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(2))
        self.text = nn.Linear(WIDTH, 2 * WIDTH)
        self.mlp = nn.ModuleList(nn.Sequential(nn.Linear(WIDTH, 2 * WIDTH), nn.GELU(), nn.Linear(2 * WIDTH, WIDTH))
                                 for _ in range(2))

    def forward(self, x, timestep, text):
        b, f, p, c = x.shape
        h = self.embed(x)
        if timestep.dim() == 2 and timestep.shape[1] == f:
            h = h + self.time(timestep.reshape(b, f, 1, 1).float() / 1000)
        elif timestep.dim() == 2:
            h = h + self.time(timestep.reshape(b, f, p, 1).float() / 1000)
        else:
            h = h + self.time(timestep.reshape(b, 1, 1, 1).float() / 1000)
        h = h.reshape(b, f * p, WIDTH)
        k_text, v_text = self.text(text).chunk(2, dim=-1)
        for qkv, cross, mlp in zip(self.qkv, self.cross, self.mlp):
            q, k, v = qkv(h).unflatten(-1, (3, 2, WIDTH // 2)).permute(2, 0, 3, 1, 4)
            h = h + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
            h = h + F.scaled_dot_product_attention(cross(h), k_text, v_text)
            h = h + mlp(h)
        return self.head(h).reshape(b, f, p, c)


def compiled(model, cache=CACHE, **options):
    return torch.compile(model, backend="turbo4d", options={"target": "eager", "cache": cache, **options})


def fresh(model, cache=CACHE):
    """A fresh compile: nothing of an earlier one survives."""
    torch._dynamo.reset()
    return compiled(model, cache)


def noise(seed, batch=1):
    return torch.randn(batch, FRAMES, TOKENS, CHANNELS, generator=torch.Generator().manual_seed(seed))


def text(seed, batch=1):
    return torch.randn(batch, TEXT, WIDTH, generator=torch.Generator().manual_seed(1000 + seed))


def times(steps=STEPS, start=1.0):
    """Flow-matching timesteps (model units 0..1000) from `start` down to 0."""
    return torch.linspace(start, 0.0, steps + 1).mul(1000).tolist()


def timestep_tensor(t, batch=1, shape="scalar"):
    if shape == "frames":
        return torch.full((batch, FRAMES), t)
    if shape == "tokens":
        return torch.full((batch, FRAMES * TOKENS), t)
    return torch.full((batch,), t)


def loop(model, x, cond, schedule, *, uncond=None, scale=3.0, shape="scalar", order=None):
    """Euler flow matching over `schedule`; with `uncond`, classifier-free guidance as two calls per step."""
    with torch.no_grad():
        for step, (t, t_next) in enumerate(zip(schedule[:-1], schedule[1:])):
            ts = timestep_tensor(t, x.shape[0], shape)
            if uncond is None:
                velocity = model(x, ts, cond)
            else:
                first_uncond = order is not None and order[step]
                if first_uncond:
                    u = model(x, ts, uncond)
                    c = model(x, ts, cond)
                else:
                    c = model(x, ts, cond)
                    u = model(x, ts, uncond)
                velocity = u + scale * (c - u)
            x = x + (t_next - t) / 1000 * velocity
    return x


def reused(model):
    return sum(u.reused + u.bypassed + u.pruned for u in t4dopt.cache_report(model).units)
