"""The spellings of attention the detect pass recognises: one table entry per spelling.

After Inductor's ``fuse_attention`` (each ``_sfdp_pattern_N`` beside its replacement), but on
the torch-level graph dynamo hands a backend, where one piece of attention is written many ways.
An entry names one spelling, the calls it accepts (functions and method names) and what it reads
off a matching node; it answers None when the node is spelled that way but means something else
(a softmax over another dim, a scale by a tensor). A new spelling is one entry here and one row
in ``tests/test_spellings.py``. The tables, by role, in the order attention is computed:

- `SDPA`: ``F.scaled_dot_product_attention``, the whole attention in one call;
- `FUSED_SDPA`: a direct call of one of aten's fused attention kernels (``torch.ops.aten.
  _scaled_dot_product_flash_attention`` and its kin, `t4dopt.compat.FUSED_SDPA_OPS`), which returns
  (output, logsumexp, ...): found so that it is reported, never rewritten (`t4dopt.passes.fused_attention`);
- `KEY_TRANSPOSES`: ``k^T`` over the last two dims;
- `SCORES`: the product ``q @ k^T`` (matmul, ``@``, bmm, einsum, baddbmm);
- `SCALES`: a factor on the scores (multiply or divide by a number);
- `MASKS`: an additive mask on the scores;
- `CASTS`: a dtype cast (the upcast around a float32 softmax and the cast back);
- `SOFTMAXES`: softmax over the key axis;
- `WEIGHTED_SUMS`: the product ``probabilities @ v``.

How the pieces must chain (which order, single users) is the detect pass's business, not the table's.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, NamedTuple, TypeVar

import torch
import torch.fx as fx
import torch.nn.functional as F

from t4dopt.compat import fused_sdpa_functions, op_arguments, sdpa_functions
from t4dopt.fx_utils import shape_of

T = TypeVar("T")


@dataclass(frozen=True)
class Spelling(Generic[T]):
    """One way a piece of attention is written: the calls that spell it and what to read off them."""

    name: str
    read: Callable[[fx.Node], T | None]
    functions: frozenset = frozenset()
    methods: frozenset[str] = frozenset()

    def match(self, node: Any) -> T | None:
        if not isinstance(node, fx.Node):
            return None
        if (node.op == "call_function" and node.target in self.functions
                or node.op == "call_method" and node.target in self.methods):
            return self.read(node)
        return None


def first_match(table: tuple[Spelling[T], ...], node: Any) -> T | None:
    """What the first entry of `table` that recognises `node` reads off it, else None."""
    for spelling in table:
        found = spelling.match(node)
        if found is not None:
            return found
    return None


class SdpaCall(NamedTuple):
    """The arguments of an SDPA call, by name (None where not given)."""

    query: Any
    key: Any
    value: Any
    attn_mask: Any
    dropout_p: Any
    is_causal: Any
    scale: Any
    enable_gqa: Any


class FusedSdpaCall(NamedTuple):
    """A fused aten attention call: the op (``aten._scaled_dot_product_flash_attention``) and its arguments read as
    SDPA's (``attn_bias`` as the mask; no grouped heads)."""

    op: str
    call: SdpaCall


class Scores(NamedTuple):
    """``alpha * (query @ key^T) + bias``; ``key_transposed``: the graph holds k^T, not k."""

    query: Any
    key: Any
    key_transposed: bool
    bias: fx.Node | None = None
    alpha: float = 1.0


class Scaled(NamedTuple):
    factor: float
    input: fx.Node


class WeightedSum(NamedTuple):
    probabilities: Any
    value: Any


def _arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _rank(node: fx.Node) -> int:
    return len(shape_of(node) or ())


# SDPA ---------------------------------------------------------------------------------------

def _sdpa(node: fx.Node) -> SdpaCall | None:
    """Every argument, positional or keyword; None unless q, k and v have known shapes of rank >= 2."""
    call = SdpaCall(*(_arg(node, i, name) for i, name in enumerate(SdpaCall._fields)))
    if any(shape_of(x) is None or len(shape_of(x)) < 2 for x in (call.query, call.key, call.value)):
        return None
    return call


SDPA: tuple[Spelling[SdpaCall], ...] = (
    Spelling("F.scaled_dot_product_attention", _sdpa, functions=sdpa_functions()),
)


def _fused_sdpa(node: fx.Node) -> FusedSdpaCall | None:
    """Arguments by the op's schema (positional or keyword); None unless q, k and v have known shapes of rank >= 2."""
    bound = op_arguments(node.target, node.args, node.kwargs)
    if bound is None:
        return None
    mask = bound.get("attn_mask", bound.get("attn_bias"))
    call = SdpaCall(bound.get("query"), bound.get("key"), bound.get("value"), mask, bound.get("dropout_p", 0.0),
                    bound.get("is_causal", False), bound.get("scale"), False)
    if any(shape_of(x) is None or len(shape_of(x)) < 2 for x in (call.query, call.key, call.value)):
        return None
    return FusedSdpaCall(fused_sdpa_functions()[node.target], call)


