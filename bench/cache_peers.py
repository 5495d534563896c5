"""Our step cache beside diffusers' own caches, on the trained diffusers testbeds (`wan-tiny`, `cogvideox-tiny`).

Every row samples the same held-out seeds (noise and conditioning scene) with flow-matching
Euler (`t4dopt.models.sample_diffusers`: each call inside ``transformer.cache_context``, as
diffusers' pipelines call a transformer) and is compared with the eager full-compute sample of
that seed (PSNR; mean and worst seed). Rows:

- full compute, eager and ``torch.compile`` (Inductor): the reference for speed is the latter;
- turbo4d: ``torch.compile(model, backend="turbo4d", options={"cache": {...}})`` over a
  threshold x ``max_reuse`` x ``decision`` grid (per unit, and step-wide: one decision per call;
  threshold 0: the cache machinery reusing nothing), and ``t4dopt.calibrate`` with a 30 dB
  budget over the same grid, its pick marked;
- each cache diffusers offers, ``transformer.enable_cache(config)``, eager as diffusers users
  run them and under ``torch.compile`` where the hook allows it (a hook that makes dynamo
  recompile past its limit is reported, not run eagerly in disguise): FirstBlockCache,
  TaylorSeer (full and lite), MagCache (its ratios from its documented calibration run,
  ``MagCacheConfig(calibrate=True)``, on a seed outside the measured ones), SeaCache (for
  CogVideoX through the generic path with a ``raw_vision_callback`` written here), Pyramid
  Attention Broadcast and FasterCache (both read ``current_timestep`` as a pipeline sets it;
  FasterCache with ``is_guidance_distilled=True``: there is no unconditional branch here).
  After each sample the diffusers models get ``_reset_stateful_cache()``, as pipelines do;
  turbo4d gets nothing (it detects a new generation itself).

Timing: after a warm-up pass (compiles, and the samples scored), `--rounds` interleaved rounds,
each timing every row once over all seeds (in an order rotated per round); a row's time is its
median over rounds, its speedup that of compiled full compute divided by it, within this run.
A row whose samples change between rounds is flagged. Use one thread on a shared machine.

    python bench/cache_peers.py --threads 1 [--models wan-tiny cogvideox-tiny] [--steps 20 50]
        [--seeds 4] [--rounds 3] [--families turbo4d MagCache ...] [--compiled-families MagCache ...]
        [--decisions unit step]
        [--markdown out.md] [--plot-dir bench]
    python bench/cache_peers.py --quick      # smoke test: a few steps, one setting each, no Inductor
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import inspect
import io
import math
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch._dynamo.utils import counters

import t4dopt
from t4dopt.data.tasks import EVAL_SEED, video_batch
from t4dopt.models import pretrained, sample_diffusers
from t4dopt.models.diffusers_testbeds import TESTBEDS
from t4dopt.options import DECISIONS
from t4dopt.quality import psnr

BUDGET_DB = 30.0
THRESHOLDS = (0.1, 0.2, 0.3, 0.5)
MAX_REUSE = (4, 8)
MAGCACHE_CALIBRATION_SEED = 100  # held out, and not one of the measured seeds
FAMILIES = ("turbo4d", "FirstBlockCache", "TaylorSeer", "MagCache", "SeaCache", "PAB", "FasterCache")
PSNR_CAP = 60.0  # for the plot: samples closer than this to full compute are drawn at the cap


@dataclass
class Clock:
    """The timestep of the call under way, as a pipeline's ``current_timestep``."""

    timestep: float = 1000.0

    def tick(self, index: int, timestep: float) -> None:
        self.timestep = timestep


@dataclass
class Method:
    """One row: what `sample_diffusers` calls, and what runs after each sample."""

    family: str
    setting: str
    mode: str  # "eager" or "compiled"
    model: Callable[..., Any]
    after: Callable[[], None] = lambda: None
    computed: Callable[[], str] = lambda: "-"
    cache_calls: Callable[[], int] | None = None
    """turbo4d rows: the calls its cache runtimes ran so far (`CacheReport.total_calls`)."""
    note: str = ""
    seconds: list[float] = field(default_factory=list)
    samples: list[torch.Tensor] = field(default_factory=list)
    varies: bool = False
    recompiled: bool = False
    uncached: bool = False

    @property
    def name(self) -> str:
        return f"{self.family}, {self.setting}" if self.setting else self.family


