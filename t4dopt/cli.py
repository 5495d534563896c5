"""Command line: ``t4dopt demo``, ``t4dopt analyze``, ``t4dopt mask``, ``t4dopt export``, ``t4dopt passes``."""

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


def _passes(args: argparse.Namespace) -> int:
    from t4dopt.passes import describe

    describe()
    return 0


ONNX_OPS = {"onnx": "custom", "onnx-portable": "portable"}
EXPORT_FORMATS = (*ONNX_OPS, "aoti", "tensorrt", "bundle")
EXPORT_TOLERANCE = 1e-4


def _reference_model(args: argparse.Namespace) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...], dict]:
    """The reference Sculpt4DDiT of `args`, its inputs and the turbo4d options for it."""
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
    return model, inputs, options


def _export(args: argparse.Namespace) -> int:
    try:
        from t4dopt.export import export_aoti, export_onnx, onnx_session
        from t4dopt.export.aoti_export import run_in_fresh_process
    except ImportError as error:
        print(f"t4dopt export: {error}; install the onnx extra: pip install 't4dopt[onnx]'", file=sys.stderr)
        return 2

    model, inputs, options = _reference_model(args)
    out = args.out or {"aoti": "model.pt2", "tensorrt": "model.engine", "bundle": "bundle"}.get(args.format, "model.onnx")
    if args.format == "bundle":
        return _export_bundle(model, inputs, options, out)
    if args.format == "tensorrt":
        import onnx

        from t4dopt.export.tensorrt_export import export_tensorrt, run_engine

        try:
            result = export_tensorrt(model, out, inputs, options=options, progress=print)
        except (ImportError, RuntimeError) as error:
            print(f"t4dopt export: {error}", file=sys.stderr)
            return 2
        runtime_name, description = "trt", "TensorRT engine, t4d ops as plugin layers"
        details = f"{result.plugin_nodes} plugin layers"
        print("checking: the engine (CUDA) against the eager turbo4d model")
        names = [value.name for value in onnx.load(str(result.onnx_path)).graph.input]
        outputs = run_engine(result.path, dict(zip(names, (x.cuda() for x in inputs))))
        got = next(iter(outputs.values())).cpu()
    elif args.format == "aoti":
        result = export_aoti(model, inputs, out, options=options, progress=print)
        runtime_name, description = "aoti", "AOTInductor .pt2 package, t4d op kept"
        details = f"{result.t4d_nodes} t4d nodes"
        print("checking: the package, loaded in a fresh process (CPU), against the eager turbo4d model")
        got = run_in_fresh_process(result.path, inputs)
    else:
        result = export_onnx(model, inputs, out, options=options, ops=ONNX_OPS[args.format], progress=print)
        runtime_name = "ort"
        description = "t4d custom domain" if result.ops == "custom" else "standard ONNX ops only"
        details = f"{result.onnx_nodes} nodes"
        print("checking: onnxruntime (CPU) against the eager turbo4d model on the same inputs")
        got = torch.from_numpy(onnx_session.run(result.path, inputs)[0])

    compiled = torch.compile(model, backend="turbo4d", options={**options, "target": "eager"})
    with torch.no_grad():
        expected = compiled(*inputs)
    difference = float((got - expected).abs().max())
    passed = difference <= EXPORT_TOLERANCE
    label = f"max |{runtime_name} - eager|"
    print(f"\nsummary\n"
          f"  format            {args.format} ({description})\n"
          f"  attention sites   {len(result.sites)} found, {result.sites_rewritten} rewritten to block-sparse\n"
          f"  file              {result.path}: {result.file_bytes / 2**20:.2f} MiB, {details}\n"
          f"  {label:<17} {difference:.2e} ({'within' if passed else 'OVER'} {EXPORT_TOLERANCE:.0e})")
    return 0 if passed else 1


BUNDLE_CHECK_STEPS = 8


def _export_bundle(model: torch.nn.Module, inputs: tuple, options: dict, out: str) -> int:
    """Write a bundle with the default cache schedule; check a sampling loop over it against the compiled model."""
    from t4dopt import deploy
    from t4dopt.export import export_bundle
    from t4dopt.models import sample_flow_matching

    options = {**options, "cache": {"steps": BUNDLE_CHECK_STEPS}}
    result = export_bundle(model, inputs, out, options=options, progress=print)
    noise, _, cond = inputs
    print(f"checking: a {BUNDLE_CHECK_STEPS}-step sampling loop over the loaded bundle against the compiled model")
    got = deploy.load(result.path).sample(noise, cond)
    compiled = torch.compile(model, backend="turbo4d", options={**options, "target": "eager"})
    with torch.no_grad():
        expected = sample_flow_matching(compiled, noise, cond, steps=BUNDLE_CHECK_STEPS)
    difference = float((got - expected).abs().max())
    passed = difference <= EXPORT_TOLERANCE
    print(f"\nsummary\n"
          f"  format            bundle (torch.export segments + manifest.json, cache schedule included)\n"
          f"  attention sites   {len(result.sites)} found, {result.sites_rewritten} rewritten to block-sparse\n"
          f"  cache             {result.units} cacheable sublayers, {result.chains} chains, {result.segments} segments\n"
          f"  folder            {result.path}: {result.file_bytes / 2**20:.2f} MiB\n"
          f"  max |bundle - compiled| over the loop {difference:.2e} "
          f"({'within' if passed else 'OVER'} {EXPORT_TOLERANCE:.0e})")
    return 0 if passed else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t4dopt", description="4D diffusion transformer compiler plugin")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="compile the reference 4D DiT dense and with turbo4d, compare")
    _layout_arguments(demo)
    demo.add_argument("--steps", type=int, default=4)
    demo.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    demo.add_argument("--target", default="inductor", choices=["inductor", "eager"])
    demo.add_argument("--out", default="t4dopt-demo", help="folder for the mask and sample pictures")
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
                        help="onnx: t4d custom-domain nodes; onnx-portable: standard ONNX ops only; "
                             "aoti: AOTInductor .pt2 package keeping the t4d op")
    export.add_argument("--out", help="output file (default: model.onnx, or model.pt2 for aoti)")
    export.set_defaults(run=_export)

    passes = commands.add_parser("passes", help="list the turbo4d passes in the order they run")
    passes.set_defaults(run=_passes)
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
