"""The README's coverage table: what turbo4d does with each diffusers video transformer (tiny configs).

One row per model of `diffusers_models`: the attention sites dynamo captured, the joint self-attentions
over the whole video and how many became sparse, the layout option it needs (none where the graph
shows the grid), the cache units found, and the largest relative error of the compiled model (sparse,
cache on, first call) against the eager model run with the policy's explicit boolean mask at the same
sites (`masked_joint_sdpa`; the unmasked eager model where no site is sparse).
A model marked `traceable` (Mochi) is compiled after `t4dopt.make_traceable`, on a copy: its references
run the model as diffusers builds it, with its own processor.

    python tests/diffusers_coverage.py           # print the table
    python tests/diffusers_coverage.py --write   # write it into README.md between its markers

`tests/test_diffusers.py` measures every row (one compile per model, shared with its other tests)
and fails when the README's table differs, so the table cannot go stale.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import diffusers_models as dm  # noqa: E402
import t4dopt  # noqa: E402
from reference import grid_labels, sculpt4d_token_mask  # noqa: E402
from t4dopt.report import collecting  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- coverage:start -->", "<!-- coverage:end -->"

BLOCK_SIZE = 16
POLICY = {"policy": "sculpt4d", "block_size": BLOCK_SIZE, "strides": (1, 2), "anchor_frames": 0}
CACHE = {"threshold": 0.0}
SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")

MODELS = [dm.cogvideox, dm.cogvideox_15, dm.wan21, dm.wan22, dm.wan_vace, dm.skyreels_v2, dm.skyreels_v2_df,
          dm.hunyuan_video, dm.hunyuan_video_padded, dm.hunyuan_video_15, dm.hunyuan_video_15_padded,
          dm.motif_video, dm.mochi, dm.ltx_video, dm.allegro, dm.easyanimate, dm.cosmos, dm.consisid, dm.latte,
          dm.sana_video]


def token_mask(tiny: dm.TinyModel) -> torch.Tensor:
    """The policy's [N, N] boolean mask over the model's joint sequence, built token by token."""
    g = tiny.grid
    labels = grid_labels(g["frames"], g["tokens_per_frame"], g["prefix_tokens"], g["suffix_tokens"])
    return sculpt4d_token_mask(labels, block_size=BLOCK_SIZE, strides=POLICY["strides"],
                               anchor_frames=POLICY["anchor_frames"])


@contextlib.contextmanager
def masked_joint_sdpa(length: int, mask: torch.Tensor):
    """Eager SDPA with `mask` combined into every self-attention over `length` tokens (the model's mask kept).

    Yields the list of the masked calls' query shapes.
    """
    original = F.scaled_dot_product_attention
    calls = []

    def sdpa(*args, **kwargs):
        bound = dict(zip(SDPA_ARGS, args), **kwargs)
        q, k = bound["query"], bound["key"]
        if q.shape[-2] == length and k.shape[-2] == length:
            assert not bound.get("is_causal")
            given = bound.get("attn_mask")
            if given is None:
                bound["attn_mask"] = mask
            elif given.dtype == torch.bool:
                bound["attn_mask"] = given & mask
            else:
                blocked = torch.zeros(mask.shape, dtype=given.dtype).masked_fill(~mask, float("-inf"))
                bound["attn_mask"] = given + blocked
            calls.append(q.shape)
        return original(**bound)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)
        yield calls


@dataclass(frozen=True)
class Row:
    model: str
    diffusers_class: str
    sites: int
    joint: int
    sparse: int
    """Joint self-attentions made sparse (a site of a block graph that runs for every block counts per block)."""
    needs: str
    """The layout option the model needs ("none" when the graph shows the grid)."""
    units: int
    error: float
    """Max |compiled - reference| / max |reference|."""
    notes: str
    """Why a joint self-attention stayed dense, or why nothing is cached ("" when neither)."""


@dataclass
class Measured:
    """One compiled call of a tiny model beside its references, for the table and for tests/test_diffusers.py."""

    tiny: dm.TinyModel
    row: Row
    report: t4dopt.Report
    warned: list[str]
    """T4DWarnings of the compile and call, the cache's left out."""
    got: torch.Tensor
    want: torch.Tensor
    """The eager model with the explicit mask at every joint self-attention (no mask where none is sparse)."""
    dense: torch.Tensor
    """The eager model unchanged."""
    masked_calls: int
    found: list[t4dopt.cache.GraphUnits]
    """Per graph, the cache units found and what was left out (`t4dopt.cache_report(model).graphs`)."""


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


@functools.cache
def measure(make) -> Measured:
    """Compile `make()`'s model with sparse attention and the cache (eager lowering) and compare one call."""
    tiny = make()
    options = {"sparse": POLICY, "cache": CACHE, "target": "eager"}
    if tiny.hint is not None:
        options["layout"] = tiny.hint
    model = tiny.model
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if tiny.traceable:
            model = copy.deepcopy(tiny.model)
            t4dopt.make_traceable(model)
        compiled = torch.compile(model, backend="turbo4d", options=options)
        with torch.no_grad(), collecting() as report:
            got = compiled(**tiny.inputs, return_dict=False)[0]
    cache = t4dopt.cache_report(model)
    units = len(cache.units)
    del compiled
    torch._dynamo.reset()
    messages = [str(w.message) for w in caught if issubclass(w.category, t4dopt.T4DWarning)]
    cache_warnings = [m for m in messages if m.startswith("turbo4d cache:")]
    length = tiny.length if tiny.grid is not None else -1
    joint = [s for s in report.sites if s.evidence == "graph break" or (
        s.shape and len(s.shape) == 4 and s.shape[-2] == length and s.kind in ("spatiotemporal", "unknown"))]
    sparse = [s for s in report.sites if s.action == "sparse"]
    with torch.no_grad():
        dense = tiny.model(**tiny.inputs, return_dict=False)[0]
        calls: list = []
        if sparse:
            with masked_joint_sdpa(tiny.length, token_mask(tiny)) as calls:
                want = tiny.model(**tiny.inputs, return_dict=False)[0]
        else:
            want = dense
    notes = ["compiled after `t4dopt.make_traceable(model)` (`t4dopt.enable` calls it)"] if tiny.traceable else []
    notes += [f"joint dense: {_short(s.reason)}" for s in joint if s.action != "sparse"][:1]
    if tiny.graph_sites:
        notes.append(f"one compiled block graph runs for all {tiny.joint_sites} blocks")
    if not units:
        notes += [f"uncached: {_short(m.removeprefix('turbo4d cache: graph left uncached: '))}"
                  for m in cache_warnings][:1]
    # A block graph dynamo compiles once serves every block: its sparse site counts once per block (both run
    # sparse, or the error against the masked reference, which masks every block, would show it).
    sparse_attentions = len(sparse) * tiny.joint_sites // tiny.graph_sites if tiny.graph_sites else len(sparse)
    row = Row(tiny.name, type(tiny.model).__name__, len(report.sites), tiny.joint_sites, sparse_attentions,
              ", ".join(tiny.hint) if tiny.hint else "none", units, relative_error(got, want), "; ".join(notes))
    return Measured(tiny, row, report, [m for m in messages if m not in cache_warnings], got, want, dense,
                    len(calls), cache.graphs)


def _short(reason: str, limit: int = 64) -> str:
    first = reason.splitlines()[0].replace("|", "/")
    return first if len(first) <= limit else first[:limit - 3].rstrip() + "..."


def error_bound(error: float) -> str:
    """The power of ten the README states: above three times the error measured (and at least 1e-7, which
    float32 rounding on another CPU may reach where this one measured 0), so reruns stay below it."""
    return f"< 1e{math.ceil(math.log10(max(3 * error, 1e-7)))}"


HEADER = ("| model | diffusers class | attention sites | joint self-attentions | sparse | layout option needed "
          "| cache units | error vs explicit mask | notes |")


def render(rows: list[Row]) -> str:
    lines = [HEADER, "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r.model} | `{r.diffusers_class}` | {r.sites} | {r.joint} | {r.sparse} | {r.needs} "
                     f"| {r.units} | {error_bound(r.error)} | {r.notes} |")
    return "\n".join(lines)


def readme_table(text: str) -> str:
    start, end = text.index(START) + len(START), text.index(END)
    return text[start:end].strip()


def write(table: str) -> None:
    text = README.read_text()
    start, end = text.index(START) + len(START), text.index(END)
    README.write_text(text[:start] + "\n" + table + "\n" + text[end:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="write the table into README.md")
    args = parser.parse_args()
    table = render([measure(make).row for make in MODELS])
    print(table)
    if args.write:
        write(table)


if __name__ == "__main__":
    main()
