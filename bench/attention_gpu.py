"""The attention table on CUDA: our two kernels beside the dense and sparse peers, in one run.

For each shape (frames x tokens per frame, heads x head dim, dtype; Sculpt4D mask, blocks of 128):

- dense peers: cuDNN SDPA and flash SDPA, without a mask (what the mask saves);
- sparse peers on the BlockMask our FlexAttention path builds and caches (`t4dopt.ops.tables`):
  FlexAttention compiled, and FlashAttention-4 through FlexAttention's ``BACKEND="FLASH"``
  where ``flash_attn.cute`` is installed (a note says why where it is not);
- ours: ``t4dopt.block_sparse_attention`` with ``T4D_CUDA_KERNEL=triton`` and ``=flex``.

After a first call of each (compilation and autotuning, timed), every round calls all of them
in turn, the order rotating, each timed with CUDA events; the figures are medians over the
rounds, so the ratios come from the same minutes of the same card. Also: effective TFLOP/s
(dense FLOPs x density / time; dense FLOPs / time for the dense peers), the ideal 1/density,
each sparse candidate's error against float64 attention with the explicit mask on sampled
query rows, and what a new table costs (layout, Triton plan, BlockMask, host time of a call).

On CPU (``bench/gpu.py --dry-run``) the same functions run small shapes: our Triton path in
Triton's interpreter (``TRITON_INTERPRET=1``, set before triton is imported) through the
op's CUDA forward function, our Flex path and FlexAttention compiled for CPU, and the math
(for cuDNN) and CPU flash SDPA backends; FlashAttention-4 is CUDA-only and noted as skipped.

    python bench/attention_gpu.py [--shapes 8x4096/16x128/bf16/fa4 ...] [--device cuda|cpu]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from device_info import describe, fa4_unavailable  # noqa: E402
from part_result import Column, PartResult  # noqa: E402
from t4dopt import masks  # noqa: E402
from t4dopt.block_layout import BlockLayout  # noqa: E402
from t4dopt.ops import block_sparse, block_sparse_attention, flex_path, tables, triton_kernel  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_SHAPES = ("8x4096/16x128/bf16/fa4", "16x4096/16x128/bf16/fa4", "32x4096/16x128/bf16/fa4",
                  "16x4096/32x64/bf16", "16x4096/16x128/fp16")
"""DESIGN.md's shapes (16 heads x 128, bf16, 8/16/32 frames of 4096 tokens), then 64-dim heads
(32 of them: the same hidden size and FLOPs) and fp16 at 16 frames. ``/fa4``: FA4 runs there too."""

CANDIDATES = {"cudnn": "cuDNN SDPA", "flash": "flash SDPA", "flex": "FlexAttention", "fa4": "FA4 (Flex FLASH)",
              "triton": "ours, Triton", "flexpath": "ours, Flex path"}
SPARSE = ("flex", "fa4", "triton", "flexpath")
REFERENCE_ROWS = 16
"""Query rows checked against float64 attention with the explicit mask (all heads)."""


@dataclass(frozen=True)
class Shape:
    frames: int
    tokens_per_frame: int
    heads: int
    head_dim: int
    dtype: str
    fa4: bool = False

    @classmethod
    def parse(cls, spec: str) -> Shape:
        """``FRAMESxTOKENS/HEADSxDIM/DTYPE[/fa4]``, e.g. ``16x4096/16x128/bf16/fa4``."""
        try:
            grid, heads, dtype, *rest = spec.split("/")
            frames, tokens = (int(x) for x in grid.split("x"))
            count, dim = (int(x) for x in heads.split("x"))
            if dtype not in DTYPES or rest not in ([], ["fa4"]):
                raise ValueError
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"shape {spec!r}: expected FRAMESxTOKENS/HEADSxDIM/DTYPE[/fa4] with DTYPE one of "
                f"{', '.join(DTYPES)}, e.g. 16x4096/16x128/bf16/fa4") from None
        return cls(frames, tokens, count, dim, dtype, fa4=rest == ["fa4"])

    @property
    def label(self) -> str:
        return f"{self.frames}x{self.tokens_per_frame}/{self.heads}x{self.head_dim}/{self.dtype}"


class BrokenContext(RuntimeError):
    """A CUDA error left the context unusable: the rest of this process cannot measure anything."""


# ------------------------------------------------------------------------------------ candidates

@contextlib.contextmanager
def cuda_kernel(name: str) -> Iterator[None]:
    """Run the op's CUDA forward on `name` (``triton`` or ``flex``) inside the block."""
    previous = os.environ.get(block_sparse.CUDA_KERNEL_ENV)
    os.environ[block_sparse.CUDA_KERNEL_ENV] = name
    try:
        yield
    finally:
        if previous is None:
            del os.environ[block_sparse.CUDA_KERNEL_ENV]
        else:
            os.environ[block_sparse.CUDA_KERNEL_ENV] = previous


