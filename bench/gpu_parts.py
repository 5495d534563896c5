"""The parts of `bench/gpu.py`, in order: what each runs, at which sizes, and how long it should take.

Each part is a bench script run with fixed arguments, one set for the GPU window and one tiny
set for the CPU dry run (same script, same functions, smaller shapes). Time estimates come
from FLOPs and DESIGN.md's H100 figures (rates below) plus compile costs, which are guesses
until the first GPU run: `bench/gpu.py` records each part's wall time beside its estimate, so
that run says how to correct them. This module imports no torch: the orchestrator never
touches the GPU itself.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field

# Rates measured on one H100 (DESIGN.md, bf16): dense cuDNN SDPA, flash (FA2) SDPA, FlexAttention on
# the sparse mask (effective), a large bf16 matrix product.
CUDNN_TFLOPS = 620.0
FLASH_SDPA_TFLOPS = 350.0
FLEX_SPARSE_TFLOPS = 420.0
MATMUL_TFLOPS = 800.0
SMALL_MATMUL_TFLOPS = 400.0
"""The SCM model's many smaller products and pointwise kernels: half the large-product rate (a guess)."""
SCULPT4D_DENSITY = {8: 0.581, 16: 0.352, 32: 0.215}
"""DESIGN.md's mask densities at 4096 tokens per frame; other frame counts are estimated dense."""

# Compile and start-up costs on the GPU machine (16 cores): guesses, to be corrected from the first run.
PROCESS_START_S = 10.0
"""A fresh worker: python, torch, triton and t4dopt imports, CUDA context, first Inductor compile's setup."""
FLEX_COMPILE_S = 8.0
"""torch.compile(flex_attention) for one new shape."""
FLEX_RECOMPILE_S = 3.0
"""The same graph compiled again (our Flex path and the peer): Inductor's and Triton's caches hit."""
FA4_COMPILE_S = 15.0
"""FlexAttention's FLASH backend: FlashAttention-4's CuTe DSL compile, one shape."""
TRITON_AUTOTUNE_S = 6.0
"""Our kernel: three configurations compiled and timed, once per (head dim, dtype)."""
INDUCTOR_BASE_S = 8.0
INDUCTOR_PER_BLOCK_S = 3.0
TURBO4D_COMPILE_FACTOR = 1.3
"""turbo4d's passes, tables and our kernel's first autotuning on top of Inductor's compile."""
CACHE_COMPILE_FACTOR = 2.5
"""A cached model lowers several graphs (all computed, all reused, segments)."""
TEACACHE_COMPILE_FACTOR = 1.5
AOTI_COMPILE_S = 45.0
"""AOTInductor: the C++ wrapper and the Triton kernels of a one-block model, packaged."""
EXPLAIN_S = 5.0
PYTEST_S = 90.0
"""The 48 GPU-marked tests: Triton and FlexAttention compiles (4 xdist workers)."""
PYTEST_SERIAL_S = 180.0


@dataclass(frozen=True)
class Part:
    """One part of the GPU run: a bench module's ``main(argv, result)`` with fixed arguments."""

    name: str
    title: str
    module: str
    argv: Callable[[bool], list[str]]
    """The module's arguments for the GPU run (False) or the CPU dry run (True)."""
    estimate: Callable[[], float]
    """Seconds the GPU run should take."""
    dry_s: float
    """Seconds the dry run may take on the 2-core CPU machine: about five times what it took there
    with the other core busy, so that a loaded machine does not stop it (its shares are not what it tests)."""
    dry_env: dict[str, str] = field(default_factory=dict)
    """Environment the dry run's worker starts with."""

    def estimate_s(self, dry: bool) -> float:
        return self.dry_s if dry else self.estimate()

    def command(self, dry: bool) -> str:
        """The equivalent command line, for the notes."""
        env = "".join(f"{k}={v} " for k, v in self.dry_env.items()) if dry else ""
        return f"{env}python bench/{self.module}.py {' '.join(self.argv(dry))}".rstrip()


def _device(dry: bool) -> list[str]:
    return ["--device", "cpu" if dry else "cuda"]


# ----------------------------------------------------------------------------------------- pytest

def _pytest_estimate() -> float:
    return PROCESS_START_S + (PYTEST_S if importlib.util.find_spec("xdist") else PYTEST_SERIAL_S)


PYTEST = Part("pytest", "GPU-marked tests (pytest -m gpu)", "gpu_pytest", lambda dry: [], _pytest_estimate, dry_s=60)

# -------------------------------------------------------------------------------------- attention

ATTENTION_SHAPES = ("8x4096/16x128/bf16/fa4", "16x4096/16x128/bf16/fa4", "32x4096/16x128/bf16/fa4",
                    "16x4096/32x64/bf16", "16x4096/16x128/fp16")
