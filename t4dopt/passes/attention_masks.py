"""What the attention mask a model passes means to the block table: nothing, per-key, per-query, or structured.

A model's mask is combined with the block mask, never dropped, or the site stays dense. A boolean
mask is first split into the factors it is the AND of (HunyuanVideo 1.5 builds
``m & m.transpose(2, 3)`` from a per-token validity vector); each factor is then read alone:

- a factor the graph computes from constants alone (``arange`` comparisons, ``ones``) is evaluated
  here, at compile time: one that keeps every key is no mask; one over queries and keys
  ([N, N], as SkyReels-V2's block-causal diffusion-forcing mask) becomes a block layout
  (`t4dopt.block_layout.BlockLayout.from_token_mask`, exact or refused) intersected with the policy
  by the sparsify pass;
- a factor that depends on the inputs is combined at run time when the graph shows it constant
  over heads and queries (a key mask: SDPA's key-padding shape [B, 1, 1, N], or such a mask
  repeated over the queries; boolean or additive, as HunyuanVideo's text padding): it becomes the
  op's ``key_mask`` (`t4dopt.ops.key_mask`: a mask that keeps every key runs unmasked); or, when
  boolean and constant over heads and keys, a query mask: the rows it masks out attend no key, and
  SDPA gives them zeros, so the rewrite zeroes them. Where a value may vary is read op by op
  (`varying_dims`: repeats, expands, transposes, views that add or drop size-1 axes, casts, pads,
  elementwise ops); anything the reading does not know varies everywhere, so such a mask stays
  dense with the reason.

Positions need no proof here: SDPA applies ``mask[..., i, j]`` to query i and key j whatever they
are, and so does the rewrite.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.fx as fx

from .state import PassState
from t4dopt.fx_utils import dtype_of, example_value, op_name, shape_of, source_line
from t4dopt.sites import AttentionSite, SiteMask

FOLD_LIMIT = 1 << 25
"""Largest tensor (elements) the compile-time evaluation of a constant mask may build."""


def _ancestors(node: fx.Node) -> list[fx.Node] | None:
    """`node` and what it is computed from, in graph order, or None when that reads a graph input."""
    seen: dict[fx.Node, None] = {}
    stack = [node]
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        if current.op in ("placeholder", "output") or current.op not in ("call_function", "call_method", "get_attr"):
            return None
        seen[current] = None
        stack.extend(current.all_input_nodes)
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    return sorted(seen, key=order.__getitem__)


def constant_value(node: fx.Node) -> torch.Tensor | None:
    """The value of a tensor the graph computes from constants only (None when it reads an input or is too big)."""
    nodes = _ancestors(node)
    if nodes is None:
        return None
    for n in nodes:
        value = example_value(n)
        if isinstance(value, torch.Tensor) and value.numel() > FOLD_LIMIT:
            return None
    values: dict[fx.Node, object] = {}
    module = node.graph.owning_module

    def load(a):
        return fx.node.map_arg(a, lambda n: values[n])

    try:
        for n in nodes:
            if n.op == "get_attr":
                target = module
                for part in str(n.target).split("."):
                    target = getattr(target, part)
                values[n] = target
            elif n.op == "call_function":
                values[n] = n.target(*load(n.args), **load(n.kwargs))
            else:
                self_, *rest = load(n.args)
                values[n] = getattr(self_, n.target)(*rest, **load(n.kwargs))
    except Exception:  # an op that does not run outside the graph (fake-only, device): not a constant we can read
        return None
    value = values[node]
    return value.detach().cpu() if isinstance(value, torch.Tensor) else None


def _keeps_everything(value: torch.Tensor) -> bool:
    return bool(value.all()) if value.dtype == torch.bool else bool((value == 0).all())


AND_OPS = frozenset({"and_", "__and__", "logical_and", "bitwise_and", "__iand__"})
SAME_PLACES = frozenset({"bool", "to", "type", "float", "half", "bfloat16", "double", "contiguous", "clone",
                         "detach", "logical_not", "__invert__", "bitwise_not", "neg", "__neg__"})
"""Ops whose value changes only where their input's does (casts, negations)."""
ELEMENTWISE = frozenset({"and_", "__and__", "logical_and", "bitwise_and", "or_", "__or__", "logical_or",
                         "bitwise_or", "mul", "__mul__", "add", "__add__", "sub", "__sub__", "eq", "ne", "lt",
                         "le", "gt", "ge", "where", "masked_fill"})
