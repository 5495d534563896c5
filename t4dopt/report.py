"""What the backend did to each attention site, as data and as a readable table."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from collections.abc import Iterator

from t4dopt.sites import SiteDecision


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


@dataclass
class Report:
    """All attention sites of the graphs compiled for one model call."""

    sites: list[SiteReport] = field(default_factory=list)
    graphs: int = 0

    def add_graph(self, decisions: list[SiteDecision]) -> None:
        """Append one compiled graph's sites, named by module path."""
        graph = self.graphs
        self.graphs += 1
        per_module: dict[str, int] = {}
        for d in decisions:
            per_module[d.site.module_path] = per_module.get(d.site.module_path, 0) + 1
        for d in decisions:
            module = d.site.module_path
            name = module if module and per_module[module] == 1 else f"{module or 'graph'}[{d.site.name}]"
            self.sites.append(SiteReport.from_decision(d, f"g{graph}:{name}" if graph else name, graph))

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
def collecting() -> Iterator[Report]:
    """Collect the site reports of every graph the backend compiles inside this block."""
    report = Report()
    _collectors.append(report)
    try:
        yield report
    finally:
        _collectors.remove(report)


def publish(decisions: list[SiteDecision]) -> None:
    """Hand one compiled graph's decisions to every active collector."""
    for report in _collectors:
        report.add_graph(decisions)
