"""Turn a rewritten graph into a `CacheRuntime`: regions, segments, the timestep input."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from t4dopt.cache.registry import register
from t4dopt.cache.runtime import CacheRuntime, Lower
from t4dopt.options import CacheSpec
from t4dopt.passes.regions import RegionPlan, find_regions
from t4dopt.passes.segments import split, token_rows
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


def build_runtime(gm: fx.GraphModule, example_inputs: list[Any], decisions: list[SiteDecision], spec: CacheSpec,
                  lower: Lower) -> tuple[CacheRuntime | None, RegionPlan]:
    """A runtime for `gm`, or None (with the plan saying why) when no attention can be cached."""
    plan = find_regions(gm.graph, decisions, dict(gm.named_modules()))
    if not plan.units:
        return None, plan
    segments = split(gm, plan, spec.token_ratio)
    parameter_ids = {id(x) for x in example_inputs if isinstance(x, torch.nn.Parameter)}
    flops = [sum(d.site.dense_flops() * d.density for d in unit.sites) for unit in plan.units]
    runtime = CacheRuntime(gm, plan, segments, spec, lower, find_timestep(gm, plan), parameter_ids, flops)
    runtime.stats.pruned_share = [token_rows(u, spec.token_ratio) / u.token_site.site.query_shape[0]
                                  if u.token_site is not None else 1.0 for u in plan.units]
    register(runtime)
    return runtime, plan
