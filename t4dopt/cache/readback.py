"""The runtime's one device-to-host transfer per call, and the fingerprints it reads.

Everything the host needs before a call runs (the timestep, which inputs it was called with,
the drifts measured during earlier calls, the continuity check of `t4dopt.cache.continuity`)
is computed on the device, gathered into one float64 vector and read back at once:
`Readback.add` names a part, `Readback.read` returns every part as a list of floats.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

FINGERPRINT_SIZE = 3
_WEIGHTS: OrderedDict[tuple[int, torch.device], torch.Tensor] = OrderedDict()
_WEIGHT_TABLES = 8


def _weights(count: int, device: torch.device) -> torch.Tensor:
    """A fixed pattern of `count` weights in [-0.5, 0.5) (a few tables kept, per size and device)."""
    key = (count, device)
    weights = _WEIGHTS.get(key)
    if weights is None:
        index = torch.arange(count, dtype=torch.int64, device=device)
        weights = ((index * 2654435761) % 1021).to(torch.float32) / 1021 - 0.5
        _WEIGHTS[key] = weights
        while len(_WEIGHTS) > _WEIGHT_TABLES:
            _WEIGHTS.popitem(last=False)
    _WEIGHTS.move_to_end(key)
    return weights


def fingerprint(tensor: torch.Tensor) -> torch.Tensor:
    """Three float64 numbers that are equal for tensors of equal content and shape, and differ otherwise.

    The sum, the sum of squares and a position-weighted sum, each over the contiguous values:
    the same values in the same order always give the same numbers; other values (a reordering
    included) almost never do.
    """
    flat = tensor.detach().reshape(-1)
    values = flat.to(torch.float64)
    weighted = (flat.to(torch.float32) * _weights(flat.numel(), flat.device)).sum(dtype=torch.float64)
    return torch.stack([values.sum(), (values * values).sum(), weighted])


class Readback:
    """Named device tensors gathered for one transfer."""

    def __init__(self) -> None:
        self._parts: list[tuple[str, torch.Tensor]] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self._parts.append((name, tensor.detach().reshape(-1)))

    def read(self) -> dict[str, list[float]]:
        """Every part as floats, in one device-to-host transfer (none when there is nothing to read)."""
        if not self._parts:
            return {}
        # Gathered where most of it lives: on the accelerator when any part is there.
        device = next((t.device for _, t in self._parts if t.device.type != "cpu"), torch.device("cpu"))
        values = torch.cat([t.to(device=device, dtype=torch.float64) for _, t in self._parts]).tolist()
        parts, start = {}, 0
        for name, tensor in self._parts:
            parts[name] = values[start:start + tensor.numel()]
            start += tensor.numel()
        return parts
