"""Where each token of an attention's queries, keys and values comes from: their token maps.

A `TokenMap` gives, for every position of a sequence axis, the tensor the token is read from
(its root) and the coordinates there (`t4dopt.sites.Segment`). It is found by walking up the
graph from the sequence axis, through ops whose effect on the token axes is understood:

- views: view / reshape / flatten / unflatten / (un)squeeze / permute / transpose / movedim,
  slices and integer indices, narrow / select, chunk / split / unbind, view_as_complex / view_as_real;
- concatenations: along the sequence each piece becomes a segment (text before or after the video);
  along another axis every piece carries the tokens;
- position-wise ops: elementwise arithmetic, activations, casts, linear layers, norms, softmax,
  reductions over other axes, matmul / bmm / einsum along their rows, attention outputs (the
  query's rows; of a fused aten attention call, its output and its log-sum-exp), values written
  into ``torch.empty_like(x)`` slice by slice (rotary embeddings);
- patch embeddings: a Conv3d / Conv2d / unfold whose kernel equals its stride cuts an axis into
  patches; its spatial dims tell what the axes are (a Conv3d's depth is time, the batch of a
  per-image Conv2d holds the frames).

Ops that reorder or repeat tokens (flip, roll, sort, gather, index_select, indexing with a tensor,
repeat, expand along the tokens) end the walk as `Stop.REORDER`; any other op ends it as
`Stop.OPAQUE` (the order beyond it is not visible). Where several operands of one op carry the
tokens (``x + f(x)``, ``q * cos + rotate(q) * sin``) their maps must agree, or the walk stops as
REORDER: only the operands that read a token input (a graph input of rank >= 3) are compared;
positional tables (reading no graph input: rotary tables, learned position embeddings) and
per-token scalars (inputs of rank <= 2: per-token timesteps, masks) ride along.

Walks are memoised per graph, so the residual stream of a deep model is walked once.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import re
from collections.abc import Iterable
from typing import Any, NamedTuple

import torch
import torch.fx as fx

from .state import PassState
from t4dopt.compat import fused_sdpa_functions, op_arguments
from t4dopt.fx_utils import example_value, is_parameter_input, is_size, op_name, shape_of, source_line
from t4dopt.sites import Digit, Segment, SiteTokens, Stop, TokenMap

Offsets = tuple[tuple[int, int], ...]
MAX_STEPS = 200_000
"""Steps one graph's walks may take in all; past that, what is left is not followed (keeps compiles fast)."""

VIEWS = frozenset({"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as"})
AXIS_MOVES = frozenset({"permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis", "t"})
SAME_AXES = frozenset({
    "contiguous", "clone", "detach", "float", "half", "bfloat16", "double", "to", "type", "type_as", "cpu", "cuda",
    "neg", "abs", "exp", "log", "sigmoid", "log_sigmoid", "logsigmoid", "tanh", "sin", "cos", "sqrt", "rsqrt", "reciprocal", "square", "erf",
    "relu", "silu", "gelu", "mish", "leaky_relu", "elu", "softplus", "hardswish", "hardsigmoid", "dropout",
    "nan_to_num", "real", "imag", "conj", "angle", "sign", "floor", "ceil", "round", "logical_not", "bitwise_not",
    "__neg__", "__invert__", "cumsum", "cumprod", "wait_tensor",
})
ELEMENTWISE = frozenset({
    "add", "sub", "mul", "div", "truediv", "floordiv", "true_divide", "rsub", "pow", "where", "addcmul", "addcdiv",
    "lerp", "maximum", "minimum", "logaddexp", "logaddexp2", "masked_fill", "polar", "complex", "atan2", "hypot", "fmod", "remainder",
    "clamp", "clip", "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or", "and_", "or_", "xor",
    "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__", "__rtruediv__",
    "__pow__", "__rpow__", "__and__", "__or__", "__floordiv__", "__mod__",
})
NORMS = {"layer_norm": "last", "rms_norm": "last", "group_norm": 1, "batch_norm": 1, "instance_norm": 1,
         "normalize": "dim", "softmax": "dim", "log_softmax": "dim"}
"""Position-wise ops that mix values along some axes: which (a fixed coordinate there no longer picks one input)."""
REDUCTIONS = frozenset({"sum", "mean", "amax", "amin", "prod", "std", "var", "logsumexp", "any", "all",
                        "nansum", "nanmean"})
REORDERING = frozenset({
    "flip", "fliplr", "flipud", "roll", "rot90", "sort", "argsort", "msort", "topk", "kthvalue", "gather",
    "index_select", "take", "take_along_dim", "nonzero", "masked_select", "scatter", "scatter_add",
    "scatter_reduce", "index_add", "index_copy", "index_put", "index_fill", "unique", "repeat",
    "repeat_interleave", "tile", "expand", "expand_as", "broadcast_to",
})
"""Ops that may reorder or repeat the tokens; harmless (followed) when their dims miss every token axis."""
FACTORIES = frozenset({
    "arange", "zeros", "ones", "full", "empty", "rand", "randn", "randint", "linspace", "logspace", "eye", "tensor",
    "new_zeros", "new_ones", "new_full", "new_empty", "new_tensor", "zeros_like", "ones_like", "full_like",
    "empty_like", "rand_like", "randn_like", "scalar_tensor",
})
SPLITS = frozenset({"split", "chunk", "tensor_split", "split_with_sizes", "unsafe_split"})
MATMULS = frozenset({"matmul", "__matmul__", "bmm", "mm"})
CONVS = {"conv1d": 1, "conv2d": 2, "conv3d": 3}
SDPA_NAMES = frozenset({"scaled_dot_product_attention"})


# --- steps of a walk --------------------------------------------------------------------------


class Cursor(NamedTuple):
    """Tokens read on `node`: token t sits at the coordinates `digits` give it, plus `offsets`.

    ``seen_at``: the node that reads `node`, when `node` is changed in place: only the writes before it count.
    """

    node: fx.Node
    digits: tuple[Digit, ...]
    offsets: Offsets
    seen_at: fx.Node | None = None
    rank: tuple | None = None
    """Behind an all-to-all (`_all_to_all`): ``(whose, world, me)``, the tokens as rank `whose` holds them (an int,
    or ``"all"``: every rank's, as the outer digit), in a group of `world` where this process is rank `me`."""


class _Follow(NamedTuple):
    """The same tokens, read on another node (with what the op said about the axes, if anything)."""

    cursor: Cursor
    note: str = ""


class _Split(NamedTuple):
    """Consecutive runs of the sequence read on different nodes (a concatenation along the tokens)."""

    parts: tuple[Cursor, ...]


class _Join(NamedTuple):
    """Several operands carry the tokens: their maps must agree."""

    operands: tuple[Cursor, ...]


class _End(NamedTuple):
    stop: Stop
    reason: str = ""


class _Carried(NamedTuple):
    """A graph input whose token map an earlier graph proved (`t4dopt.passes.carried_tokens`)."""

    tokens: TokenMap


def _normalized(digits: Iterable[Digit]) -> tuple[Digit, ...]:
    """Size-1 digits dropped; adjacent digits that are one run of an axis merged (same role)."""
    out: list[Digit] = []
    for digit in digits:
        if digit.size == 1:
            continue
        last = out[-1] if out else None
        if (last is not None and last.axis == digit.axis and last.role == digit.role
                and last.stride == digit.stride * digit.size):
            out[-1] = Digit(digit.axis, last.size * digit.size, digit.stride, digit.role)
        else:
            out.append(digit)
    return tuple(out)


