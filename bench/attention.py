"""Benchmark: t4d block-sparse attention against dense and FlexAttention baselines.

CUDA (default when available): bf16, B=1, 16 heads x 128, 4096 tokens per frame, Sculpt4D mask
with blocks of 128, for 8, 16 and 32 frames: `attention_gpu`'s table (ours on the Triton kernel
and on the FlexAttention path beside cuDNN and flash SDPA, FlexAttention and FlashAttention-4,
interleaved; ``bench/gpu.py`` runs it on more shapes). CPU (``--device cpu``, the default
without CUDA): fp32, 1 x 4 heads x 64, 8 frames x 512 tokens, blocks of 64; dense SDPA against
ours. Prints markdown tables.

    python bench/attention.py [--device cpu|cuda] [--frames 8 16 32] [--dtype bf16|fp16|fp32]
                              [--heads 16] [--head-dim 128] [--tokens-per-frame 4096] [--block-size 128]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from t4dopt import masks  # noqa: E402
from t4dopt.block_layout import BlockLayout  # noqa: E402
from t4dopt.ops import block_sparse_attention  # noqa: E402

CUDA_DEFAULTS = dict(frames=[8, 16, 32], dtype="bfloat16", heads=16, head_dim=128, tokens_per_frame=4096,
                     block_size=128)
CPU_DEFAULTS = dict(frames=[8], dtype="float32", heads=4, head_dim=64, tokens_per_frame=512, block_size=64)
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

def bench_cuda(args: argparse.Namespace) -> None:
    """The CUDA table lives in `attention_gpu` (also part of ``bench/gpu.py``): run it on these shapes."""
    import attention_gpu

    short = {v: k for k, v in DTYPE_ALIASES.items()}[args.dtype]
    shapes = [f"{frames}x{args.tokens_per_frame}/{args.heads}x{args.head_dim}/{short}/fa4" for frames in args.frames]
    attention_gpu.main(["--device", "cuda", "--block-size", str(args.block_size), "--shapes", *shapes])


def main() -> None:
    args = _parse()
    if args.device == "cuda":
        bench_cuda(args)
    else:
        bench_cpu(args)


if __name__ == "__main__":
    main()
