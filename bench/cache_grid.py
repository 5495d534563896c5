"""Which cache settings keep quality at the least work: a wide grid on the trained diffusers testbeds.

Quality only, so it runs the rewritten graph eagerly (``target="eager"``) and needs no compile per
setting: one compiled copy, its settings changed between samples as `t4dopt.calibrate` does. For
every combination of ``decision`` x ``threshold`` x ``max_reuse`` x ``order`` x ``warmup`` x
``final`` it prints the PSNR of each seed's sample against eager full compute and the share of the
calls' work computed (`CacheReport.computed`: FLOPs inside units and out), then the settings
computing the least at >= 30 dB. Speed follows the share computed plus each reused call's fixed
cost; `bench/cache_peers.py` measures it.

    python bench/cache_grid.py --model wan-tiny --steps 20 [--seeds 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
from pathlib import Path

import torch

from t4dopt.cache.registry import report_of, runtimes_of
from t4dopt.data.tasks import EVAL_SEED, video_batch
from t4dopt.models import pretrained, sample_diffusers
from t4dopt.models.diffusers_testbeds import TESTBEDS
from t4dopt.quality import psnr

BUDGET_DB = 30.0
GRID = {
    "decision": ("step", "unit"),
    "threshold": (0.2, 0.3, 0.5, 1.0, 3.0),
    "max_reuse": (4, 6, 8, 12),
    "order": (1, 2),
    "warmup": (1, 2),
    "final": (0, 1),
}
UNIT_THRESHOLDS_UP_TO = 1.0
"""Per-unit decisions above this threshold reuse whatever max_reuse allows: the same as step-wide."""


def settings() -> list[dict]:
    rows = [dict(zip(GRID, values)) for values in itertools.product(*GRID.values())]
    return [r for r in rows if r["decision"] == "step" or r["threshold"] <= UNIT_THRESHOLDS_UP_TO]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="wan-tiny", choices=list(TESTBEDS))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write every row here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = pretrained(args.model)
    inputs = []
    for seed in range(args.seeds):
        clean, cond = video_batch(1, channels_first=TESTBEDS[args.model].channels_first, seed=EVAL_SEED + seed)
        inputs.append((torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed)), cond))
    rows = []
    with torch.no_grad():
        references = [sample_diffusers(model, noise, cond, steps=args.steps) for noise, cond in inputs]
        copied = copy.deepcopy(model)
        compiled = torch.compile(copied, backend="turbo4d",
                                 options={"target": "eager", "cache": {"steps": args.steps, "threshold": 0.1}})
        sample_diffusers(compiled, *inputs[0], steps=args.steps)
        runtimes = runtimes_of(copied)
        for setting in settings():
            scores, computed = [], []
            for (noise, cond), reference in zip(inputs, references):
                for runtime in runtimes:
                    runtime.spec = dataclasses.replace(runtime.spec, **setting)
                    runtime.reset()
                scores.append(psnr(sample_diffusers(compiled, noise, cond, steps=args.steps), reference))
                computed.append(report_of(runtimes).computed)
            row = setting | {"psnr": sum(scores) / len(scores), "worst_psnr": min(scores),
                             "computed": sum(computed) / len(computed)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print(f"\n{args.model}, {args.steps} steps, {args.seeds} seeds: least work computed at >= {BUDGET_DB:g} dB "
          "(mean over seeds)\n")
    print(summary(rows))


def summary(rows: list[dict], count: int = 8) -> str:
    """The `count` settings computing the least at >= 30 dB (mean PSNR), one line per distinct outcome (settings
    with the same samples: the first, and how many more)."""
    fitting = sorted((r for r in rows if r["psnr"] >= BUDGET_DB), key=lambda r: (r["computed"], -r["psnr"]))
    outcomes: dict[tuple, list[dict]] = {}
    for r in fitting:
        outcomes.setdefault((round(r["psnr"], 3), round(r["computed"], 4)), []).append(r)
    lines = ["| decision | threshold | max_reuse | order | warmup | final | PSNR dB (worst) | work computed | "
             "same outcome |", "|---|---|---|---|---|---|---|---|---|"]
    for alike in list(outcomes.values())[:count]:
        r = alike[0]
        lines.append(f"| {r['decision']} | {r['threshold']:g} | {r['max_reuse']} | {r['order']} | {r['warmup']} | "
                     f"{r['final']} | {r['psnr']:.1f} ({r['worst_psnr']:.1f}) | {100 * r['computed']:.0f}% | "
                     f"{len(alike) - 1} more |")
    return "\n".join(lines)

if __name__ == "__main__":
    main()
