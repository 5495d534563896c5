"""The graphs a cache runtime calls, lowered: per segment its runners, and the whole-call graphs.

Graphs are lowered on first use (`LazyLowered`), once per `input_signature` (strides included). A whole-call graph
is called with named values and answers with named values: it flattens its inputs and reads
its flat outputs back with the spec its builder (`t4dopt.cache.graph.step_graphs`) returned.
The runtime's own arithmetic is lowered the same way (`t4dopt.cache.arithmetic.Arithmetic`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.fx as fx

from t4dopt.cache.arithmetic import Addend, SaveInputs, SaveKind
from t4dopt.cache.graph.step_graphs import Reused, ReusedOutputs, Tapped, TappedOutputs
from t4dopt.lowering import Lower


def input_signature(args: Sequence[Any]) -> tuple:
    """What a graph lowered for `args` depends on: per tensor its shape, strides, dtype, device and whether it
    requires grad, whether autograd records, and the values of the other arguments.

    Inductor specialises a graph to its inputs' strides (its generated code asserts them), and
    a graph lowered without autograd computes no gradients: a tensor arriving with other
    strides (a transposed view first, a contiguous copy later) or another grad mode gets its
    own lowering.
    """
    return (torch.is_grad_enabled(),) + tuple(
        (tuple(a.shape), a.stride(), a.dtype, a.device, a.requires_grad) if isinstance(a, torch.Tensor) else a
        for a in args)


class LazyLowered:
    """A graph lowered on its first call with each `input_signature`.

    A graph with dynamic shapes runs its segments at several sizes; each size gets its own
    lowering instead of reusing one specialised to another size. Lowering holds a lock, so
    threads calling at once lower a graph once.

    `static` are the positions of the model's parameters and buffers among the arguments:
    dynamo guards those (shape, strides, dtype, device) before the compiled graph runs, so they
    stay out of the signature, which would otherwise cost a read of every parameter per call.
    """

    _lowering = threading.Lock()

    def __init__(self, gm: fx.GraphModule, lower: Lower, static: Collection[int] = ()):
        self.gm, self.lower = gm, lower
        self.static = frozenset(static)
        self.lowered: dict[tuple, Callable] = {}
        self._dynamic: list[int] | None = None

    def __call__(self, *args: Any) -> Any:
        if self._dynamic is None:
            self._dynamic = [i for i in range(len(args)) if i not in self.static]
        signature = input_signature([args[i] for i in self._dynamic] if self.static else args)
        fn = self.lowered.get(signature)
        if fn is None:
            with self._lowering:
                fn = self.lowered.get(signature)
                if fn is None:
                    fn = self.lowered[signature] = self.lower(self.gm, list(args))
        return fn(*args)


class SegmentRunners(NamedTuple):
    """How to run one segment: in full, and for a token-prunable unit its ``full`` and ``pruned`` variants.

    Each takes the segment's inputs by position (`SegmentSpec.inputs`); see
    `t4dopt.cache.graph.segments` for what the variants add.
    """

    plain: Callable
    full: Callable | None = None
    pruned: Callable | None = None


class TokenTaps(NamedTuple):
    """The values a computed call taps for a token-prunable unit: its query and its attention rows."""

    query: str
    rows: str


class SpanInputs(NamedTuple):
    """What a reused call takes per span: the saved entry its drift is measured from, and its addend."""

    before: torch.Tensor
    addend: Addend


@dataclass(frozen=True)
class ComputedGraph:
    """The whole graph computing everything and running a save of one kind per saved value."""

    run: Callable
    outputs: TappedOutputs

    def __call__(self, args: Sequence[Any], saves: Sequence[SaveInputs]) -> Tapped:
        """Run on the graph's inputs `args`, with the inputs of each save (`Program.saved_values` order)."""
        kind = self.outputs.kind
        return self.outputs.read(self.run(*args, *(a for given in saves for a in kind.inputs(given))))


@dataclass(frozen=True)
class ReusedGraph:
    """The whole graph with every span of units rebuilt from saved tensors."""

    run: Callable
    outputs: ReusedOutputs

    def __call__(self, args: Sequence[Any], spans: Sequence[SpanInputs]) -> Reused:
        """Run on the graph's inputs `args`, with the inputs of each span (`Program.spans` order)."""
        extra = [a for span in spans for a in (span.before, *span.addend.arguments())]
        return self.outputs.read(self.run(*args, *extra))


@dataclass(frozen=True)
class StepGraphs:
    """Whole-call graphs, lowered on first use.

    `plain` runs the whole graph (for calls that keep nothing) and returns its output leaves;
    `computed(kind)` is the `ComputedGraph` saving with `kind` (None for a graph that changes
    tensors in place); `reused(orders)` the
    `ReusedGraph` whose spans' addends have these extrapolation orders, or `reused` is None
    when no graph can rebuild every span (a unit's nodes would still be needed).
    `token_taps` names, per token-prunable unit, its query and attention rows among the taps.
    """

    plain: Callable
    computed: Callable[[SaveKind], ComputedGraph] | None
    reused: Callable[[tuple[int, ...]], ReusedGraph] | None
    token_taps: dict[int, TokenTaps]
