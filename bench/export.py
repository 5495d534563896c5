"""Time the exported forms of the reference model beside eager and torch.compile, in one run.

One call (one denoising step) of Sculpt4DDiT with sculpt4d block-sparse joint attention:
eager dense, plain ``torch.compile`` (Inductor, dense), turbo4d (Inductor), the portable ONNX
model and the custom-domain ONNX model in ONNX Runtime (CPU provider), and the AOTInductor
package (loaded and timed in a fresh process; on CUDA it carries our Triton kernel as a
triton_op). Medians of `--repeats` calls after a warm-up; ratios against plain torch.compile and turbo4d;
the time each form took to build (compile, export), and each output's distance from turbo4d's.
``--forms`` picks the forms; ``--compiler eager`` runs the torch.compile forms without Inductor
(the quick dry run; the AOTInductor package is compiled all the same).

    python bench/export.py [--config tiny] [--depth N] [--frames 8] [--tokens-per-frame 512] [--block-size 64]
                           [--repeats 20] [--device cpu|cuda] [--dtype fp32|bf16|fp16] [--forms ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import t4dopt.export  # noqa: E402
from device_info import describe  # noqa: E402
from part_result import Column, PartResult  # noqa: E402
from t4dopt.export import onnx_session  # noqa: E402
from t4dopt.models import CONFIGS, Sculpt4DDiT, make_inputs  # noqa: E402

FORMS = {"eager": "eager, dense", "compile": "torch.compile, dense", "turbo4d": "turbo4d, sparse",
         "onnx-portable": "ONNX portable, onnxruntime CPU", "onnx-custom": "ONNX t4d domain, onnxruntime CPU",
         "aoti": "AOTInductor package (turbo4d), fresh process"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
COMPILERS = ("inductor", "eager")
COLUMNS = [Column("form", "form"), Column("ms", "ms per call", "{:.2f}"),
           Column("vs_compile", "vs torch.compile", "{:.2f}x"),
           Column("vs_turbo4d", "vs turbo4d", "{:.2f}x"),
           Column("build_s", "build s (compile / export)", "{:.1f}"), Column("load_s", "load s", "{:.1f}"),
           Column("rel_diff", "rel. diff vs turbo4d", "{:.1e}")]

_TIME_PACKAGE = """
import json, statistics, sys, time
import torch
from t4dopt.export import load_aoti
package, inputs, output, repeats = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
args = torch.load(inputs)
cuda = args[0].is_cuda
def sync():
    if cuda:
        torch.cuda.synchronize()
start = time.perf_counter()
model = load_aoti(package)
load_s = time.perf_counter() - start
with torch.no_grad():
    out = model(*args)
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        model(*args)
        sync()
        times.append(time.perf_counter() - start)
