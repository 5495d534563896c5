"""Restrict `Sculpt4DDiT`'s joint attention with a fixed boolean mask, as Sculpt4D trains it.

The models import nothing else of t4dopt, so the mask comes in as a tensor (for instance
``t4dopt.masks.sculpt4d(F, P, block_size=16).token_mask()``); True means "attend".
"""

from __future__ import annotations

import torch

from t4dopt.models.sculpt4d_dit import Sculpt4DDiT


def set_joint_mask(model: Sculpt4DDiT, mask: torch.Tensor | None) -> Sculpt4DDiT:
    """Give every block's joint attention `mask` (bool [F*P, F*P]), or make it dense again with None."""
    for block in model.blocks:
        attention = block.temporal
        attention.attn_mask = None if mask is None else mask.to(device=attention.q.weight.device, dtype=torch.bool)
    return model


def joint_mask(model: Sculpt4DDiT) -> torch.Tensor | None:
    """The mask `set_joint_mask` installed, or None for dense joint attention."""
    return model.blocks[0].temporal.attn_mask if len(model.blocks) else None