def op_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout, kernel: str) -> torch.Tensor:
    """Our op's CUDA forward on `kernel`.

    On CUDA tensors this is the op as users call it (dispatch and table lookup included). CPU
    tensors would dispatch to the CPU kernel, so for the dry run this calls the op's CUDA kernel
    function directly: the same table lookup, plan or BlockMask and kernels (Triton interpreted).
    """
    with cuda_kernel(kernel):
        if q.is_cuda:
            return block_sparse_attention(q, k, v, layout)
        return block_sparse._forward_cuda(q, k, v, *tables.layout_tensors(layout, q.device), layout.block_size)


def sdpa_backends(device: torch.device) -> dict[str, object]:
    """The SDPA backend behind each dense peer: cuDNN and flash on CUDA; math and CPU flash on CPU."""
    from torch.nn.attention import SDPBackend

    if device.type == "cuda":
        return {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}
    return {"cudnn": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION}


def _sdpa(backend, q, k, v) -> Callable[[], torch.Tensor]:
    from torch.nn.attention import sdpa_kernel

    def run():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)
    return run


_compiled_flex = None


def compiled_flex():
    """flex_attention compiled once per process, as a user would (separately from our Flex path's)."""
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


# ---------------------------------------------------------------------------------------- checks

def reference_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout,
                   rows: torch.Tensor) -> torch.Tensor:
    """Exact attention of the query rows `rows` [R] (on any device) in float64: [B, H, R, Dv], on q's device.

    The boolean key mask of each row comes from the layout's block table (query block ->
    kept key blocks -> their tokens); rows that keep no key are zeros, as the op returns.
    """
    block_of_token = layout.block_of_token()
    key_mask = layout.to_dense()[block_of_token[rows.cpu()]][:, block_of_token].to(q.device)  # [R, N]
    rows = rows.to(q.device)
    scale = q.shape[-1] ** -0.5
    heads = []
    for h in range(q.shape[1]):  # one head at a time: K and V of 131k tokens in float64 are 128 MiB each
        scores = (q[:, h, rows].double() @ k[:, h].double().transpose(-1, -2)) * scale
        probs = torch.softmax(scores.masked_fill(~key_mask, float("-inf")), dim=-1).nan_to_num(0.0)
        heads.append(probs @ v[:, h].double())
    return torch.stack(heads, dim=1)


def sampled_rows(seq_len: int, count: int = REFERENCE_ROWS) -> torch.Tensor:
    """The first and last query row and `count` - 2 others drawn with a fixed seed."""
    generator = torch.Generator().manual_seed(1)
    middle = torch.randperm(seq_len - 2, generator=generator)[: max(count - 2, 0)] + 1
    return torch.cat([torch.tensor([0]), middle.sort().values, torch.tensor([seq_len - 1])])


def relative_error(out: torch.Tensor, expected: torch.Tensor, rows: torch.Tensor) -> float:
    got = out[:, :, rows.to(out.device)].double()
    return float((got - expected).norm() / expected.norm().clamp_min(1e-30))


def _short(error: Exception) -> str:
    """The exception's type and the first line of its message, for a table cell."""
    lines = str(error).splitlines()
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


def _check_context(device: torch.device, after: str) -> None:
    if device.type != "cuda":
        return
    try:
        torch.cuda.synchronize(device)
    except Exception as error:  # noqa: BLE001 - any CUDA error here means the context is gone
        raise BrokenContext(f"CUDA context unusable after {after}: {error}") from error