@dataclass(frozen=True)
class Result:
    """A measured row."""

    family: str
    setting: str
    mode: str
    seconds: float
    speedup: float
    psnr: float
    worst_psnr: float
    computed: str
    note: str


# --- the rows -------------------------------------------------------------------------------------


ISOLATES = "isolate_recompiles" in inspect.signature(torch.compile).parameters
"""Whether this torch can keep a compile's frame decisions to itself (torch >= 2.13)."""


def _diffusers_cache(model: torch.nn.Module, config: Any, mode: str, compiler: str) -> tuple[Callable, Callable]:
    """A copy of `model` with diffusers' cache `config` enabled (compiled for mode "compiled"), and its reset.

    A hooked copy breaks its graph inside the blocks' loop, and dynamo then decides to skip the
    model class's forward: for every copy, the plain ``torch.compile`` and turbo4d rows compiled
    before it included, which from then on would run eagerly, block by block (their samples change
    between rounds). ``isolate_recompiles`` keeps that decision to the hooked copy's own compile.
    """
    cached = copy.deepcopy(model)
    cached.enable_cache(config)
    if mode != "compiled":
        return cached, cached._reset_stateful_cache
    isolated = {"isolate_recompiles": True} if ISOLATES else {}
    return torch.compile(cached, backend=compiler, **isolated), cached._reset_stateful_cache


def _cogvideox_raw_vision(module: torch.nn.Module, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """SeaCache's generic-path adapter for CogVideoX: the video latents, each [C, F, H, W]."""
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    return list(hidden.transpose(1, 2).unbind(0))  # [B, F, C, H, W]


def _mag_ratios(model: torch.nn.Module, cond: torch.Tensor, noise: torch.Tensor, steps: int) -> list[float]:
    """MagCache's documented calibration: one run with ``calibrate=True``, whose printed ratios are read back."""
    from diffusers import MagCacheConfig

    calibrating = copy.deepcopy(model)
    calibrating.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), torch.no_grad():
        sample_diffusers(calibrating, noise, cond, steps=steps)
    lines = printed.getvalue().splitlines()
    marker = next(i for i, line in enumerate(lines) if "Calibration Complete" in line)
    return [float(r) for r in ast.literal_eval(lines[marker + 1].strip())]


def peer_configs(name: str, model: torch.nn.Module, steps: int, clock: Clock, quick: bool,
                 calibration: tuple[torch.Tensor, torch.Tensor]) -> list[tuple[str, str, Callable[[], Any]]]:
    """(family, setting, config factory) for every diffusers cache setting measured on `name`."""
    from diffusers import (FasterCacheConfig, FirstBlockCacheConfig, MagCacheConfig, PyramidAttentionBroadcastConfig,
                           SeaCacheConfig, TaylorSeerCacheConfig)

    channels_first = TESTBEDS[name].channels_first
    rows: list[tuple[str, str, Callable[[], Any]]] = []
    for threshold in (0.1,) if quick else (0.05, 0.1, 0.15, 0.2, 0.3):
        rows.append(("FirstBlockCache", f"threshold {threshold:g}",
                     lambda threshold=threshold: FirstBlockCacheConfig(threshold=threshold)))
    for interval, lite in ((3, True),) if quick else ((3, True), (5, True), (8, True), (3, False), (5, False)):
        rows.append(("TaylorSeer", f"{'lite' if lite else 'full'}, interval {interval}",
                     lambda interval=interval, lite=lite: TaylorSeerCacheConfig(
                         cache_interval=interval, use_lite_mode=lite, taylor_factors_dtype=torch.float32)))
    noise, cond = calibration
    ratios = _mag_ratios(model, cond, noise, steps)
    for threshold in (0.12,) if quick else (0.06, 0.12, 0.24):
        rows.append(("MagCache", f"threshold {threshold:g}",
                     lambda threshold=threshold: MagCacheConfig(threshold=threshold, num_inference_steps=steps,
                                                                mag_ratios=ratios)))
    vision = None if channels_first else _cogvideox_raw_vision
    for threshold, most in ((1.0, 4),) if quick else ((0.25, 2), (1.0, 4), (2.0, 4), (4.0, 8)):
        rows.append(("SeaCache", f"threshold {threshold:g}, max {most}" + ("" if vision is None else " (our adapter)"),
                     lambda threshold=threshold, most=most: SeaCacheConfig(
                         threshold=threshold, max_consecutive_cached=most, raw_vision_callback=vision)))
    for skip in (2,) if quick else (2, 3, 4):
        rows.append(("PAB", f"spatial every {skip}",
                     lambda skip=skip: PyramidAttentionBroadcastConfig(
                         spatial_attention_block_skip_range=skip, current_timestep_callback=lambda: clock.timestep)))
    for skip in (2,) if quick else (2, 3):
        rows.append(("FasterCache", f"spatial every {skip}",
                     lambda skip=skip: FasterCacheConfig(
                         spatial_attention_block_skip_range=skip, spatial_attention_timestep_skip_range=(-1, 681),
                         low_frequency_weight_update_timestep_range=(99, 641),
                         high_frequency_weight_update_timestep_range=(-1, 301),
                         attention_weight_callback=lambda _: 0.3, tensor_format="BCFHW" if channels_first else "BFCHW",
                         is_guidance_distilled=True, current_timestep_callback=lambda: clock.timestep)))
    return rows


