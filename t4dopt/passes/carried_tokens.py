"""Token maps carried across graph breaks: what one compiled graph proved about its outputs, for the next graph.

A model whose forward breaks into several graphs builds its tokens in one (the patch embedding) and
attends over them in another that receives them as a plain input: HunyuanVideo 1.5 breaks at
``if is_t2v:`` and dynamo compiles each of its blocks apart. The block graph alone cannot tell time
from space, but the graph that made the tensor could. So:

- the producer: every graph's outputs whose token maps tell the frames (a patch embedding, or a map
  carried in itself) are found at compile time (`find_carried_outputs`); after each call of the
  compiled graph, those output tensors are recorded in `CARRIED`, keyed by the tensor object (a weak
  reference) and its version counter, so a tensor changed in place since no longer counts;
- the consumer: at compile time, each input whose example tensor is recorded brings its token maps
  (`carried_inputs`); the sequence trace continues through them into the producer's graph;
- at run time, a consumer that relied on carried maps checks on every call that those inputs carry
  maps of the same `signature` (`CarriedGuard`); when one does not (a tensor made another way, by
  eager code in between), that call runs the graph as it was, dense, after a warning. A signature
  says what the maps say (lengths, axes, strides, roles, root shapes), not which graph said it, so
  a recompiled producer still counts.

Only the identity of the very tensor is trusted: a copy, a cast or any eager op in between makes a
new tensor that carries nothing.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.utils._pytree import tree_leaves

from .layout import read_segment
from .state import PassState
from t4dopt.fx_utils import shape_of, source_line
from t4dopt.options import LayoutHints
from t4dopt.sites import CONFIRMED, TokenMap

Signature = tuple


def _map_signature(tokens: TokenMap) -> Signature:
    return tuple((s.length, shape_of(s.root), s.root.op, s.digits, s.offsets, s.stop.value, s.grids)
                 for s in tokens.segments)


@dataclass(frozen=True, eq=False)
class CarriedOutput:
    """The token maps one graph output carries: its sequence axis -> map, in the producer's graph."""

    maps: dict[int, TokenMap]
    producer: str
    """A name for the graph that proved them (for reports)."""

    @property
    def signature(self) -> Signature:
        return tuple(sorted((axis, _map_signature(m)) for axis, m in self.maps.items()))


class CarriedTokens:
    """The live output tensors of compiled graphs and the token maps they carry (one per process and thread)."""

    def __init__(self) -> None:
        self._local = threading.local()

    @property
    def _entries(self) -> dict[int, tuple[weakref.ref, int, CarriedOutput]]:
        entries = getattr(self._local, "entries", None)
        if entries is None:
            entries = self._local.entries = {}
        return entries

    def record(self, outputs: Any, carried: tuple[tuple[int, CarriedOutput], ...]) -> None:
        """Record the outputs at the positions `carried` names (positions among the output's tensor leaves)."""
        leaves = tree_leaves(outputs)
        entries = self._entries
        for position, output in carried:
            tensor = leaves[position] if position < len(leaves) else None
            if not isinstance(tensor, torch.Tensor):
                continue
            key = id(tensor)
            entries[key] = (weakref.ref(tensor, lambda _, key=key, entries=entries: entries.pop(key, None)),
                            tensor._version, output)

    def lookup(self, tensor: object) -> CarriedOutput | None:
        """The maps `tensor` carries, if a compiled graph made it and nothing changed it in place since."""
        if not isinstance(tensor, torch.Tensor):
            return None
        entry = self._entries.get(id(tensor))
        if entry is None or entry[0]() is not tensor or entry[1] != tensor._version:
            return None
        return entry[2]

    def reset(self) -> None:
        """Forget every recorded tensor (of this thread)."""
        self._entries.clear()


CARRIED = CarriedTokens()


def _tells_frames(tokens: TokenMap) -> bool:
    return any((r := read_segment(s, LayoutHints())) is not None and r.status == CONFIRMED for s in tokens.segments)


def find_carried_outputs(state: PassState) -> None:
    """Find the graph's outputs whose token maps tell the frames: they are recorded after each call for later graphs."""
    state.carried_outputs = ()
    if state.walk is None:
        return
    output = next(n for n in reversed(state.gm.graph.nodes) if n.op == "output")
    found = []
    for position, node in enumerate(tree_leaves(output.args[0])):
        shape = shape_of(node) if isinstance(node, fx.Node) else None
        if shape is None or not 3 <= len(shape) <= 5:
            continue
        maps = {}
        for axis in range(1, len(shape) - 1):
            if shape[axis] > 1:
                try:
                    tokens = state.walk.sequence(node, axis)
                except Exception:  # an output the walk cannot read carries nothing; the compile goes on
                    continue
                if _tells_frames(tokens):
                    maps[axis] = tokens
        if maps:
            found.append((position, CarriedOutput(maps, f"{node.name} (at {source_line(node)})")))
    state.carried_outputs = tuple(found)


def carried_inputs(gm: fx.GraphModule, example_inputs: Iterable[Any]) -> dict[str, CarriedOutput]:
    """The inputs of `gm` (by placeholder name) whose example tensors carry token maps from an earlier graph."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    found = {}
    for node, example in zip(placeholders, example_inputs):
        carried = CARRIED.lookup(example)
        if carried is not None:
            found[node.name] = carried
    return found


@dataclass(frozen=True)
class CarriedGuard:
    """The inputs a compiled graph relied on carrying token maps (position among its arguments -> signature)."""

    relied: tuple[tuple[int, str, Signature], ...]
    """(argument position, placeholder name, signature)."""

    @classmethod
    def of(cls, gm: fx.GraphModule, used: Iterable[str], carried: dict[str, CarriedOutput]) -> CarriedGuard:
        names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        used = set(used)
        return cls(tuple((i, name, carried[name].signature) for i, name in enumerate(names) if name in used))

    def failed(self, args: tuple) -> str | None:
        """Which relied-on input does not carry its maps this call (None when all do)."""
        for position, name, signature in self.relied:
            carried = CARRIED.lookup(args[position]) if position < len(args) else None
            if carried is None or carried.signature != signature:
                return name
        return None


def guarded(compiled: Callable, dense: Callable[[list], Callable], guard: CarriedGuard,
            warn: Callable[[str], None] | None) -> Callable:
    """`compiled`, run only while `guard` holds; other calls run `dense(args)` (built on first need, for those
    arguments), after `warn`. Wrap `compiled` in `recording` first and not `dense`: on such a call the outputs
    carry nothing, since what they would carry came from the inputs that failed the guard."""
    fallback: list[Callable] = []

    def run(*args):
        name = guard.failed(args)
        if name is None:
            return compiled(*args)
        if warn is not None:
            warn(name)
        if not fallback:
            fallback.append(dense(list(args)))
        return fallback[0](*args)

    return run


def recording(compiled: Callable, carried: tuple[tuple[int, CarriedOutput], ...]) -> Callable:
    """`compiled`, recording after each call the outputs that carry token maps."""
    def run(*args):
        outputs = compiled(*args)
        CARRIED.record(outputs, carried)
        return outputs

    return run
