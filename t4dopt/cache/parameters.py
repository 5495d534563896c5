"""The parameter tensors a cache runtime ran with: how `t4dopt.cache_report(model)` finds a model's runtimes."""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence

import torch


class ParameterSet:
    """Tensors held weakly and found by identity.

    Not a set of ids: once a tensor is freed its id goes to the next one, and a new model must not
    be taken for a dead one (its report, its reset). Not a WeakSet: tensors compare elementwise.
    """

    def __init__(self, tensors: Iterable[torch.Tensor] = ()) -> None:
        self._refs: dict[int, weakref.ref] = {}
        self._last_first: weakref.ref | None = None
        self.update(tensors)

    def update_from_call(self, args: Sequence[object], positions: Sequence[int]) -> None:
        """`update` with a call's parameters (``args`` at `positions`), skipped when the first is the last call's.

        A graph runs with one module's parameters call after call; walking them all (hundreds in a
        real model) on every call costs more than the check. A call with another module's (its first
        parameter differs) walks them.
        """
        if not positions:
            return
        first = args[positions[0]]
        if self._last_first is not None and self._last_first() is first:
            return
        self.update(args[i] for i in positions)
        self._last_first = weakref.ref(first)

    def update(self, tensors: Iterable[torch.Tensor]) -> None:
        for tensor in tensors:
            ref = self._refs.get(id(tensor))
            if ref is None or ref() is not tensor:
                self._refs[id(tensor)] = weakref.ref(tensor)

    def holds(self, tensor: torch.Tensor) -> bool:
        ref = self._refs.get(id(tensor))
        return ref is not None and ref() is tensor