def _offsets(values: dict[int, int]) -> Offsets:
    return tuple(sorted((a, v) for a, v in values.items() if v))


def _cursor(node: fx.Node, digits: Iterable[Digit], offsets: dict[int, int] | Offsets) -> Cursor:
    offsets = dict(offsets) if not isinstance(offsets, dict) else offsets
    return Cursor(node, _normalized(digits), _offsets(offsets))


def _axes(cursor: Cursor) -> set[int]:
    return {d.axis for d in cursor.digits}


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _where(node: fx.Node) -> str:
    return f"{op_name(node) or node.op} at {source_line(node)}"


def _row_strides(shape: tuple[int, ...]) -> list[int]:
    strides = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        strides[i] = strides[i + 1] * shape[i + 1]
    return strides


def _split_linear(mult: int, size: int, shape: tuple[int, ...], strides: list[int]) -> list[tuple[int, int, int]] | None:
    """A digit of `size` values moving a row-major linear index by `mult`, as (axis, size, stride) digits of `shape`."""
    parts = []
    for axis in range(len(shape) - 1, -1, -1):
        if size == 1:
            break
        n, step = shape[axis], strides[axis]
        if n == 1 or mult >= step * n:
            continue
        if mult % step:
            return None
        coordinate = mult // step
        if coordinate * (size - 1) < n:
            parts.append((axis, size, coordinate))
            size = 1
            break
        room = n // coordinate
        if n % coordinate or size % room:
            return None
        parts.append((axis, room, coordinate))
        size //= room
        mult = step * n
    return parts[::-1] if size == 1 else None


def _reshaped(cursor: Cursor, parent: fx.Node) -> _Follow | _End:
    """The tokens of a view/reshape output read on its input: mixed-radix arithmetic on the linear index."""
    out_shape, in_shape = shape_of(cursor.node), shape_of(parent)
    if in_shape is None or math.prod(in_shape) != math.prod(out_shape):
        return _End(Stop.OPAQUE, f"{_where(cursor.node)}: shapes unknown")
    out_strides, in_strides = _row_strides(out_shape), _row_strides(in_shape)
    digits = []
    for digit in cursor.digits:
        parts = _split_linear(digit.stride * out_strides[digit.axis], digit.size, in_shape, in_strides)
        if parts is None:
            return _End(Stop.OPAQUE, f"{_where(cursor.node)} cuts the tokens across axes")
        digits += [Digit(axis, size, stride, digit.role) for axis, size, stride in parts]
    linear = sum(value * out_strides[axis] for axis, value in cursor.offsets)
    offsets = {axis: (linear // in_strides[axis]) % in_shape[axis] for axis in range(len(in_shape))}
    for axis, size in enumerate(in_shape):
        span = offsets[axis] + sum(d.stride * (d.size - 1) for d in digits if d.axis == axis)
        if span >= size:
            return _End(Stop.OPAQUE, f"{_where(cursor.node)} cuts the tokens across axes")
    return _Follow(_cursor(parent, digits, offsets))


def _moved(cursor: Cursor, parent: fx.Node, source_of: list[int]) -> _Follow:
    """Output axis i is input axis ``source_of[i]``."""
    digits = [Digit(source_of[d.axis], d.size, d.stride, d.role) for d in cursor.digits]
    return _Follow(_cursor(parent, digits, {source_of[a]: v for a, v in cursor.offsets}))


def _axis_move(node: fx.Node, cursor: Cursor) -> _Follow | _End:
    name, parent, rank = op_name(node), node.args[0], len(shape_of(node))
    source_of = list(range(rank))
    if name == "permute":
        dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
        source_of = [d % rank for d in dims]
    elif name in ("transpose", "swapaxes", "swapdims"):
        a, b = (d % rank for d in node.args[1:3])
        source_of[a], source_of[b] = b, a
    elif name == "t":
        source_of = source_of[::-1]
    elif name in ("movedim", "moveaxis"):
        src, dst = node.args[1], node.args[2]
        src, dst = ([src], [dst]) if isinstance(src, int) else (list(src), list(dst))
        src, dst = [s % rank for s in src], [d % rank for d in dst]
        rest = iter(a for a in range(rank) if a not in src)
        placed = dict(zip(dst, src))
        source_of = [placed[i] if i in placed else next(rest) for i in range(rank)]
    return _moved(cursor, parent, source_of)


def _getattr(node: fx.Node, cursor: Cursor) -> _Follow | _End:
    parent, attribute = node.args[0], node.args[1]
    rank = len(shape_of(node) or ())
    if attribute in ("mT", "mH"):
        source_of = list(range(rank))
        source_of[-1], source_of[-2] = rank - 2, rank - 1
        return _moved(cursor, parent, source_of)
    if attribute in ("T", "H"):
        return _moved(cursor, parent, list(range(rank))[::-1])
    if attribute in ("real", "imag", "data"):
        return _Follow(cursor._replace(node=parent))
    return _End(Stop.OPAQUE, f"attribute {attribute} at {source_line(node)}")


def _indexed(node: fx.Node, cursor: Cursor) -> _Follow | _End:
    """``x[index]`` with integers, slices, None and Ellipsis."""
    parent, index = node.args
    in_shape = shape_of(parent)
    index = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, (fx.Node, torch.Tensor, list)) for i in index):
        return _End(Stop.REORDER, f"indexed with a tensor ({_where(node)})")
    consumed = sum(1 for i in index if i is not None and i is not Ellipsis)
    expanded: list[Any] = []
    for item in index:
        expanded += [slice(None)] * (len(in_shape) - consumed) if item is Ellipsis else [item]
    expanded += [slice(None)] * (len(in_shape) - sum(1 for i in expanded if i is not None))
    source: dict[int, tuple[int, int, int]] = {}
    fixed: dict[int, int] = {}
    out_axis = in_axis = 0
    for item in expanded:
        if item is None:
            out_axis += 1
        elif isinstance(item, int):
            fixed[in_axis] = item % in_shape[in_axis]
            in_axis += 1
        elif isinstance(item, slice) and all(isinstance(x, (int, type(None))) for x in (item.start, item.stop, item.step)):
            start, _, step = item.indices(in_shape[in_axis])
            source[out_axis] = (in_axis, start, step)
            out_axis += 1
            in_axis += 1
        else:
            return _End(Stop.OPAQUE, f"index {item!r} at {source_line(node)}")
    digits = []
    for d in cursor.digits:
        axis, _, step = source[d.axis]
        digits.append(Digit(axis, d.size, d.stride * step, d.role))
    offsets = dict(fixed)
    given = dict(cursor.offsets)
    for out, (axis, start, step) in source.items():
        offsets[axis] = start + step * given.get(out, 0)
    return _Follow(_cursor(parent, digits, offsets))


