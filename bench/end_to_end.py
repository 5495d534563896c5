"""Benchmark: one denoising step of the reference 4D DiT, plain Inductor against turbo4d.

Both models are compiled in the same process: ``torch.compile(model)`` (Inductor, whose SDPA
picks cuDNN / flash on CUDA) and ``torch.compile(model, backend="turbo4d")`` with the sculpt4d
mask. Prints, per frame count: the step time of each (median), the speedup, the speedup the
FLOPs allow, compile time of each and their ratio, peak memory of each, and how far the
turbo4d step is from the dense one.

CUDA (default when available): ``hunyuan3d-2.1`` (hidden 2048, 16 heads x 128, 21 blocks,
4096 tokens/frame), bf16, 16 and 32 frames, blocks of 128; ``--depth 1`` times one of its
blocks (DESIGN.md's block table). CPU: a small config (hidden 128, 2 heads x 64, 2 blocks, 512
tokens/frame), fp32, 16 frames, blocks of 64. ``--compiler eager`` runs both without Inductor
(plain ``backend="eager"`` against turbo4d's ``target="eager"``), for the quick dry run.

    python bench/end_to_end.py [--device cpu|cuda] [--frames 16 32] [--config NAME] [--depth N]
                               [--tokens-per-frame P] [--block-size B] [--repeats 5] [--compiler inductor|eager]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from device_info import describe  # noqa: E402
from part_result import Column, PartResult  # noqa: E402
from t4dopt import explain  # noqa: E402
from t4dopt.models import CONFIGS, Sculpt4DDiT, make_inputs  # noqa: E402

CPU_OVERRIDES = {"hidden": 128, "heads": 2, "depth": 2, "tokens_per_frame": 512}
COMPILERS = ("inductor", "eager")
COLUMNS = [
    Column("frames", "frames"), Column("tokens", "tokens"), Column("depth", "blocks"),
    Column("dense_ms", "torch.compile ms", "{:.1f}"), Column("sparse_ms", "turbo4d ms", "{:.1f}"),
    Column("speedup", "speedup", "{:.2f}x"), Column("flop_ideal", "FLOP-ideal", "{:.2f}x"),
    Column("attention_share", "attention share", "{:.0%}"),
    Column("dense_compile_s", "compile s torch.compile", "{:.1f}"),
    Column("sparse_compile_s", "compile s turbo4d", "{:.1f}"),
    Column("compile_ratio", "compile ratio", "{:.2f}"),
    Column("dense_peak_gib", "peak GiB torch.compile", "{:.1f}"),
    Column("sparse_peak_gib", "peak GiB turbo4d", "{:.1f}"),
    Column("rel_diff", "rel. diff (sparse vs dense)", "{:.2e}"),
]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time_step(step, device: str, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def _compile(model, compiler: str, options: dict | None):
    """``torch.compile`` with `compiler` (dense), or the turbo4d backend lowering to it (`options` given)."""
    if options is None:
        return torch.compile(model, backend=compiler)
    return torch.compile(model, backend="turbo4d", options={**options, "target": compiler})


def _measure(model, inputs, device: str, repeats: int, compiler: str, options: dict | None = None) -> dict:
    torch._dynamo.reset()
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    compiled = _compile(model, compiler, options)
    with torch.no_grad():
        start = time.perf_counter()
        output = compiled(*inputs)
        _sync(device)
        compile_s = time.perf_counter() - start
        times = _time_step(lambda: compiled(*inputs), device, repeats)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else None
    return {"ms": 1e3 * statistics.median(times), "compile_s": compile_s, "peak_gib": peak, "output": output.float()}


def _warm_up_compilers(device: str, dtype: torch.dtype, compiler: str) -> None:
    """Compile a one-block model with both backends, so neither timed compile pays the cold start."""
    config = dataclasses.replace(CONFIGS["tiny"], depth=1)
    with torch.device(device):
        model = Sculpt4DDiT(config).to(dtype).eval()
    noise, cond = make_inputs(config, device=device, dtype=dtype)
    inputs = (noise, torch.full((1,), 0.5, device=device, dtype=dtype), cond)
    options = {"layout": {"frames": config.frames, "tokens_per_frame": config.tokens_per_frame},
               "sparse": {"policy": "sculpt4d", "block_size": 16}}
    _measure(model, inputs, device, 1, compiler)
    _measure(model, inputs, device, 1, compiler, options)


def _flop_ideal(model: Sculpt4DDiT, inputs, options: dict) -> tuple[float, float]:
    """(speedup the FLOPs allow, attention share of dense FLOPs), linear layers counted from parameters."""
    report = explain(model, *inputs, options=options)
    tokens = inputs[0].shape[0] * inputs[0].shape[1] * inputs[0].shape[2]
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    other = 2.0 * linear * tokens
    return (report.flops_dense + other) / (report.flops + other), report.flops_dense / (report.flops_dense + other)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--frames", type=int, nargs="+")
    parser.add_argument("--config", choices=sorted(CONFIGS),
                        help="reference config (default: hunyuan3d-2.1 on CUDA, a small one on CPU)")
    parser.add_argument("--depth", type=int, help="override the number of blocks")
    parser.add_argument("--tokens-per-frame", type=int, help="override the config's tokens per frame")
    parser.add_argument("--block-size", type=int)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compiler", choices=COMPILERS, default="inductor")
    return parser.parse_args(argv)


def run(args: argparse.Namespace, result: PartResult | None = None) -> PartResult:
    result = result or PartResult()
    cuda = args.device == "cuda"
    result.environment = describe(torch.device(args.device))
    base = CONFIGS[args.config or ("hunyuan3d-2.1" if cuda else "tiny")]
    overrides = {} if (cuda or args.config) else dict(CPU_OVERRIDES)
    for name in ("depth", "tokens_per_frame"):
        if getattr(args, name):
            overrides[name] = getattr(args, name)
    dtype = torch.bfloat16 if cuda else torch.float32
    block_size = args.block_size or (128 if cuda else 64)
    frames_list = args.frames or ([16, 32] if cuda else [16])
    print(f"warming up {args.compiler} and turbo4d on a one-block tiny model", flush=True)
    _warm_up_compilers(args.device, dtype, args.compiler)
    table = result.table("steps", COLUMNS, f"{result.environment['device']}, torch {torch.__version__}, {dtype}, "
                         f"{args.compiler}, blocks of {block_size}, median of {args.repeats} steps after compile")
    for frames in frames_list:
        config = dataclasses.replace(base, frames=frames, **overrides)
        torch.manual_seed(0)
        with torch.device(args.device):
            model = Sculpt4DDiT(config).to(dtype).eval()
        noise, cond = make_inputs(config, device=args.device, dtype=dtype)
        inputs = (noise, torch.full((1,), 0.5, device=args.device, dtype=dtype), cond)
        options = {"layout": {"frames": frames, "tokens_per_frame": config.tokens_per_frame},
                   "sparse": {"policy": "sculpt4d", "block_size": block_size}}
        print(f"{frames} frames: FLOP count, then {args.compiler} and turbo4d", flush=True)
        ideal, share = _flop_ideal(model, inputs, options)
        dense = _measure(model, inputs, args.device, args.repeats, args.compiler)
        sparse = _measure(model, inputs, args.device, args.repeats, args.compiler, options)
        diff = float((sparse["output"] - dense["output"]).norm() / dense["output"].norm())
        result.add_row(table, {
            "frames": frames, "tokens": frames * config.tokens_per_frame, "depth": config.depth,
            "dense_ms": dense["ms"], "sparse_ms": sparse["ms"], "speedup": dense["ms"] / sparse["ms"],
            "flop_ideal": ideal, "attention_share": share, "dense_compile_s": dense["compile_s"],
            "sparse_compile_s": sparse["compile_s"], "compile_ratio": sparse["compile_s"] / dense["compile_s"],
            "dense_peak_gib": dense["peak_gib"], "sparse_peak_gib": sparse["peak_gib"], "rel_diff": diff})
        del model, dense, sparse
    return result


def main(argv: Sequence[str] | None = None, result: PartResult | None = None) -> PartResult:
    result = run(parse_args(argv), result)
    print(result.markdown())
    return result


if __name__ == "__main__":
    main()
