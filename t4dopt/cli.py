"""Command line: ``t4dopt demo``, ``t4dopt analyze``, ``t4dopt mask``, ``t4dopt export``."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

import torch

from t4dopt import masks


def _layout_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="reference model config (tiny, hunyuan3d-2.1)")
    parser.add_argument("--frames", type=int)
    parser.add_argument("--tokens-per-frame", type=int)
    parser.add_argument("--policy", default="sculpt4d", choices=sorted(masks.POLICIES))
    parser.add_argument("--block-size", type=int)


def _demo(args: argparse.Namespace) -> int:
    from t4dopt.demo import run_demo

    run_demo(config=args.config, frames=args.frames, tokens_per_frame=args.tokens_per_frame,
             policy=args.policy, block_size=args.block_size, steps=args.steps, device=args.device,
             target=args.target, out_dir=args.out, seed=args.seed)
    return 0


def _analyze(args: argparse.Namespace) -> int:
    from t4dopt.explain import explain
    from t4dopt.models import CONFIGS, Sculpt4DDiT, make_inputs

    overrides = {k: v for k, v in {"frames": args.frames, "tokens_per_frame": args.tokens_per_frame}.items() if v}
    config = dataclasses.replace(CONFIGS[args.config or "tiny"], **overrides)
    with torch.device("cpu"):
        model = Sculpt4DDiT(config).eval()
    noise, cond = make_inputs(config)
    t = torch.full((noise.shape[0],), 0.5)
    sparse = {"policy": args.policy, **({"block_size": args.block_size} if args.block_size else {})}
    report = explain(model, noise, t, cond, options={
        "layout": {"frames": config.frames, "tokens_per_frame": config.tokens_per_frame}, "sparse": sparse})
    print(report.table())
    return 0


def _mask(args: argparse.Namespace) -> int:
    from t4dopt.plotting import draw_block_mask

    layout = masks.build(args.policy, args.frames, args.tokens_per_frame,
                         block_size=args.block_size, prefix_tokens=args.prefix_tokens)
    path = draw_block_mask(layout, args.out, frames=args.frames,
                           blocks_per_frame=-(-args.tokens_per_frame // args.block_size))
    print(f"{layout}\nwritten to {path}")
    return 0


EXPORT_FORMATS = {"onnx": "custom", "onnx-portable": "portable"}
EXPORT_TOLERANCE = 1e-4


def _export(args: argparse.Namespace) -> int:
    try:
        from t4dopt.export import export_onnx, runtime
    except ImportError as error:
        print(f"t4dopt export: {error}; install the onnx extra: pip install 't4dopt[onnx]'", file=sys.stderr)
        return 2
    from t4dopt.models import CONFIGS, Sculpt4DDiT, make_inputs

    name = args.config or "tiny"
    overrides = {k: v for k, v in {"frames": args.frames, "tokens_per_frame": args.tokens_per_frame}.items() if v}
    config = dataclasses.replace(CONFIGS[name], **overrides)
    print(f"building Sculpt4DDiT({name}): frames={config.frames}, tokens_per_frame={config.tokens_per_frame}")
    with torch.device("cpu"):
        model = Sculpt4DDiT(config).eval()
    noise, cond = make_inputs(config)
    inputs = (noise, torch.full((noise.shape[0],), 0.5), cond)
    sparse = {"policy": args.policy, **({"block_size": args.block_size} if args.block_size else {})}
    options = {"layout": {"frames": config.frames, "tokens_per_frame": config.tokens_per_frame}, "sparse": sparse}
    result = export_onnx(model, inputs, args.out, options=options, ops=EXPORT_FORMATS[args.format], progress=print)

    print("checking: onnxruntime (CPU) against the eager turbo4d model on the same inputs")
    compiled = torch.compile(model, backend="turbo4d", options={**options, "target": "eager"})
    with torch.no_grad():
        expected = compiled(*inputs)
    difference = float(abs(runtime.run(result.path, inputs)[0] - expected.numpy()).max())
    passed = difference <= EXPORT_TOLERANCE
    print(f"\nsummary\n"
          f"  format            {args.format} ({'t4d custom domain' if result.ops == 'custom' else 'standard ONNX ops only'})\n"
          f"  attention sites   {len(result.sites)} found, {result.sites_rewritten} rewritten to block-sparse\n"
          f"  file              {result.path}: {result.file_bytes / 2**20:.2f} MiB, {result.onnx_nodes} nodes\n"
          f"  max |ort - eager| {difference:.2e} ({'within' if passed else 'OVER'} {EXPORT_TOLERANCE:.0e})")
    return 0 if passed else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t4dopt", description="4D diffusion transformer compiler plugin")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="compile the reference 4D DiT dense and with turbo4d, compare")
    _layout_arguments(demo)
    demo.add_argument("--steps", type=int, default=4)
    demo.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    demo.add_argument("--target", default="inductor", choices=["inductor", "eager"])
    demo.add_argument("--out", default="t4dopt-demo", help="folder for the mask PNG")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)

    analyze = commands.add_parser("analyze", help="print the explain table for a reference model")
    _layout_arguments(analyze)
    analyze.set_defaults(run=_analyze)

    mask = commands.add_parser("mask", help="draw a mask policy's block layout to a PNG")
    _layout_arguments(mask)
    mask.add_argument("--prefix-tokens", type=int, default=0)
    mask.add_argument("--out", default="mask.png")
    mask.set_defaults(run=_mask, frames=16, tokens_per_frame=4096, block_size=128)

    export = commands.add_parser("export", help="export the reference 4D DiT, attention block-sparse, and check it")
    _layout_arguments(export)
    export.add_argument("--format", default="onnx", choices=sorted(EXPORT_FORMATS),
                        help="onnx: t4d custom-domain nodes; onnx-portable: standard ONNX ops only")
    export.add_argument("--out", default="model.onnx")
    export.set_defaults(run=_export)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ValueError as error:
        print(f"t4dopt {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