def _narrowed(node: fx.Node, cursor: Cursor) -> _Follow:
    parent, rank = node.args[0], len(shape_of(node.args[0]))
    dim = _arg(node, 1, "dim") % rank
    start = _arg(node, 2, "start" if op_name(node) == "narrow" else "index")
    start %= shape_of(parent)[dim]
    if op_name(node) == "select":
        source_of = [a if a < dim else a + 1 for a in range(rank - 1)]
        moved = _moved(cursor, parent, source_of).cursor
        return _Follow(_cursor(parent, moved.digits, {**dict(moved.offsets), dim: start}))
    offsets = dict(cursor.offsets)
    offsets[dim] = offsets.get(dim, 0) + start
    return _Follow(_cursor(parent, cursor.digits, offsets))


def _piece(node: fx.Node, cursor: Cursor) -> _Follow | _End:
    """``pieces[i]`` of a split / chunk / unbind along some axis."""
    pieces, i = node.args
    name = op_name(pieces)
    source = pieces.args[0] if pieces.args and isinstance(pieces.args[0], fx.Node) else None
    values = example_value(pieces)
    if source is None or shape_of(source) is None or not isinstance(values, (tuple, list)):
        return _End(Stop.OPAQUE, f"{_where(pieces)}")
    rank = len(shape_of(source))
    if name == "unbind":
        dim = _arg(pieces, 1, "dim", 0) % rank
        source_of = [a if a < dim else a + 1 for a in range(rank - 1)]
        moved = _moved(cursor, source, source_of).cursor
        return _Follow(_cursor(source, moved.digits, {**dict(moved.offsets), dim: i}))
    if name in SPLITS:
        dim = _arg(pieces, 2, "dim", 0) % rank
        start = sum(int(v.shape[dim]) for v in values[:i])
        offsets = dict(cursor.offsets)
        offsets[dim] = offsets.get(dim, 0) + start
        found = _cursor(source, cursor.digits, offsets)
        if cursor.rank is not None:
            sizes = {int(v.shape[dim]) for v in values}
            if len(sizes) != 1:
                return _End(Stop.OPAQUE, f"tokens of other ranks reach an unequal split ({_where(pieces)})")
            found = _resolve_rank(found._replace(rank=cursor.rank), dim, i, len(values), sizes.pop())
            return found if isinstance(found, _End) else _Follow(found)
        return _Follow(found)
    return _End(Stop.OPAQUE, f"{_where(pieces)}")


