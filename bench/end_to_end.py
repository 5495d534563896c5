"""Benchmark: one denoising step of the reference 4D DiT, plain Inductor against turbo4d.

Both models are compiled in the same process: ``torch.compile(model)`` (Inductor, whose SDPA
picks cuDNN / flash on CUDA) and ``torch.compile(model, backend="turbo4d")`` with the sculpt4d
mask. Prints, per frame count: the step time of each (median), the speedup, the speedup the
FLOPs allow, compile time of each and their ratio, peak memory of each, and how far the
turbo4d step is from the dense one.

CUDA (default when available): ``hunyuan3d-2.1`` (hidden 2048, 16 heads x 128, 21 blocks,
4096 tokens/frame), bf16, 16 and 32 frames, blocks of 128. CPU: a small config (hidden 128,
2 heads x 64, 2 blocks, 512 tokens/frame), fp32, 16 frames, blocks of 64.

    python bench/end_to_end.py [--device cpu|cuda] [--frames 16 32] [--config NAME] [--depth N]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import statistics
import time

import torch

from t4dopt import explain
from t4dopt.models import CONFIGS, Sculpt4DDiT, make_inputs

CPU_OVERRIDES = {"hidden": 128, "heads": 2, "depth": 2, "tokens_per_frame": 512}


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


def _measure(model, inputs, device: str, repeats: int, **compile_kwargs) -> dict:
    torch._dynamo.reset()
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    compiled = torch.compile(model, **compile_kwargs)
    with torch.no_grad():
        start = time.perf_counter()
        output = compiled(*inputs)
        _sync(device)
        compile_s = time.perf_counter() - start
        times = _time_step(lambda: compiled(*inputs), device, repeats)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else float("nan")
    return {"ms": 1e3 * statistics.median(times), "compile_s": compile_s, "peak_gib": peak, "output": output.float()}


def _warm_up_compilers(device: str, dtype: torch.dtype, options: dict) -> None:
    """Compile a one-block model with both backends, so neither timed compile pays the cold start."""
    config = dataclasses.replace(CONFIGS["tiny"], depth=1)
    with torch.device(device):
        model = Sculpt4DDiT(config).to(dtype).eval()
    noise, cond = make_inputs(config, device=device, dtype=dtype)
    inputs = (noise, torch.full((1,), 0.5, device=device, dtype=dtype), cond)
    warm_options = {**options, "layout": {"frames": config.frames, "tokens_per_frame": config.tokens_per_frame}}
    _measure(model, inputs, device, 1)
    _measure(model, inputs, device, 1, backend="turbo4d", options=warm_options)


def _gib(value: float) -> str:
    return "-" if value != value else f"{value:.1f}"


def _flop_ideal(model: Sculpt4DDiT, inputs, options: dict) -> tuple[float, float]:
    """(speedup the FLOPs allow, attention share of dense FLOPs), linear layers counted from parameters."""
    report = explain(model, *inputs, options=options)
    tokens = inputs[0].shape[0] * inputs[0].shape[1] * inputs[0].shape[2]
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    other = 2.0 * linear * tokens
    return (report.flops_dense + other) / (report.flops + other), report.flops_dense / (report.flops_dense + other)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--frames", type=int, nargs="+")
    parser.add_argument("--config", help="reference config (default: hunyuan3d-2.1 on CUDA, a small one on CPU)")
    parser.add_argument("--depth", type=int, help="override the number of blocks")
    parser.add_argument("--block-size", type=int)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    cuda = args.device == "cuda"
    base = CONFIGS[args.config or ("hunyuan3d-2.1" if cuda else "tiny")]
    overrides = {} if (cuda or args.config) else dict(CPU_OVERRIDES)
    if args.depth:
        overrides["depth"] = args.depth
    dtype = torch.bfloat16 if cuda else torch.float32
    block_size = args.block_size or (128 if cuda else 64)
    frames_list = args.frames or ([16, 32] if cuda else [16])
    _warm_up_compilers(args.device, dtype, {"sparse": {"policy": "sculpt4d", "block_size": 16}})
    print(f"{torch.cuda.get_device_name() if cuda else 'CPU'}, torch {torch.__version__}, {dtype}, "
          f"blocks of {block_size}, median of {args.repeats} steps after compile\n")
    print("| frames | tokens | inductor ms | turbo4d ms | speedup | FLOP-ideal | attention share | "
          "compile s inductor / turbo4d (ratio) | peak GiB inductor / turbo4d | rel. diff |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for frames in frames_list:
        config = dataclasses.replace(base, frames=frames, **overrides)
        torch.manual_seed(0)
        with torch.device(args.device):
            model = Sculpt4DDiT(config).to(dtype).eval()
        noise, cond = make_inputs(config, device=args.device, dtype=dtype)
        inputs = (noise, torch.full((1,), 0.5, device=args.device, dtype=dtype), cond)
        options = {"layout": {"frames": frames, "tokens_per_frame": config.tokens_per_frame},
                   "sparse": {"policy": "sculpt4d", "block_size": block_size}}
        ideal, share = _flop_ideal(model, inputs, options)
        dense = _measure(model, inputs, args.device, args.repeats)
        sparse = _measure(model, inputs, args.device, args.repeats, backend="turbo4d", options=options)
        diff = float((sparse["output"] - dense["output"]).norm() / dense["output"].norm())
        print(f"| {frames} | {frames * config.tokens_per_frame} | {dense['ms']:.1f} | {sparse['ms']:.1f} | "
              f"{dense['ms'] / sparse['ms']:.2f}x | {ideal:.2f}x | {share:.0%} | {dense['compile_s']:.1f} / "
              f"{sparse['compile_s']:.1f} ({sparse['compile_s'] / dense['compile_s']:.2f}) | "
              f"{_gib(dense['peak_gib'])} / {_gib(sparse['peak_gib'])} | {diff:.2e} |", flush=True)
        del model, dense, sparse


if __name__ == "__main__":
    main()