# ---------------------------------------------------------------------------------------- timing

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Timing:
    median_ms: float
    spread_ms: tuple[float, float]
    """(min, max) over the rounds."""
    host_ms: float
    """Median host time of a call (until it returns, without waiting for the device)."""


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, device: torch.device) -> dict[str, Timing]:
    """Time every function once per round, in turns (the order rotating each round).

    CUDA: device time between events around each call; CPU: wall time of each call.
    """
    names = list(fns)
    device_ms: dict[str, list[float]] = {n: [] for n in names}
    host_ms: dict[str, list[float]] = {n: [] for n in names}
    cuda = device.type == "cuda"
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        events = []
        for name in order:
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            began = time.perf_counter()
            fns[name]()
            host = (time.perf_counter() - began) * 1e3
            if cuda:
                end.record()
                events.append((name, start, end))
            else:
                device_ms[name].append(host)
            host_ms[name].append(host)
        if cuda:
            torch.cuda.synchronize(device)
            for name, start, end in events:
                device_ms[name].append(start.elapsed_time(end))
    return {n: Timing(statistics.median(device_ms[n]), (min(device_ms[n]), max(device_ms[n])),
                      statistics.median(host_ms[n])) for n in names}


def choose_rounds(round_ms: float, target_s: float, min_rounds: int, max_rounds: int) -> int:
    """Rounds that fill about `target_s` when one round takes `round_ms`, within the bounds."""
    wanted = int(target_s * 1e3 / max(round_ms, 1e-3))
    return max(min_rounds, min(max_rounds, wanted))


# ----------------------------------------------------------------------------------------- table

def dense_flops(shape: Shape) -> float:
    seq_len = shape.frames * shape.tokens_per_frame
    return 4.0 * shape.heads * seq_len ** 2 * shape.head_dim


SHAPE_COLUMNS = [Column("frames", "frames"), Column("heads", "heads x dim"), Column("dtype", "dtype"),
                 Column("tokens", "tokens"), Column("density", "density", "{:.3f}")]
TIME_COLUMNS = SHAPE_COLUMNS + [Column(f"{k}_ms", f"{label} ms", "{:.2f}") for k, label in CANDIDATES.items()] + [
    Column("rounds", "rounds")]
RATIO_COLUMNS = SHAPE_COLUMNS[:3] + [
    Column("ideal", "ideal 1/density", "{:.2f}x"),
    Column("triton_vs_cudnn", "Triton vs cuDNN", "{:.2f}x"),
    Column("triton_of_ideal", "Triton of ideal", "{:.2f}"),
    Column("triton_vs_flex", "Triton vs Flex", "{:.2f}x"),
    Column("triton_vs_fa4", "Triton vs FA4", "{:.2f}x"),
    Column("flexpath_vs_cudnn", "Flex path vs cuDNN", "{:.2f}x"),
    Column("flexpath_vs_flex", "Flex path vs Flex", "{:.2f}x"),
    Column("flex_vs_cudnn", "Flex vs cuDNN", "{:.2f}x"),
    Column("fa4_vs_cudnn", "FA4 vs cuDNN", "{:.2f}x"),
] + [Column(f"{k}_tflops", f"{label} TFLOP/s", "{:.3g}") for k, label in CANDIDATES.items()]
COST_COLUMNS = SHAPE_COLUMNS[:3] + [
    Column("layout_ms", "layout ms", "{:.1f}"), Column("plan_ms", "Triton plan ms", "{:.1f}"),
    Column("block_mask_ms", "BlockMask ms", "{:.1f}"),
    Column("triton_host_ms", "host/call Triton ms", "{:.3f}"),
    Column("flexpath_host_ms", "host/call Flex path ms", "{:.3f}"),
] + [Column(f"{k}_first_ms", f"first call {label} ms", "{:.0f}") for k, label in CANDIDATES.items()] + [
    Column(f"{k}_error", f"rel. err {CANDIDATES[k]}", "{:.1e}") for k in SPARSE] + [
    Column("triton_config", "Triton tiles, config"), Column("errors", "errors")]