torch.save(out[0] if isinstance(out, (list, tuple)) else out, output)
print(json.dumps({"ms": statistics.median(times) * 1e3, "load_s": load_s}))
"""


def _median_ms(fn: Callable[[], object], repeats: int, cuda: bool) -> tuple[float, object]:
    """(median ms of `repeats` calls after a warm-up call, the warm-up's output)."""
    output = fn()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, output


def _timed_build(build: Callable[[], object], cuda: bool) -> tuple[object, float]:
    start = time.perf_counter()
    built = build()
    if cuda:
        torch.cuda.synchronize()
    return built, time.perf_counter() - start


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny", choices=sorted(CONFIGS))
    parser.add_argument("--depth", type=int, default=None)
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument("--tokens-per-frame", type=int, default=None)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--forms", nargs="+", choices=list(FORMS), default=list(FORMS))
    parser.add_argument("--compiler", choices=COMPILERS, default="inductor")
    return parser.parse_args(argv)


def run(args: argparse.Namespace, result: PartResult | None = None) -> PartResult:
    result = result or PartResult()
    result.environment = describe(torch.device(args.device))
    overrides = {"frames": args.frames, "tokens_per_frame": args.tokens_per_frame, "depth": args.depth}
    config = dataclasses.replace(CONFIGS[args.config], **{k: v for k, v in overrides.items() if v})
    dtype, cuda = DTYPES[args.dtype], args.device == "cuda"
    torch.manual_seed(0)
    model = Sculpt4DDiT(config).eval().to(args.device, dtype)
    noise, cond = make_inputs(config, device=args.device, dtype=dtype)
    inputs = (noise, torch.full((1,), 0.5, device=args.device, dtype=dtype), cond)
    options = {"layout": {"frames": config.frames, "tokens_per_frame": config.tokens_per_frame},
               "sparse": {"policy": "sculpt4d", "block_size": args.block_size}}
    caption = (f"Sculpt4DDiT({args.config}, depth {config.depth}), {config.frames} frames x {config.tokens_per_frame} "
               f"tokens, sculpt4d blocks of {args.block_size}, {args.dtype}, device {args.device}, torch.compile forms "
               f"with {args.compiler}; medians of {args.repeats} calls")
    table = result.table("forms", COLUMNS, caption)
    measured: dict[str, dict] = {}

    def add(form: str, ms: float, output, build_s: float | None = None, load_s: float | None = None) -> None:
        """Record a form and rewrite the table (ratios against torch.compile, distances from turbo4d)."""
        measured[form] = {"form": FORMS[form], "ms": ms, "build_s": build_s, "load_s": load_s,
                          "output": None if output is None else output.float().cpu()}
        print(f"  {FORMS[form]}: {ms:.2f} ms", flush=True)
        reference = measured.get("turbo4d", {}).get("output")
        baseline = measured.get("compile", {}).get("ms")
        turbo4d_ms = measured.get("turbo4d", {}).get("ms")
        table.rows.clear()
        for name, entry in measured.items():
            out = entry["output"]
            table.rows.append({**{k: v for k, v in entry.items() if k != "output"},
                               "vs_compile": None if baseline is None else baseline / entry["ms"],
                               "vs_turbo4d": None if turbo4d_ms is None else turbo4d_ms / entry["ms"],
                               "rel_diff": (None if reference is None or out is None or name == "turbo4d"
                                            else float((out - reference).norm() / reference.norm()))})
        result.save()

    with torch.no_grad(), tempfile.TemporaryDirectory(prefix="t4dopt-bench-") as folder:
        if "eager" in args.forms:
            add("eager", *_median_ms(lambda: model(*inputs), args.repeats, cuda))
        for form, backend in (("compile", None), ("turbo4d", "turbo4d")):
            if form not in args.forms:
                continue
            torch._dynamo.reset()
            if backend is None:
                compiled = torch.compile(model, backend=args.compiler)
            else:
                compiled = torch.compile(model, backend="turbo4d", options={**options, "target": args.compiler})
            output, build_s = _timed_build(lambda: compiled(*inputs), cuda)  # the first call compiles
            ms, _ = _median_ms(lambda: compiled(*inputs), args.repeats, cuda)
            add(form, ms, output, build_s)
        cpu_inputs = tuple(x.cpu().float() for x in inputs)
        for form, ops in (("onnx-portable", "portable"), ("onnx-custom", "custom")):
            if form not in args.forms:
                continue
            path = Path(folder) / f"{ops}.onnx"
            cpu_model = Sculpt4DDiT(config).eval()
            cpu_model.load_state_dict({k: v.float().cpu() for k, v in model.state_dict().items()})
            _, build_s = _timed_build(lambda: t4dopt.export.onnx(cpu_model, cpu_inputs, path, options=options, ops=ops),
                                      False)
            session = onnx_session.session(path)
            feed = {i.name: x.numpy() for i, x in zip(session.get_inputs(), cpu_inputs)}
            ms, outputs = _median_ms(lambda: session.run(None, feed), args.repeats, False)
            add(form, ms, torch.from_numpy(outputs[0]), build_s)
        if "aoti" in args.forms:
            package, saved, output = (Path(folder) / name for name in ("model.pt2", "inputs.pt", "output.pt"))
            def say(line: str) -> None:
                print(f"  aoti: {line}", flush=True)

            _, build_s = _timed_build(lambda: t4dopt.export.aoti(model, inputs, package, options=options, progress=say),
                                      cuda)
            torch.save(inputs, saved)
            completed = subprocess.run([sys.executable, "-c", _TIME_PACKAGE, str(package), str(saved), str(output),
                                        str(args.repeats)], check=True, capture_output=True, text=True)
            timing = json.loads(completed.stdout.strip().splitlines()[-1])
            add("aoti", timing["ms"], torch.load(output), build_s, timing["load_s"])

    return result


def main(argv: Sequence[str] | None = None, result: PartResult | None = None) -> PartResult:
    result = run(parse_args(argv), result)
    print(result.markdown())
    return result


if __name__ == "__main__":
    main()