def _share_computed(model: torch.nn.Module) -> Callable[[], str]:
    """The share of the last generation's unit calls `model`'s cache computed (while its runtimes live)."""
    def share() -> str:
        units = t4dopt.cache_report(model).units
        calls = sum(u.calls for u in units)
        return f"{100 * sum(u.computed for u in units) / calls:.0f}% of {len(units)} units" if calls else "no units"
    return share


def _frozen(text: str) -> Callable[[], str]:
    return lambda: text


Setting = tuple[float, int, str]
"""A turbo4d setting: threshold, ``max_reuse``, ``decision``."""


def setting_name(threshold: float, max_reuse: int, decision: str) -> str:
    if not threshold:
        return "threshold 0"
    return f"threshold {threshold:g}, max_reuse {max_reuse}" + (", step-wide" if decision == "step" else "")


def turbo4d_rows(model: torch.nn.Module, steps: int, grid: list[Setting], target: str) -> list[Method]:
    """turbo4d at threshold 0 and over `grid`, each on its own copy of the model."""
    methods = []
    for threshold, max_reuse, decision in [(0.0, 0, "unit")] + grid:
        copied = copy.deepcopy(model)
        cache = ({"threshold": threshold, "steps": steps, "decision": decision}
                 | ({"max_reuse": max_reuse} if max_reuse else {}))
        options = {"cache": cache} | ({"target": target} if target != "inductor" else {})
        setting = setting_name(threshold, max_reuse, decision)
        methods.append(Method("turbo4d", setting, "compiled", torch.compile(copied, backend="turbo4d", options=options),
                              computed=_share_computed(copied),
                              cache_calls=lambda copied=copied: t4dopt.cache_report(copied).total_calls))
    return methods


def run_calibrate(model: torch.nn.Module, inputs: list[tuple[torch.Tensor, torch.Tensor]], steps: int,
                  grid: list[Setting], target: str) -> tuple[str | None, str]:
    """`t4dopt.calibrate` with a 30 dB budget over the grid: its pick and a note (its own table, or why none)."""
    def run(m: Callable) -> torch.Tensor:
        return torch.cat([sample_diffusers(m, noise, cond, steps=steps) for noise, cond in inputs])

    options = {"cache": {"steps": steps}} | ({"target": target} if target != "inductor" else {})
    try:
        result = t4dopt.calibrate(copy.deepcopy(model), run, {"psnr": BUDGET_DB}, options=options,
                                  thresholds=sorted({t for t, _, _ in grid}), max_reuse=sorted({m for _, m, _ in grid}),
                                  decisions=sorted({d for _, _, d in grid}))
    except t4dopt.T4DOptionError as error:
        return None, f"calibrate: {error}"
    print(result.table(), flush=True)
    if result.options is None:
        return None, f"calibrate: {result.reason}"
    cache = result.options["cache"]
    return setting_name(cache["threshold"], cache["max_reuse"], cache.get("decision", "unit")), ""


# --- measuring ------------------------------------------------------------------------------------


