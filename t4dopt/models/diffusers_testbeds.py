"""Tiny diffusers video transformers trained on the procedural scenes: their configs, their call, a sampler.

The task (`t4dopt.data.tasks.video_batch`): view 0 of a scene as an 8-frame 16 x 16 video in
pixels (no VAE: the pixels are the latents, 3 channels), denoised by flow matching
(x_t = (1 - t) x_0 + t noise, the transformer predicts noise - x_0, called with timestep
1000 t, as diffusers' flow-matching pipelines call Wan). The conditioning is what every
trained model here takes: the clean first frame's 64 patch tokens, each followed by a code of
its position ([B, 64, 24]). The diffusers models take it as ``encoder_hidden_states``, the
text their pipelines pass: Wan cross-attends to it, CogVideoX joins it in front of the video
tokens in each attention.

diffusers is imported only when a testbed is built (the ``diffusers`` extra).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from t4dopt.models.sampler import flow_matching_timesteps

TIMESTEP_SCALE = 1000.0  # diffusers transformers take timesteps in [0, 1000]


@dataclass(frozen=True)
class DiffusersTestbed:
    """A tiny diffusers transformer on the scene task: its class, config and video order."""

    architecture: str
    config: dict[str, Any]
    channels_first: bool  # video [B, C, F, H, W] (Wan) rather than [B, F, C, H, W] (CogVideoX)


FRAMES, SIZE, PATCH = 8, 16, 2
COND_TOKENS, COND_DIM = (SIZE // PATCH) ** 2, 3 * PATCH * PATCH + 12

TESTBEDS: dict[str, DiffusersTestbed] = {
    "wan-tiny": DiffusersTestbed("WanTransformer3DModel", {
        "patch_size": (1, PATCH, PATCH), "num_attention_heads": 2, "attention_head_dim": 32, "in_channels": 3,
        "out_channels": 3, "text_dim": COND_DIM, "freq_dim": 64, "ffn_dim": 256, "num_layers": 4,
        "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 32,
    }, channels_first=True),
    # CogVideoX 1.0 (2B-like): sinusoidal 3-D position embedding, no temporal patching, text in front.
    "cogvideox-tiny": DiffusersTestbed("CogVideoXTransformer3DModel", {
        "num_attention_heads": 2, "attention_head_dim": 32, "in_channels": 3, "out_channels": 3, "time_embed_dim": 64,
        "text_embed_dim": COND_DIM, "num_layers": 4, "sample_width": SIZE, "sample_height": SIZE,
        "sample_frames": (FRAMES - 1) * 4 + 1, "patch_size": PATCH, "temporal_compression_ratio": 4,
        "max_text_seq_length": COND_TOKENS,
    }, channels_first=False),
}


def diffusers_class(architecture: str) -> type[nn.Module]:
    """The diffusers model class named `architecture`; a clear ImportError without diffusers."""
    try:
        import diffusers
    except ImportError as error:
        raise ImportError(f"the {architecture} testbeds need diffusers: pip install 't4dopt[diffusers]'") from error
    model_class = getattr(diffusers, architecture, None)
    if model_class is None:
        raise ValueError(f"diffusers {diffusers.__version__} has no model class {architecture!r}")
    return model_class


def build_transformer(architecture: str, config: dict[str, Any]) -> nn.Module:
    """A freshly initialised diffusers `architecture` with `config` (lists in a stored config become tuples)."""
    return diffusers_class(architecture)(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})


def velocity(transformer: Callable[..., Any], x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """The transformer's prediction of noise - x_0 at times t [B] in [0, 1]."""
    return transformer(hidden_states=x, timestep=t * TIMESTEP_SCALE, encoder_hidden_states=cond, return_dict=False)[0]


class Denoiser(nn.Module):
    """A diffusers transformer as ``model(x, t, cond)``, the call `t4dopt.data.tasks` trains and scores."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return velocity(self.transformer, x, t, cond)


def sample_diffusers(
    transformer: Callable[..., Any],
    noise: torch.Tensor,
    cond: torch.Tensor,
    *,
    steps: int = 8,
    shift: float = 1.0,
    context: str | None = "cond",
    on_step: Callable[[int, float], None] | None = None,
) -> torch.Tensor:
    """Flow-matching Euler from t = 1 to 0, called as diffusers' pipelines call a transformer.

    Each call runs inside ``transformer.cache_context(context, step_index=, sigma=,
    num_inference_steps=)`` when the transformer has one (diffusers' caches read their step
    from it; SeaCache needs it), with ``timestep`` 1000 t. `transformer` may be the model or
    ``torch.compile`` of it. ``on_step(index, timestep)`` runs before each call (where a
    pipeline sets its ``current_timestep``, which PAB and FasterCache read). Deterministic for
    given noise and conditioning.
    """
    times = flow_matching_timesteps(steps, shift).tolist()
    scope = getattr(transformer, "cache_context", None) if context is not None else None
    x = noise
    for index, (t, t_next) in enumerate(zip(times[:-1], times[1:])):
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype)
        if on_step is not None:
            on_step(index, t * TIMESTEP_SCALE)
        if scope is None:
            v = velocity(transformer, x, t_batch, cond)
        else:
            with scope(context, step_index=index, sigma=t, num_inference_steps=steps):
                v = velocity(transformer, x, t_batch, cond)
        x = x + (t_next - t) * v
    return x