"""DESIGN.md's shapes with FA4, then 64-dim heads (32 of them: same hidden size) and fp16 at 16 frames."""
ATTENTION_DRY_SHAPES = ("4x128/2x32/fp16/fa4",)
ATTENTION_TARGET_S = 2.0
ATTENTION_ROUNDS = (3, 10)


def _attention_argv(dry: bool) -> list[str]:
    if dry:
        return _device(dry) + ["--shapes", *ATTENTION_DRY_SHAPES, "--block-size", "64", "--target-s", "0",
                               "--min-rounds", "2", "--max-rounds", "2"]
    return _device(dry) + ["--shapes", *ATTENTION_SHAPES, "--block-size", "128", "--target-s", str(ATTENTION_TARGET_S),
                           "--min-rounds", str(ATTENTION_ROUNDS[0]), "--max-rounds", str(ATTENTION_ROUNDS[1])]


def _fa4_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def _attention_estimate() -> float:
    total, tuned = PROCESS_START_S, set()
    for spec in ATTENTION_SHAPES:
        grid, heads, dtype, *rest = spec.split("/")
        frames, tokens = (int(x) for x in grid.split("x"))
        count, dim = (int(x) for x in heads.split("x"))
        fa4 = rest == ["fa4"] and _fa4_installed()
        flops = 4.0 * count * (frames * tokens) ** 2 * dim
        sparse = flops * SCULPT4D_DENSITY.get(frames, 1.0)
        round_s = (flops / CUDNN_TFLOPS + flops / FLASH_SDPA_TFLOPS + 3 * sparse / FLEX_SPARSE_TFLOPS
                   + (sparse / CUDNN_TFLOPS if fa4 else 0.0)) / 1e12
        timed = 2 * round_s + min(max(ATTENTION_TARGET_S, ATTENTION_ROUNDS[0] * round_s), ATTENTION_ROUNDS[1] * round_s)
        compile_s = FLEX_COMPILE_S + FLEX_RECOMPILE_S + (FA4_COMPILE_S if fa4 else 0.0) + 2.0  # + tables, reference
        if (dim, dtype) not in tuned:
            tuned.add((dim, dtype))
            compile_s += TRITON_AUTOTUNE_S
        total += compile_s + timed
    return total


ATTENTION = Part("attention", "Attention kernels: ours beside cuDNN, flash, FlexAttention and FA4", "attention_gpu",
                 _attention_argv, _attention_estimate, dry_s=90, dry_env={"TRITON_INTERPRET": "1"})

# ------------------------------------------------------------------------------------- end to end

E2E_FRAMES = (16, 32)
E2E_DEPTH = 1
"""One of hunyuan3d-2.1's 21 blocks (DESIGN.md's block table); the speedup of the whole step is the block's."""
E2E_REPEATS = 5
HUNYUAN = dict(hidden=2048, tokens_per_frame=4096, image_tokens=1370)


def _e2e_argv(dry: bool) -> list[str]:
    if dry:
        return _device(dry) + ["--config", "tiny", "--frames", "4", "--depth", "1", "--block-size", "16",
                               "--repeats", "2", "--compiler", "eager"]
    return _device(dry) + ["--config", "hunyuan3d-2.1", "--frames", *map(str, E2E_FRAMES), "--depth", str(E2E_DEPTH),
                           "--block-size", "128", "--repeats", str(E2E_REPEATS), "--compiler", "inductor"]


def hunyuan_block_ms(frames: int, sparse: bool) -> float:
    """One Hunyuan3D-2.1 block from its FLOPs: linear layers at the matmul rate, attention at cuDNN's
    (the joint attention at FlexAttention's sparse rate when `sparse`). 73 ms dense at 16 frames
    against DESIGN.md's measured 77.3 ms."""
    h, p, image = HUNYUAN["hidden"], HUNYUAN["tokens_per_frame"], HUNYUAN["image_tokens"]
    n = frames * p
    linear = 36.0 * h * h * n  # spatial and joint q, kv, out; cross q, out; 4x MLP: 18 h^2 multiply-adds a token
    other_attention = 4.0 * p * p * h * frames + 4.0 * n * image * h
    joint = 4.0 * n * n * h
    joint_s = joint * SCULPT4D_DENSITY.get(frames, 1.0) / FLEX_SPARSE_TFLOPS if sparse else joint / CUDNN_TFLOPS
    return 1e3 * (linear / MATMUL_TFLOPS + other_attention / CUDNN_TFLOPS + joint_s) / 1e12


def _compile_s(depth: int, factor: float = 1.0) -> float:
    return factor * (INDUCTOR_BASE_S + INDUCTOR_PER_BLOCK_S * depth)


