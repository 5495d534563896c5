"""Block-sparse attention on CPU that computes only the kept blocks.

The block table is turned once per layout into a `Plan` of dense pieces. Each piece runs on the
fused flash-attention kernel that SDPA uses on CPU (as fast per pair as dense SDPA on large pieces),
which also returns every query row's log-sum-exp, so the pieces of a row merge exactly into the
softmax over the union of their keys. The query blocks are split into groups of consecutive
blocks that share long runs of consecutive key blocks (a frame's blocks, in video layouts):

* rectangles: a group attends each shared long run (whole frames) on zero-copy views of q, k, v;
* bicliques: key blocks that several blocks of a group keep (Sculpt4D's strided blocks of one
  residue class) are gathered once and attended by all of those query blocks together;
* the rest of each query block's row is gathered on its own.

Gathered pieces of one shape run as one batched call. The work is exactly the kept token pairs
(`Plan.pairs` per batch entry and head). The backward pass recomputes each query block against
all of its gathered keys with plain matmuls (nothing to merge), one bounded chunk at a time.

A key mask (`t4dopt.ops.key_mask`) enters as an additive bias [B, N] on the keys: each piece adds
its keys' slice of it (the flash kernel's ``attn_mask``), rows of a piece whose keys are all
removed get log-sum-exp -inf, and merges tolerate two such halves. Without a key mask the code
path is the one it always was (`_masked_lse`, `_piece_bias` and `_softmax_of_masked` run only with one).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from t4dopt.compat import cpu_flash_attention

MIN_RUN_TOKENS = 256
"""Shortest run of consecutive key tokens worth a rectangle of its own; shorter runs are gathered."""

JOIN_FRACTION = 0.9
"""A query block joins its predecessors' group if that keeps this fraction of its long-run pairs."""

MIN_SHARED_ROWS = 3
"""Key blocks kept by this many query blocks of a group are gathered once for all of them."""

GATHER_BUDGET = 1 << 20
"""Elements of gathered K and V (or of backward score matrices) held at once, per chunk."""



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
    fresh: bool
    """No earlier piece wrote these rows: written directly instead of merged."""


@dataclass(frozen=True)
class Plan:
    unit: int
    """Tokens per gathered unit: the gcd of the block boundaries, so gathers copy whole runs."""
    gathered: tuple[Gathered, ...]
    """Computed first; no query token appears twice within one of them."""
    rects: tuple[Rect, ...]
    """Computed last, on views of q, k and v."""
    rows: tuple[Gathered, ...]
    """Every query block with all of its kept keys, for the backward pass."""
    pairs: int
    """Query-key token pairs the forward pass computes, per batch entry and head."""


