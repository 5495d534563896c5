"""The main demo: the reference 4D DiT compiled dense and with turbo4d, side by side.

It samples a few flow-matching steps with both, prints the explain table, the time per step
of each, how far the sparse sample is from the dense one, and draws the mask to a PNG. Random
weights say little about quality, so it then samples the trained `joint-tiny` model dense and
through turbo4d for one seed and draws both videos (`samples.png`, `samples.gif`).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from t4dopt.data import from_tokens
from t4dopt.data.tasks import EVAL_SEED, scene_batch
from t4dopt.explain import explain
from t4dopt import masks
from t4dopt.models import CONFIGS, Sculpt4DDiT, make_inputs, pretrained, sample_flow_matching
from t4dopt.plotting import draw_block_mask, draw_sample_gif, draw_sample_grid
from t4dopt.quality import psnr, relative_l2
from t4dopt.report import Report

CPU_DEMO = {"hidden": 128, "heads": 2, "depth": 2, "frames": 16, "tokens_per_frame": 512}
CUDA_DEMO = {"frames": 16, "tokens_per_frame": 4096}
TRAINED_STEPS = 16
TIMING_ROUNDS = 2
"""Samplings of each model, dense and turbo4d taking turns; the step time is the median over all of their steps."""
TRAINED_BLOCK_SIZE = 16  # 4 blocks per 64-token frame of joint-tiny


@dataclass
class DemoResult:
    report: Report
    dense_ms: float
    sparse_ms: float
    relative_l2: float
    psnr_db: float
    mask_png: Path
    trained_psnr_db: float
    samples_png: Path
    samples_gif: Path

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.sparse_ms


def _step_times(model: Callable, noise: torch.Tensor, cond: torch.Tensor, steps: int) -> tuple[torch.Tensor, list[float]]:
    times: list[float] = []
    last = [time.perf_counter()]

    def on_step(index: int, t: float, x: torch.Tensor) -> None:
        if noise.is_cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    with torch.no_grad():
        sample = sample_flow_matching(model, noise, cond, steps=steps, callback=on_step)
    return sample, times


def _trained_samples(policy: str, seed: int) -> dict[str, torch.Tensor]:
    """Frames [T, 3, 16, 16] of the scene, and of `joint-tiny` sampled dense and through turbo4d."""
    model = pretrained("joint-tiny")
    x0, cond = scene_batch("joint", 1, seed=EVAL_SEED + seed)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    options = {
        "layout": {"frames": model.config.frames, "tokens_per_frame": model.config.tokens_per_frame},
        "sparse": {"policy": policy, "block_size": TRAINED_BLOCK_SIZE},
        "target": "eager",
    }
    torch._dynamo.reset()
    sparse = torch.compile(model, backend="turbo4d", options=options)
    with torch.no_grad():
        dense_tokens = sample_flow_matching(model, noise, cond, steps=TRAINED_STEPS)
        sparse_tokens = sample_flow_matching(sparse, noise, cond, steps=TRAINED_STEPS)
    size = model.pretrained_info["task"]["size"]
    return {
        "scene": from_tokens(x0[0], size),
        "dense": from_tokens(dense_tokens[0], size).clamp(-1, 1),
        f"turbo4d {policy}": from_tokens(sparse_tokens[0], size).clamp(-1, 1),
    }


def run_demo(
    *,
    config: str | None = None,
    frames: int | None = None,
    tokens_per_frame: int | None = None,
    policy: str = "sculpt4d",
    block_size: int | None = None,
    steps: int = 4,
    device: str | None = None,
    target: str = "inductor",
    out_dir: str | Path = "t4dopt-demo",
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> DemoResult:
    """Compile the reference model dense and with turbo4d, sample, compare and draw the mask;
    then sample the trained `joint-tiny` both ways and draw the videos."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if policy not in masks.POLICIES:
        raise ValueError(f"policy={policy!r} is unknown; allowed: {sorted(masks.POLICIES)}")
    overrides = dict(CUDA_DEMO if device.startswith("cuda") else CPU_DEMO)
    base = CONFIGS[config or ("hunyuan3d-2.1" if device.startswith("cuda") else "tiny")]
    if config is not None:
        overrides = {}
    overrides.update({k: v for k, v in {"frames": frames, "tokens_per_frame": tokens_per_frame}.items() if v})
    cfg = dataclasses.replace(base, **overrides)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    block_size = block_size or (128 if device.startswith("cuda") else 64)
    options = {
        "layout": {"frames": cfg.frames, "tokens_per_frame": cfg.tokens_per_frame},
        "sparse": {"policy": policy, "block_size": block_size},
        "target": target,
    }
    log(f"t4dopt demo: Sculpt4DDiT hidden={cfg.hidden} heads={cfg.heads} depth={cfg.depth} "
        f"frames={cfg.frames} tokens/frame={cfg.tokens_per_frame} on {device} ({dtype}), {steps} steps")
    torch.manual_seed(seed)
    model = Sculpt4DDiT(cfg).to(device=device, dtype=dtype).eval()
    noise, cond = make_inputs(cfg, seed=seed, device=device, dtype=dtype)
    t = torch.full((noise.shape[0],), 0.5, device=device, dtype=dtype)

    report = explain(model, noise, t, cond, options=options)
    log("\n" + report.table() + "\n")

    dense = torch.compile(model, backend="inductor") if target == "inductor" else model
    sparse = torch.compile(model, backend="turbo4d", options=options)
    log(f"compiling and warming up (target={target}) ...")
    for compiled in (dense, sparse):
        _step_times(compiled, noise, cond, 1)
    dense_times: list[float] = []
    sparse_times: list[float] = []
    for _ in range(TIMING_ROUNDS):  # alternating, so that load from other processes hits both alike
        dense_sample, times = _step_times(dense, noise, cond, steps)
        dense_times += times
        sparse_sample, times = _step_times(sparse, noise, cond, steps)
        sparse_times += times
    dense_ms, sparse_ms = 1e3 * statistics.median(dense_times), 1e3 * statistics.median(sparse_times)
    l2, psnr_db = relative_l2(sparse_sample, dense_sample), psnr(sparse_sample, dense_sample)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    layout = masks.build(policy, cfg.frames, cfg.tokens_per_frame, block_size=block_size)
    mask_png = draw_block_mask(layout, out_dir / "mask.png", frames=cfg.frames,
                               blocks_per_frame=-(-cfg.tokens_per_frame // block_size))
    log(f"time per denoising step: dense {dense_ms:.1f} ms, turbo4d {sparse_ms:.1f} ms "
        f"-> {dense_ms / sparse_ms:.2f}x (attention FLOPs saved: {100 * report.flops_saved:.0f}%)")
    log(f"sparse sample vs dense sample: relative L2 {l2:.3e}, PSNR {psnr_db:.1f} dB "
        f"(a training-free approximation on random weights; models trained with the mask are exact)")
    log(f"mask drawn to {mask_png}")

    samples = _trained_samples(policy, seed)
    dense_frames, sparse_frames = samples["dense"], samples[f"turbo4d {policy}"]
    trained_psnr = psnr(sparse_frames, dense_frames, peak=2.0)
    samples_png = draw_sample_grid(samples, out_dir / "samples.png")
    samples_gif = draw_sample_gif(samples, out_dir / "samples.gif")
    log(f"trained joint-tiny, {TRAINED_STEPS} steps, seed {seed}: turbo4d {policy} (blocks of {TRAINED_BLOCK_SIZE}) "
        f"vs dense frames PSNR {trained_psnr:.1f} dB; drawn to {samples_png} and {samples_gif}")
    return DemoResult(report, dense_ms, sparse_ms, l2, psnr_db, mask_png, trained_psnr, samples_png, samples_gif)
