"""The runtime's own tensor arithmetic, as small graphs lowered like the segments (one fused kernel each).

Run eagerly, each reuse or store would be four to six separate small ops per sublayer and
call; lowered by Inductor they are one kernel each.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx as fx

EPSILON = 1e-12


def relative_drift(now: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """|now - before|_1 / |before|_1 as a 0-d float32 tensor on the tensors' device."""
    change = (now - before).abs().sum(dtype=torch.float32)
    return change / before.abs().sum(dtype=torch.float32).clamp_min(EPSILON)


def drift(now: torch.Tensor, before: torch.Tensor) -> tuple[torch.Tensor]:
    return (relative_drift(now, before),)


def reuse(entry: torch.Tensor, residual: torch.Tensor, before: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The sublayer's exit rebuilt from its new entry, and how far that entry moved."""
    return entry + residual, relative_drift(entry, before)


def store(exit_value: torch.Tensor, entry: torch.Tensor,
          before: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual to keep after a computation, and how far the entry moved since the last one."""
    return exit_value - entry, relative_drift(entry, before)


class Arithmetic:
    """`drift`, `reuse` and `store`, each lowered on first use per input signature by `make(gm)`."""

    def __init__(self, make: Callable[[fx.GraphModule], Callable]):
        self.drift = make(fx.symbolic_trace(drift))
        self.reuse = make(fx.symbolic_trace(reuse))
        self.store = make(fx.symbolic_trace(store))