FUSED_SDPA: tuple[Spelling[FusedSdpaCall], ...] = (
    Spelling("torch.ops.aten._scaled_dot_product_*_attention", _fused_sdpa,
             functions=frozenset(fused_sdpa_functions())),
)


# k^T ----------------------------------------------------------------------------------------

def _transposed_last_two(node: fx.Node) -> fx.Node | None:
    rank = _rank(node)
    if rank < 2 or len(node.args) < 3:
        return None
    last = {-1, rank - 1}
    second = {-2, rank - 2}
    a, b = node.args[1:3]
    return node.args[0] if (a in last and b in second) or (a in second and b in last) else None


def _matrix_transpose(node: fx.Node) -> fx.Node | None:
    return node.args[0] if _rank(node) >= 2 and node.args[1] == "mT" else None


def _permuted_last_two(node: fx.Node) -> fx.Node | None:
    rank = _rank(node)
    if rank < 2:
        return None
    dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
    dims = [d % rank for d in dims]
    return node.args[0] if dims == list(range(rank - 2)) + [rank - 1, rank - 2] else None


KEY_TRANSPOSES: tuple[Spelling[fx.Node], ...] = (
    Spelling("k.transpose(-2, -1)", _transposed_last_two,
             functions=frozenset({torch.transpose, torch.swapaxes}), methods=frozenset({"transpose", "swapaxes"})),
    Spelling("k.mT", _matrix_transpose, functions=frozenset({getattr})),
    Spelling("k.permute(..., -1, -2)", _permuted_last_two, methods=frozenset({"permute"})),
)


# q @ k^T ------------------------------------------------------------------------------------

def _product_scores(node: fx.Node) -> Scores | None:
    if len(node.args) < 2:
        return None
    q, kt = node.args[0], node.args[1]
    k = first_match(KEY_TRANSPOSES, kt)
    return Scores(q, k, False) if k is not None else Scores(q, kt, True)


def _einsum_operands(node: fx.Node) -> tuple[str, str, str] | None:
    """The subscripts of a two-operand einsum of equal-rank operands and output, else None."""
    if len(node.args) != 3 or not isinstance(node.args[0], str):
        return None
    match = re.fullmatch(r"(\w+),(\w+)->(\w+)", node.args[0].replace(" ", ""))
    if not match:
        return None
    a, b, out = match.groups()
    return (a, b, out) if len(a) >= 2 and len(b) == len(a) and len(out) == len(a) else None


def _einsum_scores(node: fx.Node) -> Scores | None:
    """q·k over the head dim: ``'...id,...jd->...ij'``, or ``'...id,...dj->...ij'`` with k^T."""
    subscripts = _einsum_operands(node)
    if subscripts is None:
        return None
    a, b, out = subscripts
    batch, i, d = a[:-2], a[-2], a[-1]
    if out != batch + i + b[-2 if b[-1] == d else -1] or b[:-2] != batch:
        return None
    if b[-1] == d and b[-2] != d:
        return Scores(node.args[1], node.args[2], False)
    if b[-2] == d:
        return Scores(node.args[1], node.args[2], True)
    return None


def _baddbmm_scores(node: fx.Node) -> Scores | None:
    """``beta * bias + alpha * (q @ k^T)``, with beta 1 (the bias is an additive mask) or 0 (no bias)."""
    if len(node.args) < 3:
        return None
    bias, q, kt = node.args[0], node.args[1], node.args[2]
    beta = _number(node.kwargs.get("beta", 1.0))
    alpha = _number(node.kwargs.get("alpha", 1.0))
    if beta not in (0.0, 1.0) or alpha is None:
        return None
    k = first_match(KEY_TRANSPOSES, kt)
    bias = bias if beta == 1.0 else None
    return Scores(q, k, False, bias, alpha) if k is not None else Scores(q, kt, True, bias, alpha)


_MATMUL = {"functions": frozenset({torch.matmul, torch.Tensor.matmul}), "methods": frozenset({"matmul"})}
_MATMUL_OPERATOR = {"functions": frozenset({operator.matmul}), "methods": frozenset({"__matmul__"})}
_BMM = {"functions": frozenset({torch.bmm, torch.Tensor.bmm}), "methods": frozenset({"bmm"})}
_EINSUM = {"functions": frozenset({torch.einsum})}

SCORES: tuple[Spelling[Scores], ...] = (
    Spelling("torch.matmul(q, k^T)", _product_scores, **_MATMUL),
    Spelling("q @ k^T", _product_scores, **_MATMUL_OPERATOR),
    Spelling("torch.bmm(q, k^T)", _product_scores, **_BMM),
    Spelling("torch.einsum('...id,...jd->...ij', q, k)", _einsum_scores, **_EINSUM),
    Spelling("torch.baddbmm(mask, q, k^T, alpha=scale)", _baddbmm_scores,
             functions=frozenset({torch.baddbmm}), methods=frozenset({"baddbmm"})),
)


