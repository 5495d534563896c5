"""Capture a model as one torch-level FX graph and run the turbo4d passes on it.

The passes read the graph dynamo hands a backend (``F.scaled_dot_product_attention``,
``call_method`` reshapes, ``nn_module_stack``), not the ATen graph of ``torch.export``, so
the model is captured with ``torch._dynamo.export``: the same torch-level graph, with the
parameters as attributes of the module rather than inputs, and the model's own input names.
The rewritten module is then an ordinary ``nn.Module`` that ``torch.onnx.export`` can trace.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx

from t4dopt.compat import T4DCompatError, dynamo_export
from t4dopt.errors import T4DUnsupportedError, warn_or_raise
from t4dopt.options import Options, parse_options
from t4dopt.passes import run_passes
from t4dopt.report import Report, SiteReport, count_rewritten
from t4dopt.sites import SiteDecision


def capture_rewritten(model: torch.nn.Module, args: Sequence[Any],
                      options: Options) -> tuple[fx.GraphModule, list[SiteDecision]]:
    """`model` on `args` as one FX graph with its joint attention rewritten per `options`."""
    try:
        export = dynamo_export()
        captured = export(model)(*args)
    except T4DCompatError:
        raise
    except Exception as error:  # dynamo raises many types; they all mean the same thing here
        first_line = (str(error).splitlines() or [""])[0]
        raise T4DUnsupportedError(
            f"t4dopt.export: {type(model).__name__} could not be captured as one graph by "
            f"torch._dynamo.export ({type(error).__name__}: {first_line}); export needs a model without graph breaks"
        ) from error
    gm = captured.graph_module.eval()
    decisions = run_passes(gm, options)
    warn_or_raise(decisions, options)
    return gm, decisions


def capture_for_export(model: torch.nn.Module, args: Any, options: Mapping[str, Any] | Options | None,
                       say: Callable[[str], None],
                       ) -> tuple[fx.GraphModule, tuple, list[SiteDecision], list[SiteReport]]:
    """Parse `options`, capture and rewrite `model` on `args` (a tensor or a sequence), report the sites."""
    args = (args,) if isinstance(args, torch.Tensor) else tuple(args)
    say(f"capturing {type(model).__name__} and rewriting its attention (turbo4d passes)")
    with torch.no_grad():
        gm, decisions = capture_rewritten(model, args, parse_options(options))
    report = Report()
    report.add_graph(decisions)
    rewritten = count_rewritten(report.sites)
    say(f"{rewritten} of {len(report.sites)} attention sites rewritten to block-sparse attention")
    return gm, args, decisions, report.sites


def node_values(gm: fx.GraphModule, args: tuple, names: set[str] | None = None) -> dict[str, Any]:
    """The values of `gm`'s nodes named in `names` (every node when None) when it runs on `args`."""
    values: dict[str, Any] = {}
    interpreter = fx.Interpreter(gm)
    run_node = interpreter.run_node

    def record(node: fx.Node) -> Any:
        result = run_node(node)
        if names is None or node.name in names:
            values[node.name] = result
        return result

    interpreter.run_node = record
    with torch.no_grad():
        interpreter.run(*args)
    return values
