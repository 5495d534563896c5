"""Speed and quality of reuse across denoising steps on the trained SCM testbed, beside a TeaCache-style baseline.

Every row samples the same seeds (noise and conditioning scene) through a whole sampling loop
and is compared with the full-compute sample of that seed (PSNR, relative L2); time is the
best of the repeats per sample, speedup is against plain ``torch.compile`` (Inductor) of the
same model in the same run. Rows:

- inductor: plain ``torch.compile``, full compute (the reference for speed);
- turbo4d threshold 0: our runtime computing everything (its overhead);
- turbo4d block / block+token / all levels at each threshold: ``options["cache"]``;
- teacache-style: one global decision per step from the accumulated relative L1 change of the
  first block's timestep-modulated input (as TeaCache does, with one ``.item()`` per step),
  reusing the residual of the whole block stack; no token or chain level; blocks compiled
  with Inductor;
- with ``--model joint-tiny``: the cache combined with sculpt4d block-sparse joint attention
  applied training-free (quality against the dense model);
- with ``--model joint-tiny-sculpt4d`` (trained with the sculpt4d mask, which it runs as a dense
  masked SDPA): the cache combined with the block-sparse kernel computing that same mask; the
  reference and the inductor row are the model as trained;
- with ``--model scm-sv4d``: an SV4D-size SCMNet (8 views x 5 frames x 576 tokens, hidden 1024,
  depth 10 or ``--depth``; ``--override NAME=VALUE`` changes other sizes), randomly initialised
  (seed 0), on random noise and conditioning: for the GPU machine (``--device cuda --dtype
  bf16``), where the table adds peak memory.

``--levels`` keeps only some of the turbo4d level rows, ``--teacache-thresholds`` sets the
TeaCache-style rows (none: no such rows), and ``--compiler eager`` runs every row without
Inductor (turbo4d with ``target="eager"``), for the quick dry run.

    python bench/cache.py [--model scm-tiny] [--steps 50] [--seeds 2] [--threads 1] [--plot curve.png]
    python bench/cache.py --model scm-sv4d --device cuda --dtype bf16 --thresholds 0.3 1.0 --max-reuse 11 15
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import t4dopt  # noqa: E402
from device_info import describe  # noqa: E402
from part_result import Column, PartResult  # noqa: E402
from t4dopt.data.tasks import EVAL_SEED, scene_batch  # noqa: E402
from t4dopt.models import SCMNet, pretrained, sample_flow_matching  # noqa: E402
from t4dopt.models.joint_mask import joint_mask, set_joint_mask  # noqa: E402
from t4dopt.models.sculpt4d_dit import timestep_embedding  # noqa: E402
from t4dopt.quality import psnr, relative_l2  # noqa: E402

VIEWS, FRAMES, TOKENS = 4, 8, 64
"""The trained testbed's grid."""
SV4D = "scm-sv4d"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
THRESHOLDS = (0.05, 0.1, 0.2, 0.3)
TEACACHE_THRESHOLDS = (0.1, 0.2, 0.4, 0.8)
LEVELS = {"block": ["block"], "block+token": ["block", "token"], "all": ["block", "token", "chain"]}
"""The turbo4d level rows (``--levels``); ``all`` is the only one for the joint models."""
COMPILERS = ("inductor", "eager")
COLUMNS = [Column("method", "method"), Column("seconds", "s/sample", "{:.3f}"), Column("speedup", "speedup", "{:.2f}x"),
           Column("psnr", "PSNR dB", "{:.1f}"), Column("rel_l2", "rel. L2", "{:.4f}"),
           Column("computed", "sublayer calls computed"), Column("peak_gib", "peak GiB", "{:.2f}")]


