"""The passes of the turbo4d backend, in the one order they run, and how to run them.

Each pass is a plain function ``pass_(state: PassState) -> None`` in the module of its
concern; it reads what earlier passes wrote on the state and writes its own result by name.
After torch-tensorrt's lowering pass list (``dump_lowering_passes``): `describe` prints the list.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TextIO

import torch.fx as fx

from .attention_masks import read_attention_masks
from .carried_tokens import CarriedOutput, find_carried_outputs
from .detect import detect_attention
from .layout import classify_layouts, infer_grid, read_layouts
from .rewrite import rewrite_sparse_sites
from .ring_layouts import check_ring_layouts, rewrite_ring_layouts
from .sequence_trace import trace_sequences
from .sparsify import decide_sparsity
from .state import PassState
from t4dopt.options import Options
from t4dopt.sites import SiteDecision

Pass = Callable[[PassState], None]

ANALYSIS_PASSES: tuple[Pass, ...] = (
    detect_attention,
    read_attention_masks,
    trace_sequences,
    find_carried_outputs,
    read_layouts,
    infer_grid,
    classify_layouts,
    check_ring_layouts,
    decide_sparsity,
)
"""The passes that read the graph and decide; they change nothing."""

PASSES: tuple[Pass, ...] = (*ANALYSIS_PASSES, rewrite_ring_layouts, rewrite_sparse_sites)
"""Every pass, in order: the analysis, then the passes that change the graph."""


def _run(state: PassState, passes: tuple[Pass, ...]) -> list[SiteDecision]:
    for run_pass in passes:
        run_pass(state)
    return state.decisions


def analyze(gm: fx.GraphModule, options: Options) -> list[SiteDecision]:
    """Find the attention sites of `gm` and decide what each becomes; the graph is not changed."""
    return _run(PassState(gm, options), ANALYSIS_PASSES)


def run_passes(gm: fx.GraphModule, options: Options, *, reference: bool = False,
               carried: dict[str, CarriedOutput] | None = None) -> list[SiteDecision]:
    """Analyze and rewrite `gm` in place; returns the decisions, one per site.

    With ``reference=True`` the sparse sites become SDPA with the explicit boolean token mask:
    the dense reference that ``verify`` compares the rewritten graph against. `carried`: the token maps
    earlier graphs proved for inputs of this one (`t4dopt.passes.carried_tokens.carried_inputs`).
    """
    return rewrite(gm, options, reference=reference, carried=carried).decisions


def rewrite(gm: fx.GraphModule, options: Options, *, reference: bool = False,
            carried: dict[str, CarriedOutput] | None = None) -> PassState:
    """`run_passes`, returning the whole state the passes left (the backend reads what carries to later graphs)."""
    state = PassState(gm, options, reference=reference, carried=dict(carried or {}))
    _run(state, PASSES)
    return state


def _summary(run_pass: Pass) -> str:
    return ((run_pass.__doc__ or "").strip().splitlines() or [""])[0]


def describe(file: TextIO | None = None) -> str:
    """Print the ordered pass list, one line per pass, and return it.

    A line holds the position, the pass, its module and the first line of its docstring.
    `file` is standard output unless given.
    """
    rows = [(f"{i}.", p.__name__, p.__module__.rsplit(".", 1)[-1] + ".py", _summary(p))
            for i, p in enumerate(PASSES, start=1)]
    widths = [max(len(row[c]) for row in rows) for c in range(3)]
    text = "\n".join(f"{n:>{widths[0]}} {name:<{widths[1]}}  {module:<{widths[2]}}  {doc}"
                     for n, name, module, doc in rows)
    print(text, file=file or sys.stdout)
    return text
