"""Turn a rewritten graph into a `CacheRuntime`: regions, segments, the timestep input, the whole-call graphs."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from t4dopt.cache.arithmetic import SaveKind
from t4dopt.cache.graph import work
from t4dopt.cache.graph.collectives import collective_group, is_collective
from t4dopt.cache.graph.functional import functional_residuals, functional_writes
from t4dopt.cache.graph.regions import Rejection, RegionPlan, find_regions, find_timestep
from t4dopt.cache.graph.segments import Segment, split
from t4dopt.cache.graph.streams import pack_streams
from t4dopt.cache.graph.step_graphs import reused_graph, tapped_graph
from t4dopt.cache.lowered import ComputedGraph, LazyLowered, ReusedGraph, SegmentRunners, StepGraphs, TokenTaps
from t4dopt.cache.parameters import ParameterSet
from t4dopt.cache.program import Program, Work, program_of
from t4dopt.cache.registry import GraphUnits, LeftOut, UnitFound, record, register
from t4dopt.cache.runtime import CacheRuntime
from t4dopt.lowering import Lower
from t4dopt.options import CacheSpec
from t4dopt.sites import SiteDecision


NOT_A_DENOISER = (
    "the graph has no timestep input, so it is not a whole denoiser: a block of a regionally compiled model "
    "(diffusers' compile_repeated_blocks), or a piece of a model split by a graph break. The cache tells "
    "denoising steps and generations apart by the timestep and the latents, so it needs them in one graph: "
    "compile the whole model (torch.compile(transformer, backend='turbo4d', ...)) to use it. If you did: dynamo "
    "may be skipping the model's forward, which it does for every copy of a class once one copy broke its graph "
    "inside the blocks' loop in this process (a copy with a diffusers cache hook, compiled): compile that copy "
    "with torch.compile(..., isolate_recompiles=True), or call torch._dynamo.reset() once it is no longer used")


@dataclass
class Prepared:
    """A graph cut for the cache: its region plan, segments and the program the runtime runs."""

    plan: RegionPlan
    segments: list[Segment]
    program: Program | None
    group: object | None = None
    """The process group of the graph's collectives (context parallelism), which reads are reduced over."""


def prepare(gm: fx.GraphModule, decisions: list[SiteDecision], spec: CacheSpec) -> Prepared:
    """Regions, segments and program of `gm` (no program when no sublayer can be cached).

    In-place steps that can be made out-of-place are, first (`t4dopt.cache.graph.functional`); the
    writes left in place are among the plan's rejections.
    """
    writes = functional_writes(gm.graph)
    if functional_residuals(gm.graph) + writes.rewritten:
        gm.recompile()
    plan = find_regions(gm.graph, decisions, dict(gm.named_modules()))
    if plan.stream_input is not None:
        streams = pack_streams(gm.graph, plan.stream_input)
        if streams.packed:
            gm.recompile()
            plan = find_regions(gm.graph, decisions, dict(gm.named_modules()))
        plan.rejected += [Rejection("", reason) for reason in streams.refused]
    plan.rejected += [Rejection(r.module or r.node, f"{r.node} left in place: {r.reason}") for r in writes.refused]
    timestep = find_timestep(gm, plan) if plan.stream_input is not None else None
    if plan.stream_input is not None and timestep is None:
        plan.reason = NOT_A_DENOISER
        return Prepared(plan, [], None)
    if not plan.units:
        return Prepared(plan, [], None)
    group, refused = collective_group(gm.graph)
    if refused is not None:
        plan.reason = refused
        return Prepared(plan, [], None)
    for unit in plan.units:
        if unit.token_site is not None and any(is_collective(node) for node in unit.nodes):
            unit.token_site = None  # (rows picked per shard: not one decision for all ranks)
    segments = split(gm, plan, spec.token_ratio)
    flops = [sum(d.site.dense_flops() * d.density for d in unit.sites) for unit in plan.units]
    return Prepared(plan, segments, program_of(gm, plan, segments, timestep, flops, spec.token_ratio,
                                               _work(gm, plan, decisions)), group)


def _work(gm: fx.GraphModule, plan: RegionPlan, decisions: list[SiteDecision]) -> Work:
    """FLOPs per call of each unit and of the whole graph (for the share of work a call computes)."""
    modules = dict(gm.named_modules())
    attention = {d.rewritten_output or d.site.output: d.site.dense_flops() * d.density for d in decisions}
    return Work([work.flops(unit.nodes, modules, attention) for unit in plan.units],
                work.flops(gm.graph.nodes, modules, attention))


