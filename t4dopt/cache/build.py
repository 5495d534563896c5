"""Turn a rewritten graph into a `CacheRuntime`: regions, segments, the timestep input."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from t4dopt.cache.registry import register
from t4dopt.cache.program import Program, program_of
from t4dopt.cache.runtime import CacheRuntime, LazyLowered, Lower
from t4dopt.options import CacheSpec
from t4dopt.passes.regions import RegionPlan, find_regions
from t4dopt.passes.segments import Segment, split
from t4dopt.sites import SiteDecision


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    value = node.meta.get("example_value", node.meta.get("val"))
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def find_timestep(gm: fx.GraphModule, plan: RegionPlan) -> fx.Node | None:
    """The input holding the timestep: a non-parameter tensor of shape [] or [batch], not the stream.

    When several qualify, one named like a timestep (``t``, ``timestep``, ``sigma``) wins.
    """
    batch = _shape(plan.stream_input)[0]
    candidates = []
    for node in gm.graph.nodes:
        shape = _shape(node) if node.op == "placeholder" else None
        if shape is None or node is plan.stream_input or "_parameters_" in node.name or "_buffers_" in node.name:
            continue
        if shape in ((), (1,), (batch,)):
            candidates.append(node)
    named = [n for n in candidates if any(word in n.name for word in ("timestep", "sigma", "l_t_"))]
    return (named or candidates or [None])[0]


@dataclass
class Prepared:
    """A graph cut for the cache: its region plan, segments and the program the runtime runs."""

    plan: RegionPlan
    segments: list[Segment]
    program: Program | None


def prepare(gm: fx.GraphModule, decisions: list[SiteDecision], spec: CacheSpec) -> Prepared:
    """Regions, segments and program of `gm` (no program when no sublayer can be cached)."""
    plan = find_regions(gm.graph, decisions, dict(gm.named_modules()))
    if not plan.units:
        return Prepared(plan, [], None)
    segments = split(gm, plan, spec.token_ratio)
    flops = [sum(d.site.dense_flops() * d.density for d in unit.sites) for unit in plan.units]
    return Prepared(plan, segments, program_of(gm, plan, segments, find_timestep(gm, plan), flops, spec.token_ratio))


def build_runtime(gm: fx.GraphModule, example_inputs: list[Any], decisions: list[SiteDecision], spec: CacheSpec,
                  lower: Lower) -> tuple[CacheRuntime | None, RegionPlan]:
    """A runtime for `gm`, or None (with the plan saying why) when no sublayer can be cached."""
    prepared = prepare(gm, decisions, spec)
    if prepared.program is None:
        return None, prepared.plan

    def lazy(module: fx.GraphModule | None) -> LazyLowered | None:
        return LazyLowered(module, lower) if module is not None else None

    runners = [(lazy(s.gm), lazy(s.token_full), lazy(s.token_pruned)) for s in prepared.segments]
    parameter_ids = {id(x) for x in example_inputs if isinstance(x, torch.nn.Parameter)}
    runtime = CacheRuntime(prepared.program, runners, spec, parameter_ids, lower)
    register(runtime)
    return runtime, prepared.plan