def _ratio(row: dict, numerator: str, denominator: str) -> float | None:
    a, b = row.get(f"{numerator}_ms"), row.get(f"{denominator}_ms")
    return None if a is None or b is None else a / b


def measure_shape(shape: Shape, block_size: int, device: torch.device, *, target_s: float, min_rounds: int,
                  max_rounds: int, say: Callable[[str], None] = print) -> dict:
    """One row of the table: times, costs, errors of every candidate on `shape`."""
    dtype = DTYPES[shape.dtype]
    start = time.perf_counter()
    layout = masks.sculpt4d(shape.frames, shape.tokens_per_frame, block_size=block_size)
    row: dict = {"frames": shape.frames, "heads": f"{shape.heads}x{shape.head_dim}", "dtype": shape.dtype,
                 "tokens": layout.seq_len, "layout_ms": (time.perf_counter() - start) * 1e3}
    row["density"] = density = layout.density
    row["ideal"] = 1 / density
    block_m, block_n = triton_kernel.tile_sizes(int(layout.block_lengths.max()))
    start = time.perf_counter()
    triton_kernel.build_plan(layout.to_dense(), layout.block_starts, block_m=block_m, block_n=block_n, device=device)
    _sync(device)
    row["plan_ms"] = (time.perf_counter() - start) * 1e3
    start = time.perf_counter()
    flex_path.build_block_mask(layout.to_dense(), layout.block_starts, layout.block_size, device)
    _sync(device)
    row["block_mask_ms"] = (time.perf_counter() - start) * 1e3

    generator = torch.Generator(device=device).manual_seed(shape.frames)
    q, k, v = (torch.randn((1, shape.heads, layout.seq_len, shape.head_dim), generator=generator, device=device,
                           dtype=dtype) for _ in range(3))
    errors: list[str] = []
    fns: dict[str, Callable[[], torch.Tensor]] = {}
    outputs: dict[str, torch.Tensor] = {}

    def first_call(key: str, fn: Callable[[], torch.Tensor]) -> None:
        say(f"  {shape.label}: first call of {CANDIDATES[key]}")
        try:
            _sync(device)
            start = time.perf_counter()
            outputs[key] = fn()
            _sync(device)
            row[f"{key}_first_ms"] = (time.perf_counter() - start) * 1e3
            fns[key] = fn
        except Exception as error:  # noqa: BLE001 - a failing candidate is reported, the others still run
            errors.append(f"{CANDIDATES[key]}: {_short(error)}")
            say(f"  {shape.label}: {errors[-1]}")
            _check_context(device, f"the first call of {CANDIDATES[key]}")

    # Ours first, so that their first calls include decoding the table and building the plan / BlockMask.
    first_call("triton", lambda: op_forward(q, k, v, layout, "triton"))
    first_call("flexpath", lambda: op_forward(q, k, v, layout, "flex"))
    # The BlockMask our Flex path built and cached for this table: the sparse peers run on the same one.
    block_mask = tables.table_for(q, *tables.layout_tensors(layout, q.device)).block_mask(layout.block_size, q.device)
    first_call("flex", lambda: compiled_flex()(q, k, v, block_mask=block_mask))
    reason = fa4_unavailable(device) if shape.fa4 else None
    if shape.fa4 and reason is None:
        first_call("fa4", lambda: compiled_flex()(q, k, v, block_mask=block_mask, kernel_options={"BACKEND": "FLASH"}))
    for key, backend in sdpa_backends(device).items():
        first_call(key, _sdpa(backend, q, k, v))
    if reason is not None:
        row["fa4_note"] = reason

    rows = sampled_rows(layout.seq_len)
    expected = reference_rows(q, k, v, layout, rows)
    for key in SPARSE:
        if key in outputs:
            row[f"{key}_error"] = relative_error(outputs[key], expected, rows)
    outputs.clear()

    timings: dict[str, Timing] = {}
    if fns:
        try:
            warm = interleaved(fns, 1, device)
            rounds = choose_rounds(sum(t.median_ms for t in warm.values()), target_s, min_rounds, max_rounds)
            say(f"  {shape.label}: {rounds} rounds of {len(fns)} candidates")
            timings = interleaved(fns, rounds, device)
            row["rounds"] = rounds
        except Exception as error:  # noqa: BLE001 - e.g. out of memory: the row keeps its first calls and errors
            errors.append(f"timed rounds: {_short(error)}")
            say(f"  {shape.label}: {errors[-1]}")
        _check_context(device, "the timed rounds")
    for key, timing in timings.items():
        row[f"{key}_ms"] = timing.median_ms
        flops = dense_flops(shape) * (density if key in SPARSE else 1.0)
        row[f"{key}_tflops"] = flops / (timing.median_ms * 1e-3) / 1e12
        if key in ("triton", "flexpath"):
            row[f"{key}_host_ms"] = timing.host_ms
    for name, (numerator, denominator) in {
        "triton_vs_cudnn": ("cudnn", "triton"), "triton_vs_flex": ("flex", "triton"),
        "triton_vs_fa4": ("fa4", "triton"),
        "flexpath_vs_cudnn": ("cudnn", "flexpath"), "flexpath_vs_flex": ("flex", "flexpath"),
        "flex_vs_cudnn": ("cudnn", "flex"), "fa4_vs_cudnn": ("cudnn", "fa4"),
    }.items():
        row[name] = _ratio(row, numerator, denominator)
    if row["triton_vs_cudnn"] is not None:
        row["triton_of_ideal"] = row["triton_vs_cudnn"] / row["ideal"]
    tuned = triton_kernel.tuned_config(shape.head_dim, dtype)
    row["triton_config"] = f"{block_m}x{block_n}, {tuned}" if tuned else f"{block_m}x{block_n}, default config"
    row["errors"] = "; ".join(errors) or None
    del q, k, v
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def run(shapes: Sequence[Shape], *, block_size: int = 128, device: str = "cuda", target_s: float = 2.0,
        min_rounds: int = 3, max_rounds: int = 10, result: PartResult | None = None) -> PartResult:
    """Measure every shape into `result` (tables ``times``, ``ratios``, ``costs``), row by row."""
    result = result or PartResult()
    dev = torch.device(device)
    result.environment = describe(dev)
    # Several shapes and kernel options recompile flex_attention; past dynamo's limit it would
    # silently run unfused, which would be a wrong figure.
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 64))
    times = result.table("times", TIME_COLUMNS, "Medians over interleaved rounds (CUDA events), ms")
    ratios = result.table("ratios", RATIO_COLUMNS, "Speedups from the same rounds (a/b > 1: b is faster); "
                          "TFLOP/s: dense FLOPs x density / time (dense peers: dense FLOPs)")
    costs = result.table("costs", COST_COLUMNS, "What a table costs: layout (policy -> block table), Triton plan, "
                         "BlockMask; host time of a call; first calls (compile / autotune included); error against "
                         f"float64 attention with the explicit mask on {REFERENCE_ROWS} query rows")
    with torch.no_grad():
        for shape in shapes:
            print(f"attention {shape.label}", flush=True)
            torch._dynamo.reset()  # a fresh set of compiled flex_attention graphs for each shape
            row = measure_shape(shape, block_size, dev, target_s=target_s, min_rounds=min_rounds,
                                max_rounds=max_rounds)
            for table in (times, ratios, costs):
                result.add_row(table, row)
            if row.get("fa4_note") and not any(row["fa4_note"] in n for n in result.notes):
                result.note(row["fa4_note"])
    return result


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", type=Shape.parse, nargs="+", default=[Shape.parse(s) for s in DEFAULT_SHAPES])
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--target-s", type=float, default=2.0, help="timed rounds per shape fill about this long")
    parser.add_argument("--min-rounds", type=int, default=3)
    parser.add_argument("--max-rounds", type=int, default=10)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None, result: PartResult | None = None) -> PartResult:
    args = parse_args(argv)
    result = run(args.shapes, block_size=args.block_size, device=args.device, target_s=args.target_s,
                 min_rounds=args.min_rounds, max_rounds=args.max_rounds, result=result)
    print(result.markdown())
    return result


if __name__ == "__main__":
    main()
