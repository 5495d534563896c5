"""Ring and Ulysses scaling of the joint attention, ours (block-sparse) beside dense, one row per degree.

Per rank, on its share of one joint attention over frames x tokens per frame (Sculpt4D mask):

- Ulysses: all-to-all to the whole sequence and heads / world, attention, all-to-all back; dense SDPA
  beside ``t4dopt.block_sparse_attention`` (the mask is the whole sequence's);
- Ring: the key/value chunks gathered as diffusers' ring gathers them, then each kept chunk pair
  (``t4d::block_sparse_attention_chunk``, merged by log-sum-exp; pairs keeping no block skipped),
  beside dense SDPA of the query chunk over every key.

Times are medians over rounds (CUDA events on GPU), each round running every path in turn, the
slowest rank's time per path (all-reduced MAX). ``balance`` is max / mean over ranks of the token
pairs each rank's ring computes (1.00: perfectly balanced). Run on the GPU machine:

    torchrun --nproc-per-node 8 bench/context_parallel.py --frames 21 --tokens-per-frame 1560 --heads 12 \\
        --head-dim 128 --dtype bf16
    python bench/context_parallel.py ...          # one process: the single-rank paths (world 1)
    python bench/context_parallel.py --dry-run    # CPU, tiny shapes, world 1 (what tests/test_bench_cpu.py runs)
    python bench/context_parallel.py --balance-only --frames 21 --tokens-per-frame 1560 --degrees 2 4 8

Nothing here was run on a GPU yet (written against torch's documented APIs).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from t4dopt import block_sparse_attention  # noqa: E402
from t4dopt.context_parallel import ring_plan  # noqa: E402
from t4dopt.masks import sculpt4d  # noqa: E402
from t4dopt.ops.chunk import block_sparse_attention_chunk, chunk_table, merge_chunks  # noqa: E402
from t4dopt.ops.tables import layout_tensors, lookup_table  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pair_work(layout, rank: int, world: int) -> int:
    """Token pairs rank `rank`'s ring computes (its query chunk against every kept key chunk)."""
    plan = ring_plan(layout, rank, world)
    table = lookup_table(layout_tensors(layout, torch.device("cpu")))
    return sum(chunk_table(table, rank * plan.chunk, plan.chunk, j * plan.chunk, plan.chunk).kept_pairs
               for j in plan.kept)


def balance(layout, world: int) -> tuple[float, int]:
    """(max / mean of the ranks' ring work, how many chunk pairs keep no block)."""
    work = [pair_work(layout, r, world) for r in range(world)]
    skipped = sum(world - len(ring_plan(layout, r, world).kept) for r in range(world))
    return max(work) / (sum(work) / world), skipped


