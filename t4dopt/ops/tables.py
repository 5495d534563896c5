"""Block tables as the kernels use them: decoded once, with what each kernel derives from them, cached.

The op takes the block table as three tensors (``BlockLayout.tensors()``). What the kernels
derive from a table (the CPU plan, the Triton plan, the FlexAttention ``BlockMask``) is built
once and cached: by the identity of the table tensors while they live, and by their content
otherwise.
"""

from __future__ import annotations

import hashlib
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property, partial

import torch

from t4dopt.block_layout import BlockLayout
from t4dopt.ops import flex_path, triton_kernel
from t4dopt.ops.cpu_plan import Plan as CpuPlan, build_plan as build_cpu_plan
from t4dopt.ops.schema import OP_NAME


@dataclass(eq=False)
class BlockTable:
    """A decoded block table and what the kernels derived from it."""

    dense: torch.Tensor
    """bool [blocks, blocks] on CPU: query block i attends key block j."""
    block_starts: torch.Tensor
    """int64 [blocks + 1] on CPU."""
    derived: dict = field(default_factory=dict)

    @property
    def seq_len(self) -> int:
        return int(self.block_starts[-1])

    @cached_property
    def longest_block(self) -> int:
        return int((self.block_starts[1:] - self.block_starts[:-1]).max())

    def cpu_plan(self, parts: int = 1) -> CpuPlan:
        """The CPU kernel's plan, cut into `parts` parts of query blocks (`cpu_kernel.part_count`)."""
        key = ("cpu-plan", parts)
        if key not in self.derived:
            self.derived[key] = build_cpu_plan(self.dense, self.block_starts, parts)
        return self.derived[key]

    def triton_plan(self, device: torch.device, *, block_m: int | None = None,
                    block_n: int | None = None) -> triton_kernel.Plan:
        default_m, default_n = triton_kernel.tile_sizes(self.longest_block)
        key = ("triton-plan", block_m or default_m, block_n or default_n, device)
        if key not in self.derived:
            self.derived[key] = triton_kernel.build_plan(self.dense, self.block_starts, block_m=key[1],
                                                         block_n=key[2], device=device)
        return self.derived[key]

    def block_mask(self, block_size: int, device: torch.device):
        key = ("block-mask", block_size, device)
        if key not in self.derived:
            self.derived[key] = flex_path.build_block_mask(self.dense, self.block_starts, block_size, device)
        return self.derived[key]


def decode(kv_counts: torch.Tensor, kv_indices: torch.Tensor, block_starts: torch.Tensor) -> BlockTable:
    counts, indices, starts = kv_counts.long(), kv_indices.long(), block_starts.long()
    blocks, width = indices.shape
    if blocks == 0 or int(starts[0]) != 0 or bool((starts[1:] <= starts[:-1]).any()):
        raise ValueError(f"{OP_NAME}: block_starts must start at 0 and increase strictly, got {starts.tolist()[:16]}")
    if bool((counts < 0).any()) or bool((counts > width).any()):
        raise ValueError(f"{OP_NAME}: kv_counts must lie in [0, {width}] (the width of kv_indices)")
    kept = torch.arange(width).unsqueeze(0) < counts.unsqueeze(1)
    if bool(((indices < 0) | (indices >= blocks))[kept].any()):
        raise ValueError(f"{OP_NAME}: kv_indices must name key blocks in [0, {blocks})")
    dense = torch.zeros(blocks, blocks, dtype=torch.bool)
    dense[torch.arange(blocks).unsqueeze(1).expand(blocks, width)[kept], indices[kept]] = True
    return BlockTable(dense, starts.contiguous())


def _version(tensor: torch.Tensor) -> int:
    try:
        return tensor._version
    except RuntimeError:  # inference tensors keep no version counter (and cannot change outside inference mode)
        return -1


class TableCache:
    """`BlockTable`s keyed by the identity of the table tensors (while they live, unchanged) and by content."""

    def __init__(self, capacity: int = 64) -> None:
        self._capacity = capacity
        self._by_identity: dict[tuple[int, ...], tuple[tuple[weakref.ref, ...], tuple[int, ...], BlockTable]] = {}
        self._by_content: OrderedDict[bytes, BlockTable] = OrderedDict()

    def lookup(self, tensors: tuple[torch.Tensor, ...]) -> BlockTable:
        key = tuple(id(t) for t in tensors)
        versions = tuple(_version(t) for t in tensors)
        entry = self._by_identity.get(key)
        if entry is not None and entry[1] == versions and all(ref() is t for ref, t in zip(entry[0], tensors)):
            return entry[2]
        table = self._lookup_content(tuple(t.detach().cpu() for t in tensors))
        refs = tuple(weakref.ref(t, partial(self._forget, key)) for t in tensors)
        self._by_identity[key] = (refs, versions, table)
        return table

    def _lookup_content(self, tensors: tuple[torch.Tensor, ...]) -> BlockTable:
        digest = hashlib.blake2b(digest_size=16)
        for t in tensors:
            digest.update(repr((t.dtype, tuple(t.shape))).encode())
            digest.update(t.contiguous().numpy().tobytes())
        key = digest.digest()
        table = self._by_content.get(key)
        if table is None:
            table = decode(*tensors)
            self._by_content[key] = table
            while len(self._by_content) > self._capacity:
                self._by_content.popitem(last=False)
        self._by_content.move_to_end(key)
        return table

    def _forget(self, key: tuple[int, ...], ref: weakref.ref) -> None:
        entry = self._by_identity.get(key)
        if entry is not None and any(r is ref for r in entry[0]):
            del self._by_identity[key]


_tables = TableCache()


def lookup_table(tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> BlockTable:
    """The decoded table of (kv_counts, kv_indices, block_starts), from the shared cache."""
    return _tables.lookup(tensors)


def table_for(q: torch.Tensor, kv_counts: torch.Tensor, kv_indices: torch.Tensor,
               block_starts: torch.Tensor) -> BlockTable:
    table = lookup_table((kv_counts, kv_indices, block_starts))
    if table.seq_len != q.shape[2]:
        raise ValueError(f"{OP_NAME}: q/k/v have N={q.shape[2]} tokens but the block table covers {table.seq_len}")
    return table


LAYOUT_CACHE_SIZE = 256

_layout_tensors: dict[int, tuple[BlockLayout, dict[torch.device, tuple[torch.Tensor, ...]]]] = {}


def layout_tensors(layout: BlockLayout, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``layout.tensors(device)``, copied once per (layout, device).

    Repeated calls hand the op the same tensors, so its per-table caches hit without a copy or a
    device sync. A plain dict keyed by ``id(layout)`` (holding the layout, so the id is not
    reused) rather than a WeakKeyDictionary, which torch.compile cannot trace.
    """
    entry = _layout_tensors.get(id(layout))
    if entry is None or entry[0] is not layout:
        if len(_layout_tensors) >= LAYOUT_CACHE_SIZE:
            del _layout_tensors[next(iter(_layout_tensors))]
        entry = _layout_tensors[id(layout)] = (layout, {})
    per_device = entry[1]
    if device not in per_device:
        per_device[device] = layout.tensors(device)
    return per_device[device]


def layout_of(tensor: torch.Tensor) -> BlockLayout | None:
    """The layout whose `layout_tensors` include `tensor` (that very tensor object), else None: what a graph holding
    those tensors (a ring backend's chunk calls) was built from."""
    for layout, per_device in list(_layout_tensors.values()):
        if any(tensor is t for tensors in per_device.values() for t in tensors):
            return layout
    return None
