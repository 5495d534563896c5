"""The runtime's one device-to-host transfer per call, and the samples and fingerprints it reads.

Everything the host needs before a call runs (the timestep, which inputs it was called with,
the drifts measured during earlier calls, the continuity check of `t4dopt.cache.continuity`)
is computed on the device, gathered into one float64 vector and read back at once:
`Readback.add` names a part, `Readback.read` returns every part as a list of floats.

Large tensors are compared through a fixed sample of their values (`sample`, at most
`SAMPLE` per row): a call of another generation, another prompt or another guidance branch
differs from this one nearly everywhere, so a few thousand values tell them apart as well
as all of them, at a cost that does not grow with the video.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

SAMPLE = 4096
"""Values sampled per row of a tensor compared across calls."""
FINGERPRINT_SIZE = 3
_TABLES = 16
_tables: OrderedDict[tuple, torch.Tensor] = OrderedDict()
_tables_lock = threading.Lock()


def _table(key: tuple, build) -> torch.Tensor:
    """A small tensor kept per `key` (the least recently used beyond `_TABLES` go)."""
    with _tables_lock:
        table = _tables.get(key)
        if table is None:
            table = _tables[key] = build()
            while len(_tables) > _TABLES:
                _tables.popitem(last=False)
        _tables.move_to_end(key)
        return table


def _positions(count: int, device: torch.device) -> torch.Tensor:
    """`SAMPLE` of `count` positions, the same ones in every process."""
    def build() -> torch.Tensor:
        generator = torch.Generator().manual_seed(count)
        return torch.randperm(count, generator=generator)[:SAMPLE].sort().values.to(device)
    return _table(("positions", count, device), build)


def sample(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """`tensor` as `rows` rows (one per batch element) of at most `SAMPLE` fixed positions each, in float64."""
    flat = tensor.detach().reshape(rows, -1)
    if flat.shape[1] > SAMPLE:
        flat = flat.index_select(1, _positions(flat.shape[1], flat.device))
    return flat.to(torch.float64)


def _weights(count: int, device: torch.device) -> torch.Tensor:
    """A fixed pattern of `count` weights in [-0.5, 0.5)."""
    def build() -> torch.Tensor:
        index = torch.arange(count, dtype=torch.int64, device=device)
        return ((index * 2654435761) % 1021).to(torch.float64) / 1021 - 0.5
    return _table(("weights", count, device), build)


def fingerprint(tensor: torch.Tensor) -> torch.Tensor:
    """Three float64 numbers, equal for tensors of equal content and shape, different otherwise (`sample`d).

    The sum, the sum of squares and a position-weighted sum of the sampled values: the same
    values in the same order always give the same numbers; other values almost never do.
    """
    values = sample(tensor, 1)[0]
    return torch.stack([values.sum(), (values * values).sum(), (values * _weights(values.numel(), values.device)).sum()])


class Readback:
    """Named device tensors gathered for one transfer.

    With a process group (context parallelism: each rank runs the same graph on a shard of the
    sequence), the gathered vector is all-reduced once before it is read: parts added with
    ``summed=True`` (the sums of a drift) are added up over the ranks, the others averaged (they are
    equal on every rank when the ranks were called alike). Every rank then reads the same numbers and
    so makes the same decisions: none runs a collective inside a sublayer the others skip.
    """

    def __init__(self) -> None:
        self._parts: list[tuple[str, torch.Tensor]] = []
        self._summed: set[str] = set()

    def add(self, name: str, tensor: torch.Tensor, summed: bool = False) -> None:
        self._parts.append((name, tensor.detach().reshape(-1)))
        if summed:
            self._summed.add(name)

    def read(self, group=None) -> dict[str, list[float]]:
        """Every part as floats, in one device-to-host transfer (none when there is nothing to read);
        with `group`, reduced over it first (one all-reduce)."""
        if not self._parts:
            return {}
        # Gathered where most of it lives: on the accelerator when any part is there.
        device = next((t.device for _, t in self._parts if t.device.type != "cpu"), torch.device("cpu"))
        vector = torch.cat([t.to(device=device, dtype=torch.float64) for _, t in self._parts])
        if group is not None:
            vector = _reduced(vector, [(name in self._summed, t.numel()) for name, t in self._parts], group)
        values = vector.tolist()
        parts, start = {}, 0
        for name, tensor in self._parts:
            parts[name] = values[start:start + tensor.numel()]
            start += tensor.numel()
        return parts


def _reduced(vector: torch.Tensor, layout: list[tuple[bool, int]], group) -> torch.Tensor:
    """`vector` summed over `group`, the parts not marked summed divided by its size (their mean)."""
    import torch.distributed as dist

    vector = vector.clone()
    dist.all_reduce(vector, op=dist.ReduceOp.SUM, group=group)
    scale = torch.cat([torch.full((count,), 1.0 if summed else 1.0 / dist.get_world_size(group), dtype=vector.dtype)
                       for summed, count in layout]).to(vector.device)
    return vector * scale