BROADCASTS = frozenset({"repeat", "expand", "expand_as", "broadcast_to"})
RESHAPES = frozenset({"view", "reshape", "unsqueeze", "squeeze", "flatten", "unflatten"})


def _tail_dims(shape: tuple[int, ...]) -> frozenset[int]:
    """The dims of `shape` (counted from the end: -1 is the last) whose size is not 1."""
    return frozenset(d - len(shape) for d, size in enumerate(shape) if size != 1)


def varying_dims(node: object) -> frozenset[int] | None:
    """The dims (counted from the end) along which the value of `node` may change; None when its shape is unknown.

    Conservative: an op not read here may vary along every dim of size > 1.
    """
    if not isinstance(node, fx.Node):
        return frozenset()
    shape = shape_of(node)
    if shape is None:
        return None
    everywhere = _tail_dims(shape)
    parent = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    if node.op not in ("call_function", "call_method") or parent is None:
        return everywhere
    name, inner = op_name(node), varying_dims(parent)
    if inner is None:
        return everywhere
    if name in SAME_PLACES or name in BROADCASTS or (name == "repeat_interleave" and "dim" in node.kwargs):
        return inner & everywhere
    rank = len(shape)
    if name in ("transpose", "swapaxes", "swapdims"):
        pair = node.args[1:3]
        if len(pair) != 2 or not all(isinstance(d, int) for d in pair):
            return everywhere  # dims given by keyword or symbolically: not read
        a, b = (d - rank if d >= 0 else d for d in pair)
        return frozenset(b if d == a else a if d == b else d for d in inner)
    if name == "permute":
        dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
        if len(dims) != rank or not all(isinstance(d, int) for d in dims):
            return everywhere  # dims given by keyword: not read
        sources = [(d - rank if d >= 0 else d) for d in dims]
        return frozenset(i - rank for i, source in enumerate(sources) if source in inner)
    if name in RESHAPES:
        outer, parent_shape = [d for d in range(len(shape)) if shape[d] != 1], shape_of(parent)
        before = [d for d in range(len(parent_shape)) if parent_shape[d] != 1]
        if [shape[d] for d in outer] != [parent_shape[d] for d in before]:
            return everywhere  # the reshape splits or merges axes: not read
        moved = {b - len(parent_shape): o - len(shape) for o, b in zip(outer, before)}
        return frozenset(moved[d] for d in inner if d in moved)
    if name == "pad":
        pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad", ())
        return (inner | frozenset(-1 - i for i in range(len(pad) // 2))) & everywhere
    if name in ELEMENTWISE:
        found = frozenset()
        for operand in (a for a in node.args if isinstance(a, fx.Node)):
            dims = varying_dims(operand)
            if dims is None:
                return everywhere
            found |= dims
        return found & everywhere
    return everywhere


def _and_factors(mask: fx.Node) -> list[fx.Node]:
    """The boolean masks `mask` is the AND of (through boolean casts), or `mask` itself."""
    name = op_name(mask) if mask.op in ("call_function", "call_method") else ""
    if name in ("bool", "to") and isinstance(mask.args[0], fx.Node) and dtype_of(mask.args[0]) == torch.bool:
        return _and_factors(mask.args[0])
    if name in AND_OPS and len(mask.args) == 2 and all(isinstance(a, fx.Node) for a in mask.args) \
            and all(dtype_of(a) == torch.bool for a in mask.args):
        return _and_factors(mask.args[0]) + _and_factors(mask.args[1])
    return [mask]


def _key_only(shape: tuple[int, ...], batch: int) -> bool:
    """Whether a mask of `shape` broadcast to [batch, heads, N, N] depends on the batch element and key alone."""
    if len(shape) > 4:
        return False
    padded = (1,) * (4 - len(shape)) + shape
    return padded[1] == 1 and padded[2] == 1 and padded[0] in (1, batch)


class _Part(NamedTuple):
    kind: str
    """"none", "keys", "queries", "structured" or "unsupported"."""
    node: fx.Node | None = None
    value: torch.Tensor | None = None
    evidence: str = ""
    reason: str = ""


def _read_factor(factor: fx.Node, site: AttentionSite, whole: bool) -> _Part:
    """One factor of a site's mask (`whole`: it is the whole mask, not a part of an AND)."""
    shape, n, batch = shape_of(factor), site.key_len, site.query_shape[0]
    where = f"{factor.name} (at {source_line(factor)})"
    if shape is None:
        return _Part("unsupported", reason=f"its attention mask {where} has no static shape")
    value = constant_value(factor)
    if value is not None:
        if _keeps_everything(value):
            return _Part("none", evidence=f"the attention mask {where} keeps every key (read at compile time)")
        if _key_only(shape, batch):
            return _Part("keys", factor, evidence=f"the constant key mask {where}")
        if len(shape) >= 2 and shape[-2:] == (site.query_len, n) and math.prod(shape[:-2]) == 1:
            return _Part("structured", value=value.reshape(shape[-2:]),
                         evidence=f"the structured mask {where}, read at compile time")
        return _Part("unsupported", reason=f"its attention mask {where} {list(shape)} differs per batch element "
                                           "or head over queries and keys")
    dims = varying_dims(factor)
    padded = (1,) * (4 - len(shape)) + shape if len(shape) <= 4 else None
    if dims is not None and padded is not None and padded[0] in (1, batch):
        if dims <= {-4, -1} and padded[3] in (1, n):
            return _Part("keys", factor, evidence=f"the key mask {where} {list(shape)}, applied at run time")
        if dims <= {-4, -2} and padded[2] in (1, site.query_len) and dtype_of(factor) == torch.bool:
            return _Part("queries", factor, evidence=f"the query mask {where} {list(shape)}: the rows it masks out "
                                                      "get zeros, as from SDPA")
    what = "its attention mask" if whole else "a factor of its attention mask"
    return _Part("unsupported", reason=f"{what} {where} {list(shape)} depends on the inputs and varies over "
                                       "queries and keys together (or over heads); only masks over keys alone or "
                                       "over queries alone combine with a block table at run time")


def read_mask(site: AttentionSite) -> SiteMask | None:
    """What the site's mask means to the block table (None: it has none)."""
    mask = site.attn_mask
    if mask is None:
        return None
    dtype, where = dtype_of(mask), f"{mask.name} (at {source_line(mask)})"
    if shape_of(mask) is None or dtype is None:
        return SiteMask(reason=f"its attention mask {where} has no static shape")
    if dtype != torch.bool and not dtype.is_floating_point:
        return SiteMask(reason=f"its attention mask {where} is of dtype {dtype}")
    if len(site.query_shape) != 4:
        return SiteMask(reason="an attention mask on a site that is not [B, H, N, D]")
    factors = _and_factors(mask) if dtype == torch.bool else [mask]
    parts = [_read_factor(f, site, whole=len(factors) == 1) for f in factors]
    refused = next((p for p in parts if p.kind == "unsupported"), None)
    if refused is not None:
        return SiteMask(reason=refused.reason)
    found: dict[str, _Part] = {}
    for part in (p for p in parts if p.kind != "none"):
        if part.kind in found:
            return SiteMask(reason=f"its attention mask {where} is the AND of several {part.kind} masks; "
                                   "only one of each kind combines with a block table")
        found[part.kind] = part
    evidence = "; ".join(p.evidence for p in (found.values() or parts))
    keys, queries, structured = (found.get(k) for k in ("keys", "queries", "structured"))
    return SiteMask(keys.node if keys else None, queries.node if queries else None,
                    structured.value if structured else None, evidence=evidence)


def read_attention_masks(state: PassState) -> None:
    """Read each site's attention mask: its key, query (run time) and structured (compile time) parts, or why not."""
    state.masks = [read_mask(site) for site in state.sites]