def _runs(row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Begin and end (exclusive) block of each maximal run of True in a bool row."""
    edges = np.flatnonzero(np.diff(np.concatenate(([0], row.astype(np.int8), [0]))))
    return edges[0::2], edges[1::2]


def _long_runs(row: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    begins, ends = _runs(row)
    tokens = starts[ends] - starts[begins]
    keep = tokens >= MIN_RUN_TOKENS
    return begins[keep], ends[keep], int(tokens[keep].sum())


def _row_groups(mask: np.ndarray, starts: np.ndarray) -> list[tuple[int, int, np.ndarray]]:
    """Split the query blocks into runs that share long key runs: (first, end, common row).

    Greedy: the next query block joins the group while its shared long runs still cover at
    least JOIN_FRACTION of what its own long runs would, so a frame's query blocks stay
    together and a group ends where the next query block sees other keys.
    """
    groups = []
    first, count = 0, mask.shape[0]
    while first < count:
        common = mask[first]
        covered = (starts[first + 1] - starts[first]) * _long_runs(common, starts)[2]
        end = first + 1
        while covered and end < count:
            candidate = common & mask[end]
            candidate_covered = (starts[end + 1] - starts[first]) * _long_runs(candidate, starts)[2]
            alone = (starts[end + 1] - starts[end]) * _long_runs(mask[end], starts)[2]
            if candidate_covered - covered < JOIN_FRACTION * alone:
                break
            common, covered, end = candidate, candidate_covered, end + 1
        groups.append((first, end, common))
        first = end
    return groups


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


class _PieceBatcher:
    """Collects gathered pieces into batches of one shape whose query tokens do not repeat."""

    def __init__(self, units: int) -> None:
        self.batches: dict[tuple[int, int, int, int], list[tuple[np.ndarray, np.ndarray]]] = {}
        self.written = np.zeros(units, dtype=bool)

    def add(self, stage: int, round_: int, queries: np.ndarray, keys: np.ndarray) -> None:
        self.batches.setdefault((stage, round_, queries.size, keys.size), []).append((queries, keys))

    def build(self) -> tuple[Gathered, ...]:
        """Batches in execution order, each marked fresh when none of its rows was written before."""
        result = []
        for key in sorted(self.batches):
            pieces = self.batches[key]
            q_index = np.stack([q for q, _ in pieces])
            fresh = not self.written[q_index].any()
            self.written[q_index] = True
            result.append(Gathered(torch.from_numpy(q_index), torch.from_numpy(np.stack([kv for _, kv in pieces])),
                                   fresh))
        return tuple(result)


def build_plan(dense: torch.Tensor, block_starts: torch.Tensor) -> Plan:
    """The pieces that compute exactly the kept blocks of `dense` (bool [blocks, blocks]).

    Per group of query blocks: rectangles for the long key runs they share; bicliques for the
    other key blocks that MIN_SHARED_ROWS or more of them keep; the rest of each row gathered,
    in one piece with every other query block whose rest is the same. Execution order: the
    rests (one piece per row, written directly), the bicliques (in rounds, so that no batch
    repeats a row), the rectangles.
    """
    mask = dense.cpu().numpy().astype(bool)
    starts = block_starts.cpu().numpy().astype(np.int64)
    unit = int(np.gcd.reduce(starts))
    units_of = [np.arange(starts[b] // unit, starts[b + 1] // unit) for b in range(mask.shape[0])]

    def units(blocks: np.ndarray | list[int]) -> np.ndarray:
        return np.concatenate([units_of[b] for b in blocks])

    rects: list[tuple[int, int, int, int]] = []
    batcher = _PieceBatcher(int(starts[-1]) // unit)
    whole_rows = _PieceBatcher(int(starts[-1]) // unit)
    rests: dict[bytes, list[int]] = {}
    for first, end, common in _row_groups(mask, starts):
        begins, ends, _ = _long_runs(common, starts)
        left = mask[first:end].copy()
        for begin, stop in zip(begins, ends):
            left[:, begin:stop] = False
            rects.append((int(starts[first]), int(starts[end]), int(starts[begin]), int(starts[stop])))
        rounds = np.zeros(end - first, dtype=np.int64)
        for rows, columns in _shared_columns(left):
            round_ = int(rounds[rows].max())
            rounds[rows] = round_ + 1
            batcher.add(1, round_, units(first + rows), units(columns))
            left[np.ix_(rows, columns)] = False
        for row in range(end - first):
            if left[row].any():
                rests.setdefault(left[row].tobytes(), []).append(first + row)
            if mask[first + row].any():
                whole_rows.add(0, 0, units_of[first + row], units(np.flatnonzero(mask[first + row])))
    for rest, blocks in rests.items():
        batcher.add(0, 0, units(blocks), units(np.flatnonzero(np.frombuffer(rest, dtype=bool))))
    gathered = batcher.build()
    written = np.repeat(batcher.written, unit)
    pieces = []
    for q_start, q_end, k_start, k_end in _merge_stacked(rects):
        pieces.append(Rect(q_start, q_end, k_start, k_end, fresh=not written[q_start:q_end].any()))
        written[q_start:q_end] = True
    pairs = sum((r.q_end - r.q_start) * (r.k_end - r.k_start) for r in pieces) + sum(
        group.q_index.numel() * group.kv_index.shape[1] * unit * unit for group in gathered)
    return Plan(unit, gathered, tuple(pieces), whole_rows.build(), pairs)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
            bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention of one piece: (output in q's dtype, log-sum-exp in float32/float64).

    `bias` (additive, broadcast to [B, H, Nq, Nk]) comes from a key mask; see `_masked_lse`.
    """
    if bias is None:
        return cpu_flash_attention()(q, k, v, scale)
    return cpu_flash_attention()(q, k, v, scale, bias)


def _masked_lse(lse: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """`lse` with -inf on the rows whose keys the bias removes entirely.

    torch's CPU flash kernel returns zeros and a log-sum-exp of 0 for such rows; 0 would weigh them
    in a merge as if they had keys. `bias` is [..., 1, Nk] with `lse`'s leading dims.
    """
    return lse.masked_fill(torch.isneginf(bias).all(dim=-1), -math.inf)


def _piece_bias(key_bias: torch.Tensor, kv_index: torch.Tensor, unit: int, heads: int) -> torch.Tensor:
    """[B, N] -> [B, H * pieces, 1, kv_len]: the key bias of each gathered piece, in `_gather`'s head-major order."""
    b, pieces = key_bias.shape[0], kv_index.shape[0]
    bias = key_bias.index_select(1, _tokens(kv_index, unit)).view(b, 1, pieces, -1)
    return bias.expand(b, heads, pieces, bias.shape[-1]).reshape(b, heads * pieces, 1, bias.shape[-1])


def _merge_(acc: torch.Tensor, acc_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
            masked: bool = False) -> None:
    """(acc, acc_lse) <- the softmax-weighted union of (acc, acc_lse) and (out, lse), in place.

    The two weights exp(acc_lse - total) and exp(lse - total) sum to one: one lerp pass. With a key
    mask (`masked`) both halves of a row may have no key (-inf): its weight, NaN, is taken as 0.
    """
    total = torch.logaddexp(acc_lse, lse)
    weight = (lse - total).exp_()
    if masked:
        weight = weight.nan_to_num_(0.0)
    acc.lerp_(out.to(acc.dtype), weight.unsqueeze(-1))
    acc_lse.copy_(total)


def _chunks(group: Gathered, per_block: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(q_index, kv_index) slices of `group` with at most GATHER_BUDGET elements of work each."""
    step = max(1, GATHER_BUDGET // max(per_block, 1))
    for begin in range(0, group.q_index.shape[0], step):
        yield group.q_index[begin:begin + step], group.kv_index[begin:begin + step]


class _Workspace(threading.local):
    """Gather buffers kept between calls: fresh large allocations cost page faults, as much as the copy."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def take(self, name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        buffer = self.buffers.get((name, dtype))
        if buffer is None or buffer.numel() < numel:
            buffer = self.buffers[(name, dtype)] = torch.empty(numel, dtype=dtype)
        return buffer[:numel]


_workspace = _Workspace()


def _gather(x: torch.Tensor, index: torch.Tensor, unit: int, name: str) -> torch.Tensor:
    """[B, H, N, D] -> [B, H * blocks, len, D]: the units `index` ([blocks, len / unit]) of x, per block.

    Gathering runs of `unit` tokens (rows of unit * D elements) copies far faster than token by
    token. CPU results live in the workspace buffer `name` until the next gather into it.
    """
    b, h, n, d = x.shape
    units = x.view(b, h, n // unit, unit * d)
    shape = (b, h, index.numel(), unit * d)
    if x.device.type == "cpu":
        out = _workspace.take(name, math.prod(shape), x.dtype).view(shape)
        torch.index_select(units, 2, index.reshape(-1), out=out)
    else:
        out = units.index_select(2, index.reshape(-1))
    return out.view(b, h * index.shape[0], index.shape[1] * unit, d)


def _tokens(index: torch.Tensor, unit: int) -> torch.Tensor:
    """The token indices of the units `index`, flattened."""
    return (index.reshape(-1, 1) * unit + torch.arange(unit, device=index.device)).reshape(-1)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Plan, scale: float,
            key_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Block-sparse attention of [B, H, N, D] CPU tensors; returns [B, H, N, Dv] in q's dtype, contiguous.

    `key_bias` [B, N] (accumulation dtype: float32, float64 for float64) is added to each key's scores.
    """
    head_dim, value_dim = q.shape[-1], v.shape[-1]
    if value_dim != head_dim:
        # The fused kernel wants one head size: zero columns change neither scores nor outputs.
        width = max(head_dim, value_dim)
        q, k, v = (torch.nn.functional.pad(x, (0, width - x.shape[-1])) for x in (q, k, v))
    q, k, v = (x.contiguous() for x in (q, k, v))
    b, h, n, d = q.shape
    unit = plan.unit
    acc_dtype = _accumulation_dtype(q.dtype)
    acc = q.new_zeros((b, h, n, d), dtype=acc_dtype)
    acc_lse = q.new_full((b, h, n), -math.inf, dtype=acc_dtype)
    for group in plan.gathered:
        for q_index, kv_index in _chunks(group, b * h * group.kv_index.shape[1] * unit * 2 * d):
            bias = None if key_bias is None else _piece_bias(key_bias, kv_index, unit, h)
            out, lse = _attend(_gather(q, q_index, unit, "q"), _gather(k, kv_index, unit, "k"),
                               _gather(v, kv_index, unit, "v"), scale, bias)
            if bias is not None:
                lse = _masked_lse(lse, bias)
            rows = _tokens(q_index, unit)
            out, lse = out.reshape(b, h, rows.numel(), d), lse.reshape(b, h, rows.numel())
            if group.fresh:
                acc.index_copy_(2, rows, out.to(acc_dtype))
                acc_lse.index_copy_(2, rows, lse.to(acc_dtype))
            else:
                merged, merged_lse = acc.index_select(2, rows), acc_lse.index_select(2, rows)
                _merge_(merged, merged_lse, out, lse, key_bias is not None)
                acc.index_copy_(2, rows, merged)
                acc_lse.index_copy_(2, rows, merged_lse)
    for rect in plan.rects:
        rows = slice(rect.q_start, rect.q_end)
        keys = slice(rect.k_start, rect.k_end)
        bias = None if key_bias is None else key_bias[:, None, None, keys]
        out, lse = _attend(q[:, :, rows], k[:, :, keys], v[:, :, keys], scale, bias)
        if bias is not None:
            lse = _masked_lse(lse, bias)
        if rect.fresh:
            acc[:, :, rows] = out
            acc_lse[:, :, rows] = lse
        else:
            _merge_(acc[:, :, rows], acc_lse[:, :, rows], out, lse, key_bias is not None)
    # (contiguous: the fake implementation promises it, also when the value dim was padded above)
    return acc[..., :value_dim].to(q.dtype).contiguous()


def _softmax_of_masked(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim where whole rows may be -inf (a key mask removed every key): those give 0."""
    top = scores.amax(dim=-1, keepdim=True)
    probs = (scores - top.masked_fill_(torch.isneginf(top), 0.0)).exp_()
    total = probs.sum(dim=-1, keepdim=True)
    return probs.div_(total.masked_fill_(total == 0, 1.0))


def backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: Plan,
    scale: float,
    key_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of `forward`, recomputing attention one chunk of query blocks at a time.

    Plain tensor ops, so it runs on any device; it accumulates in float32 (float64 for float64).
    The gradients are contiguous.
    """
    q, k, v, grad_out = (x.contiguous() for x in (q, k, v, grad_out))
    b, h, _, d = q.shape
    value_dim = v.shape[-1]
    dtype = _accumulation_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=dtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=dtype, device=q.device)
    dv = torch.zeros(v.shape, dtype=dtype, device=q.device)

    unit = plan.unit

    def gathered(x: torch.Tensor, index: torch.Tensor, name: str) -> torch.Tensor:
        return _gather(x, index, unit, name).to(dtype)

    for group in plan.rows:
        q_len, kv_len = group.q_index.shape[1] * unit, group.kv_index.shape[1] * unit
        per_block = b * h * max(q_len * kv_len * 3, kv_len * (d + value_dim))
        for q_index, kv_index in _chunks(group, per_block):
            q_index, kv_index = q_index.to(q.device), kv_index.to(q.device)
            qg, kg, vg = gathered(q, q_index, "q"), gathered(k, kv_index, "k"), gathered(v, kv_index, "v")
            grad = gathered(grad_out, q_index, "grad")
            scores = torch.matmul(qg, kg.transpose(-1, -2)) * scale
            if key_bias is None:
                probs = torch.softmax(scores, dim=-1)
            else:
                pieces = q_index.shape[0]
                bias = key_bias.index_select(1, _tokens(kv_index, unit)).view(b, 1, pieces, 1, kv_len)
                scores = scores.view(b, h, pieces, q_len, kv_len).add_(bias).view(b, h * pieces, q_len, kv_len)
                probs = _softmax_of_masked(scores)
            out = torch.matmul(probs, vg)
            dv_g = torch.matmul(probs.transpose(-1, -2), grad)
            dprobs = torch.matmul(grad, vg.transpose(-1, -2))
            dscores = probs.mul_(dprobs.sub_((grad * out).sum(-1, keepdim=True))).mul_(scale)
            dq_g = torch.matmul(dscores, kg)
            dk_g = torch.matmul(dscores.transpose(-1, -2), qg)
            rows, keys = _tokens(q_index, unit), _tokens(kv_index, unit)
            dq.index_copy_(2, rows, dq_g.reshape(b, h, rows.numel(), d))
            dk.index_add_(2, keys, dk_g.reshape(b, h, keys.numel(), d))
            dv.index_add_(2, keys, dv_g.reshape(b, h, keys.numel(), value_dim))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
