"""Time the exported forms of the reference model beside eager and torch.compile, in one run.

One call (one denoising step) of Sculpt4DDiT with sculpt4d block-sparse joint attention:
eager dense, plain ``torch.compile`` (Inductor, dense), turbo4d (Inductor), the portable ONNX
model and the custom-domain ONNX model in ONNX Runtime (CPU provider), and the AOTInductor
package (timed in a fresh process that only loads it). Medians of `--repeats` calls after a
warm-up; ratios against plain torch.compile.

    python bench/export.py [--config tiny] [--frames 8] [--tokens-per-frame 512] [--block-size 64] [--repeats 20]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import t4dopt.export
from t4dopt.export import onnx_session
from t4dopt.models import CONFIGS, Sculpt4DDiT, make_inputs

_TIME_PACKAGE = """
import statistics, sys, time
import torch
from t4dopt.export import load_aoti
package, inputs, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3])
args = torch.load(inputs)
model = load_aoti(package)
with torch.no_grad():
    model(*args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(*args)
        times.append(time.perf_counter() - start)
if args[0].is_cuda:
    torch.cuda.synchronize()
print(statistics.median(times) * 1e3)
"""


def _median_ms(fn: Callable[[], object], repeats: int, cuda: bool) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny", choices=sorted(CONFIGS))
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument("--tokens-per-frame", type=int, default=None)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    overrides = {"frames": args.frames, "tokens_per_frame": args.tokens_per_frame}
    config = dataclasses.replace(CONFIGS[args.config], **{k: v for k, v in overrides.items() if v})
    torch.manual_seed(0)
    model = Sculpt4DDiT(config).eval().to(args.device)
    noise, cond = make_inputs(config, device=args.device)
    inputs = (noise, torch.full((1,), 0.5, device=args.device), cond)
    options = {"layout": {"frames": config.frames, "tokens_per_frame": config.tokens_per_frame},
               "sparse": {"policy": "sculpt4d", "block_size": args.block_size}}
    cuda = args.device == "cuda"
    rows: list[tuple[str, float]] = []
    with torch.no_grad(), tempfile.TemporaryDirectory(prefix="t4dopt-bench-") as folder:
        rows.append(("eager, dense", _median_ms(lambda: model(*inputs), args.repeats, cuda)))
        compiled = torch.compile(model)
        rows.append(("torch.compile (Inductor), dense", _median_ms(lambda: compiled(*inputs), args.repeats, cuda)))
        torch._dynamo.reset()
        turbo = torch.compile(model, backend="turbo4d", options=options)
        rows.append(("turbo4d (Inductor), sparse", _median_ms(lambda: turbo(*inputs), args.repeats, cuda)))
        cpu_inputs = tuple(x.cpu() for x in inputs)
        for ops, label in (("portable", "ONNX portable, onnxruntime CPU"), ("custom", "ONNX t4d domain, onnxruntime CPU")):
            path = Path(folder) / f"{ops}.onnx"
            t4dopt.export.onnx(model.cpu(), cpu_inputs, path, options=options, ops=ops)
            session = onnx_session.session(path)
            feed = {i.name: x.numpy() for i, x in zip(session.get_inputs(), cpu_inputs)}
            rows.append((label, _median_ms(lambda: session.run(None, feed), args.repeats, False)))
        model.to(args.device)
        package = Path(folder) / "model.pt2"
        t4dopt.export.aoti(model, inputs, package, options=options)
        saved = Path(folder) / "inputs.pt"
        torch.save(inputs, saved)
        result = subprocess.run([sys.executable, "-c", _TIME_PACKAGE, str(package), str(saved), str(args.repeats)],
                                check=True, capture_output=True, text=True)
        rows.append(("AOTInductor package, fresh process", float(result.stdout.strip().splitlines()[-1])))
    baseline = rows[1][1]
    print(f"Sculpt4DDiT({args.config}), {config.frames} frames x {config.tokens_per_frame} tokens, sculpt4d blocks of "
          f"{args.block_size}, device {args.device}, {torch.get_num_threads()} threads; medians of {args.repeats} calls\n")
    print("| form | ms per call | vs torch.compile |")
    print("|---|---|---|")
    for name, ms in rows:
        print(f"| {name} | {ms:.1f} | {baseline / ms:.2f}x |")


if __name__ == "__main__":
    main()
