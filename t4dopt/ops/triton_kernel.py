"""Block-sparse flash attention forward in Triton, over the op's block table.

The block table is turned once per table into a `Plan` of tiles (`build_plan`):

* query tiles: each query block cut into tiles of at most ``block_m`` tokens (blocks of any
  length work; unequal blocks just give shorter tiles);
* key chunks: each query block's kept key blocks merged into runs of consecutive tokens, and
  each run cut into chunks of at most ``block_n`` tokens, the kernel's key tile. Runs of short
  blocks (a prefix block and the frame after it, a frame's partial last block and the next
  frame) fill whole tiles instead of one short tile per block. Full chunks (exactly
  ``block_n`` tokens) and partial ones (at most one per run) are listed apart: the kernel runs
  the full ones in a loop without any masking, and only the few partial ones pay for it.
* schedule: the query tiles sorted by descending number of chunks (longest processing time
  first), so the longest rows start first and the grid ends on short rows instead of a
  straggler. The grid is (tiles, batch x heads) with tiles fastest: the programs in flight at
  once are one head's heaviest rows, which read the same key blocks (anchor frame, neighbour
  frames) at about the same time and share them in L2.

Each program runs the FlashAttention-2 forward for its query tile over its chunks: one tile of
Q, K and V loaded per chunk (software-pipelined over ``num_stages``), online softmax in float32
with ``exp2`` and the softmax scale folded into ``log2(e)``. It writes O and the
log-sum-exp (float32 [B, H, N], natural log; -inf on rows that keep no key, whose O is 0).

With a key mask (`t4dopt.ops.key_mask`), the kernel is compiled with ``HAS_BIAS``: each key tile
also loads its slice of the float32 key bias [B, N] and adds it to the scores, and the online
softmax guards rows whose scores are all -inf so far. Without one, that code is not compiled in.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from dataclasses import dataclass

import numpy as np
import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: supports() says so and the op keeps its other paths
    triton = tl = None

MAX_BLOCK_M = 128
"""Largest query tile (FlashAttention's on H100)."""
MAX_BLOCK_N = 64
"""Largest key tile. A 128 x 128 float32 score tile next to the 128 x 128 accumulator of head dim
128 spills registers on sm_90 (ptxas: 255 registers and a stack); 128 x 64 fits in about 210."""

HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_BATCH_HEADS = 65535
"""The grid's second dimension, batch x heads, is limited by CUDA to this."""

AUTOTUNE_ENV = "T4D_TRITON_AUTOTUNE"
"""``0`` skips autotuning on CUDA and launches the default configuration of `default_config`."""

LOG2_E = 1.4426950408889634
TILE_FIELDS = 6
"""A tile row: query tokens (start, end), its full chunks (begin, end), its partial chunks (begin, end)."""


# ------------------------------------------------------------------------------------------ plan

@dataclass(frozen=True)
class Plan:
    """What the kernel reads besides q, k, v: the query tiles in launch order and their key chunks."""

    block_m: int
    """Query tile: at most this many tokens of one query block."""
    block_n: int
    """Key tile: a chunk is at most this many consecutive key tokens that a whole query block keeps."""
    seq_len: int
    tiles: torch.Tensor
    """int32 [tiles, TILE_FIELDS], in launch order (most chunks first)."""
    full_starts: torch.Tensor
    """int32 [full chunks]: first key token of each chunk of exactly ``block_n`` tokens, row by row."""
    partial_starts: torch.Tensor
    """int32 [partial chunks]: first key token of each shorter chunk, row by row."""
    partial_ends: torch.Tensor
    """int32 [partial chunks]: one past the last key token of each shorter chunk."""

    @property
    def num_tiles(self) -> int:
        return int(self.tiles.shape[0])

    @property
    def chunks(self) -> int:
        return int(self.full_starts.numel() + self.partial_starts.numel())


def _next_power_of_two(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def tile_sizes(max_block_length: int) -> tuple[int, int]:
    """(block_m, block_n) for blocks of at most `max_block_length` tokens.

    The block length rounded up to a power of two (at least 16, the smallest ``tl.dot``), at
    most `MAX_BLOCK_M` / `MAX_BLOCK_N`: blocks of 32 get tiles of 32 rather than mostly empty
    tiles, and longer blocks are cut into several tiles.
    """
    tile = max(_next_power_of_two(max_block_length), 16)
    return min(tile, MAX_BLOCK_M), min(tile, MAX_BLOCK_N)


def _ranges(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(begin, end) of consecutive ranges of the given lengths."""
    end = np.cumsum(counts)
    return end - counts, end


def build_plan(dense: torch.Tensor, block_starts: torch.Tensor, *, block_m: int, block_n: int,
               device: torch.device | str = "cpu") -> Plan:
    """The plan of a block table: bool `dense` [blocks, blocks] and int64 `block_starts` [blocks + 1].

    Vectorized over runs and chunks (no loop over blocks); callers cache it per table.
    """
    if block_m < 1 or block_n < 1:
        raise ValueError(f"block_m={block_m} and block_n={block_n} must be positive")
    kept = dense.cpu().numpy().astype(bool, copy=False)
    starts = block_starts.cpu().numpy().astype(np.int64, copy=False)
    blocks = kept.shape[0]

    # Runs of consecutive kept key blocks: in each row, edges alternate run start, run stop.
    padded = np.zeros((blocks, blocks + 2), dtype=bool)
    padded[:, 1:-1] = kept
    rows, cols = np.nonzero(padded[:, 1:] != padded[:, :-1])
    run_rows, run_start, run_end = rows[0::2], starts[cols[0::2]], starts[cols[1::2]]

    # Each run cut into full chunks of `block_n` tokens from its start, and the rest, if any.
    full, rest = np.divmod(run_end - run_start, block_n)
    partial = rest > 0
    first, last = _ranges(full)
    full_starts = np.arange(last[-1] if last.size else 0) * block_n + np.repeat(run_start - first * block_n, full)
    partial_starts = (run_start + full * block_n)[partial]
    partial_ends = run_end[partial]
    full_begin, full_end = _ranges(np.bincount(run_rows, weights=full, minlength=blocks).astype(np.int64))
    partial_begin, partial_end = _ranges(np.bincount(run_rows[partial], minlength=blocks))

    # Query tiles, then the launch order: most chunks first, ties in token order.
    lengths = starts[1:] - starts[:-1]
    tiles_per_block = -(-lengths // block_m)
    tile_block = np.repeat(np.arange(blocks), tiles_per_block)
    tile_first, _ = _ranges(tiles_per_block)
    q_start = starts[tile_block] + (np.arange(tile_block.size) - tile_first[tile_block]) * block_m
    q_end = np.minimum(q_start + block_m, starts[tile_block + 1])
    fields = [q_start, q_end] + [x[tile_block] for x in (full_begin, full_end, partial_begin, partial_end)]
    work = (full_end - full_begin + partial_end - partial_begin)[tile_block]
    tiles = np.stack(fields, axis=1)[np.argsort(-work, kind="stable")]

    def as_tensor(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.int32)).to(device)

    return Plan(block_m, block_n, int(starts[-1]), as_tensor(tiles),
                *(as_tensor(x) for x in (full_starts, partial_starts, partial_ends)))


# ---------------------------------------------------------------------------------------- kernel

def _attend_tile(acc, l_i, m_i, q, k_ptrs, v_ptrs, bias_ptrs, kv_len, qk_scale, offs_n,
                 MASKED: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr):
    """One online-softmax step of a query tile over BLOCK_N keys (the first `kv_len` valid if MASKED).

    `m_i` is the running row maximum of the scores in log2 units (times ``scale * log2(e)``), so
    the exponent is one fused multiply-add; the scale is positive, so the maximum of the scaled
    scores is the scaled maximum. Without a key bias `m_i` is finite after a program's first step,
    as every chunk has a valid key, so ``m_i - m_new`` is never ``-inf - -inf``. A key bias (in
    natural units, at `bias_ptrs`) can remove every key of a chunk: then a row's maximum may stay
    -inf, and the exponents are taken against 0 instead (they are all exp2(-inf) = 0).
    """
    if MASKED:
        valid = offs_n < kv_len
        k = tl.load(k_ptrs, mask=valid[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
    scores = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    if MASKED:
        scores = tl.where(valid[None, :], scores, float("-inf"))
    if HAS_BIAS:
        if MASKED:
            bias = tl.load(bias_ptrs, mask=valid, other=float("-inf"))
        else:
            bias = tl.load(bias_ptrs)
        scores = scores * qk_scale + (bias * 1.4426950408889634)[None, :]  # natural log to log2 units
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(scores - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
    else:
        m_new = tl.maximum(m_i, tl.max(scores, 1) * qk_scale)
        p = tl.math.exp2(scores * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASKED:
        v = tl.load(v_ptrs, mask=valid[:, None], other=0.0)
    else:
        v = tl.load(v_ptrs)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
    return acc, l_i, m_new


def _forward_kernel(
    Q, K, V, Out, Lse, KeyBias, tiles, full_starts, partial_starts, partial_ends, qk_scale, heads,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on, stride_lb, stride_lh, stride_bb,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    tile = tl.program_id(0)
    batch_head = tl.program_id(1)
    b = (batch_head // heads).to(tl.int64)
    h = (batch_head % heads).to(tl.int64)
    fields = tiles + tile * 6  # the TILE_FIELDS fields of this tile
    q_start = tl.load(fields)
    q_len = tl.load(fields + 1) - q_start
    full_begin = tl.load(fields + 2)
    full_end = tl.load(fields + 3)
    partial_begin = tl.load(fields + 4)
    partial_end = tl.load(fields + 5)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    rows = offs_m < q_len
    q_ptrs = Q + b * stride_qb + h * stride_qh + q_start.to(tl.int64) * stride_qn
    q = tl.load(q_ptrs + offs_m[:, None] * stride_qn + offs_d[None, :], mask=rows[:, None], other=0.0)
    k_tile = K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :]
    v_tile = V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_dv[None, :]
    bias_tile = KeyBias + b * stride_bb + offs_n  # (not read without HAS_BIAS)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_V], dtype=tl.float32)
    for c in range(full_begin, full_end):
        key = tl.load(full_starts + c).to(tl.int64)
        acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, k_tile + key * stride_kn, v_tile + key * stride_vn,
                                     bias_tile + key, BLOCK_N, qk_scale, offs_n, False, HAS_BIAS, PRECISION)
    for c in range(partial_begin, partial_end):
        key = tl.load(partial_starts + c)
        kv_len = tl.load(partial_ends + c) - key
        key = key.to(tl.int64)
        acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, k_tile + key * stride_kn, v_tile + key * stride_vn,
                                     bias_tile + key, kv_len, qk_scale, offs_n, True, HAS_BIAS, PRECISION)

    # Rows that keep no key have l_i = 0 and acc = 0: O = 0, log-sum-exp = -inf.
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_ptrs = Out + b * stride_ob + h * stride_oh + q_start.to(tl.int64) * stride_on
    tl.store(o_ptrs + offs_m[:, None] * stride_on + offs_dv[None, :], out.to(Out.dtype.element_ty),
             mask=rows[:, None])
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453  # log2 units to natural log: times ln 2
    tl.store(Lse + b * stride_lb + h * stride_lh + q_start + offs_m, lse, mask=rows)


# Jitted here rather than decorated, so that the module (the plan, supports()) imports without triton.
if triton is not None:
    _attend_tile = triton.jit(_attend_tile)
    _forward_kernel = triton.jit(_forward_kernel)


# -------------------------------------------------------------------------------------- launcher

FAST_DTYPES = (torch.float16, torch.bfloat16)
"""Tensor-core dtypes. float32 runs exactly (``input_precision="ieee"``) but on CUDA cores, and
compiles for tens of seconds; the op keeps it on FlexAttention unless told otherwise."""


@dataclass(frozen=True)
class KernelConfig:
    num_warps: int
    num_stages: int


def default_config(head_dim: int, dtype: torch.dtype) -> KernelConfig:
    """The configuration launched without autotuning (and by the interpreter).

    Chosen with ptxas's register counts for sm_90 at block_m 128, block_n 64: 8 warps for head
    dim 128 (about 210 registers a thread, no spills), 4 for smaller heads; float32 takes 8
    warps and 2 stages to keep its CUDA-core tiles in registers and shared memory.
    """
    if dtype == torch.float32:
        return KernelConfig(8, 2)
    return KernelConfig(8 if head_dim >= 128 else 4, 3)


def autotune_configs(head_dim: int, dtype: torch.dtype) -> list[KernelConfig]:
    """The few configurations autotuning times on CUDA, the default first."""
    if dtype == torch.float32:
        return [default_config(head_dim, dtype)]
    if head_dim >= 128:
        configs = [KernelConfig(8, 2), KernelConfig(8, 3), KernelConfig(8, 4)]
    else:
        configs = [KernelConfig(4, 3), KernelConfig(4, 4), KernelConfig(8, 3)]
    default = default_config(head_dim, dtype)
    return [default] + [c for c in configs if c != default]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _autotuning() -> bool:
    return not _interpreting() and os.environ.get(AUTOTUNE_ENV, "1") != "0"


@functools.cache
def _tuned_kernel(head_dim: int, dtype: torch.dtype):
    """`_forward_kernel` under triton.autotune over `autotune_configs` (tuned once per tile shape and dtype)."""
    configs = [triton.Config({}, num_warps=c.num_warps, num_stages=c.num_stages)
               for c in autotune_configs(head_dim, dtype)]
    return triton.autotune(configs, key=["HEAD_DIM", "HEAD_DIM_V", "BLOCK_M", "BLOCK_N", "HAS_BIAS"])(_forward_kernel)


def tuned_config(head_dim: int, dtype: torch.dtype) -> KernelConfig | None:
    """The configuration autotuning last picked for this head dim and dtype; None if it has not run."""
    if triton is None or not _autotuning():
        return None
    best = getattr(_tuned_kernel(head_dim, dtype), "best_config", None)
    return None if best is None else KernelConfig(best.num_warps, best.num_stages)


def supports(q: torch.Tensor, v: torch.Tensor | None = None, scale: float | None = None) -> str | None:
    """None when the Triton kernel runs these inputs, else the reason it does not.

    Blocks of any length run (longer ones in several tiles), so the table is no reason.
    """
    if triton is None:
        return "triton is not installed"
    if q.device.type != "cuda" and not _interpreting():
        return f"{q.device.type} tensors (the kernel runs on CUDA, or on CPU under TRITON_INTERPRET=1)"
    if q.dtype not in DTYPES:
        return f"dtype {q.dtype} (the kernel takes float16, bfloat16 and float32)"
    for name, dim in (("q/k", q.shape[-1]), ("v", (v if v is not None else q).shape[-1])):
        if dim not in HEAD_DIMS:
            return f"{name} head dim {dim} (the kernel takes {', '.join(map(str, HEAD_DIMS))})"
    if q.dim() != 4 or q.shape[0] * q.shape[1] > MAX_BATCH_HEADS:
        return f"shape {tuple(q.shape)} (the kernel takes [B, H, N, D] with B * H <= {MAX_BATCH_HEADS})"
    if scale is not None and not scale > 0:
        return f"softmax scale {scale} (the kernel assumes a positive scale)"
    return None


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Plan, scale: float,
            config: KernelConfig | None = None, *,
            key_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, H, N, Dv] in q's dtype, lse float32 [B, H, N]) of q, k, v over the plan's blocks.

    Any strides in B, H and N; a last dimension that is not contiguous is copied. The plan
    must be on q's device. `config` fixes the launch configuration; by default CUDA autotunes
    (unless ``T4D_TRITON_AUTOTUNE=0``) and the interpreter takes `default_config`. `key_bias`
    [B, N] is added to each key's scores (float32, natural units; -inf removes the key).
    """
    reason = supports(q, v, scale)
    if reason is not None:
        raise ValueError(f"the Triton block-sparse kernel does not run {reason}")
    if k.shape != q.shape or v.shape[:3] != q.shape[:3] or not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k [B, H, N, D] and v [B, H, N, Dv] must agree and share a dtype, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}, {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[2] != plan.seq_len or plan.tiles.device != q.device:
        raise ValueError(f"q/k/v have N={q.shape[2]} tokens on {q.device}; the plan covers "
                         f"{plan.seq_len} on {plan.tiles.device}")
    if key_bias is not None:
        if key_bias.shape != (q.shape[0], q.shape[2]) or key_bias.device != q.device:
            raise ValueError(f"key_bias must be [B, N] = {[q.shape[0], q.shape[2]]} on {q.device}, "
                             f"got {list(key_bias.shape)} on {key_bias.device}")
        key_bias = _last_dim_contiguous(key_bias.float())
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    out, lse = empty_outputs(q, v)
    if out.numel() == 0:
        return out, lse
    widest = max(q.shape[-1], v.shape[-1])
    # Triton launches on the current device: make it q's.
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        if config is None and _autotuning():
            launch(_tuned_kernel(widest, q.dtype), q, k, v, out, lse, plan, scale, None, key_bias)
        else:
            launch(_forward_kernel, q, k, v, out, lse, plan, scale, config or default_config(widest, q.dtype),
                   key_bias)
    return out, lse


def empty_outputs(q: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Uninitialised out [B, H, N, Dv] in q's dtype and lse float32 [B, H, N] for a launch."""
    batch, heads, seq_len, _ = q.shape
    out = torch.empty(batch, heads, seq_len, v.shape[-1], device=q.device, dtype=q.dtype)
    return out, torch.empty(batch, heads, seq_len, device=q.device, dtype=torch.float32)


def launch(kernel, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
           plan: Plan, scale: float, config: KernelConfig | None, key_bias: torch.Tensor | None = None) -> None:
    """Launch `kernel` (`_forward_kernel`, autotuned or wrapped for a triton_op) over `plan`'s tiles.

    `config` None leaves the launch configuration to an autotuned `kernel`. `key_bias`: float32
    [B, N] with a contiguous last dim, or None (the kernel is then compiled without it).
    """
    heads = q.shape[1]
    bias = lse if key_bias is None else key_bias  # (a float32 pointer the kernel never reads without HAS_BIAS)
    args = (q, k, v, out, lse, bias, plan.tiles, plan.full_starts, plan.partial_starts, plan.partial_ends,
            scale * LOG2_E, heads,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *lse.stride()[:2],
            0 if key_bias is None else key_bias.stride(0))
    meta = dict(HEAD_DIM=q.shape[-1], HEAD_DIM_V=v.shape[-1], BLOCK_M=plan.block_m, BLOCK_N=plan.block_n,
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32", HAS_BIAS=key_bias is not None)
    if config is not None:
        meta.update(num_warps=config.num_warps, num_stages=config.num_stages)
    kernel[(plan.num_tiles, q.shape[0] * heads)](*args, **meta)
