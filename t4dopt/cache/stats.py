"""Per-unit counts of what the cache did during a generation, and the report users read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from t4dopt.cache.policy import Mode


@dataclass(frozen=True)
class UnitReport:
    """One cache unit (an attention sublayer) over one generation; a count per `Mode`, named by its value.

    ``flops_saved`` counts the attention FLOPs (QK^T and PV) not spent: the whole site when
    reused or bypassed, the rows not recomputed when pruned.
    """

    name: str
    kind: str
    calls: int
    computed: int
    reused: int
    pruned: int
    bypassed: int
    flops_dense: float
    flops_saved: float
    work: float = 0.0
    """FLOPs of the whole sublayer per call (0 where not known)."""


class WorkShare(NamedTuple):
    """FLOPs of a generation's calls: computed, and in all (inside units and out)."""

    computed: float
    total: float


class CacheStats:
    """Counts per unit for the running generation; the last finished one is kept for reports."""

    def __init__(self, names: list[str], kinds: list[str], flops: list[float], pruned_share: list[float],
                 work: list[float] | None = None, call_work: float = 0.0):
        """`pruned_share`: per unit, the share of its attention rows a pruned call recomputes; `work`: per unit,
        the FLOPs of the whole sublayer, `call_work` those of a whole call (0: not known)."""
        self.names, self.kinds, self.flops, self.pruned_share = names, kinds, flops, pruned_share
        self.work, self.call_work = work or [0.0] * len(names), call_work
        self.current = self._empty()
        self.last: list[dict[Mode, int]] | None = None
        self.total_calls = 0
        """Every call counted since the runtime was built (resets and generations included)."""

    def _empty(self) -> list[dict[Mode, int]]:
        return [dict.fromkeys(Mode, 0) for _ in self.names]

    def count(self, modes: list[Mode]) -> None:
        """Count one call: each unit's mode."""
        self.total_calls += 1
        for counts, mode in zip(self.current, modes):
            counts[mode] += 1

    def close_generation(self) -> None:
        """End the running generation (a new one starts, or the cache was reset)."""
        if any(sum(c.values()) for c in self.current):
            self.last = self.current
        self.current = self._empty()

    def _reported(self) -> list[dict[Mode, int]]:
        """The last finished generation, or the running one when none has finished."""
        return self.current if self.last is None or any(sum(c.values()) for c in self.current) else self.last

    def report(self) -> list[UnitReport]:
        rows = []
        for name, kind, flops, share, work, c in zip(self.names, self.kinds, self.flops, self.pruned_share, self.work,
                                                     self._reported()):
            calls = sum(c.values())
            saved = flops * (c[Mode.REUSE] + c[Mode.BYPASS]) + flops * (1.0 - share) * c[Mode.PRUNE]
            rows.append(UnitReport(name, kind, calls, flops_dense=flops * calls, flops_saved=saved, work=work,
                                   **{mode.value: c[mode] for mode in Mode}))
        return rows

    def work_share(self) -> WorkShare:
        """FLOPs the reported generation computed: the work outside units every call, each unit's when computed
        (a pruned call: its share of rows). Zero in all where the work is not known."""
        counts = self._reported()
        calls = sum(counts[0].values()) if counts else 0
        if not self.call_work or not calls:
            return WorkShare(0.0, 0.0)
        outside = self.call_work - sum(self.work)
        inside = sum(work * (c[Mode.COMPUTE] + share * c[Mode.PRUNE])
                     for work, share, c in zip(self.work, self.pruned_share, counts))
        return WorkShare(outside * calls + inside, self.call_work * calls)


def table(units: list[UnitReport]) -> str:
    """A plain-text table of `units` with a total line."""
    header = ("unit", "kind", "calls", "computed", "reused", "pruned", "bypassed", "attn GFLOP saved")
    rows = [header] + [(u.name, u.kind, u.calls, u.computed, u.reused, u.pruned, u.bypassed,
                        f"{u.flops_saved / 1e9:.3g} of {u.flops_dense / 1e9:.3g}") for u in units]
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    dense = sum(u.flops_dense for u in units)
    saved = sum(u.flops_saved for u in units)
    calls = sum(u.calls for u in units)
    computed = sum(u.computed for u in units)
    lines.append("")
    lines.append(f"{len(units)} cache units; {computed} of {calls} unit calls computed in full; "
                 f"attention FLOPs saved {100 * saved / dense if dense else 0:.1f}%")
    return "\n".join(lines)