def _e2e_estimate() -> float:
    total = PROCESS_START_S + 2 * INDUCTOR_BASE_S  # the warm-up compiles of a tiny model
    for frames in E2E_FRAMES:
        dense, sparse = (E2E_DEPTH * hunyuan_block_ms(frames, s) / 1e3 for s in (False, True))
        total += EXPLAIN_S + sparse + _compile_s(E2E_DEPTH) + _compile_s(E2E_DEPTH, TURBO4D_COMPILE_FACTOR)
        total += (1 + E2E_REPEATS) * (dense + sparse)
    return total


END_TO_END = Part("end-to-end", "One denoising step of hunyuan3d-2.1 (one block): torch.compile vs turbo4d",
                  "end_to_end", _e2e_argv, _e2e_estimate, dry_s=60)

# ------------------------------------------------------------------------------------------ cache

CACHE_DEPTH = 2
"""Blocks of the SV4D-size SCMNet (its config has 10); per-block sizes are SV4D's."""
CACHE_STEPS = 50
SV4D = dict(hidden=1024, views=8, frames=5, tokens_per_frame=576, cond_tokens=576)


def _cache_argv(dry: bool) -> list[str]:
    common = ["--model", "scm-sv4d", "--seeds", "1", "--repeats", "1", "--thresholds", "0.3", "--levels", "all",
              "--teacache-thresholds", "0.2"]
    if dry:
        return _device(dry) + common + ["--depth", "1", "--override", "hidden=64", "heads=4", "tokens_per_frame=16",
                                         "cond_tokens=8", "cond_dim=32", "--steps", "4", "--max-reuse", "2",
                                         "--dtype", "fp32", "--compiler", "eager"]
    return _device(dry) + common + ["--depth", str(CACHE_DEPTH), "--steps", str(CACHE_STEPS), "--max-reuse", "11",
                                    "--dtype", "bf16", "--compiler", "inductor"]


def sv4d_step_ms(depth: int) -> float:
    """One SV4D-size step from its FLOPs (linear layers dominate; attention over 576, 8 and 5 tokens is small)."""
    h = SV4D["hidden"]
    tokens = SV4D["views"] * SV4D["frames"] * SV4D["tokens_per_frame"]
    linear = 44.0 * h * h * tokens  # spatial, camera, motion q/kv/out, cross q/out, 4x MLP: 22 h^2 a token
    attention = 4.0 * SV4D["tokens_per_frame"] * h * tokens + 4.0 * SV4D["cond_tokens"] * h * tokens
    return 1e3 * depth * (linear + attention) / (SMALL_MATMUL_TFLOPS * 1e12)


def _cache_estimate() -> float:
    step_s = sv4d_step_ms(CACHE_DEPTH) / 1e3
    rows = [(1.0, 1.0), (TURBO4D_COMPILE_FACTOR, 1.0), (CACHE_COMPILE_FACTOR, 0.2), (TEACACHE_COMPILE_FACTOR, 0.2)]
    """(compile factor, share of sublayers computed) of the rows: full compute, threshold 0, cached, teacache."""
    total = PROCESS_START_S + 2 * CACHE_STEPS * step_s  # the eager reference sample
    for factor, computed in rows:
        total += _compile_s(CACHE_DEPTH, factor) + 2 * CACHE_STEPS * step_s * computed  # warm-up pass + 1 repeat
    return total


CACHE = Part("cache", "Reuse across steps at SV4D size (scm-sv4d)", "cache", _cache_argv, _cache_estimate, dry_s=80)

# ------------------------------------------------------------------------------------------- AOTI

AOTI_FRAMES = 8
AOTI_REPEATS = 10


def _aoti_argv(dry: bool) -> list[str]:
    if dry:
        return _device(dry) + ["--config", "tiny", "--depth", "1", "--frames", "4", "--tokens-per-frame", "64",
                               "--block-size", "16", "--dtype", "fp32", "--forms", "turbo4d", "aoti", "--repeats", "2",
                               "--compiler", "eager"]
    return _device(dry) + ["--config", "hunyuan3d-2.1", "--depth", "1", "--frames", str(AOTI_FRAMES), "--block-size",
                           "128", "--dtype", "bf16", "--forms", "turbo4d", "aoti", "--repeats", str(AOTI_REPEATS),
                           "--compiler", "inductor"]


def _aoti_estimate() -> float:
    step_s = hunyuan_block_ms(AOTI_FRAMES, True) / 1e3
    return (PROCESS_START_S + _compile_s(1, TURBO4D_COMPILE_FACTOR) + EXPLAIN_S + AOTI_COMPILE_S
            + PROCESS_START_S + 2 * (1 + AOTI_REPEATS) * step_s)


AOTI = Part("aoti", "AOTInductor package (our Triton kernel as a triton_op) vs torch.compile", "export",
            _aoti_argv, _aoti_estimate, dry_s=200)

PARTS: list[Part] = [PYTEST, ATTENTION, END_TO_END, CACHE, AOTI]
"""In the order they run: the tests first (a broken kernel makes every figure after it moot)."""