# scale, mask, casts -------------------------------------------------------------------------

def _times_number(node: fx.Node) -> Scaled | None:
    """``x * c`` or ``c * x`` with a nonzero number c."""
    if len(node.args) != 2 or node.kwargs:
        return None
    left, right = node.args
    if isinstance(left, fx.Node) and (c := _number(right)):
        return Scaled(c, left)
    if isinstance(right, fx.Node) and (c := _number(left)):
        return Scaled(c, right)
    return None


def _over_number(node: fx.Node) -> Scaled | None:
    """``x / c`` with a nonzero number c."""
    if len(node.args) != 2 or node.kwargs:
        return None
    left, right = node.args
    if isinstance(left, fx.Node) and (c := _number(right)):
        return Scaled(1.0 / c, left)
    return None


SCALES: tuple[Spelling[Scaled], ...] = (
    Spelling("scores * c", _times_number,
             functions=frozenset({operator.mul, torch.mul}), methods=frozenset({"mul", "__mul__"})),
    Spelling("scores / c", _over_number,
             functions=frozenset({operator.truediv, torch.div}), methods=frozenset({"div", "__truediv__"})),
)


def _two_terms(node: fx.Node) -> tuple[Any, Any] | None:
    """Both terms of a sum; which one is the mask is told by which reaches the scores."""
    return (node.args[0], node.args[1]) if len(node.args) == 2 else None


MASKS: tuple[Spelling[tuple[Any, Any]], ...] = (
    Spelling("scores + mask", _two_terms,
             functions=frozenset({operator.add, torch.add}), methods=frozenset({"add", "__add__"})),
)


def _cast_to_constant(node: fx.Node) -> fx.Node | None:
    """The input, when every other argument is a constant (a dtype), not a tensor to copy the dtype of."""
    return node.args[0] if all(not isinstance(a, fx.Node) for a in node.args[1:]) else None


CASTS: tuple[Spelling[fx.Node], ...] = (
    Spelling("x.float() / x.half() / x.bfloat16()", _cast_to_constant,
             methods=frozenset({"float", "half", "bfloat16"})),
    Spelling("x.to(dtype) / x.type(dtype)", _cast_to_constant, methods=frozenset({"to", "type"})),
    Spelling("x.type_as(y)", lambda node: node.args[0], methods=frozenset({"type_as"})),
)


# softmax, probabilities @ v -----------------------------------------------------------------

def _softmax_over_last_dim(node: fx.Node) -> fx.Node | None:
    """The scores, when the softmax runs over the last dim (the keys); ``dtype=`` (an upcast) is allowed."""
    dim = _arg(node, 1, "dim", None)
    rank = _rank(node)
    if not node.args or dim is None or rank < 2 or dim not in (-1, rank - 1):
        return None
    return node.args[0]


SOFTMAXES: tuple[Spelling[fx.Node], ...] = (
    Spelling("F.softmax(scores, dim=-1)", _softmax_over_last_dim,
             functions=frozenset({torch.softmax, F.softmax, torch.Tensor.softmax})),
    Spelling("scores.softmax(-1)", _softmax_over_last_dim, methods=frozenset({"softmax"})),
)


def _product_weighted_sum(node: fx.Node) -> WeightedSum | None:
    return WeightedSum(node.args[0], node.args[1]) if len(node.args) >= 2 else None


def _einsum_weighted_sum(node: fx.Node) -> WeightedSum | None:
    """``'...ij,...jd->...id'``."""
    subscripts = _einsum_operands(node)
    if subscripts is None:
        return None
    a, b, out = subscripts
    batch, i, j = a[:-2], a[-2], a[-1]
    if b[:-2] == batch and b[-2] == j and out == batch + i + b[-1] and b[-1] not in a:
        return WeightedSum(node.args[1], node.args[2])
    return None


WEIGHTED_SUMS: tuple[Spelling[WeightedSum], ...] = (
    Spelling("torch.matmul(p, v)", _product_weighted_sum, **_MATMUL),
    Spelling("p @ v", _product_weighted_sum, **_MATMUL_OPERATOR),
    Spelling("torch.bmm(p, v)", _product_weighted_sum, **_BMM),
    Spelling("torch.einsum('...ij,...jd->...id', p, v)", _einsum_weighted_sum, **_EINSUM),
)

TABLES: dict[str, tuple[Spelling, ...]] = {
    "sdpa": SDPA, "fused_sdpa": FUSED_SDPA, "key_transposes": KEY_TRANSPOSES, "scores": SCORES, "scales": SCALES,
    "masks": MASKS, "casts": CASTS, "softmaxes": SOFTMAXES, "weighted_sums": WEIGHTED_SUMS,
}
"""Every table by role, for tests and for reading; the detect pass uses the tables directly."""
