"""What the backend did to each attention site, as data and as a readable table."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from t4dopt.sites import HiddenAttention, SiteDecision


@dataclass(frozen=True)
class SiteReport:
    """One attention site: where it is, what it mixes, what became of it and why.

    ``name`` is the module path of the attention (with the graph node when one module holds
    several, and the graph when the model compiled to several), ``node`` the FX node.
    """

    name: str
    node: str
    graph: int
    module: str
    kind: str
    action: str
    density: float
    reason: str
    evidence: str
    shape: tuple[int, ...]
    flops_dense: float

    @property
    def flops(self) -> float:
        return self.flops_dense * self.density

    @classmethod
    def hidden(cls, hidden: HiddenAttention, name: str, graph: int) -> SiteReport:
        """An attention a graph break kept out of the compiled graphs: not rewritten, not seen."""
        return cls(name=name, node="", graph=graph, module=name, kind="unknown", action="dense", density=1.0,
                   reason=f"a graph break inside this attention at {hidden.where} keeps it out of the compiled "
                          f"graphs (it runs as it is): {hidden.reason}. To keep it in: {hidden.avoid}",
                   evidence="graph break", shape=(), flops_dense=0.0)

    @classmethod
    def from_decision(cls, decision: SiteDecision, name: str, graph: int) -> SiteReport:
        site = decision.site
        return cls(
            name=name,
            node=site.name,
            graph=graph,
            module=site.module_path,
            kind=decision.layout.kind.value,
            action=decision.action,
            density=decision.density,
            reason=decision.reason,
            evidence=decision.layout.evidence,
            shape=site.query_shape,
            flops_dense=site.dense_flops(),
        )


def count_rewritten(sites: list[SiteReport]) -> int:
    """How many of `sites` were rewritten to block-sparse attention."""
    return sum(1 for site in sites if site.action == "sparse")


def _gflops(value: float) -> str:
    return f"{value / 1e9:.3g}"


def _prefix(parameters: list[tuple[str, torch.Tensor]], names: dict[int, str]) -> str | None:
    """Where the module of a graph's frame sits in the model (``transformer_blocks.3.``): what the model calls the
    graph's parameters, less the path inside the frame; None when they do not say."""
    found = Counter()
    for relative, tensor in parameters:
        full = names.get(id(tensor))
        if full is not None and (full == relative or full.endswith("." + relative)):
            found[full[: len(full) - len(relative)]] += 1
    return found.most_common(1)[0][0] if found else None


@dataclass
class Report:
    """All attention sites of the graphs compiled for one model call.

    ``names``: the model's parameter and buffer names by tensor id, when the model is known (`t4dopt.explain`):
    with them, sites of a graph dynamo cut out of the model (a block compiled on its own after a graph break)
    keep their full module path (``transformer_blocks.3.attn1``); without, they are named inside their graph,
    with its index (``g1:attn``).
    """

    sites: list[SiteReport] = field(default_factory=list)
    graphs: int = 0
    names: dict[int, str] = field(default_factory=dict)

    def add_graph(self, decisions: list[SiteDecision], hidden: list[HiddenAttention] = (),
                  parameters: list[tuple[str, torch.Tensor]] = ()) -> None:
        """Append one compiled graph's sites (and the attentions a graph break kept out of it), named by module path."""
        graph = self.graphs
        self.graphs += 1
        prefix = _prefix(list(parameters), self.names)
        prefix = "" if prefix is None and not graph else prefix
        per_module = Counter(d.site.module_path for d in decisions)

        def named(module: str, node: str, unique: bool) -> str:
            name = module if module and unique else f"{module or 'graph'}[{node}]"
            if prefix is None:
                return f"g{graph}:{name}"
            return f"{prefix}{name}" if prefix else name

        for d in decisions:
            module = d.site.module_path
            self.sites.append(SiteReport.from_decision(d, named(module, d.site.name, per_module[module] == 1), graph))
        for h in hidden:
            self.sites.append(SiteReport.hidden(h, named(h.module, "", True), graph))

    @property
    def flops_dense(self) -> float:
        return sum(s.flops_dense for s in self.sites)

    @property
    def flops(self) -> float:
        return sum(s.flops for s in self.sites)

    @property
    def flops_saved(self) -> float:
        """Fraction of the attention FLOPs (QK^T and PV) the rewrite skips."""
        return 1.0 - self.flops / self.flops_dense if self.flops_dense else 0.0

    def table(self) -> str:
        header = ("site", "kind", "action", "q shape", "density", "GFLOP dense", "GFLOP now", "why")
        rows = [header] + [
            (s.name, s.kind, s.action, "x".join(map(str, s.shape)), f"{s.density:.3f}",
             _gflops(s.flops_dense), _gflops(s.flops), s.reason)
            for s in self.sites
        ]
        widths = [max(len(str(r[i])) for r in rows) for i in range(len(header) - 1)]
        lines = ["  ".join(str(c).ljust(w) for c, w in zip(r[:-1], widths)) + "  " + str(r[-1]) for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * 3)
        sparse = count_rewritten(self.sites)
        lines.append("")
        lines.append(
            f"{len(self.sites)} attention sites, {sparse} made sparse; attention FLOPs "
            f"{_gflops(self.flops_dense)} -> {_gflops(self.flops)} GFLOP per call "
            f"({100 * self.flops_saved:.1f}% saved, estimated from shapes and mask density)"
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


_collectors: list[Report] = []


@contextmanager
def collecting(model: torch.nn.Module | None = None) -> Iterator[Report]:
    """Collect the site reports of every graph the backend compiles inside this block (`model`: to name sites
    by their full module path in every graph)."""
    names = {}
    if model is not None:
        names = {id(t): n for n, t in list(model.named_parameters()) + list(model.named_buffers())}
    report = Report(names=names)
    _collectors.append(report)
    try:
        yield report
    finally:
        _collectors.remove(report)


def publish(decisions: list[SiteDecision], hidden: list[HiddenAttention] = (),
            parameters: list[tuple[str, torch.Tensor]] = ()) -> None:
    """Hand one compiled graph's decisions (and hidden attentions, and parameter paths) to every active collector."""
    for report in _collectors:
        report.add_graph(decisions, hidden, parameters)
