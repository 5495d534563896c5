"""The CPU kernel's plan: a block table cut into dense pieces, built once per layout and part count.

Each piece is a dense attention on torch's fused CPU flash kernel (`cpu_kernel`), which works on
tiles of 256 query rows when a call has at least 768 of them and on tiles of 64 (or 32) rows
below that, markedly slower per pair. So the plan looks for pieces with many query rows:

* column rectangles: consecutive key blocks that long runs (>= `MIN_COLUMN_RUN_TOKENS`) of
  consecutive query blocks all keep (a frame's keys, seen by the frames of its window and, for an
  anchor frame, by every frame) are attended on zero-copy views of q, k and v;
* what remains is split into groups of consecutive query blocks that share long runs of
  consecutive key blocks (a frame's blocks, in video layouts), and per group into
  row rectangles (a group attends each long key run it shares, on views), bicliques (key blocks
  that several blocks of a group keep, Sculpt4D's strided blocks of one residue class, gathered
  once and attended by all of those query blocks together) and rests (the rest of each query
  block's row, gathered, batched with the other query blocks whose rest is the same).

The query blocks are split into `Part`s that share no query row, so that parts run on separate
threads (`cpu_pool`); pieces are cut at part boundaries. Gathered pieces of one shape run as one
batched call. The work is exactly the kept token pairs (`Plan.pairs` per batch entry and head).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

MIN_RUN_TOKENS = 256
"""Shortest run of consecutive key tokens worth a row rectangle of its own; shorter runs are gathered."""

MIN_COLUMN_RUN_TOKENS = 768
"""Shortest run of consecutive query tokens worth a column rectangle: from 768 query rows on, the
flash kernel uses its large tiles."""

JOIN_FRACTION = 0.9
"""A block joins its predecessors' group if that keeps this fraction of its long-run pairs."""

MIN_SHARED_ROWS = 3
"""Key blocks kept by this many query blocks of a group are gathered once for all of them."""


@dataclass(frozen=True)
class Rect:
    """Query tokens ``q_start:q_end`` attend key tokens ``k_start:k_end``."""

    q_start: int
    q_end: int
    k_start: int
    k_end: int
    fresh: bool
    """The only piece of its rows so far: written directly instead of merged."""


@dataclass(frozen=True)
class Gathered:
    """Pieces of one shape: each gathers `q_len` query tokens that attend `kv_len` gathered keys."""

    q_index: torch.Tensor
    """int64 [pieces, q_len / unit]: the query units (`Plan.unit` consecutive tokens) of each piece."""
    kv_index: torch.Tensor
    """int64 [pieces, kv_len / unit]: the key units each piece attends."""
    q_tokens: torch.Tensor
    """int64 [pieces, q_len]: the query tokens of each piece (its units' tokens, in order)."""
    kv_tokens: torch.Tensor
    """int64 [pieces, kv_len]: the key tokens of each piece."""
    fresh: bool
    """No earlier piece wrote these rows: written directly instead of merged."""


@dataclass(frozen=True)
class Part:
    """The pieces that compute query blocks ``first:end``; they write no other row."""

    first: int
    end: int
    gathered: tuple[Gathered, ...]
    """Computed first; no query token appears twice within one of them."""
    rects: tuple[Rect, ...]
    """Computed last, on views of q, k and v."""
    pairs: int
    """Query-key token pairs the part computes, per batch entry and head."""


@dataclass(frozen=True)
class Plan:
    unit: int
    """Tokens per gathered unit: the gcd of the block boundaries, so gathers copy whole runs."""
    parts: tuple[Part, ...]
    """Disjoint in their query rows, together every row; the most work first."""
    rows: tuple[Gathered, ...]
    """Every query block with all of its kept keys, for the backward pass."""

    @property
    def pairs(self) -> int:
        """Query-key token pairs the forward pass computes, per batch entry and head."""
        return sum(part.pairs for part in self.parts)


Group = tuple[int, int, np.ndarray]
"""(first, end, common): blocks ``first:end`` and the AND of their rows."""