def _inputs(name: str, seeds: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Noise and conditioning (a held-out scene) per seed."""
    out = []
    for seed in seeds:
        clean, cond = video_batch(1, channels_first=TESTBEDS[name].channels_first, seed=EVAL_SEED + seed)
        out.append((torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed)), cond))
    return out


def _samples(method: Method, inputs: list, steps: int, clock: Clock) -> list[torch.Tensor]:
    samples = []
    for noise, cond in inputs:
        samples.append(sample_diffusers(method.model, noise, cond, steps=steps, on_step=clock.tick))
        method.after()
    return samples


def _runs(method: Method, inputs: list, steps: int, clock: Clock) -> list[torch.Tensor] | None:
    """The samples, or None with the reason in the note where the row fails to run."""
    try:
        return _samples(method, inputs, steps, clock)
    except Exception as error:  # a peer that does not run here is a row with its reason, not a crash
        method.note = f"not run: {type(error).__name__}: {str(error).splitlines()[0][:160]}"
        print(f"  {method.name} ({method.mode}): {method.note}", flush=True)
        return None


def _warm_up(method: Method, inputs: list, steps: int, clock: Clock) -> bool:
    """Compile and sample once (the samples scored); False, with the reason in the note, where it fails."""
    start, graphs = time.perf_counter(), counters["stats"]["unique_graphs"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", t4dopt.T4DWarning)
        samples = _runs(method, inputs, steps, clock)
    if samples is None:
        return False
    method.samples = samples
    reasons = sorted({str(w.message).splitlines()[0][:160] for w in caught if issubclass(w.category, t4dopt.T4DWarning)})
    if method.mode == "compiled":
        reasons.insert(0, f"{counters['stats']['unique_graphs'] - graphs} dynamo graphs")
    method.note = "; ".join(filter(None, [method.note, *reasons]))
    print(f"  {method.name} ({method.mode}): warm-up {time.perf_counter() - start:.1f} s", flush=True)
    return True


def measure(methods: list[Method], inputs: list, steps: int, rounds: int, clock: Clock) -> list[Method]:
    """Warm every row up, then time `rounds` interleaved rounds; the rows that ran.

    Compiled copies of one model class share dynamo's code caches, and a frame compiled for one
    backend is compiled again for the next (dynamo guards on the backend): an untimed pass over
    every row after the warm-up settles that; a row that still compiles while timed is flagged.
    """
    ran = [m for m in methods if _warm_up(m, inputs, steps, clock)]
    ran = [m for m in ran if _runs(m, inputs, steps, clock) is not None]
    for round_index in range(rounds):
        shift = round_index % max(len(ran), 1)
        for method in ran[shift:] + ran[:shift]:
            graphs = counters["stats"]["unique_graphs"]
            served = method.cache_calls() if method.cache_calls else 0
            start = time.perf_counter()
            samples = _samples(method, inputs, steps, clock)
            method.seconds.append((time.perf_counter() - start) / len(inputs))
            if method.cache_calls:
                method.uncached |= method.cache_calls() - served != steps * len(inputs)
            method.varies |= any(not torch.equal(a, b) for a, b in zip(samples, method.samples))
            method.recompiled |= counters["stats"]["unique_graphs"] != graphs
        print(f"  round {round_index + 1}/{rounds} done", flush=True)
    return ran


def results(ran: list[Method], references: list[torch.Tensor]) -> list[Result]:
    baseline = statistics.median(next(m for m in ran if m.family == "full compute" and m.mode == "compiled").seconds)
    rows = []
    for m in ran:
        scores = [psnr(s, r) for s, r in zip(m.samples, references)]
        seconds = statistics.median(m.seconds)
        note = "; ".join(filter(None, [m.note, "samples differ between rounds (another path ran while timed)" if m.varies else "",
                                       "compiled again while timed" if m.recompiled else "",
                                       "ran without its cache while timed" if m.uncached else ""]))
        rows.append(Result(m.family, m.setting, m.mode, seconds, baseline / seconds, statistics.mean(scores),
                           min(scores), m.computed(), note))
    return rows


# --- reporting ------------------------------------------------------------------------------------


def _db(value: float) -> str:
    return "exact" if math.isinf(value) else f"{value:.1f}"


def _best(rows: list[Result], keep: Callable[[Result], bool]) -> Result | None:
    fitting = [r for r in rows if keep(r) and r.psnr >= BUDGET_DB]
    return max(fitting, key=lambda r: r.speedup, default=None)


def _decision(row: Result) -> str:
    return "step-wide" if row.setting.endswith("step-wide") else "per unit"


def table(name: str, steps: int, rows: list[Result], picked: str | None, pick_note: str) -> str:
    lines = [f"### {name}, {steps} steps", "",
             "| method | setting | mode | s/sample | speedup vs compiled | PSNR dB (worst seed) | computed | note |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mark = " **(calibrate's pick)**" if r.family == "turbo4d" and r.setting == picked else ""
        lines.append(f"| {r.family} | {r.setting}{mark} | {r.mode} | {r.seconds:.3f} | {r.speedup:.2f}x | "
                     f"{_db(r.psnr)} ({_db(r.worst_psnr)}) | {r.computed} | {r.note} |")
    lines += ["", f"Best at PSNR >= {BUDGET_DB:g} dB, per method and mode:", "",
              "| method | mode | setting | speedup vs compiled | PSNR dB |", "|---|---|---|---|---|"]
    groups = list(dict.fromkeys((r.family, r.mode) for r in rows if r.family != "full compute"))
    for family, mode in groups:
        best = _best(rows, lambda r, f=family, m=mode: r.family == f and r.mode == m)
        if best is None:
            lines.append(f"| {family} | {mode} | none at >= {BUDGET_DB:g} dB | - | - |")
        else:
            lines.append(f"| {family} | {mode} | {best.setting} | {best.speedup:.2f}x | {_db(best.psnr)} |")
    for decision in ("per unit", "step-wide"):
        best = _best(rows, lambda r, d=decision: r.family == "turbo4d" and _decision(r) == d)
        if best is not None:
            lines.append(f"| turbo4d, {decision} | {best.mode} | {best.setting} | {best.speedup:.2f}x | "
                         f"{_db(best.psnr)} |")
    ours = _best(rows, lambda r: r.family == "turbo4d")
    peer = _best(rows, lambda r: r.family not in ("turbo4d", "full compute"))
    zero = next((r for r in rows if r.family == "turbo4d" and r.setting == "threshold 0"), None)
    lines.append("")
    if ours and peer:
        lines.append(f"- ours / best diffusers cache at >= {BUDGET_DB:g} dB: {ours.speedup:.2f}x / {peer.speedup:.2f}x "
                     f"({peer.family}, {peer.mode}) = **{ours.speedup / peer.speedup:.2f}** (target >= 1.5)")
    if zero:
        lines.append(f"- turbo4d threshold 0: **{zero.speedup:.2f}x** of plain torch.compile (target >= 1.0)")
    chosen = next((r for r in rows if r.family == "turbo4d" and r.setting == picked), None)
    if chosen and ours:
        lines.append(f"- calibrate's pick ({picked}): {chosen.speedup:.2f}x at {_db(chosen.psnr)} dB, "
                     f"**{chosen.speedup / ours.speedup:.2f}** of our best (target >= 0.9)")
    elif pick_note:
        lines.append(f"- {pick_note}")
    return "\n".join(lines)


def plot(name: str, steps: int, rows: list[Result], path: Path) -> Path:
    from t4dopt.plotting import draw_speed_quality_curve

    curves: dict[str, list[tuple[str, float, float]]] = {}
    for r in rows:
        label = r.setting.replace("threshold ", "").replace(", max_reuse ", "/") if r.family == "turbo4d" else ""
        curves.setdefault(f"{r.family} ({r.mode})", []).append((label, r.speedup, min(r.psnr, PSNR_CAP)))
    return draw_speed_quality_curve(curves, path, x_label=f"{name}, {steps} steps: speedup vs torch.compile",
                                    y_label=f"PSNR vs full compute (dB, capped at {PSNR_CAP:g})")


def bench(name: str, steps: int, args: argparse.Namespace) -> str:
    torch._dynamo.reset()
    model = pretrained(name)
    seeds = list(range(args.seeds))
    inputs = _inputs(name, seeds)
    with torch.no_grad():
        references = [sample_diffusers(model, noise, cond, steps=steps) for noise, cond in inputs]
    grid = [(t, m, d) for d in args.decisions for m in args.max_reuse
            for t in (args.step_thresholds or args.thresholds if d == "step" else args.thresholds)]
    target = "eager" if args.quick else "inductor"
    compiler = "eager" if args.quick else "inductor"
    clock = Clock()
    print(f"{name}, {steps} steps, seeds {seeds}, {args.rounds} rounds, threads {torch.get_num_threads()}", flush=True)

    methods = [Method("full compute", "", "eager", model),
               Method("full compute", "", "compiled", torch.compile(copy.deepcopy(model), backend=compiler))]
    if "turbo4d" in args.families:
        methods += turbo4d_rows(model, steps, grid, target)
    calibration = _inputs(name, [MAGCACHE_CALIBRATION_SEED])[0]
    for family, setting, config in peer_configs(name, model, steps, clock, args.quick, calibration):
        if family not in args.families:
            continue
        for mode in ("eager", "compiled") if family in args.compiled_families else ("eager",):
            runnable, reset = _diffusers_cache(model, config(), mode, compiler)
            note = "" if ISOLATES or mode == "eager" else "not isolated (torch < 2.13): the compiled rows may run eagerly"
            methods.append(Method(family, setting, mode, runnable, after=reset, note=note))
    with torch.no_grad():
        ran = measure(methods, inputs, steps, args.rounds, clock)
        for method in ran:  # read now: calibrate's dynamo reset below frees the rows' cache runtimes
            method.computed = _frozen(method.computed())
        pick, pick_note = None, ""
        if "turbo4d" in args.families:
            print("  calibrate:", flush=True)
            # A hooked peer compiled above breaks its graph inside the blocks' loop, and dynamo then skips
            # that forward for every later copy of the class (it compiles each block alone, which the cache
            # refuses): calibrate compiles after forgetting them, as a fresh process would.
            torch._dynamo.reset()
            pick, pick_note = run_calibrate(model, inputs, steps, grid, target)
    rows = results(ran, references)
    failed = [m for m in methods if m not in ran]
    text = table(name, steps, rows, pick, pick_note)
    if failed:
        text += "\n\nNot run:\n" + "\n".join(f"- {m.name} ({m.mode}): {m.note}" for m in failed)
    if args.plot_dir:
        path = plot(name, steps, rows, Path(args.plot_dir) / f"cache_peers_{name}_{steps}.png")
        text += f"\n\n![{name}, {steps} steps]({path.name})"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(TESTBEDS), choices=list(TESTBEDS))
    parser.add_argument("--steps", type=int, nargs="+", default=[20, 50])
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--thresholds", type=float, nargs="+", default=list(THRESHOLDS))
    parser.add_argument("--max-reuse", type=int, nargs="+", default=list(MAX_REUSE))
    parser.add_argument("--decisions", nargs="+", default=list(DECISIONS), choices=list(DECISIONS),
                        help="turbo4d's cache decision: per unit, step-wide (one decision per call), or both")
    parser.add_argument("--step-thresholds", type=float, nargs="+",
                        help="thresholds of the step-wide rows (default: --thresholds)")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES),
                        help="which caches to measure (full compute always runs)")
    parser.add_argument("--compiled-families", nargs="+", default=list(FAMILIES[1:]), choices=list(FAMILIES[1:]),
                        help="the diffusers caches also measured under torch.compile (default: all; PAB's and "
                             "FasterCache's hooks recompile for minutes per setting on a CPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--markdown", type=Path, help="also write the tables here")
    parser.add_argument("--plot-dir", help="write cache_peers_<model>_<steps>.png here")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: wan-tiny, 3 steps, 1 seed, 1 round, one setting each, dynamo's eager backend")
    args = parser.parse_args()
    if args.quick:
        args.models, args.steps, args.seeds, args.rounds = ["wan-tiny"], [3], 1, 1
        args.thresholds, args.max_reuse = [0.3], [4]
    if args.threads:
        torch.set_num_threads(args.threads)
    # A compiled hook that keeps recompiling raises (its row reports it) instead of running eagerly unnoticed.
    # The limits are high because every compiled copy adds entries to the same code objects (blocks that
    # hooks split off are frames of their own, one entry per copy and backend).
    torch._dynamo.config.recompile_limit = 1024
    torch._dynamo.config.accumulated_recompile_limit = 8192
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    import diffusers

    started = time.strftime("%Y-%m-%d %H:%M")
    parts = [f"{started}, {platform.processor() or platform.machine()}, torch {torch.__version__}, diffusers "
             f"{diffusers.__version__}, {torch.get_num_threads()} thread(s); seeds {args.seeds}, rounds {args.rounds}"]
    for name in args.models:
        for steps in args.steps:
            parts.append(bench(name, steps, args))
            print("\n" + parts[-1] + "\n", flush=True)
    if args.markdown:
        args.markdown.write_text("\n\n".join(parts) + "\n")
        print(f"wrote {args.markdown}")


if __name__ == "__main__":
    main()
