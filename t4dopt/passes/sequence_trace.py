"""Where a sequence axis came from: follow reshapes, permutes and concatenations back up the graph.

Joint attention in video models is written as ``x.reshape(B, F * P, C)`` (frame-major) after a
``torch.cat([text, video], dim=1)`` for prefix tokens; per-frame attention folds frames into the
batch. Following the query's sequence axis back through the view-like and elementwise ops that
produced it tells which axes were merged into it, in which order, and how many prefix tokens
were concatenated in front.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from .state import PassState
from t4dopt.fx_utils import shape_of
from t4dopt.sites import SequenceOrigin

MAX_STEPS = 200
SAME_AXIS_METHODS = {
    "contiguous", "float", "half", "bfloat16", "to", "type", "type_as", "clone", "detach",
    "__mul__", "__add__", "__sub__", "__truediv__", "mul", "add", "sub", "div", "neg", "sigmoid",
}
SAME_AXIS_FUNCTIONS = {
    operator.mul, operator.add, operator.sub, operator.truediv, operator.neg, torch.mul, torch.add,
    torch.sub, torch.neg, F.linear, F.layer_norm, F.group_norm, F.rms_norm, F.silu, F.gelu,
    torch.nn.functional.normalize, torch.sigmoid, torch.tanh, F.dropout,
    torch.layer_norm, torch.group_norm, torch.rms_norm,  # what nn.RMSNorm & co. record in the graph
    # ``out = torch.empty_like(x); out[..., 0::2] = ...`` (rotary embeddings): out has x's axes.
    torch.empty_like, torch.zeros_like,
}


def _group_reshape(shape_in: tuple[int, ...], shape_out: tuple[int, ...], out_dim: int) -> list[int] | None:
    """Input dims that make up output dim `out_dim` of a reshape, when it is a pure merge or 1:1.

    Size-1 dims are left out of the matching: they can be added or dropped anywhere.
    """
    keep_in = [d for d, size in enumerate(shape_in) if size != 1]
    keep_out = [d for d, size in enumerate(shape_out) if size != 1]
    if shape_out[out_dim] == 1 or math.prod(shape_in) != math.prod(shape_out):
        return None
    i = j = 0
    while i < len(keep_in) and j < len(keep_out):
        group_in, group_out = [i], [j]
        prod_in, prod_out = shape_in[keep_in[i]], shape_out[keep_out[j]]
        while prod_in != prod_out:
            if prod_in < prod_out and group_in[-1] + 1 < len(keep_in):
                group_in.append(group_in[-1] + 1)
                prod_in *= shape_in[keep_in[group_in[-1]]]
            elif prod_out < prod_in and group_out[-1] + 1 < len(keep_out):
                group_out.append(group_out[-1] + 1)
                prod_out *= shape_out[keep_out[group_out[-1]]]
            else:
                return None
        if keep_out.index(out_dim) in group_out:
            return [keep_in[g] for g in group_in] if len(group_out) == 1 else None
        i, j = group_in[-1] + 1, group_out[-1] + 1
    return None


def _carrying_arg(node: fx.Node, shape: tuple[int, ...], dim: int) -> fx.Node | None:
    """The input that carries axis `dim` into an elementwise op, linear or norm (same rank and size there)."""
    tensors = [a for a in node.args if isinstance(a, fx.Node) and shape_of(a) is not None]
    for arg in sorted(tensors, key=lambda a: shape_of(a) != shape):
        arg_shape = shape_of(arg)
        if len(arg_shape) == len(shape) and arg_shape[dim] == shape[dim]:
            return arg
    return None


def _split_source(node: fx.Node, dim: int) -> fx.Node | None:
    """The tensor a chunk/split came from, when it was not cut along axis `dim`."""
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    source = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    source_shape = shape_of(source) if source is not None else None
    if name not in ("chunk", "split") or source_shape is None:
        return None
    split_dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    return None if split_dim % len(source_shape) == dim else source


def trace_sequence(node: fx.Node, dim: int) -> SequenceOrigin:
    """Follow axis `dim` of `node` upwards until it is a merge of several axes or cannot be followed."""
    shape = shape_of(node)
    size = shape[dim] if shape else 0
    dim = dim % len(shape) if shape else dim
    prefix = 0
    for _ in range(MAX_STEPS):
        shape = shape_of(node)
        if shape is None or node.op != "call_function" and node.op != "call_method":
            break
        target = node.target
        name = target if isinstance(target, str) else getattr(target, "__name__", "")
        parent = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        if name in ("view", "reshape", "flatten", "unflatten") and parent is not None:
            group = _group_reshape(shape_of(parent) or (), shape, dim)
            if group is None:
                break
            parent_shape = shape_of(parent)
            sizes = tuple(parent_shape[d] for d in group)
            if len(sizes) > 1:
                return SequenceOrigin(prefix, sizes)
            node, dim = parent, group[0]
        elif name in ("permute",) and parent is not None:
            order = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
            node, dim = parent, order[dim] % len(shape)
        elif name in ("transpose", "swapaxes") and parent is not None:
            a, b = (d % len(shape) for d in node.args[1:3])
            node, dim = parent, b if dim == a else a if dim == b else dim
        elif target is operator.getitem and parent is not None:
            index = node.args[1]
            if shape_of(parent) is None:
                source = _split_source(parent, dim)
                if source is None:
                    break
                node = source
            elif isinstance(index, int):
                node, dim = parent, dim + 1
            elif isinstance(index, tuple) and all(i is Ellipsis or isinstance(i, slice) for i in index):
                if Ellipsis in index:
                    break
                if dim < len(index) and index[dim] != slice(None):
                    start = index[dim].start or 0
                    if index[dim].stop is not None or index[dim].step not in (None, 1):
                        break
                    inner = trace_sequence(parent, dim)
                    if inner.prefix != start:
                        break
                    return SequenceOrigin(prefix, inner.factors)
                node = parent
            else:
                break
        elif target is torch.cat or name == "cat":
            pieces = node.args[0]
            cat_dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            if cat_dim % len(shape) != dim:
                node = next((p for p in pieces if shape_of(p) and shape_of(p)[dim] == shape[dim]), None)
                if node is None:
                    break
                continue
            prefix += sum(shape_of(p)[dim] for p in pieces[:-1])
            node = pieces[-1]
        elif name in SAME_AXIS_METHODS or target in SAME_AXIS_FUNCTIONS:
            following = _carrying_arg(node, shape, dim)
            if following is None:
                break
            node = following
        else:
            break
    remaining = shape_of(node)
    tail = remaining[dim] if remaining and dim < len(remaining) else size - prefix
    return SequenceOrigin(prefix, (tail,))


def factors_match(factors: tuple[int, ...], outer: int, inner: int) -> bool:
    """Whether merged `factors` read as `outer` then `inner` (inner may itself be a merge, h * w)."""
    if not factors or factors[0] != outer:
        return False
    return math.prod(factors[1:]) == inner


def trace_sequences(state: PassState) -> None:
    """Trace each site's query sequence axis up the graph: the axes merged into it, the prefix tokens."""
    state.origins = [trace_sequence(site.query, -2) for site in state.sites]