def step_graphs(gm: fx.GraphModule, prepared: Prepared, spec: CacheSpec, lower: Lower,
                unprepared: fx.GraphModule | None = None) -> StepGraphs:
    """The runtime's whole-call graphs for `gm`.

    The plain one (calls that keep nothing: threshold 0, gradients) is `unprepared`, the graph
    as it was before `prepare` where given: the streams unpacked and the writes in place, so such
    a call costs what plain ``torch.compile`` of the graph costs (the packed streams of a
    two-stream model concatenate every sublayer's two addends). A graph that changes tensors in
    place gets only the plain one: values a tapped or rebuilt graph returned early could change
    later in the same graph, but the plain graph returns only the graph's own outputs.
    """
    program = prepared.program
    # The whole-call graphs take the graph's inputs first, then what the runtime passes.
    static = [i for i, name in enumerate(program.placeholders) if name in set(program.static)]
    plain = LazyLowered(tapped_graph(unprepared if unprepared is not None else gm, []).module, lower, static)
    if program.mutates:
        return StepGraphs(plain, None, None, {})
    token_taps = {}
    for unit in prepared.plan.units if "token" in spec.levels else []:
        if unit.token_site is not None:
            site = unit.token_site
            token_taps[unit.index] = TokenTaps(site.site.query.name, (site.rewritten_output or site.site.output).name)
    taps = list(dict.fromkeys([unit.entry for unit in program.units]
                              + [name for pair in token_taps.values() for name in pair]))
    spans = program.spans()
    computed: dict[SaveKind, ComputedGraph] = {}
    reused: dict[tuple[int, ...], ReusedGraph] = {}

    def computed_for(kind: SaveKind) -> ComputedGraph:
        if kind not in computed:
            whole = tapped_graph(gm, taps, program.saved_values(), kind)
            computed[kind] = ComputedGraph(LazyLowered(whole.module, lower, static), whole.outputs)
        return computed[kind]

    def reused_for(orders: tuple[int, ...]) -> ReusedGraph:
        if orders not in reused:
            whole = reused_graph(gm, prepared.plan, spans, orders)
            reused[orders] = ReusedGraph(LazyLowered(whole.module, lower, static), whole.outputs)
        return reused[orders]

    # Whether every span can be rebuilt does not depend on the orders: try once, with order 0 throughout.
    rebuildable = reused_graph(gm, prepared.plan, spans, [0] * len(spans)) is not None
    return StepGraphs(plain, computed_for, reused_for if rebuildable else None, token_taps)


def build_runtime(gm: fx.GraphModule, example_inputs: list[Any], decisions: list[SiteDecision], spec: CacheSpec,
                  lower: Lower) -> tuple[CacheRuntime | None, RegionPlan]:
    """A runtime for `gm`, or None (with the plan saying why) when no sublayer can be cached."""
    unprepared = fx.GraphModule(gm, copy.deepcopy(gm.graph))  # its modules and attributes shared, not copied
    prepared = prepare(gm, decisions, spec)
    plan = prepared.plan
    found = GraphUnits(tuple(UnitFound(u.name, u.kind) for u in plan.units),
                       tuple(LeftOut(r.module, r.reason) for r in plan.rejected),
                       "" if prepared.program is not None else plan.reason)
    record(found, [x for x in example_inputs if isinstance(x, torch.nn.Parameter)])
    if prepared.program is None:
        return None, prepared.plan

    static = set(prepared.program.static)

    def lazy(module: fx.GraphModule | None, segment: Segment) -> LazyLowered | None:
        # A segment (and its token variants) takes the segment's inputs first.
        positions = [i for i, node in enumerate(segment.inputs) if node.name in static]
        return LazyLowered(module, lower, positions) if module is not None else None

    runners = [SegmentRunners(lazy(s.gm, s), lazy(s.token_full, s), lazy(s.token_pruned, s))
               for s in prepared.segments]
    parameters = ParameterSet(x for x in example_inputs if isinstance(x, torch.nn.Parameter))
    runtime = CacheRuntime(prepared.program, runners, spec, parameters, lower,
                           step_graphs(gm, prepared, spec, lower, unprepared))
    runtime.generations.group = prepared.group
    register(runtime)
    return runtime, prepared.plan