class TeaCacheStyle(torch.nn.Module):
    """SCMNet with a TeaCache-style step cache: reuse the whole block stack's residual while the
    accumulated relative L1 change of block 0's modulated input stays under `threshold`."""

    def __init__(self, model: SCMNet, threshold: float, steps: int, warmup: int = 2, compiler: str = "inductor"):
        super().__init__()
        self.model, self.threshold, self.steps, self.warmup = model, threshold, steps, warmup
        self.blocks = torch.compile(self._blocks, backend=compiler)
        self.stem = torch.compile(self._stem, backend=compiler)
        self.head = torch.compile(lambda h: model.final(model.final_norm(h)), backend=compiler)
        self.start()

    def start(self) -> None:
        self.step, self.accumulated, self.previous, self.residual = 0, 0.0, None, None
        self.computed = 0

    def _stem(self, x, t):
        model = self.model
        _, views, frames, tokens, _ = x.shape
        h = model.embed(x) + model.position_embedding(views, frames, tokens, x.device).to(x.dtype)
        temb = model.time_mlp(timestep_embedding(t, model.config.hidden).to(h.dtype))
        first = model.blocks[0]
        shift, scale, _ = first.modulation(F.silu(temb)).view(x.shape[0], 1, 1, 1, 3, 5, -1).unbind(dim=4)
        return h, temb, first.norms[0](h) * (1 + scale[..., 0, :]) + shift[..., 0, :]

    def _blocks(self, h, temb, cond):
        for block in self.model.blocks:
            h = block(h, temb, cond)
        return h

    def forward(self, x, t, cond):
        h, temb, modulated = self.stem(x, t)
        if self.previous is not None:
            change = ((modulated - self.previous).abs().mean() / self.previous.abs().mean()).item()
            self.accumulated += change
        self.previous = modulated
        compute = (self.step < self.warmup or self.step >= self.steps - 1 or self.residual is None
                   or self.accumulated >= self.threshold)
        if compute:
            out = self.blocks(h, temb, cond)
            self.residual, self.accumulated = out - h, 0.0
            self.computed += 1
        else:
            out = h + self.residual
        self.step += 1
        return self.head(out)


def _model(name: str, depth: int | None, overrides: dict[str, int]) -> torch.nn.Module:
    if name == SV4D:
        torch.manual_seed(0)
        return SCMNet("sv4d", **({"depth": depth} if depth else {}), **overrides)
    if overrides:
        raise SystemExit(f"--override applies to --model {SV4D} only, not {name}")
    return pretrained(name)


def _override(text: str) -> tuple[str, int]:
    name, _, value = text.partition("=")
    try:
        return name, int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--override {text!r}: expected NAME=INTEGER, e.g. hidden=64") from None


def _grid(name: str, model: torch.nn.Module) -> tuple[int, int, int]:
    """(views, frames, tokens per frame) the model is sampled at."""
    if name == SV4D:
        return model.config.views, model.config.frames, model.config.tokens_per_frame
    return VIEWS, FRAMES, TOKENS


