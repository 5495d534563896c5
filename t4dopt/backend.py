"""The ``turbo4d`` torch.compile backend.

``torch.compile(model, backend="turbo4d", options={...})`` hands each captured FX graph to
`turbo4d`, which runs the passes (detect, layout, sparsify, rewrite), reports what it did,
and lowers the rewritten graph through Inductor (or runs it eagerly with ``target="eager"``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.fx as fx
from torch.utils._pytree import tree_leaves

from t4dopt import lowering, report
from t4dopt.errors import T4DVerifyError, warn_or_raise, warn_unless_strict
from t4dopt.options import Options, parse_options
from t4dopt.fx_utils import graph_parameters
from t4dopt.passes import run_passes
from t4dopt.passes.carried_tokens import CarriedGuard, CarriedOutput, carried_inputs, guarded, recording
from t4dopt.passes.graph_breaks import hidden_attentions
from t4dopt.passes.pipeline import rewrite
from t4dopt.passes.state import PassState
from t4dopt.sites import SiteDecision

VERIFY_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def _lower(gm: fx.GraphModule, example_inputs: list[Any], target: str) -> Callable:
    return lowering.target(target).whole(gm, example_inputs)


def _with_cache(gm: fx.GraphModule, example_inputs: list[Any], decisions: list[SiteDecision],
                options: Options) -> Callable | None:
    """The cache runtime for `gm`, or None (after a warning, or an error with strict) when nothing can be cached."""
    from t4dopt.cache.build import build_runtime

    runtime, plan = build_runtime(gm, example_inputs, decisions, options.cache, lowering.target(options.target).segment)
    if runtime is None and decisions:
        warn_unless_strict(f"turbo4d cache: graph left uncached: {plan.reason}", options, stacklevel=2)
    return runtime


def _max_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.detach().abs().max().clamp(min=1e-6)
    return float((actual.detach().float() - expected.detach().float()).abs().max() / scale)


def _verified(compiled: Callable, reference: fx.GraphModule) -> Callable:
    """Run the dense masked reference beside the first call and raise if they differ."""
    checked = False

    def run(*args):
        nonlocal checked
        outputs = compiled(*args)
        if not checked:
            checked = True
            with torch.no_grad():
                expected = reference(*args)
            for got, want in zip(tree_leaves(outputs), tree_leaves(expected)):
                if isinstance(got, torch.Tensor) and got.is_floating_point():
                    error = _max_relative_error(got, want)
                    tolerance = VERIFY_TOLERANCE.get(want.dtype, 1e-4)
                    if not error <= tolerance:
                        raise T4DVerifyError(
                            f"turbo4d verify: rewritten graph differs from its dense masked reference by "
                            f"{error:.2e} (relative to the largest output), tolerance {tolerance:.0e} for {want.dtype}"
                        )
        return outputs

    return run


def _uncarried(options: Options) -> Callable[[str], None]:
    """What a call whose input lost its carried token maps says: a warning, or with ``strict=True`` an error
    (before anything runs)."""
    def say(name: str) -> None:
        warn_unless_strict(f"turbo4d: the input {name} of a graph made sparse with token maps carried from an "
                           "earlier graph does not carry them in this call (made another way, or changed in place "
                           "since): this call runs the graph dense", options, stacklevel=3)
    return say


def turbo4d(gm: fx.GraphModule, example_inputs: list[Any], options: Mapping[str, Any] | Options | None = None) -> Callable:
    """torch.compile backend: rewrite joint attention to block-sparse attention, then lower."""
    opts = parse_options(options)
    carried = carried_inputs(gm, example_inputs)
    original = copy.deepcopy(gm) if carried else None
    reference = copy.deepcopy(gm) if opts.verify else None
    state = rewrite(gm, opts, carried=carried)
    decisions = state.decisions
    hidden = hidden_attentions(gm, [d.site for d in decisions])
    report.publish(decisions, hidden, graph_parameters(gm))
    warn_or_raise(decisions, opts, hidden)
    compiled = _with_cache(gm, example_inputs, decisions, opts) if opts.cache is not None else None
    if compiled is None:
        compiled = _lower(gm, example_inputs, opts.target)
    if reference is not None and any(d.action == "sparse" for d in decisions):
        run_passes(reference, opts, reference=True, carried=carried)
        compiled = _verified(compiled, reference)
    return _carrying(compiled, state, carried, original, opts)


def _carrying(compiled: Callable, state: PassState, carried: dict[str, CarriedOutput], original: fx.GraphModule | None,
              options: Options) -> Callable:
    """`compiled`, recording the outputs that carry token maps to later graphs, and checking on every call the
    inputs whose carried maps it relied on (`t4dopt.passes.carried_tokens`): when one does not carry them, a
    graph made sparse with them runs `original` dense, and no graph records outputs derived from them."""
    recorded = recording(compiled, state.carried_outputs) if state.carried_outputs else compiled
    relied = state.walk.carried_used if state.walk is not None else set()
    if not relied:
        return recorded
    guard = CarriedGuard.of(state.gm, relied, carried)
    if any(d.action == "sparse" for d in state.decisions):
        return guarded(recorded, lambda args: _lower(original, args, options.target), guard, _uncarried(options))
    return guarded(recorded, lambda args: compiled, guard, None)  # nothing rewritten: the same graph, unrecorded
