"""Attentions a graph break keeps out of the compiled graphs: named, so that none goes missing silently.

When dynamo meets an op it cannot trace inside an attention (Mochi's ``torch.nonzero`` over the text
mask), the whole call runs outside the graphs this backend receives: it is neither rewritten nor seen.
The graph that ends at such a break says so (dynamo's reason and the user frames at the break); a break
whose frames pass through an attention (a file, function or called attribute named like one) is
reported with its source line, dynamo's hint, and what would keep the attention in the graph: where the
break lies in a diffusers processor `t4dopt.traceable_processors` replaces (matched by file and line), the
one call that does.
"""

from __future__ import annotations

import os
import re

import torch.fx as fx

from t4dopt.compat import graph_break_of
from t4dopt.sites import AttentionSite, HiddenAttention
from t4dopt.traceable_processors import break_fix

ATTENTION_WORDS = ("attention", "attn")


def _attention_call(frame) -> str | None:
    """The attribute a frame's line calls when it is an attention (``self.attn1(`` -> ``attn1``), else None."""
    for attribute in re.findall(r"self\.([\w.]+)\(", frame.line or ""):
        if any(word in attribute.lower() for word in ATTENTION_WORDS):
            return attribute
    return None


def _inside_attention(frame) -> bool:
    name = f"{os.path.basename(frame.filename)} {frame.name}".lower()
    return any(word in name for word in ATTENTION_WORDS)


def _hint(reason: str) -> str:
    found = re.search(r"Hint:\s*(.+?)(?:\s+Hint:|\s+Developer debug context:|$)", reason, re.S)
    return " ".join(found.group(1).split()) if found else ""


def hidden_attentions(gm: fx.GraphModule, sites: list[AttentionSite]) -> list[HiddenAttention]:
    """The attention a graph break inside it keeps out of this and every graph (at most one per graph)."""
    found = graph_break_of(gm)
    if found is None:
        return []
    reason, frames = found
    if not frames or not any(_inside_attention(f) or _attention_call(f) for f in frames):
        return []
    module = next((a for a in (_attention_call(f) for f in frames) if a), "")
    if module and any(s.module_path == module or s.module_path.endswith("." + module) for s in sites):
        return []  # the break comes after the attention, which this graph holds
    last = frames[-1]
    summary = " ".join(reason.split("Explanation:")[0].split())
    hint = _hint(reason)
    fix = next(filter(None, (break_fix(f.filename, f.lineno) for f in frames)), None)
    if fix:
        avoid = fix
    elif hint:
        avoid = f"{hint}; or compute the attention without ops whose output shape depends on data"
    else:
        avoid = "compute the attention without the op that breaks the graph"
    return [HiddenAttention(module or "attention", f"{os.path.basename(last.filename)}:{last.lineno}",
                            f"{summary} ({(last.line or '').strip()})", avoid)]
