"""Our cache against plain ``torch.compile`` in a process of its own: threshold 0, one reusing setting, and
which path (`t4dopt.cache.executor.CallPath`) each call took.

`bench/cache_peers.py` compiles some forty copies of one model class in one process; this one compiles
three, so the ratios here carry none of that (dynamo's code caches shared by every copy).

    python bench/cache_overhead.py --model wan-tiny --steps 20 [--threshold 0.3] [--max-reuse 4] [--rounds 5]
        [--decision unit step]
"""

from __future__ import annotations

import argparse
import collections
import copy
import statistics
import time

import torch

from t4dopt.cache import executor
from t4dopt.data.tasks import EVAL_SEED, video_batch
from t4dopt.models import pretrained, sample_diffusers
from t4dopt.models.diffusers_testbeds import TESTBEDS
from t4dopt.options import DECISIONS
from t4dopt.quality import psnr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="wan-tiny", choices=list(TESTBEDS))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threshold", type=float, default=0.3)
    parser.add_argument("--max-reuse", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--decision", nargs="+", default=["unit"], choices=list(DECISIONS),
                        help="the reusing rows' cache decision (one row each)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    paths: collections.Counter = collections.Counter()
    run = executor.Executor.run

    def counted(self, plan, call_args):
        paths[plan.path.name] += 1
        return run(self, plan, call_args)

    executor.Executor.run = counted
    model = pretrained(args.model)
    clean, cond = video_batch(1, channels_first=TESTBEDS[args.model].channels_first, seed=EVAL_SEED)
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))
    rows = {"torch.compile": torch.compile(copy.deepcopy(model))}
    for threshold, decision in [(0.0, "unit")] + [(args.threshold, d) for d in args.decision]:
        options = {"cache": {"threshold": threshold, "max_reuse": args.max_reuse, "steps": args.steps,
                             "decision": decision}}
        name = f"turbo4d threshold {threshold:g}" + (f", decision {decision}" if threshold else "")
        rows[name] = torch.compile(copy.deepcopy(model), backend="turbo4d", options=options)
    seconds: dict[str, list[float]] = {name: [] for name in rows}
    with torch.no_grad():
        reference = sample_diffusers(model, noise, cond, steps=args.steps)
        for name, compiled in rows.items():
            sample_diffusers(compiled, noise, cond, steps=args.steps)
            paths.clear()
            sample = sample_diffusers(compiled, noise, cond, steps=args.steps)
            print(f"{name}: paths {dict(paths)}, {psnr(sample, reference):.1f} dB against eager", flush=True)
        for _ in range(args.rounds):
            for name, compiled in rows.items():
                start = time.perf_counter()
                sample_diffusers(compiled, noise, cond, steps=args.steps)
                seconds[name].append(time.perf_counter() - start)
    base = statistics.median(seconds["torch.compile"])
    for name, times in seconds.items():
        print(f"{name}: {statistics.median(times):.3f} s/sample, {base / statistics.median(times):.2f}x of torch.compile")


if __name__ == "__main__":
    main()
