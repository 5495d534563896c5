"""The runtime's own tensor arithmetic, as small graphs lowered like the segments (one fused kernel each).

Run eagerly, each reuse or store would be several separate small ops per sublayer and call;
lowered by Inductor they are one kernel each. Step counts enter as 0-d tensors picked from a
table on the device, so neither a new value nor a host-to-device copy is needed per call.
"""

from __future__ import annotations

import operator
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


def store(exit_value: torch.Tensor, entry: torch.Tensor, before: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual to keep after a computation, and how far the entry moved since the last one."""
    return exit_value - entry, relative_drift(entry, before)


def store_slope(exit_value: torch.Tensor, entry: torch.Tensor, before: torch.Tensor, previous: torch.Tensor,
                inverse_gap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As `store`, plus the residual's change per step since the `previous` one, `1 / inverse_gap` steps ago."""
    residual = exit_value - entry
    return residual, (residual - previous) * inverse_gap.to(residual.dtype), relative_drift(entry, before)


def reuse_graph(extrapolated: tuple[bool, ...]) -> fx.GraphModule:
    """``(entry, before, residual_0[, slope_0, steps_0], ...) -> (entry + sum of terms, drift of entry)``.

    A reused sublayer adds its stored residual to its new entry, and consecutive reused
    sublayers only add residuals, so one or a run of them is one sum: term i is ``residual_i``
    or, where `extrapolated[i]`, ``residual_i + slope_i * steps_i`` (steps in the slope's dtype).
    """
    graph = fx.Graph()
    entry, before = graph.placeholder("entry"), graph.placeholder("before")
    terms = []
    for index, slope in enumerate(extrapolated):
        names = ("residual", "slope", "steps") if slope else ("residual",)
        terms.append([graph.placeholder(f"{name}{index}") for name in names])
    total = entry
    for term in terms:
        total = graph.call_function(operator.add, (total, term[0]))
        if len(term) == 3:
            steps = graph.call_method("type_as", (term[2], term[1]))
            total = graph.call_function(operator.add, (total, graph.call_function(operator.mul, (term[1], steps))))
    graph.output((total, graph.call_function(relative_drift, (entry, before))))
    return fx.GraphModule(torch.nn.Module(), graph)


class Arithmetic:
    """The functions above, each lowered on first use per input signature by `make(gm)`.

    `steps(n, like)` and `inverse(n, like)` are n and 1/n as 0-d tensors on `like`'s device.
    """

    def __init__(self, make: Callable[[fx.GraphModule], Callable], limit: int):
        self.drift = make(fx.symbolic_trace(drift))
        self.store = make(fx.symbolic_trace(store))
        self.store_slope = make(fx.symbolic_trace(store_slope))
        self.limit = limit
        self._make = make
        self._reuse: dict[tuple[bool, ...], Callable] = {}
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _table(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if like.device not in self._tables:
            counts = torch.arange(self.limit + 1, dtype=torch.float32)
            self._tables[like.device] = (counts.to(like.device), (1 / counts.clamp_min(1)).to(like.device))
        return self._tables[like.device]

    def reuse(self, extrapolated: tuple[bool, ...]) -> Callable:
        """The lowered `reuse_graph` for this pattern of terms."""
        if extrapolated not in self._reuse:
            self._reuse[extrapolated] = self._make(reuse_graph(extrapolated))
        return self._reuse[extrapolated]

    def steps(self, count: int, like: torch.Tensor) -> torch.Tensor:
        return self._table(like)[0][min(count, self.limit)]

    def inverse(self, count: int, like: torch.Tensor) -> torch.Tensor:
        return self._table(like)[1][min(max(count, 1), self.limit)]
