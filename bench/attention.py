"""Benchmark: t4d block-sparse attention against dense and FlexAttention baselines.

CUDA (default when available): bf16, B=1, 16 heads x 128, 4096 tokens per frame, Sculpt4D mask
with blocks of 128, for 8, 16 and 32 frames: `attention_gpu`'s table (ours on the Triton kernel
and on the FlexAttention path beside cuDNN and flash SDPA, FlexAttention and FlashAttention-4,
interleaved; ``bench/gpu.py`` runs it on more shapes). CPU (``--device cpu``, the default
without CUDA): fp32, 1 x 4 heads x 64, 8 frames x 512 tokens, blocks of 64; dense SDPA against
ours and FlexAttention compiled for CPU, quiet and (``--busy``) with another process keeping one
core busy. Prints markdown tables.

    python bench/attention.py [--device cpu|cuda] [--frames 8 16 32] [--dtype bf16|fp16|fp32]
                              [--heads 16] [--head-dim 128] [--tokens-per-frame 4096] [--block-size 128]
                              [--busy] [--no-flex] [--repeats 15]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from t4dopt import masks  # noqa: E402
from t4dopt.block_layout import BlockLayout  # noqa: E402
from t4dopt.ops import block_sparse_attention, tables  # noqa: E402
from t4dopt.ops.tables import layout_tensors  # noqa: E402

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
    parser.add_argument("--busy", action="store_true",
                        help="CPU: also measure with another process keeping one core busy")
    parser.add_argument("--no-flex", dest="flex", action="store_false",
                        help="CPU: skip FlexAttention compiled for CPU (its compile takes about 20 s)")
    parser.add_argument("--repeats", type=int, default=15, help="CPU: alternating runs per function")
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


# ------------------------------------------------------------------------------------------ CPU

BUSY_LOOP = "while True: pass"
"""What the busy process runs: one core's worth of pure-Python spinning, as another user's job would."""


def _cpu_times(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
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


class _OthersLoad:
    """Cores that other processes kept busy while the block ran (from /proc/stat, less this process's CPU
    time); None where /proc/stat is missing. The busy process of ``--busy`` counts as another process.

    /proc/stat counts in clock ticks (10 ms): a block shorter than `MIN_WINDOW_S` is followed by a wait
    that makes the window that long, else a few milliseconds of tiny shapes read as noise."""

    MIN_WINDOW_S = 0.5

    def __enter__(self) -> _OthersLoad:
        self.cores: float | None = None
        self._start = self._sample()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._start is not None:
            time.sleep(max(0.0, self.MIN_WINDOW_S - (time.monotonic() - self._start[2])))
        end = self._sample()
        if self._start is not None and end is not None:
            (busy0, own0, wall0), (busy1, own1, wall1) = self._start, end
            self.cores = max(0.0, (busy1 - busy0 - (own1 - own0)) / (wall1 - wall0))

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as stat:
                fields = [int(x) for x in stat.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        # user nice system idle iowait irq softirq steal ...: all but idle and iowait are busy
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return busy, usage.ru_utime + usage.ru_stime, time.monotonic()


@contextlib.contextmanager
def _busy_core() -> Iterator[None]:
    """Another process keeping one core busy while the block runs."""
    spinner = subprocess.Popen([sys.executable, "-c", BUSY_LOOP])
    try:
        time.sleep(1.0)  # let the load settle
        yield
    finally:
        spinner.kill()
        spinner.wait()


def _flex_cpu(layout: BlockLayout, q: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], object]:
    """FlexAttention compiled for CPU on our own BlockMask (the peer DESIGN.md names)."""
    from torch.nn.attention.flex_attention import flex_attention

    counts, indices, starts = layout_tensors(layout, q.device)
    mask = tables.table_for(q, counts, indices, starts).block_mask(layout.block_size, q.device)
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: compiled(q, k, v, block_mask=mask)


def bench_cpu(args: argparse.Namespace) -> None:
    """Quiet columns, then (``--busy``) the same with a busy process on one core; ratios within each run."""
    phases = [("quiet", contextlib.nullcontext)] + ([("busy", _busy_core)] if args.busy else [])
    header = ["frames", "tokens", "density", "ideal 1/density"]
    for phase, _ in phases:
        header += [f"{phase}: load avg", "others' cores", "dense SDPA ms", "ours ms", "speedup", "of ideal"]
        if args.flex:
            header += ["Flex ms", "Flex speedup"]
    rows, notes = [], []
    for frames in args.frames:
        layout = masks.sculpt4d(frames, args.tokens_per_frame, block_size=args.block_size)
        q, k, v = _inputs(args, layout.seq_len)
        start = time.perf_counter()
        block_sparse_attention(q, k, v, layout)
        notes.append(f"{frames} frames: first call (plan) {(time.perf_counter() - start) * 1e3:.0f} ms")
        fns = {"dense": lambda: F.scaled_dot_product_attention(q, k, v),
               "ours": lambda: block_sparse_attention(q, k, v, layout)}
        if args.flex:
            start = time.perf_counter()
            flex = _flex_cpu(layout, q)
            flex(q, k, v)
            notes.append(f"{frames} frames: FlexAttention compile {time.perf_counter() - start:.1f} s")
            fns["flex"] = lambda: flex(q, k, v)
        ideal = 1 / layout.density
        row = [str(frames), str(layout.seq_len), f"{layout.density:.3f}", f"{ideal:.2f}x"]
        for _, context in phases:
            with context():
                load = os.getloadavg()[0]
                with _OthersLoad() as others:
                    timings = _cpu_times(fns, args.repeats)
            dense, ours = timings["dense"], timings["ours"]
            row += [f"{load:.1f}", "?" if others.cores is None else f"{others.cores:.2f}", f"{dense:.1f}", f"{ours:.1f}", f"{dense / ours:.2f}x", f"{dense / ours / ideal:.2f}"]
            if args.flex:
                row += [f"{timings['flex']:.1f}", f"{dense / timings['flex']:.2f}x"]
        rows.append(row)
    print(f"CPU ({os.cpu_count()} cores), {args.dtype}, B=1, {args.heads} heads x {args.head_dim}, "
          f"{args.tokens_per_frame} tokens/frame, sculpt4d blocks of {args.block_size}, {torch.get_num_threads()} "
          f"threads; medians of {args.repeats} alternating runs; load avg: 1-minute load average as the phase began; "
          f"others' cores: cores other processes kept busy during the phase"
          + ("; busy: another process spins on one core" if args.busy else "") + "\n")
    print(_table(header, rows))
    print("\n" + "; ".join(notes))


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
