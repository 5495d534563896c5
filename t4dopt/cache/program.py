"""What the cache runtime runs, as plain data: segments, units and chains named by the values they pass.

A `Program` names every value by its node in the original graph, so the same runtime runs
segments lowered in this process and segments loaded from a deployment bundle, whose
manifest stores the program as JSON (`to_json`; `from_json` also reads the manifests of
earlier versions, whose segments carried a ``token`` flag that nothing read).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any, NamedTuple

import torch.fx as fx
from torch.utils import _pytree as pytree

from t4dopt.compat import treespec_dumps, treespec_loads
from t4dopt.fx_utils import is_parameter_input
from t4dopt.cache.graph.regions import RegionPlan, find_prediction, is_in_place
from t4dopt.cache.graph.segments import Segment, token_rows


@dataclass(frozen=True)
class SegmentSpec:
    """A segment by the values it takes and returns; `unit` is the unit it computes, None outside units."""

    inputs: list[str]
    outputs: list[str]
    unit: int | None = None


@dataclass(frozen=True)
class UnitSpec:
    """A residual sublayer: exit = entry + residual; `token_share` is the share of rows pruning recomputes."""

    name: str
    kind: str
    entry: str
    exit: str
    flops: float
    token_share: float | None = None
    work: float = 0.0
    """FLOPs of the whole sublayer per call (`t4dopt.cache.graph.work`), not only its attention's."""


class UnitSpan(NamedTuple):
    """Adjacent units ``first..last`` (each one's exit the next one's entry), by unit index."""

    first: int
    last: int


class Work(NamedTuple):
    """FLOPs per call: of each unit, and of the whole graph."""

    units: list[float]
    total: float


class SavedValue(NamedTuple):
    """The entry and exit (by value name) of what a computation saves: a unit, or a whole chain."""

    entry: str
    exit: str


@dataclass(frozen=True)
class Program:
    """The graph as the runtime runs it: its inputs, outputs, segments, units and chains."""

    placeholders: list[str]
    output_leaves: list[Any]
    output_spec: str
    timestep: str | None
    segments: list[SegmentSpec]
    units: list[UnitSpec]
    chains: list[tuple[int, ...]] = field(default_factory=list)
    mutates: bool = True
    """Whether the graph changes tensors in place; if not, stored inputs need no copy."""
    stream: str | None = None
    """The input carrying the latents (the token stream's source)."""
    prediction: str | None = None
    """The output value holding the prediction for the latents (`find_prediction`), if there is one."""
    static: list[str] = field(default_factory=list)
    """Inputs that are the model's parameters and buffers: the same tensors call after call."""
    work: float = 0.0
    """FLOPs of one whole call, inside units and out (0: not known, a bundle of an earlier version)."""

    def outputs(self, env: dict[str, Any]) -> Any:
        """The graph's output structure filled from `env` (leaves that name values are looked up)."""
        leaves = [env[leaf["value"]] if isinstance(leaf, dict) else leaf for leaf in self.output_leaves]
        return pytree.tree_unflatten(leaves, treespec_loads(self.output_spec))

    def spans(self) -> list[UnitSpan]:
        """The maximal spans of adjacent units, in order; every unit is in one.

        A reused span is rebuilt in one sum, so the values between its units are never made:
        units are adjacent only where the value between them is used by the next unit alone
        (not by another segment, e.g. a ``view_as`` after the sublayer, nor returned; a cast after the
        residual addition belongs to its unit, see `t4dopt.cache.graph.regions`).
        """
        users: dict[str, set[int | None]] = {}
        for segment in self.segments:
            for name in segment.inputs:
                users.setdefault(name, set()).add(segment.unit)
        returned = {leaf["value"] for leaf in self.output_leaves if isinstance(leaf, dict)}
        spans: list[UnitSpan] = []
        for index, unit in enumerate(self.units):
            if (spans and self.units[spans[-1].last].exit == unit.entry and unit.entry not in returned
                    and users.get(unit.entry, set()) <= {index}):
                spans[-1] = spans[-1]._replace(last=index)
            else:
                spans.append(UnitSpan(index, index))
        return spans

    def saved_values(self) -> list[SavedValue]:
        """What a call computing everything saves: each unit, then each chain."""
        return ([SavedValue(unit.entry, unit.exit) for unit in self.units]
                + [SavedValue(self.units[chain[0]].entry, self.units[chain[-1]].exit) for chain in self.chains])

    @cached_property
    def chain_of(self) -> dict[int, int]:
        """The chain each unit in a chain belongs to, by unit index."""
        return {unit: chain for chain, members in enumerate(self.chains) for unit in members}

    def output_values(self, flat: list[Any]) -> Any:
        """The graph's output structure from the values of its tensor leaves, in order."""
        names = [leaf["value"] for leaf in self.output_leaves if isinstance(leaf, dict)]
        return self.outputs(dict(zip(names, flat)))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Program:
        return cls(
            placeholders=list(data["placeholders"]),
            output_leaves=list(data["output_leaves"]),
            output_spec=data["output_spec"],
            timestep=data["timestep"],
            segments=[SegmentSpec(list(s["inputs"]), list(s["outputs"]), s.get("unit")) for s in data["segments"]],
            units=[UnitSpec(**u) for u in data["units"]],
            chains=[tuple(c) for c in data["chains"]],
            mutates=bool(data.get("mutates", True)),
            stream=data.get("stream"),
            prediction=data.get("prediction"),
            static=list(data.get("static", [])),
            work=float(data.get("work", 0.0)),
        )


def program_of(gm: fx.GraphModule, plan: RegionPlan, segments: list[Segment], timestep: fx.Node | None,
               flops: list[float], token_ratio: float, work: Work) -> Program:
    output = next(n for n in gm.graph.nodes if n.op == "output")
    leaves, spec = pytree.tree_flatten(output.args[0])
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    prediction = find_prediction(gm, plan.stream_input)
    return Program(
        placeholders=[n.name for n in placeholders],
        output_leaves=[{"value": leaf.name} if isinstance(leaf, fx.Node) else leaf for leaf in leaves],
        output_spec=treespec_dumps(spec),
        timestep=timestep.name if timestep is not None else None,
        segments=[SegmentSpec([n.name for n in s.inputs], [n.name for n in s.outputs], s.unit) for s in segments],
        units=[UnitSpec(u.name, u.kind, u.entry.name, u.exit.name, f,
                        token_rows(u, token_ratio) / u.token_site.site.query_shape[0] if u.token_site else None, w)
               for u, f, w in zip(plan.units, flops, work.units)],
        chains=[c.units for c in plan.chains],
        mutates=any(is_in_place(n) for n in gm.graph.nodes),
        stream=plan.stream_input.name,
        prediction=prediction.name if prediction is not None else None,
        static=[n.name for n in placeholders if is_parameter_input(n)],
        work=work.total,
    )