def _all_to_all(node: fx.Node, cursor: Cursor) -> _Follow | _End:
    """``all_to_all_single(x, out_splits, in_splits, group)`` (Ulysses context parallelism), split along axis 0.

    Chunk w of the output on rank e is chunk e of rank w's input. So the tokens a cursor reads on the output
    are, on the input, chunk e (e: the rank whose output this is, this process unless an earlier all-to-all
    said otherwise), as rank w holds them: w the chunk the cursor reads (a digit over every chunk: every
    rank's, the sequence gathered from its shards). A chunk the cursor does not pin is read as chunk 0 (the
    heads of the other ranks, on the way back: no token moves with it).
    """
    from t4dopt.compat import process_group_rank

    source, outs, ins, group = (list(node.args) + [None] * 4)[:4]
    found = process_group_rank(group) if isinstance(group, str) else None
    shape = shape_of(source)
    if found is None or shape is None or not shape:
        return _End(Stop.OPAQUE, f"{_where(node)}: its process group is not known here")
    me, world = found
    if shape[0] % world or any(s is not None and (not isinstance(s, list) or len(set(s)) > 1) for s in (outs, ins)):
        return _End(Stop.OPAQUE, f"{_where(node)} with unequal splits")
    chunk = shape[0] // world
    digits = list(cursor.digits)
    first = digits[0] if digits else None
    if (first is not None and first.axis == 0 and first.stride * (first.size - 1) >= chunk and first.stride < chunk
            and chunk % first.stride == 0 and first.size * first.stride == world * chunk):
        # one digit over every chunk (the merge of the ranks' shards): the rank, then the tokens inside a chunk
        digits[:1] = [Digit(0, world, chunk, first.role), Digit(0, chunk // first.stride, first.stride, first.role)]
    cursor = cursor._replace(digits=tuple(digits))
    outer = [d for d in cursor.digits if d.axis == 0 and d.stride * (d.size - 1) >= chunk]
    offsets = dict(cursor.offsets)
    start = offsets.get(0, 0)
    inner = [d for d in cursor.digits if not any(d is o for o in outer)]
    if outer and (outer != [cursor.digits[0]] or outer[0].stride != chunk or outer[0].size != world or start >= chunk):
        return _End(Stop.OPAQUE, f"tokens cut across the ranks' chunks by {_where(node)}")
    if any(d.axis == 0 and (start % chunk) + d.stride * (d.size - 1) >= chunk for d in inner):
        return _End(Stop.OPAQUE, f"tokens cut across the ranks' chunks by {_where(node)}")
    whose = "all" if outer else start // chunk
    reader = cursor.rank[0] if cursor.rank is not None else me
    if reader == "all":
        inner = [Digit(0, world, chunk, outer[0].role if outer else None)] + inner
        reader = 0
    offsets[0] = reader * chunk + start % chunk
    rank = None if whose == me else (whose, world, me)
    return _Follow(Cursor(source, _normalized(inner), _offsets(offsets), None, rank))


def _resolve_rank(cursor: Cursor, dim: int, piece: int, pieces: int, length: int) -> Cursor | _End:
    """A split of `pieces` equal pieces along `dim`, piece `piece` taken: where the ranks' shards came from."""
    whose, world, me = cursor.rank
    if pieces != world or piece != me:
        return _End(Stop.OPAQUE, f"tokens of other ranks reach a split into {pieces} pieces whose piece {piece} "
                                 f"is not this rank's ({me} of {world})")
    offsets = dict(cursor.offsets)
    if whose == "all":
        offsets[dim] = offsets.get(dim, 0) - piece * length
        return _cursor(cursor.node, (Digit(dim, world, length),) + cursor.digits, offsets)
    offsets[dim] = offsets.get(dim, 0) + (whose - piece) * length
    return _cursor(cursor.node, cursor.digits, offsets)


def _concatenated(node: fx.Node, cursor: Cursor) -> _Follow | _Split | _Join | _End:
    rank = len(shape_of(node))
    piece_rank = rank - 1 if op_name(node) == "stack" else rank
    pieces = [p for p in _arg(node, 0, "tensors") if isinstance(p, fx.Node) and len(shape_of(p) or ()) == piece_rank]
    dim = _arg(node, 1, "dim", 0) % rank
    if op_name(node) == "stack":
        source_of = [a if a < dim else a - 1 for a in range(rank)]
        if dim in _axes(cursor):
            return _End(Stop.OPAQUE, f"tokens stacked from several tensors ({_where(node)})")
        given = dict(cursor.offsets)
        chosen = [pieces[given.pop(dim)]] if dim in given else pieces
        moved = [_cursor(p, [Digit(source_of[d.axis], d.size, d.stride, d.role) for d in cursor.digits],
                         {source_of[a]: v for a, v in given.items()}) for p in chosen]
        return _Follow(moved[0]) if len(moved) == 1 else _Join(tuple(moved))
    bounds = [0]
    for piece in pieces:
        bounds.append(bounds[-1] + shape_of(piece)[dim])
    on_dim = [d for d in cursor.digits if d.axis == dim]
    offsets = dict(cursor.offsets)
    low = offsets.get(dim, 0)
    high = low + sum(d.stride * (d.size - 1) for d in on_dim) + 1
    if not on_dim and dim not in offsets:
        return _Join(tuple(_cursor(p, cursor.digits, offsets) for p in pieces))
    inside = [j for j in range(len(pieces)) if bounds[j] <= low and high <= bounds[j + 1]]
    if inside:
        j = inside[0]
        return _Follow(_cursor(pieces[j], cursor.digits, {**offsets, dim: low - bounds[j]}))
    outer = cursor.digits[0]
    if on_dim != [outer] or outer.stride != 1:
        return _End(Stop.OPAQUE, f"a concatenation cuts the tokens inside the sequence ({_where(node)})")
    parts = []
    for j, piece in enumerate(pieces):
        start, stop = max(low, bounds[j]), min(high, bounds[j + 1])
        if start < stop:
            digit = Digit(dim, stop - start, 1, outer.role)
            parts.append(_cursor(piece, (digit,) + cursor.digits[1:], {**offsets, dim: start - bounds[j]}))
    return _Split(tuple(parts))


def _broadcast_cursor(operand: fx.Node, cursor: Cursor, rank: int) -> tuple[Cursor | None, bool]:
    """The cursor on a broadcast operand (right-aligned), and whether it carries every token axis."""
    shape = shape_of(operand)
    if shape is None:
        return None, False
    shift = rank - len(shape)
    digits = []
    for d in cursor.digits:
        axis = d.axis - shift
        if axis < 0 or shape[axis] == 1:
            return None, False
        digits.append(Digit(axis, d.size, d.stride, d.role))
    offsets = {a - shift: v for a, v in cursor.offsets if a - shift >= 0 and shape[a - shift] != 1}
    return _cursor(operand, digits, offsets), True


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    values = list(node.args) + list(node.kwargs.values())
    return [v for v in values if isinstance(v, fx.Node) and shape_of(v) is not None]


def _elementwise(node: fx.Node, cursor: Cursor, mixed_axes: Iterable[int] = (),
                 operands: list[fx.Node] | None = None) -> _Follow | _Join | _End:
    """A position-wise op: every operand (all tensor arguments unless given) carrying all the token axes carries
    the tokens; a fixed coordinate on `mixed_axes` (normalised over) no longer picks one input and is dropped."""
    rank = len(shape_of(node))
    mixed = set(mixed_axes) - _axes(cursor)
    cursor = cursor._replace(offsets=tuple((a, v) for a, v in cursor.offsets if a not in mixed))
    carriers = []
    for operand in _tensor_args(node) if operands is None else operands:
        moved, full = _broadcast_cursor(operand, cursor, rank)
        if full:
            carriers.append(moved)
    if not carriers:
        return _End(Stop.OPAQUE, f"tokens built by broadcasting ({_where(node)})")
    return _Follow(carriers[0]) if len(carriers) == 1 else _Join(tuple(carriers))


def _mixed_axes(node: fx.Node) -> list[int]:
    rank, how = len(shape_of(node)), NORMS[op_name(node)]
    if how == "last":
        shape = _arg(node, 1, "normalized_shape", ())
        return list(range(rank - (len(shape) if isinstance(shape, (list, tuple)) else 1), rank))
    if how == "dim":
        return [_arg(node, 1, "dim", 1 if op_name(node) == "normalize" else -1) % rank]
    return [how]


def _reduced(node: fx.Node, cursor: Cursor) -> _Follow | _End:
    parent = node.args[0]
    rank = len(shape_of(parent))
    dims = _arg(node, 1, "dim", None)
    if dims is None or not isinstance(dims, (int, list, tuple)):
        return _End(Stop.OPAQUE, f"{_where(node)}")
    dims = {d % rank for d in ([dims] if isinstance(dims, int) else dims)}
    if _arg(node, 2, "keepdim", False):
        return _Follow(_cursor(parent, cursor.digits, {a: v for a, v in cursor.offsets if a not in dims}))
    return _moved(cursor, parent, [a for a in range(rank) if a not in dims])


def _dims_of(node: fx.Node) -> set[int] | None:
    """The axes a reordering op works on (None: all, or not known)."""
    name, rank = op_name(node), len(shape_of(node.args[0]) or ())
    if name in ("flip",):
        dims = _arg(node, 1, "dims")
    elif name == "roll":
        dims = _arg(node, 2, "dims")
    elif name in ("sort", "argsort", "topk", "kthvalue", "msort", "gather", "index_select", "repeat_interleave",
                  "cumsum", "take_along_dim"):
        dims = _arg(node, {"topk": 2, "kthvalue": 2, "repeat_interleave": 2, "gather": 1, "index_select": 1,
                           "take_along_dim": 2}.get(name, 1), "dim", -1 if name in ("sort", "argsort", "topk") else None)
    elif name in ("repeat", "tile", "expand", "broadcast_to"):
        sizes = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
        out_shape = shape_of(node)
        in_shape = shape_of(node.args[0])
        if out_shape is None or in_shape is None:
            return None
        shift = len(out_shape) - len(in_shape)
        changed = {a for a in range(len(out_shape)) if a < shift or out_shape[a] != in_shape[a - shift]}
        return changed
    else:
        return None
    if dims is None or isinstance(dims, fx.Node):
        return None
    dims = [dims] if isinstance(dims, int) else list(dims)
    return {d % rank for d in dims} if rank else None


def _reordering(node: fx.Node, cursor: Cursor) -> _Follow | _End:
    """Followed when the axes the op reorders or repeats miss every token axis; else the walk ends as REORDER."""
    dims = _dims_of(node)
    if dims is not None and not dims & _axes(cursor):
        moved, full = _broadcast_cursor(node.args[0], cursor, len(shape_of(node)))
        if full:
            return _Follow(moved)
    return _End(Stop.REORDER, f"the tokens are reordered or repeated by {_where(node)}")


def _matmul(node: fx.Node, cursor: Cursor, a: Any, b: Any) -> _Follow | _Join | _End:
    """``a @ b``: rows from a, columns from b, batch axes from both (broadcast)."""
    sa, sb, rank = shape_of(a), shape_of(b), len(shape_of(node))
    if sa is None or sb is None or len(sa) < 2 or len(sb) < 2:
        return _End(Stop.OPAQUE, f"{_where(node)}")
    rows = [d for d in cursor.digits if d.axis == rank - 2]
    cols = [d for d in cursor.digits if d.axis == rank - 1]
    if rows and cols:
        return _End(Stop.OPAQUE, f"pairs of tokens ({_where(node)})")
    given = dict(cursor.offsets)

    def on(operand, shape, own):
        shift = rank - len(shape)
        digits, offsets = [], {}
        for d in cursor.digits:
            if d.axis >= rank - 2:
                if d.axis == own:
                    digits.append(Digit(len(shape) - (rank - d.axis), d.size, d.stride, d.role))
                continue
            if d.axis - shift < 0 or shape[d.axis - shift] == 1:
                return None
            digits.append(Digit(d.axis - shift, d.size, d.stride, d.role))
        for axis, value in given.items():
            if axis == own:
                offsets[len(shape) - (rank - axis)] = value
            elif axis < rank - 2 and axis - shift >= 0 and shape[axis - shift] != 1:
                offsets[axis - shift] = value
        return _cursor(operand, digits, offsets)

    if rows:
        found = on(a, sa, rank - 2)
        return _Follow(found) if found is not None else _End(Stop.OPAQUE, f"{_where(node)}")
    if cols:
        found = on(b, sb, rank - 1)
        return _Follow(found) if found is not None else _End(Stop.OPAQUE, f"{_where(node)}")
    operands = [c for c in (on(a, sa, None), on(b, sb, None)) if c is not None]
    if not operands:
        return _End(Stop.OPAQUE, f"{_where(node)}")
    return _Follow(operands[0]) if len(operands) == 1 else _Join(tuple(operands))


def _einsum(node: fx.Node, cursor: Cursor) -> _Follow | _Join | _End:
    equation = node.args[0]
    operands = list(node.args[1]) if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else list(node.args[1:])
    match = re.fullmatch(r"([a-zA-Z,]+)->([a-zA-Z]*)", equation.replace(" ", "")) if isinstance(equation, str) else None
    if match is None or len(operands) != len(match.group(1).split(",")):
        return _End(Stop.OPAQUE, f"{_where(node)}")
    inputs, output = match.group(1).split(","), match.group(2)
    letters = {output[d.axis] for d in cursor.digits}
    holders = [j for j, subscripts in enumerate(inputs) if letters <= set(subscripts)]
    if not holders or any(letters & set(s) and j not in holders for j, s in enumerate(inputs)):
        return _End(Stop.OPAQUE, f"tokens spread over several einsum operands ({_where(node)})")
    found = []
    for j in holders:
        subscripts = inputs[j]
        digits = [Digit(subscripts.index(output[d.axis]), d.size, d.stride, d.role) for d in cursor.digits]
        offsets = {subscripts.index(output[a]): v for a, v in cursor.offsets if output[a] in subscripts}
        found.append(_cursor(operands[j], digits, offsets))
    return _Follow(found[0]) if len(found) == 1 else _Join(tuple(found))


def _linear(node: fx.Node, cursor: Cursor) -> _Follow | _End:
    rank = len(shape_of(node))
    if rank - 1 in _axes(cursor):
        return _End(Stop.OPAQUE, f"tokens along the features of {_where(node)}")
    return _Follow(_cursor(node.args[0], cursor.digits, {a: v for a, v in cursor.offsets if a != rank - 1}))


def _sdpa(node: fx.Node, cursor: Cursor) -> _Follow | _End:
    query = _arg(node, 0, "query")
    rank = len(shape_of(node))
    if rank - 1 in _axes(cursor) or shape_of(query) is None or len(shape_of(query)) != rank:
        return _End(Stop.OPAQUE, f"{_where(node)}")
    return _Follow(_cursor(query, cursor.digits, {a: v for a, v in cursor.offsets if a != rank - 1}))


def _fused_output(node: fx.Node, cursor: Cursor) -> _Follow | _End:
    """Item 0 (the output, [..., Nq, Dv]) or item 1 (the log-sum-exp, [..., Nq] or with trailing 1s) of a fused aten
    attention call (`t4dopt.compat.FUSED_SDPA_OPS`): the query's rows. Any other item (sequence and RNG
    bookkeeping), or a log-sum-exp padded past the queries (the efficient kernel's), is not followed."""
    call, index = node.args
    bound = op_arguments(call.target, call.args, call.kwargs) or {}
    query, shape = bound.get("query"), shape_of(node)
    query_shape = shape_of(query)
    if query_shape is None or shape is None or index not in (0, 1):
        return _End(Stop.OPAQUE, f"{_where(call)}")
    rows = len(query_shape) - 1  # the axes the output shares with the queries: [..., Nq]
    if index == 0:
        matches = len(shape) == len(query_shape) and shape[:rows] == query_shape[:rows]
    else:
        matches = shape[:rows] == query_shape[:rows] and all(size == 1 for size in shape[rows:])
    if not matches or any(axis >= rows for axis in _axes(cursor)):
        return _End(Stop.OPAQUE, f"{_where(call)}")
    return _Follow(_cursor(query, cursor.digits, {a: v for a, v in cursor.offsets if a < rows}))


def _pairs(value: Any, count: int, default: int) -> tuple:
    if value is None:
        return (default,) * count
    return tuple(value) * (count if len(tuple(value)) == 1 else 1) if isinstance(value, (list, tuple)) else (value,) * count


def _conv(node: fx.Node, cursor: Cursor) -> _Follow | _End:
    """A convolution: a patch embedding (kernel == stride, no padding) or a position-preserving one (stride 1, 'same')."""
    dims = CONVS[op_name(node)]
    source, weight = node.args[0], _arg(node, 1, "weight")
    kernel = (shape_of(weight) or ())[2:]
    stride = _pairs(_arg(node, 3, "stride", 1), dims, 1)
    padding = _arg(node, 4, "padding", 0)
    dilation = _pairs(_arg(node, 5, "dilation", 1), dims, 1)
    if len(kernel) != dims or len(shape_of(source) or ()) != dims + 2:
        return _End(Stop.OPAQUE, f"{_where(node)}")
    same = padding == "same"
    padding = (0,) * dims if padding in ("valid", "same") else _pairs(padding, dims, 0)
    roles = {2: "space", 3: "space", 4: "space"} if dims > 1 else {}
    if dims == 3:
        roles[2] = "time"
    digits, offsets = [], {}
    for d in cursor.digits:
        if d.axis == 1:
            return _End(Stop.OPAQUE, f"tokens along the channels of {_where(node)}")
        if d.axis == 0:
            digits.append(Digit(0, d.size, d.stride, d.role or ("batched" if dims == 2 else None)))
            continue
        i = d.axis - 2
        k, s, p, dl = kernel[i], stride[i], padding[i], dilation[i]
        if k == s and p == 0 and (dl == 1 or k == 1):
            digits.append(Digit(d.axis, d.size, d.stride * s, d.role or roles.get(d.axis)))
        elif s == 1 and (same or 2 * p == dl * (k - 1)):
            digits.append(Digit(d.axis, d.size, d.stride, d.role or roles.get(d.axis)))
        else:
            return _End(Stop.OPAQUE, f"{_where(node)} (neither patches nor position-preserving)")
    for axis, value in cursor.offsets:
        if axis != 1:
            offsets[axis] = value * (stride[axis - 2] if axis >= 2 and kernel[axis - 2] == stride[axis - 2] else 1)
    kind = {3: "Conv3d", 2: "Conv2d", 1: "Conv1d"}[dims]
    return _Follow(_cursor(source, digits, offsets), f"{kind} patch embedding at {source_line(node)}")


def _unfold(node: fx.Node, cursor: Cursor) -> _Follow | _End:
    """``x.unfold(dim, size, step)`` with size == step (patches along dim), or ``F.unfold`` with kernel == stride."""
    source = node.args[0]
    if node.op == "call_method":
        dim, size, step = (node.args[1:4] + (None,) * 3)[:3]
        rank = len(shape_of(source))
        if not isinstance(dim, int) or size != step or rank in _axes(cursor):
            return _End(Stop.OPAQUE, f"{_where(node)}")
        dim %= rank
        given = dict(cursor.offsets)
        inner = given.pop(rank, 0)
        digits = [Digit(d.axis, d.size, d.stride * step, d.role) if d.axis == dim else d for d in cursor.digits]
        given[dim] = given.get(dim, 0) * step + inner
        return _Follow(_cursor(source, digits, given))
    kernel = _pairs(_arg(node, 1, "kernel_size"), 2, 1)
    dilation = _pairs(_arg(node, 2, "dilation", 1), 2, 1)
    padding = _pairs(_arg(node, 3, "padding", 0), 2, 0)
    stride = _pairs(_arg(node, 4, "stride", 1), 2, 1)
    in_shape = shape_of(source)
    if kernel != stride or padding != (0, 0) or dilation != (1, 1) or len(in_shape or ()) != 4 or 1 in _axes(cursor):
        return _End(Stop.OPAQUE, f"{_where(node)}")
    grid = (in_shape[2] // kernel[0], in_shape[3] // kernel[1])
    digits, offsets = [], {}
    for d in cursor.digits:
        if d.axis == 0:
            digits.append(d)
            continue
        parts = _split_linear(d.stride, d.size, grid, _row_strides(grid))
        if parts is None:
            return _End(Stop.OPAQUE, f"{_where(node)}")
        digits += [Digit(2 + a, s, c * kernel[a], d.role or "space") for a, s, c in parts]
    for axis, value in cursor.offsets:
        if axis == 0:
            offsets[0] = value
        elif axis == 2:
            offsets[2], offsets[3] = (value // grid[1]) * kernel[0], (value % grid[1]) * kernel[1]
    return _Follow(_cursor(source, digits, offsets), f"unfold patch embedding at {source_line(node)}")


def _expanded_index(index: Any, rank: int) -> list[Any] | None:
    """``x[index]``'s index, one entry per axis of x (None when it holds None, tensors or lists)."""
    index = index if isinstance(index, tuple) else (index,)
    if any(i is None or isinstance(i, (fx.Node, torch.Tensor, list)) for i in index):
        return None
    consumed = sum(1 for i in index if i is not Ellipsis)
    expanded: list[Any] = []
    for item in index:
        expanded += [slice(None)] * (rank - consumed) if item is Ellipsis else [item]
    return expanded + [slice(None)] * (rank - len(expanded))


def _written(target: fx.Node, cursor: Cursor, write: fx.Node, fresh: bool) -> _Follow | _Split | _Join | _End:
    """What `cursor` reads on `target` after the last in-place write before it, ``target[index] = value``.

    A write along other axes than the tokens (rotary embeddings filling ``out[..., 0::2]``) leaves every token
    where it was: the value joins what was there (nothing, for a fresh ``torch.empty_like``). A write of a run
    of tokens (``q[:, :, n:] = rope(q[:, :, n:])``) replaces those positions by the value's. `fresh`: `target`
    is a new tensor (``torch.empty_like``...) and this is its first write: there was nothing before it.
    """
    before = cursor._replace(seen_at=write)
    if write.target is not operator.setitem or write.args[0] is not target:
        return _End(Stop.OPAQUE, f"changed in place by {_where(write)}")
    shape = shape_of(target)
    index = _expanded_index(write.args[1], len(shape))
    value = write.args[2]
    if index is None or any(not isinstance(i, (int, slice)) for i in index):
        return _End(Stop.OPAQUE, f"written in place at {source_line(write)}")
    if not isinstance(value, fx.Node):  # a constant along other axes, or over tokens: no token moves
        return _Follow(before) if not any(a in _axes(cursor) for a, i in enumerate(index) if i != slice(None)) else \
            _End(Stop.OPAQUE, f"tokens overwritten by a constant at {source_line(write)}")
    value_shape = shape_of(value)
    kept = [axis for axis, item in enumerate(index) if not isinstance(item, int)]
    region = {axis: j for j, axis in enumerate(kept)}
    shift = len(kept) - len(value_shape or ())
    token_axes = _axes(cursor) | {a for a, _ in cursor.offsets}
    partial = [a for a in token_axes if index[a] != slice(None)]
    others_full = all(index[a] == slice(None) for a in range(len(shape)) if a not in token_axes)

    def on_value(digits, offsets: dict[int, int]) -> Cursor | None:
        moved = []
        for d in digits:
            axis = region[d.axis] - shift if d.axis in region else -1
            if axis < 0 or value_shape[axis] == 1:
                return None
            moved.append(Digit(axis, d.size, d.stride, d.role))
        return _cursor(value, moved, {region[a] - shift: v for a, v in offsets.items()
                                      if a in region and region[a] - shift >= 0 and value_shape[region[a] - shift] != 1})

    if value_shape is None:
        return _End(Stop.OPAQUE, f"written in place at {source_line(write)}")
    if not partial:
        written = on_value(cursor.digits, {a: v for a, v in cursor.offsets if a in token_axes})
        if written is None:
            return _End(Stop.OPAQUE, f"tokens broadcast into place at {source_line(write)}")
        return _Follow(written) if fresh else _Join((written, before))
    if len(partial) != 1 or not others_full or not isinstance(index[partial[0]], slice):
        return _End(Stop.OPAQUE, f"written in place along the tokens at {source_line(write)}")
    axis = partial[0]
    start, stop, step = index[axis].indices(shape[axis])
    on_axis = [d for d in cursor.digits if d.axis == axis]
    offsets = dict(cursor.offsets)
    low = offsets.get(axis, 0)
    high = low + sum(d.stride * (d.size - 1) for d in on_axis) + 1
    if step != 1:
        return _End(Stop.OPAQUE, f"written in place along the tokens at {source_line(write)}")
    if high <= start or low >= stop:
        return _Follow(before)
    if start <= low and high <= stop:
        written = on_value(cursor.digits, {**offsets, axis: low - start})
        return _Follow(written) if written is not None else _End(Stop.OPAQUE, f"written at {source_line(write)}")
    outer = cursor.digits[0] if cursor.digits else None
    if on_axis != [outer] or outer.stride != 1:
        return _End(Stop.OPAQUE, f"written in place inside the sequence at {source_line(write)}")
    parts: list[Cursor] = []
    for lo, hi, inside in ((low, min(high, start), False), (max(low, start), min(high, stop), True),
                           (max(low, stop), high, False)):
        if lo >= hi:
            continue
        digits = (Digit(axis, hi - lo, 1, outer.role),) + cursor.digits[1:]
        if inside:
            written = on_value(digits, {**offsets, axis: lo - start})
            if written is None:
                return _End(Stop.OPAQUE, f"written at {source_line(write)}")
            parts.append(written)
        else:
            parts.append(_cursor(target, digits, {**offsets, axis: lo})._replace(seen_at=write))
    return _Split(tuple(parts))


# --- the walk ---------------------------------------------------------------------------------


TOKENS, SIDE = 2, 1
"""Bits of `_InputKinds`: the node reads a graph input of rank >= 3 / of rank <= 2."""


class _InputKinds:
    """Which kinds of graph input each node reads through its values: sizes read off a tensor, the dtype of
    ``x.type_as(y)`` / ``x.to(y)`` and the shape of ``torch.zeros_like(y)`` do not count."""

    def __init__(self, graph: fx.Graph):
        self.bits: dict[fx.Node, int] = {}
        for node in graph.nodes:
            name = op_name(node)
            if node.op == "placeholder":
                shape = shape_of(node)
                self.bits[node] = 0 if is_parameter_input(node) or shape is None else (TOKENS if len(shape) >= 3 else SIDE)
            elif node.op == "get_attr" or name in FACTORIES:
                self.bits[node] = 0
            else:
                sources = node.args[:1] if name in SAME_AXES and node.args else node.all_input_nodes
                bits = 0
                for source in sources:
                    if isinstance(source, fx.Node) and not is_size(example_value(source)):
                        bits |= self.bits.get(source, 0)
                self.bits[node] = bits
                if _changes_in_place(node) and node.args and isinstance(node.args[0], fx.Node):
                    self._written(node.args[0], bits)

    def _written(self, target: fx.Node, bits: int) -> None:
        """What an in-place write reads flows into the tensor it changes (and what that is a view of)."""
        while isinstance(target, fx.Node):
            self.bits[target] = self.bits.get(target, 0) | bits
            target = target.args[0] if op_name(target) in VIEW_LIKE and target.args else None


VIEW_LIKE = VIEWS | AXIS_MOVES | SPLITS | {"getitem", "narrow", "select", "unbind", "expand", "detach", "contiguous",
                                           "view_as_real", "view_as_complex", "diagonal", "as_strided", "getattr"}


IN_PLACE_OPERATORS = frozenset({operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
                                operator.ifloordiv, operator.ipow, operator.imod, operator.iand, operator.ior})


def _changes_in_place(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in IN_PLACE_OPERATORS:
        return True
    name = op_name(node)
    in_place_name = name.endswith("_") and not name.endswith("__")
    return in_place_name and (node.op == "call_method" or getattr(node.target, "__module__", "") != "_operator")


def _writes(graph: fx.Graph) -> dict[fx.Node, list[fx.Node]]:
    """Nodes changed in place (``x[i] = v``, ``x += y``, ``x.add_(y)``), with the ops that change them."""
    writes: dict[fx.Node, list[fx.Node]] = {}
    for node in graph.nodes:
        if _changes_in_place(node) and node.args and isinstance(node.args[0], fx.Node):
            writes.setdefault(node.args[0], []).append(node)
    return writes


def _ranked(step, cursor: Cursor):
    """A step taken behind an all-to-all: the cursors it yields read the same rank's tokens (ops that move
    tokens between ranks, or resolve whose they are, say so themselves); an input reached there is not split."""
    if isinstance(step, _End):
        if step.stop is Stop.INPUT:
            return _End(Stop.OPAQUE, f"tokens of another rank (behind an all-to-all) reach {cursor.node.name}, "
                                     "which the graph does not split")
        return step
    node = cursor.node
    if op_name(node) == "all_to_all_single" or (op_name(node) == "getitem" and isinstance(node.args[0], fx.Node)
                                                and op_name(node.args[0]) in SPLITS):
        return step
    keep = lambda c: c._replace(rank=cursor.rank) if c.rank is None else c  # noqa: E731
    if isinstance(step, _Follow):
        return step._replace(cursor=keep(step.cursor))
    if isinstance(step, _Split):
        return _Split(tuple(keep(c) for c in step.parts))
    return _Join(tuple(keep(c) for c in step.operands))


def _aligned(a: TokenMap, b: TokenMap) -> bool:
    """Whether two maps read the same positions of two inputs laid out alike (a control video added to the
    latent video: the same patches of tensors of one shape along the token axes)."""
    if len(a.segments) != len(b.segments):
        return False
    for x, y in zip(a.segments, b.segments):
        if (x.stop is not Stop.INPUT or y.stop is not Stop.INPUT or x.root.op != "placeholder"
                or y.root.op != "placeholder" or (x.length, x.digits, x.offsets) != (y.length, y.digits, y.offsets)):
            return False
        sx, sy = shape_of(x.root), shape_of(y.root)
        if sx is None or sy is None or len(sx) != len(sy) or any(sx[d.axis] != sy[d.axis] for d in x.digits):
            return False
    return True


class TokenWalk:
    """Token maps of the nodes of one graph, memoised."""

    def __init__(self, graph: fx.Graph, carried: dict[str, Any] | None = None):
        self._memo: dict[Cursor, TokenMap] = {}
        self._carried = carried or {}
        self.carried_used: set[str] = set()
        """The inputs whose carried token maps a walk went through (by placeholder name)."""
        self._kinds = _InputKinds(graph)
        self._writes = _writes(graph)
        self._aliased: dict[fx.Node, list[fx.Node]] = {}
        self._order = {node: i for i, node in enumerate(graph.nodes)}
        self._steps = 0

    def sequence(self, node: fx.Node, axis: int) -> TokenMap:
        """The token map of axis `axis` of `node`."""
        shape = shape_of(node)
        axis %= len(shape)
        return self._trace(_cursor(node, [Digit(axis, shape[axis])], {}))

    def _writes_to(self, node: fx.Node) -> list[fx.Node]:
        """The ops that change `node` in place, directly or through a view of it."""
        found = self._aliased.get(node)
        if found is None:
            found = list(self._writes.get(node, []))
            for user in node.users:
                if op_name(user) in VIEW_LIKE and user.args and user.args[0] is node:
                    found += self._writes_to(user)
            self._aliased[node] = found
        return found

    def _trace(self, cursor: Cursor) -> TokenMap:
        visited: list[tuple[Cursor, int]] = []
        notes: list[str] = []
        while True:
            if cursor in self._memo:
                result = self._memo[cursor]
                break
            visited.append((cursor, len(notes)))
            self._steps += 1
            step = self._step(cursor) if self._steps < MAX_STEPS else _End(Stop.OPAQUE, "the walk took too long")
            if cursor.rank is not None:
                step = _ranked(step, cursor)
            if isinstance(step, _Follow):
                if step.note:
                    notes.append(step.note)
                cursor = self._read_by(step.cursor, cursor.node)
                continue
            if isinstance(step, _Split):
                parts = [self._read_by(part, cursor.node) for part in step.parts]
                result = TokenMap(tuple(s for part in parts for s in self._trace(part).segments))
            elif isinstance(step, _Carried):
                result = step.tokens
            elif isinstance(step, _Join) and not step.operands:
                length = math.prod(d.size for d in cursor.digits)
                result = TokenMap((Segment(length, cursor.node, cursor.digits, cursor.offsets, Stop.OPAQUE,
                                           f"{_where(cursor.node)}"),))
            elif isinstance(step, _Join) and len(step.operands) == 1:
                cursor = self._read_by(step.operands[0], cursor.node)
                continue
            elif isinstance(step, _Join):
                result = self._join(cursor, step._replace(operands=tuple(self._read_by(c, cursor.node)
                                                                         for c in step.operands)))
            else:
                length = math.prod(d.size for d in cursor.digits)
                result = TokenMap((Segment(length, cursor.node, cursor.digits, cursor.offsets, step.stop, step.reason),))
            break
        for seen, count in reversed(visited):
            added = tuple(notes[count:])
            self._memo[seen] = result if not added else TokenMap(tuple(
                dataclasses.replace(s, notes=added + s.notes) for s in result.segments))
        return self._memo[visited[0][0]] if visited else result

    def _read_by(self, cursor: Cursor, reader: fx.Node) -> Cursor:
        """`cursor` as `reader` reads it: later in-place writes to its node do not count (earlier ones do)."""
        if cursor.seen_at is None and cursor.node is not reader and self._writes_to(cursor.node):
            return cursor._replace(seen_at=reader)
        return cursor

    def _with_grids(self, tokens: TokenMap, positional: list[Cursor]) -> TokenMap:
        """`tokens`, with the token grids of the positional tables joined to them (rotary embeddings)."""
        if len(tokens.segments) != 1:
            return tokens
        grids = []
        for table in positional:
            found = self._trace(table).segments
            if len(found) == 1 and found[0].length == tokens.length:
                grids += ([found[0].sizes] if len(found[0].digits) >= 2 else []) + list(found[0].grids)
        segment = tokens.segments[0]
        new = tuple(g for g in grids if g not in segment.grids)
        return TokenMap((dataclasses.replace(segment, grids=segment.grids + new),)) if new else tokens

    def _join(self, cursor: Cursor, step: _Join) -> TokenMap:
        """Operands reading token inputs must agree (else those reading per-token scalars must); positional ones ride along."""
        bits = [self._kinds.bits.get(c.node, 0) for c in step.operands]
        for wanted in (TOKENS, SIDE):
            chosen = [c for c, b in zip(step.operands, bits) if b & wanted]
            if chosen:
                break
        else:  # positional tables only: the first, with the grids of all
            chosen = list(step.operands[:1])
            return self._with_grids(self._trace(chosen[0]), list(step.operands[1:]))
        maps = [self._trace(c) for c in chosen]
        if all(m.same_tokens(maps[0]) or _aligned(m, maps[0]) for m in maps[1:]):
            return self._with_grids(maps[0], [c for c, b in zip(step.operands, bits) if not b])
        roots = ", ".join(sorted({f"{s.root.name}" for m in maps for s in m.segments}))
        length = math.prod(d.size for d in cursor.digits)
        return TokenMap((Segment(length, cursor.node, cursor.digits, cursor.offsets, Stop.REORDER,
                                 f"tokens in different orders meet at {_where(cursor.node)} (from {roots})"),))

    def _carried_map(self, cursor: Cursor) -> _Carried | _End:
        """The token map an earlier graph proved for this input, when the cursor reads one whole axis of it."""
        carried, shape = self._carried[cursor.node.name], shape_of(cursor.node)
        digit = cursor.digits[0] if len(cursor.digits) == 1 else None
        tokens = carried.maps.get(digit.axis) if digit is not None else None
        if (tokens is None or digit.stride != 1 or digit.size != shape[digit.axis] or cursor.rank is not None
                or any(axis == digit.axis and start for axis, start in cursor.offsets)):
            return _End(Stop.INPUT)
        self.carried_used.add(cursor.node.name)
        note = f"carried across a graph break from {carried.producer}"
        return _Carried(TokenMap(tuple(dataclasses.replace(s, notes=s.notes + (note,)) for s in tokens.segments)))

    def _step(self, cursor: Cursor) -> _Follow | _Split | _Join | _End | _Carried:
        node = cursor.node
        if node.op == "placeholder" and node.name in self._carried:
            return self._carried_map(cursor)
        if node.op in ("placeholder", "get_attr"):
            return _End(Stop.INPUT)
        if node.op not in ("call_function", "call_method"):
            return _End(Stop.OPAQUE, f"{node.op} {node.target} at {source_line(node)}")
        name = op_name(node)
        if shape_of(node) is None:
            return _End(Stop.OPAQUE, f"{_where(node)}: shape not static")
        writes = [w for w in self._writes_to(node) if cursor.seen_at is None or self._order[w] < self._order[cursor.seen_at]]
        if writes:
            return _written(node, cursor, writes[-1], fresh=name in FACTORIES and len(writes) == 1)
        if name in FACTORIES:
            return _End(Stop.INPUT, f"constant ({_where(node)})")
        parent = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        if name == "getitem":
            if parent is not None and parent.op == "call_function" and parent.target in fused_sdpa_functions():
                return _fused_output(node, cursor)
            if isinstance(example_value(parent), (tuple, list)):
                return _piece(node, cursor)
            return _indexed(node, cursor)
        if name == "getattr":
            return _getattr(node, cursor)
        if name in SDPA_NAMES:
            return _sdpa(node, cursor)
        if name == "all_to_all_single":
            return _all_to_all(node, cursor)
        if parent is None and name not in ("cat", "concat", "concatenate", "stack", "einsum"):
            return _End(Stop.OPAQUE, f"{_where(node)}")
        if name in VIEWS:
            return _reshaped(cursor, parent)
        if name in AXIS_MOVES:
            return _axis_move(node, cursor)
        if name in ("narrow", "select"):
            return _narrowed(node, cursor)
        if name in ("cat", "concat", "concatenate", "stack"):
            return _concatenated(node, cursor)
        if name in ("view_as_complex", "view_as_real"):
            rank = len(shape_of(node))
            if name == "view_as_real" and rank - 1 in _axes(cursor):
                return _End(Stop.OPAQUE, f"{_where(node)}")
            offsets = tuple((a, v) for a, v in cursor.offsets if a < rank - (name == "view_as_real"))
            return _Follow(_cursor(parent, cursor.digits, offsets))
        if name in NORMS:
            return _elementwise(node, cursor, _mixed_axes(node), [parent])
        if name in SAME_AXES:  # casts, activations: other arguments are dtypes or settings
            return _elementwise(node, cursor, (), [parent])
        if name in ELEMENTWISE or (name.endswith("_") and not name.endswith("__")):
            return _elementwise(node, cursor)
        if name in REDUCTIONS:
            return _reduced(node, cursor)
        if name in REORDERING:
            return _reordering(node, cursor)
        if name == "linear":
            return _linear(node, cursor)
        if name in MATMULS:
            return _matmul(node, cursor, node.args[0], _arg(node, 1, "other"))
        if name in ("baddbmm", "addmm"):  # the bias only adds to each product
            return _matmul(node, cursor, _arg(node, 1, "batch1" if name == "baddbmm" else "mat1"),
                           _arg(node, 2, "batch2" if name == "baddbmm" else "mat2"))
        if name == "einsum":
            return _einsum(node, cursor)
        if name in CONVS:
            return _conv(node, cursor)
        if name == "unfold":
            return _unfold(node, cursor)
        return _End(Stop.OPAQUE, f"not followed through {_where(node)}")


def site_tokens(walk: TokenWalk, site) -> SiteTokens:
    """The token maps of a site's queries, keys (k^T: its last axis) and values."""
    return SiteTokens(walk.sequence(site.query, -2),
                      walk.sequence(site.key, -1 if site.key_transposed else -2),
                      walk.sequence(site.value, -2))


def _unknown(site, error: Exception) -> SiteTokens:
    """Token maps saying the walk failed (the site stays dense, with the error as the reason)."""
    def unknown(node, axis):
        shape = shape_of(node)
        return TokenMap((Segment(shape[axis], node, (Digit(axis % len(shape), shape[axis]),), (), Stop.OPAQUE,
                                 f"the walk up from {node.name} failed: {error!r}"),))
    return SiteTokens(unknown(site.query, -2), unknown(site.key, -1 if site.key_transposed else -2),
                      unknown(site.value, -2))


def trace_sequences(state: PassState) -> None:
    """Trace where each token of every site's queries, keys and values comes from (token maps)."""
    walk = state.walk = TokenWalk(state.gm.graph, state.carried)
    state.tokens = []
    for site in state.sites:
        try:
            state.tokens.append(site_tokens(walk, site))
        except Exception as error:  # a graph the walk cannot read must leave the site dense, not fail the compile
            state.tokens.append(_unknown(site, error))