def _runs(row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Begin and end (exclusive) block of each maximal run of True in a bool row."""
    edges = np.flatnonzero(np.diff(np.concatenate(([0], row.astype(np.int8), [0]))))
    return edges[0::2], edges[1::2]


def _long_runs(row: np.ndarray, starts: np.ndarray, min_tokens: int) -> tuple[np.ndarray, np.ndarray, int]:
    begins, ends = _runs(row)
    tokens = starts[ends] - starts[begins]
    keep = tokens >= min_tokens
    return begins[keep], ends[keep], int(tokens[keep].sum())


def _row_groups(mask: np.ndarray, starts: np.ndarray, first: int, stop: int, min_tokens: int) -> list[Group]:
    """Split the rows ``first:stop`` of `mask` into runs that share long runs of columns.

    Greedy: the next row joins the group while its shared long runs still cover at least
    JOIN_FRACTION of what its own long runs would, so a frame's blocks stay together and a group
    ends where the next row sees other blocks. (Rows and columns share `starts`.)
    """
    groups = []
    while first < stop:
        common = mask[first]
        covered = (starts[first + 1] - starts[first]) * _long_runs(common, starts, min_tokens)[2]
        end = first + 1
        while covered and end < stop:
            candidate = common & mask[end]
            candidate_covered = (starts[end + 1] - starts[first]) * _long_runs(candidate, starts, min_tokens)[2]
            alone = (starts[end + 1] - starts[end]) * _long_runs(mask[end], starts, min_tokens)[2]
            if candidate_covered - covered < JOIN_FRACTION * alone:
                break
            common, covered, end = candidate, candidate_covered, end + 1
        groups.append((first, end, common))
        first = end
    return groups


def _column_rects(mask: np.ndarray, starts: np.ndarray) -> list[tuple[int, int, int, int]]:
    """(q_first, q_end, k_first, k_end) in blocks: groups of key blocks x the long query runs that keep all of them."""
    rects = []
    for k_first, k_end, common in _row_groups(mask.T, starts, 0, mask.shape[0], MIN_COLUMN_RUN_TOKENS):
        begins, ends, _ = _long_runs(common, starts, MIN_COLUMN_RUN_TOKENS)
        rects += [(int(begin), int(end), k_first, k_end) for begin, end in zip(begins, ends)]
    return rects


def _merge_stacked(rects: list[tuple[int, int, int, int]]) -> list[tuple[int, int, int, int]]:
    """Join rectangles over the same keys whose query ranges touch (bigger calls run faster)."""
    merged: list[tuple[int, int, int, int]] = []
    for q_start, q_end, k_start, k_end in sorted(rects, key=lambda r: (r[2], r[3], r[0])):
        if merged and merged[-1][2:] == (k_start, k_end) and merged[-1][1] == q_start:
            merged[-1] = (merged[-1][0], q_end, k_start, k_end)
        else:
            merged.append((q_start, q_end, k_start, k_end))
    return sorted(merged, key=lambda r: (r[0], r[2] - r[3]))


def _shared_columns(left: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Bicliques (rows, key blocks) of `left` (bool [rows, blocks]): columns kept by the same rows.

    Only classes kept by at least MIN_SHARED_ROWS rows.
    """
    classes: dict[bytes, list[int]] = {}
    for column in np.flatnonzero(left.sum(axis=0) >= MIN_SHARED_ROWS):
        classes.setdefault(left[:, column].tobytes(), []).append(int(column))
    return [(np.flatnonzero(left[:, columns[0]]), np.array(columns)) for columns in classes.values()]


def _unit_tokens(index: np.ndarray, unit: int) -> torch.Tensor:
    """[pieces, units] unit indices -> [pieces, units * unit] token indices."""
    return torch.from_numpy((index[..., None] * unit + np.arange(unit)).reshape(index.shape[0], -1))


class _PieceBatcher:
    """Collects gathered pieces into batches of one shape whose query tokens do not repeat."""

    def __init__(self, units: int, unit: int) -> None:
        self.batches: dict[tuple[int, int, int, int], list[tuple[np.ndarray, np.ndarray]]] = {}
        self.written = np.zeros(units, dtype=bool)
        self.unit = unit

    def add(self, stage: int, round_: int, queries: np.ndarray, keys: np.ndarray) -> None:
        self.batches.setdefault((stage, round_, queries.size, keys.size), []).append((queries, keys))

    def build(self) -> tuple[Gathered, ...]:
        """Batches in execution order, each marked fresh when none of its rows was written before."""
        result = []
        for key in sorted(self.batches):
            pieces = self.batches[key]
            q_index, kv_index = np.stack([q for q, _ in pieces]), np.stack([kv for _, kv in pieces])
            fresh = not self.written[q_index].any()
            self.written[q_index] = True
            result.append(Gathered(torch.from_numpy(q_index), torch.from_numpy(kv_index),
                                   _unit_tokens(q_index, self.unit), _unit_tokens(kv_index, self.unit), fresh))
        return tuple(result)


class _Units:
    """Block indices -> the `unit`-token units they cover."""

    def __init__(self, starts: np.ndarray, unit: int) -> None:
        self.of_block = [np.arange(starts[b] // unit, starts[b + 1] // unit) for b in range(len(starts) - 1)]

    def __call__(self, blocks: np.ndarray | list[int]) -> np.ndarray:
        return np.concatenate([self.of_block[b] for b in blocks])


def _part_bounds(mask: np.ndarray, starts: np.ndarray, count: int) -> list[tuple[int, int]]:
    """`count` (at most one per block) ranges of query blocks with about equal work.

    Bounds fall on the row groups of `mask` (a frame's blocks) where there are enough of them.
    """
    sizes = starts[1:] - starts[:-1]
    work = np.concatenate(([0], np.cumsum(sizes * (mask.astype(np.int64) @ sizes))))
    blocks = mask.shape[0]
    candidates = np.array([first for first, _, _ in _row_groups(mask, starts, 0, blocks, MIN_RUN_TOKENS)][1:])
    if len(candidates) < count - 1:
        candidates = np.arange(1, blocks)
    bounds = [0]
    for target in work[-1] * np.arange(1, count) / count:
        choices = candidates[candidates > bounds[-1]]
        if choices.size:
            bounds.append(int(choices[np.argmin(np.abs(work[choices] - target))]))
    return list(zip(bounds, bounds[1:] + [blocks]))


def _build_part(mask: np.ndarray, left: np.ndarray, column_rects: list[tuple[int, int, int, int]],
                starts: np.ndarray, unit: int, first: int, end: int) -> Part:
    """The pieces of query blocks ``first:end``: the column rectangles cut to them, then per row group
    of `mask` what they leave of it (`left`): row rectangles, bicliques and rests.

    Execution order: the rests (one piece per row, written directly), the bicliques (in rounds, so
    that no batch repeats a row), the rectangles.
    """
    rects = [(int(starts[max(q0, first)]), int(starts[min(q1, end)]), int(starts[k0]), int(starts[k1]))
             for q0, q1, k0, k1 in column_rects if q0 < end and q1 > first]
    units = _Units(starts, unit)
    batcher = _PieceBatcher(int(starts[-1]) // unit, unit)
    rests: dict[bytes, list[int]] = {}
    for group_first, group_end, _ in _row_groups(mask, starts, first, end, MIN_RUN_TOKENS):
        begins, ends, _ = _long_runs(left[group_first:group_end].all(axis=0), starts, MIN_RUN_TOKENS)
        rest = left[group_first:group_end].copy()
        for begin, stop in zip(begins, ends):
            rest[:, begin:stop] = False
            rects.append((int(starts[group_first]), int(starts[group_end]), int(starts[begin]), int(starts[stop])))
        rounds = np.zeros(group_end - group_first, dtype=np.int64)
        for rows, columns in _shared_columns(rest):
            round_ = int(rounds[rows].max())
            rounds[rows] = round_ + 1
            batcher.add(1, round_, units(group_first + rows), units(columns))
            rest[np.ix_(rows, columns)] = False
        for row in range(group_end - group_first):
            if rest[row].any():
                rests.setdefault(rest[row].tobytes(), []).append(group_first + row)
    for rest_row, blocks in rests.items():
        batcher.add(0, 0, units(blocks), units(np.flatnonzero(np.frombuffer(rest_row, dtype=bool))))
    gathered = batcher.build()
    written = np.repeat(batcher.written, unit)
    pieces = []
    for q_start, q_end, k_start, k_end in _merge_stacked(rects):
        pieces.append(Rect(q_start, q_end, k_start, k_end, fresh=not written[q_start:q_end].any()))
        written[q_start:q_end] = True
    pairs = sum((r.q_end - r.q_start) * (r.k_end - r.k_start) for r in pieces) + sum(
        group.q_index.numel() * group.kv_index.shape[1] * unit * unit for group in gathered)
    return Part(first, end, gathered, tuple(pieces), pairs)


def build_plan(dense: torch.Tensor, block_starts: torch.Tensor, parts: int = 1) -> Plan:
    """The pieces that compute exactly the kept blocks of `dense` (bool [blocks, blocks]), in about `parts` parts."""
    mask = dense.cpu().numpy().astype(bool)
    starts = block_starts.cpu().numpy().astype(np.int64)
    unit = int(np.gcd.reduce(starts))
    column_rects = _column_rects(mask, starts)
    left = mask.copy()
    for q_first, q_end, k_first, k_end in column_rects:
        left[q_first:q_end, k_first:k_end] = False
    built = [_build_part(mask, left, column_rects, starts, unit, first, end)
             for first, end in _part_bounds(mask, starts, max(1, min(parts, mask.shape[0])))]
    units = _Units(starts, unit)
    whole_rows = _PieceBatcher(int(starts[-1]) // unit, unit)
    for block in np.flatnonzero(mask.any(axis=1)):
        whole_rows.add(0, 0, units.of_block[block], units(np.flatnonzero(mask[block])))
    return Plan(unit, tuple(sorted(built, key=lambda part: -part.pairs)), whole_rows.build())
