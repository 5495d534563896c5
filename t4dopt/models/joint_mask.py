"""Restrict `Sculpt4DDiT`'s joint attention with a fixed boolean mask, as Sculpt4D trains it.

The models import nothing else of t4dopt, so the mask comes in as a tensor (for instance
``t4dopt.masks.sculpt4d(F, P, block_size=16).token_mask()``); True means "attend".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from t4dopt.models.sculpt4d_dit import Attention, Sculpt4DDiT, rotate_half


class MaskedAttention(Attention):
    """Self-attention through SDPA with ``attn_mask=self.mask`` (a non-persistent bool buffer [N, N])."""

    def __init__(self, hidden: int, heads: int, mask: torch.Tensor):
        super().__init__(hidden, heads)
        self.register_buffer("mask", mask.to(torch.bool), persistent=False)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if context is not None:
            raise ValueError("MaskedAttention is self-attention only")
        if x.shape[1] != self.mask.shape[0]:
            raise ValueError(f"joint mask is for {self.mask.shape[0]} tokens, got a sequence of {x.shape[1]}")
        q = self.q_norm(self._split(self.q(x)))
        k, v = self.kv(x).chunk(2, dim=-1)
        k, v = self.k_norm(self._split(k)), self._split(v)
        if rope is not None:
            cos, sin = rope
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)
        return self.out(out.transpose(1, 2).reshape(x.shape))


def set_joint_mask(model: Sculpt4DDiT, mask: torch.Tensor | None) -> Sculpt4DDiT:
    """Give every block's joint attention `mask` (bool [F*P, F*P]), or make it dense again with None.

    The attention modules are replaced by new ones holding copies of the same weights, so build
    an optimizer only after this call.
    """
    config = model.config
    for block in model.blocks:
        old = block.temporal
        new = Attention(config.hidden, config.heads) if mask is None else MaskedAttention(config.hidden, config.heads, mask)
        new.load_state_dict(old.state_dict())
        block.temporal = new.to(device=old.q.weight.device, dtype=old.q.weight.dtype)
    return model


def joint_mask(model: Sculpt4DDiT) -> torch.Tensor | None:
    """The mask `set_joint_mask` installed, or None for dense joint attention."""
    attention = model.blocks[0].temporal if len(model.blocks) else None
    return attention.mask if isinstance(attention, MaskedAttention) else None
