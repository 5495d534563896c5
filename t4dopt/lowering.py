"""Where a rewritten graph goes next: one table of lowering targets, used by the backend, the cache and export.

Each `Target` lowers two kinds of graph: the graph dynamo hands the backend (`whole`), and a
plain FX graph cut out of it outside dynamo (`segment`: the cache's segments, whole-call
graphs and arithmetic). `unavailable` says why the target cannot run on this machine, or None.
A new target is one entry here.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from t4dopt import compat

Lower = Callable[[fx.GraphModule, list[Any]], Callable]
"""A graph and example inputs -> a callable with the graph's signature."""


def _inductor_whole(gm: fx.GraphModule, example_inputs: list[Any]) -> Callable:
    return compat.inductor_compile_fx()(gm, example_inputs)


def _inductor_segment(gm: fx.GraphModule, example_inputs: list[Any]) -> Callable:
    return compat.inductor_compile()(gm, example_inputs)


def _eager_whole(gm: fx.GraphModule, example_inputs: list[Any]) -> Callable:
    return gm.forward


def _eager_segment(gm: fx.GraphModule, example_inputs: list[Any]) -> Callable:
    return gm


def _tensorrt(gm: fx.GraphModule, example_inputs: list[Any]) -> Callable:
    from t4dopt.plugins.tensorrt_converter import lower_tensorrt

    return lower_tensorrt(gm, example_inputs)


def _always() -> str | None:
    return None


def _tensorrt_unavailable() -> str | None:
    missing = [name for name in ("tensorrt", "torch_tensorrt") if importlib.util.find_spec(name) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (pip install 't4dopt[tensorrt]')"
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


@dataclass(frozen=True)
class Target:
    """A lowering target: how it lowers whole graphs and segments, and whether it can run here."""

    name: str
    whole: Lower
    segment: Lower
    unavailable: Callable[[], str | None]
    description: str


TARGETS: dict[str, Target] = {
    target.name: target for target in (
        Target("inductor", _inductor_whole, _inductor_segment, _always,
               "Inductor (torch.compile's default compiler); the t4d op stays one opaque call"),
        Target("eager", _eager_whole, _eager_segment, _always,
               "the rewritten graph runs as it is, op by op (fast to start; for tests and debugging)"),
        Target("tensorrt", _tensorrt, _tensorrt, _tensorrt_unavailable,
               "torch-tensorrt with the t4d TensorRT plugin (needs TensorRT and a CUDA GPU)"),
    )
}


def target(name: str) -> Target:
    """The target called `name` (options parsing has checked it is one of `TARGETS`)."""
    return TARGETS[name]