def _timer(device: torch.device):
    if device.type == "cuda":
        def run(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
    else:
        def run(fn):
            began = time.perf_counter()
            fn()
            return (time.perf_counter() - began) * 1e3
    return run


def _a2a(x: torch.Tensor, world: int) -> torch.Tensor:
    import torch.distributed._functional_collectives as funcol

    return funcol.wait_tensor(funcol.all_to_all_single(x.contiguous(), None, None, dist.group.WORLD))


def _ulysses(q, k, v, world, attend):
    """q, k, v [B, H, S_local, D] -> attention over the whole sequence for H / world heads, and back."""
    b, h, s, d = q.shape

    def gather(x):  # [B, H, S, D] -> [world, B, H/w, S, D] -> the whole sequence for a share of the heads
        x = x.reshape(b, world, h // world, s, d).transpose(0, 1)
        return _a2a(x, world).permute(1, 2, 0, 3, 4).reshape(b, h // world, world * s, d)

    out = attend(gather(q), gather(k), gather(v))
    out = out.reshape(b, h // world, world, s, d).permute(2, 0, 1, 3, 4)
    return _a2a(out, world).permute(1, 0, 2, 3, 4).reshape(b, h, s, d)


def _ring(q, k, v, layout, rank, world, kept, sparse: bool):
    import torch.distributed._functional_collectives as funcol

    both = funcol.all_gather_tensor(torch.stack([k, v]).contiguous(), 0, dist.group.WORLD)
    chunks = [(both[2 * j], both[2 * j + 1]) for j in range(world)]
    if not sparse:
        return F.scaled_dot_product_attention(q, torch.cat([c[0] for c in chunks], 2),
                                              torch.cat([c[1] for c in chunks], 2))
    s, out, lse = q.shape[2], None, None
    for j in kept:
        part, part_lse = block_sparse_attention_chunk(q, chunks[j][0], chunks[j][1], layout, rank * s, j * s)
        out, lse = merge_chunks(out, lse, part.float(), part_lse)
    return out.to(q.dtype)


def measure(args, layout, device, rank, world) -> dict[str, float]:
    dtype = DTYPES[args.dtype]
    s = layout.seq_len // world
    generator = torch.Generator().manual_seed(rank)
    q, k, v = (torch.randn(1, args.heads, s, args.head_dim, generator=generator).to(device, dtype) for _ in range(3))
    kept = ring_plan(layout, rank, world).kept
    paths = {
        "ulysses dense": lambda: _ulysses(q, k, v, world, F.scaled_dot_product_attention),
        "ulysses ours": lambda: _ulysses(q, k, v, world, lambda a, b, c: block_sparse_attention(a, b, c, layout)),
        "ring dense": lambda: _ring(q, k, v, layout, rank, world, kept, sparse=False),
        "ring ours": lambda: _ring(q, k, v, layout, rank, world, kept, sparse=True),
    }
    timer, times = _timer(device), {name: [] for name in paths}
    with torch.no_grad():
        for fn in paths.values():  # first calls: plans, autotuning
            fn()
        for round_ in range(args.repeats):
            names = list(paths)[round_ % len(paths):] + list(paths)[:round_ % len(paths)]
            for name in names:
                dist.barrier()
                times[name].append(timer(paths[name]))
    medians = torch.tensor([statistics.median(times[name]) for name in paths], dtype=torch.float64)
    if device.type == "cuda":
        medians = medians.to(device)
    dist.all_reduce(medians, op=dist.ReduceOp.MAX)
    return dict(zip(paths, medians.cpu().tolist()))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=21)
    parser.add_argument("--tokens-per-frame", type=int, default=1560)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--degrees", type=int, nargs="+", default=[2, 4, 8], help="for --balance-only")
    parser.add_argument("--balance-only", action="store_true", help="only the ring's work balance per degree")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, one process")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.frames, args.tokens_per_frame, args.block_size = 4, 48, 16
        args.heads, args.head_dim, args.dtype, args.repeats = 2, 16, "fp32", 2
    layout = sculpt4d(args.frames, args.tokens_per_frame, block_size=args.block_size)
    if args.balance_only:
        print("| ring degree | max/mean work per rank | chunk pairs skipped |\n|---|---|---|")
        for world in args.degrees:
            ratio, skipped = balance(layout, world)
            print(f"| {world} | {ratio:.3f} | {skipped} |")
        return
    cuda = torch.cuda.is_available() and not args.dry_run
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get(
            "MASTER_PORT", "29517"))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    try:
        if layout.seq_len % world or args.heads % world:
            raise SystemExit(f"{layout.seq_len} tokens and {args.heads} heads must split over {world} ranks")
        times = measure(args, layout, device, rank, world)
        ratio, skipped = balance(layout, world)
        if rank == 0:
            print(f"{args.frames} x {args.tokens_per_frame} tokens, {args.heads} x {args.head_dim}, {args.dtype}, "
                  f"sculpt4d density {layout.density:.3f}, block {args.block_size}, {device.type}, "
                  f"{time.strftime('%Y-%m-%d %H:%M')}")
            names = list(times)
            print("| world | " + " | ".join(f"{n} ms" for n in names) + " | ring speedup | balance | skipped |")
            print("|---" * (len(names) + 4) + "|")
            print(f"| {world} | " + " | ".join(f"{times[n]:.3f}" for n in names)
                  + f" | {times['ring dense'] / times['ring ours']:.2f}x | {ratio:.3f} | {skipped} |")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
