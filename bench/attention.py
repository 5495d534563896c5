"""Benchmark: t4d block-sparse attention against dense and FlexAttention baselines.

CUDA (default when available): bf16, B=1, 16 heads x 128, 4096 tokens per frame, Sculpt4D mask
with blocks of 128, for 8, 16 and 32 frames; cuDNN and flash SDPA, FlexAttention dense and
sparse, and ours twice: the op on its Triton kernel and on its FlexAttention path
(``T4D_CUDA_KERNEL=triton|flex``), timed with ``triton.testing.do_bench`` (medians). Then what a
new table costs: the plans, the host time of a call, and the first calls (compilation and
autotuning included). CPU (``--device cpu``, the default without CUDA): fp32, 1 x 4 heads x 64,
8 frames x 512 tokens, blocks of 64; dense SDPA against ours. Prints markdown tables.

    python bench/attention.py [--device cpu|cuda] [--frames 8 16 32] [--dtype bf16|fp16|fp32]
                              [--heads 16] [--head-dim 128] [--tokens-per-frame 4096] [--block-size 128]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from t4dopt import masks  # noqa: E402
from t4dopt.block_layout import BlockLayout  # noqa: E402
from t4dopt.ops import block_sparse, block_sparse_attention, flex_path, triton_kernel  # noqa: E402

CUDA_DEFAULTS = dict(frames=[8, 16, 32], dtype="bfloat16", heads=16, head_dim=128, tokens_per_frame=4096,
                     block_size=128)
CPU_DEFAULTS = dict(frames=[8], dtype="float32", heads=4, head_dim=64, tokens_per_frame=512, block_size=64)
CREATE_BLOCK_MASK_MAX_TOKENS = 65536
"""Above this, FlexAttention's sparse baseline takes our table (from_kv_blocks) instead of create_block_mask."""
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--frames", type=int, nargs="+")
    parser.add_argument("--dtype", type=lambda name: DTYPE_ALIASES.get(name, name),
                        choices=["float32", "float16", "bfloat16"], help="also fp32, fp16, bf16")
    parser.add_argument("--heads", type=int)
    parser.add_argument("--head-dim", type=int)
    parser.add_argument("--tokens-per-frame", type=int)
    parser.add_argument("--block-size", type=int)
    args = parser.parse_args()
    defaults = CUDA_DEFAULTS if args.device == "cuda" else CPU_DEFAULTS
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    return args