def _inputs(name: str, model: torch.nn.Module, kind: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise and conditioning for one seed: a held-out scene for the trained models, random for sv4d size."""
    generator = torch.Generator().manual_seed(seed)
    if name == SV4D:
        config = model.config
        noise = torch.randn(1, config.views, config.frames, config.tokens_per_frame, config.in_channels,
                            generator=generator)
        return noise, torch.randn(1, config.cond_tokens, config.cond_dim, generator=generator)
    clean, cond = scene_batch(kind, 1, views=VIEWS, frames=FRAMES, seed=EVAL_SEED + seed)
    return torch.randn(clean.shape, generator=generator), cond


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed_samples(model: Callable, inputs: list, steps: int, repeats: int, device: str,
                   before: Callable[[], None] = lambda: None) -> tuple[float, list[torch.Tensor]]:
    """Best seconds per sample over `repeats` passes over the seeds, after a warm-up pass, and the samples."""
    samples = []
    with torch.no_grad():
        for noise, cond in inputs:
            before()
            samples.append(sample_flow_matching(model, noise, cond, steps=steps))
        best = math.inf
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            for noise, cond in inputs:
                before()
                sample_flow_matching(model, noise, cond, steps=steps)
            _sync(device)
            best = min(best, (time.perf_counter() - start) / len(inputs))
    return best, samples


def _quality(samples: list[torch.Tensor], references: list[torch.Tensor]) -> tuple[float, float]:
    return (sum(psnr(s, r) for s, r in zip(samples, references)) / len(samples),
            sum(relative_l2(s, r) for s, r in zip(samples, references)) / len(samples))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="scm-tiny", choices=["scm-tiny", "joint-tiny", "joint-tiny-sculpt4d", SV4D])
    parser.add_argument("--depth", type=int, help=f"blocks of {SV4D} (default: its config's 10)")
    parser.add_argument("--override", type=_override, nargs="+", default=[], metavar="NAME=VALUE",
                        help=f"other sizes of {SV4D}'s config, e.g. hidden=64 tokens_per_frame=36")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--thresholds", type=float, nargs="+", default=THRESHOLDS)
    parser.add_argument("--max-reuse", type=int, nargs="+", default=[8, 12],
                        help="max_reuse values; block and block+token rows use the first")
    parser.add_argument("--levels", nargs="+", choices=sorted(LEVELS), default=list(LEVELS),
                        help="turbo4d level rows to run (the joint models have only 'all')")
    parser.add_argument("--teacache-thresholds", type=float, nargs="*", default=TEACACHE_THRESHOLDS)
    parser.add_argument("--compiler", choices=COMPILERS, default="inductor")
    parser.add_argument("--plot", help="write the speed-vs-quality curve to this PNG")
    return parser.parse_args(argv)


def run(args: argparse.Namespace, result: PartResult | None = None) -> PartResult:
    result = result or PartResult()
    if args.threads:
        torch.set_num_threads(args.threads)
    result.environment = describe(torch.device(args.device))
    dtype = DTYPES[args.dtype]
    model = _model(args.model, args.depth, dict(args.override)).to(args.device, dtype).eval()
    kind = "scm" if args.model.startswith("scm") else "joint"
    sparse_model = model
    if kind == "joint" and joint_mask(model) is not None:
        # turbo4d leaves an attention that already has a mask dense: the sparse kernel computes that mask instead.
        sparse_model = set_joint_mask(copy.deepcopy(model), None)
    inputs = [tuple(t.to(args.device, dtype) for t in _inputs(args.model, model, kind, seed))
              for seed in range(args.seeds)]
    views, frames, tokens = _grid(args.model, model)
    layout = ({"frames": frames, "views": views, "tokens_per_frame": tokens} if kind == "scm"
              else {"frames": frames, "tokens_per_frame": tokens})
    with torch.no_grad():
        references = [sample_flow_matching(model, noise, cond, steps=args.steps) for noise, cond in inputs]

    cuda = args.device == "cuda"
    table = result.table("samples", COLUMNS, f"{args.model}, {args.steps} steps, {args.seeds} seeds, device "
                         f"{args.device}, {args.dtype}, {args.compiler}, threads {torch.get_num_threads()}; "
                         "quality against the full-compute sample, speedup against the first row")

    def run_row(name: str, compiled: Callable, before: Callable[[], None] = lambda: None,
                computed: Callable[[], str] = lambda: "100%") -> None:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        seconds, samples = _timed_samples(compiled, inputs, args.steps, args.repeats, args.device, before)
        quality, error = _quality(samples, references)
        baseline = table.rows[0]["seconds"] if table.rows else seconds
        result.add_row(table, {"method": name, "seconds": seconds, "speedup": baseline / seconds, "psnr": quality,
                               "rel_l2": error, "computed": computed(),
                               "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None})
        print(f"  {name}: {seconds:.3f} s/sample, {quality:.1f} dB", flush=True)

    def share_computed() -> str:
        units = t4dopt.cache_report(sparse_model).units
        return f"{100 * sum(u.computed for u in units) / max(sum(u.calls for u in units), 1):.0f}%"

    print(table.caption, flush=True)
    torch._dynamo.reset()
    run_row(f"{args.compiler} (full compute)", torch.compile(model, backend=args.compiler))
    base = {"layout": layout, "target": args.compiler}
    if kind == "joint":
        base["sparse"] = {"policy": "sculpt4d", "block_size": 16}
    torch._dynamo.reset()
    run_row("turbo4d, threshold 0", torch.compile(sparse_model, backend="turbo4d",
                                                  options={**base, "cache": {"threshold": 0.0}}))
    for level in args.levels if kind == "scm" else ["all"]:
        label = "all levels" if level == "all" else level
        for max_reuse in args.max_reuse if level == "all" else args.max_reuse[:1]:
            for threshold in args.thresholds:
                torch._dynamo.reset()
                cache = {"threshold": threshold, "levels": LEVELS[level], "max_reuse": max_reuse, "steps": args.steps}
                compiled = torch.compile(sparse_model, backend="turbo4d", options={**base, "cache": cache})
                run_row(f"turbo4d {label}, threshold {threshold:g}, max_reuse {max_reuse}", compiled,
                        computed=share_computed)
    if kind == "scm":
        for threshold in args.teacache_thresholds:
            torch._dynamo.reset()
            teacache = TeaCacheStyle(model, threshold, args.steps, compiler=args.compiler)
            run_row(f"teacache-style, threshold {threshold:g}", teacache, before=teacache.start,
                    computed=lambda: f"{100 * teacache.computed / args.steps:.0f}%")

    if args.plot:
        from t4dopt.plotting import draw_speed_quality_curve

        curves: dict[str, list[tuple[str, float, float]]] = {}
        for row in table.rows[2:]:
            name = row["method"]
            if name.startswith(("turbo4d all", "teacache")):
                curve = "turbo4d (all levels)" if name.startswith("turbo4d") else "teacache-style"
                label = name.split("threshold ")[1].replace(", max_reuse ", "/")
                curves.setdefault(curve, []).append((label, row["speedup"], min(row["psnr"], 60.0)))
        result.note(f"wrote {draw_speed_quality_curve(curves, args.plot)}")
    return result


def main(argv: Sequence[str] | None = None, result: PartResult | None = None) -> PartResult:
    result = run(parse_args(argv), result)
    print()
    print(result.markdown())
    return result


if __name__ == "__main__":
    main()