def _inputs(args: argparse.Namespace, seq_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator(device=args.device).manual_seed(0)
    shape = (1, args.heads, seq_len, args.head_dim)
    return tuple(torch.randn(shape, generator=generator, device=args.device, dtype=getattr(torch, args.dtype))
                 for _ in range(3))


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _attention_flops(layout: BlockLayout, args: argparse.Namespace, density: float) -> float:
    return 4.0 * args.heads * layout.seq_len ** 2 * args.head_dim * density


# ------------------------------------------------------------------------------------------ CPU

def _cpu_times(fns: dict[str, Callable[[], object]], repeats: int = 15) -> dict[str, float]:
    """Median wall time of each function in ms; the functions take turns, so that load from
    other processes on the machine hits them alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) * 1e3 for name, values in times.items()}


def bench_cpu(args: argparse.Namespace) -> None:
    rows = []
    for frames in args.frames:
        layout = masks.sculpt4d(frames, args.tokens_per_frame, block_size=args.block_size)
        q, k, v = _inputs(args, layout.seq_len)
        start = time.perf_counter()
        block_sparse_attention(q, k, v, layout)
        first_call = (time.perf_counter() - start) * 1e3
        timings = _cpu_times({"dense": lambda: F.scaled_dot_product_attention(q, k, v),
                              "ours": lambda: block_sparse_attention(q, k, v, layout)})
        dense, ours = timings["dense"], timings["ours"]
        ideal = 1 / layout.density
        rows.append([str(frames), str(layout.seq_len), f"{layout.density:.3f}", f"{dense:.1f}", f"{ours:.1f}",
                     f"{dense / ours:.2f}x", f"{ideal:.2f}x", f"{dense / ours / ideal:.2f}",
                     f"{_attention_flops(layout, args, layout.density) / ours / 1e6:.0f}", f"{first_call:.0f}"])
    print(f"CPU, {args.dtype}, B=1, {args.heads} heads x {args.head_dim}, {args.tokens_per_frame} tokens/frame, "
          f"sculpt4d blocks of {args.block_size}, {torch.get_num_threads()} threads; medians of alternating runs\n")
    print(_table(["frames", "tokens", "density", "dense SDPA ms", "ours ms", "speedup", "ideal 1/density",
                  "of ideal", "ours eff. GFLOP/s", "first call ms (plan)"], rows))


# ----------------------------------------------------------------------------------------- CUDA

def _sculpt4d_mask_mod(args: argparse.Namespace, device: torch.device):
    """The Sculpt4D rule on token indices, for FlexAttention's create_block_mask."""
    strides = torch.tensor(masks.SCULPT4D_STRIDES, device=device)
    tokens, block = args.tokens_per_frame, args.block_size

    def mask_mod(b, h, q_idx, kv_idx):
        q_frame, kv_frame = q_idx // tokens, kv_idx // tokens
        q_block, kv_block = (q_idx % tokens) // block, (kv_idx % tokens) // block
        stride = strides[(q_frame - kv_frame).abs().clamp(max=len(masks.SCULPT4D_STRIDES) - 1)]
        return (kv_frame < 1) | ((q_block - kv_block) % stride == 0)

    return mask_mod


@contextlib.contextmanager
def _cuda_kernel(name: str) -> Iterator[None]:
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


def _timed_ms(fn: Callable[[], object]) -> float:
    """Wall time of one call, through to the end of its GPU work, in ms."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def _host_ms(fn: Callable[[], object], repeats: int = 20) -> float:
    """Median host time of a call (decode lookup, plan lookup, launch) without waiting for the GPU, in ms."""
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def bench_cuda(args: argparse.Namespace) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    from triton.testing import do_bench

    device = torch.device("cuda")
    flex = torch.compile(flex_attention, dynamic=False)
    rows, costs = [], []
    for frames in args.frames:
        start = time.perf_counter()
        layout = masks.sculpt4d(frames, args.tokens_per_frame, block_size=args.block_size)
        table_ms = (time.perf_counter() - start) * 1e3
        block_m, block_n = triton_kernel.tile_sizes(int(layout.block_lengths.max()))
        start = time.perf_counter()
        triton_kernel.build_plan(layout.to_dense(), layout.block_starts, block_m=block_m, block_n=block_n,
                                 device=device)
        torch.cuda.synchronize()
        plan_ms = (time.perf_counter() - start) * 1e3
        start = time.perf_counter()
        own_mask = flex_path.build_block_mask(layout.to_dense(), layout.block_starts, layout.block_size, device)
        torch.cuda.synchronize()
        block_mask_ms = (time.perf_counter() - start) * 1e3
        q, k, v = _inputs(args, layout.seq_len)

        def ours(kernel: str) -> Callable[[], torch.Tensor]:
            def run():
                with _cuda_kernel(kernel):
                    return block_sparse_attention(q, k, v, layout)
            return run

        first_triton_ms = _timed_ms(ours("triton"))
        first_flex_ms = _timed_ms(ours("flex"))
        host_triton_ms, host_flex_ms = _host_ms(ours("triton")), _host_ms(ours("flex"))

        if layout.seq_len <= CREATE_BLOCK_MASK_MAX_TOKENS:
            flex_mask = torch.compile(create_block_mask)(_sculpt4d_mask_mod(args, device), None, None,
                                                         layout.seq_len, layout.seq_len, device=device,
                                                         BLOCK_SIZE=flex_path.tile_size(args.block_size))
            flex_mask_source = "create_block_mask"
        else:
            flex_mask, flex_mask_source = own_mask, "from_kv_blocks"

        def sdpa(backend):
            def run():
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v)
            return run

        timings = {
            "cuDNN": do_bench(sdpa(SDPBackend.CUDNN_ATTENTION), return_mode="median"),
            "flash": do_bench(sdpa(SDPBackend.FLASH_ATTENTION), return_mode="median"),
            "flex dense": do_bench(lambda: flex(q, k, v), return_mode="median"),
            "flex sparse": do_bench(lambda: flex(q, k, v, block_mask=flex_mask), return_mode="median"),
            "ours triton": do_bench(ours("triton"), return_mode="median"),
            "ours flex": do_bench(ours("flex"), return_mode="median"),
        }
        density, ideal = layout.density, 1 / layout.density
        sparse_flops = _attention_flops(layout, args, density)
        row = [str(frames), str(layout.seq_len), f"{density:.3f}"] + [f"{t:.2f}" for t in timings.values()]
        for name in ("ours triton", "ours flex"):
            speedup = timings["cuDNN"] / timings[name]
            row += [f"{speedup:.2f}x", f"{speedup / ideal:.2f}", f"{timings['flex sparse'] / timings[name]:.2f}x",
                    f"{sparse_flops / timings[name] / 1e9:.0f}"]
        row += [f"{ideal:.2f}x", f"{_attention_flops(layout, args, 1.0) / timings['cuDNN'] / 1e9:.0f}"]
        rows.append(row)
        costs.append([str(frames), f"{table_ms:.1f}", f"{plan_ms:.1f}", f"{block_mask_ms:.1f}",
                      f"{host_triton_ms:.3f}", f"{host_flex_ms:.3f}", f"{first_triton_ms:.0f}", f"{first_flex_ms:.0f}",
                      flex_mask_source])
        del q, k, v
        torch.cuda.empty_cache()
    tuned = triton_kernel.tuned_config(args.head_dim, getattr(torch, args.dtype))
    print(f"{torch.cuda.get_device_name()}, {args.dtype}, B=1, {args.heads} heads x {args.head_dim}, "
          f"{args.tokens_per_frame} tokens/frame, sculpt4d blocks of {args.block_size}; do_bench medians in ms; "
          f"Triton tiles {block_m} x {block_n}, {tuned or 'default config (not autotuned)'}\n")
    header = ["frames", "tokens", "density", *timings]
    for name in ("triton", "flex"):
        header += [f"{name} vs cuDNN", f"{name} of ideal", f"{name} vs flex sparse", f"{name} TFLOP/s"]
    print(_table(header + ["ideal 1/density", "cuDNN TFLOP/s"], rows))
    print("\nWhat a table costs (ms): the layout (policy -> block table), our Triton plan and the BlockMask "
          "from the table; the host time of a call once its table is cached; the first call on each path "
          "(table decode, plan or BlockMask, and compilation / autotuning on the first size)\n")
    print(_table(["frames", "block table", "Triton plan", "BlockMask", "host/call triton", "host/call flex",
                  "first call triton", "first call flex", "flex sparse mask from"], costs))


def main() -> None:
    args = _parse()
    if args.device == "cuda":
        bench_cuda(args)
    else:
        bench_cpu(args)


if __name__ == "__main__":
    main()
