"""Find attention in the torch-level FX graph that dynamo hands a backend.

Two forms are recognised:

- ``F.scaled_dot_product_attention`` in any call form (positional or keyword arguments,
  attn_mask, dropout_p, is_causal, scale, enable_gqa);
- hand-written attention: ``scores = q @ k^T`` (matmul, ``@``, bmm, einsum or baddbmm), an
  optional scale (mul or div by a number), an optional additive mask, softmax over the last
  dim (with or without a float upcast and a cast back), then ``scores @ v``.

Nothing is changed here; the result is a list of `AttentionSite`.
"""

from __future__ import annotations

import operator
import re

import torch
import torch.fx as fx
import torch.nn.functional as F

from .state import PassState
from t4dopt.compat import sdpa_functions
from t4dopt.fx_utils import CAST_METHODS, dtype_of, module_path, shape_of
from t4dopt.sites import AttentionSite

SDPA_TARGETS = sdpa_functions()
SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
SOFTMAX_FUNCTIONS = {torch.softmax, F.softmax, torch.Tensor.softmax}
MATMUL_FUNCTIONS = {torch.matmul, operator.matmul, torch.bmm, torch.Tensor.matmul, torch.Tensor.bmm}


def _is_call(node: fx.Node, functions: set, methods: set[str] = frozenset()) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function":
        return node.target in functions
    if node.op == "call_method":
        return node.target in methods
    return False


def _arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _sdpa_site(node: fx.Node) -> AttentionSite | None:
    values = {name: _arg(node, i, name) for i, name in enumerate(SDPA_ARGS)}
    q, k, v = values["query"], values["key"], values["value"]
    shapes = [shape_of(x) for x in (q, k, v)]
    if any(s is None or len(s) < 2 for s in shapes):
        return None
    mask = values["attn_mask"]
    return AttentionSite(
        name=node.name, form="sdpa", query=q, key=k, value=v, output=node, nodes=[node],
        query_shape=shapes[0], key_shape=shapes[1], value_shape=shapes[2],
        dtype=str(dtype_of(q)).replace("torch.", ""),
        scale=values["scale"],
        attn_mask=mask if isinstance(mask, fx.Node) else None,
        is_causal=bool(values["is_causal"]),
        dropout_p=float(values["dropout_p"] or 0.0),
        enable_gqa=bool(values["enable_gqa"]),
        module_path=module_path(node),
    )


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _is_softmax(node: fx.Node) -> bool:
    if not _is_call(node, SOFTMAX_FUNCTIONS, {"softmax"}):
        return False
    dim = _arg(node, 1, "dim", None)
    rank = len(shape_of(node) or ())
    return dim is not None and rank >= 2 and dim in (-1, rank - 1)


def _is_cast(node: fx.Node) -> bool:
    if node.op == "call_method" and node.target in CAST_METHODS:
        return all(not isinstance(a, fx.Node) for a in node.args[1:]) or node.target == "type_as"
    return False


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _scale_factor(node: fx.Node) -> tuple[float, fx.Node] | None:
    """(factor, input) for ``x * c``, ``c * x`` or ``x / c`` with a number c, else None."""
    is_mul = _is_call(node, {operator.mul, torch.mul}, {"mul", "__mul__"})
    is_div = _is_call(node, {operator.truediv, torch.div}, {"div", "__truediv__"})
    if not (is_mul or is_div) or len(node.args) != 2 or node.kwargs:
        return None
    left, right = node.args
    if isinstance(left, fx.Node) and (c := _number(right)) and c != 0.0:
        return (1.0 / c if is_div else c), left
    if is_mul and isinstance(right, fx.Node) and (c := _number(left)) and c != 0.0:
        return c, right
    return None


def _reaches_scores(node: fx.Node) -> bool:
    """Whether casts and scale factors above `node` end in a QK^T product."""
    while isinstance(node, fx.Node):
        if _scores_operands(node) is not None:
            return True
        if _is_cast(node):
            node = node.args[0]
        elif (factor := _scale_factor(node)) is not None:
            node = factor[1]
        else:
            return False
    return False


def _einsum_qk(node: fx.Node) -> tuple[fx.Node, fx.Node, bool] | None:
    """(q, k, key_transposed) when the einsum is q·k over the head dim: '...id,...jd->...ij'."""
    if len(node.args) != 3 or not isinstance(node.args[0], str):
        return None
    equation = node.args[0].replace(" ", "")
    match = re.fullmatch(r"(\w+),(\w+)->(\w+)", equation)
    if not match:
        return None
    a, b, out = match.groups()
    if len(a) < 2 or len(a) != len(b) or len(out) != len(a):
        return None
    batch, i, d = a[:-2], a[-2], a[-1]
    if out != batch + i + b[-2 if b[-1] == d else -1] or b[:-2] != batch:
        return None
    if b[-1] == d and b[-2] != d:
        return node.args[1], node.args[2], False
    if b[-2] == d:
        return node.args[1], node.args[2], True
    return None


def _einsum_pv(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(probabilities, v) when the einsum is '...ij,...jd->...id'."""
    if len(node.args) != 3 or not isinstance(node.args[0], str):
        return None
    match = re.fullmatch(r"(\w+),(\w+)->(\w+)", node.args[0].replace(" ", ""))
    if not match:
        return None
    a, b, out = match.groups()
    if len(a) < 2 or len(b) != len(a) or len(out) != len(a):
        return None
    batch, i, j = a[:-2], a[-2], a[-1]
    if b[:-2] == batch and b[-2] == j and out == batch + i + b[-1] and b[-1] not in a:
        return node.args[1], node.args[2]
    return None


def _is_last_two_transpose(node: fx.Node) -> fx.Node | None:
    """The input of ``x.transpose(-2, -1)`` (any spelling), else None."""
    rank = len(shape_of(node) or ())
    if rank < 2:
        return None
    last_two = {(-2, -1), (-1, -2), (rank - 2, rank - 1), (rank - 1, rank - 2),
                (-2, rank - 1), (rank - 2, -1), (-1, rank - 2), (rank - 1, -2)}
    if node.op == "call_method" and node.target in ("transpose", "swapaxes") and tuple(node.args[1:3]) in last_two:
        return node.args[0]
    if node.op == "call_function" and node.target in (torch.transpose, torch.swapaxes) and tuple(node.args[1:3]) in last_two:
        return node.args[0]
    if node.op == "call_function" and node.target is getattr and node.args[1] == "mT":
        return node.args[0]
    if node.op == "call_method" and node.target == "permute":
        dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
        dims = [d % rank for d in dims]
        if dims == list(range(rank - 2)) + [rank - 1, rank - 2]:
            return node.args[0]
    return None


def _scores_operands(node: fx.Node):
    """(q, k_or_kT, key_transposed, bias, scale) for a QK^T product node, else None."""
    if _is_call(node, MATMUL_FUNCTIONS, {"matmul", "bmm", "__matmul__"}):
        q, kt = node.args[0], node.args[1]
        k = _is_last_two_transpose(kt)
        return (q, k, False, None, 1.0) if k is not None else (q, kt, True, None, 1.0)
    if _is_call(node, {torch.einsum}):
        parsed = _einsum_qk(node)
        if parsed is None:
            return None
        q, k, transposed = parsed
        return q, k, transposed, None, 1.0
    if _is_call(node, {torch.baddbmm}, {"baddbmm"}):
        bias, q, kt = node.args[0], node.args[1], node.args[2]
        beta = _number(node.kwargs.get("beta", 1.0))
        alpha = _number(node.kwargs.get("alpha", 1.0))
        if beta not in (0.0, 1.0) or alpha is None:
            return None
        k = _is_last_two_transpose(kt)
        bias = bias if beta == 1.0 else None
        return (q, k, False, bias, alpha) if k is not None else (q, kt, True, bias, alpha)
    return None


def _handwritten_site(softmax: fx.Node) -> AttentionSite | None:
    nodes = [softmax]
    # Forward from softmax: optional cast, then the product with v.
    product = _only_user(softmax)
    while product is not None and _is_cast(product):
        nodes.append(product)
        product = _only_user(product)
    if product is None:
        return None
    if _is_call(product, MATMUL_FUNCTIONS, {"matmul", "bmm", "__matmul__"}) and product.args[0] is nodes[-1]:
        value = product.args[1]
    elif _is_call(product, {torch.einsum}) and (parsed := _einsum_pv(product)) and parsed[0] is nodes[-1]:
        value = parsed[1]
    else:
        return None
    nodes.append(product)
    # Backward from softmax: optional casts, additive mask, scale, then QK^T. A factor met
    # before the mask would scale the mask too: that spelling is not attention as SDPA does it.
    scale, mask = 1.0, None
    current = softmax.args[0]
    while True:
        if not isinstance(current, fx.Node) or len(current.users) != 1:
            return None
        if _is_cast(current):
            nodes.append(current)
            current = current.args[0]
            continue
        factor = _scale_factor(current)
        if factor is not None:
            scale *= factor[0]
            nodes.append(current)
            current = factor[1]
            continue
        if _is_call(current, {operator.add, torch.add}, {"add", "__add__"}) and mask is None and len(current.args) == 2:
            if scale != 1.0:
                return None
            left, right = current.args
            if not (isinstance(left, fx.Node) and isinstance(right, fx.Node)):
                return None
            nodes.append(current)
            current, mask = (left, right) if _reaches_scores(left) else (right, left)
            continue
        break
    operands = _scores_operands(current)
    if operands is None:
        return None
    q, k, key_transposed, bias, alpha = operands
    if bias is not None:
        if mask is not None:
            return None
        mask = bias
    nodes.append(current)
    shapes = [shape_of(x) for x in (q, k, value)]
    if any(s is None or len(s) < 2 for s in shapes):
        return None
    return AttentionSite(
        name=product.name, form="handwritten", query=q, key=k, value=value, output=product,
        nodes=nodes, query_shape=shapes[0], key_shape=shapes[1], value_shape=shapes[2],
        dtype=str(dtype_of(q)).replace("torch.", ""),
        scale=scale * alpha, attn_mask=mask, key_transposed=key_transposed,
        module_path=module_path(product),
    )


def find_attention(graph: fx.Graph) -> list[AttentionSite]:
    """Every attention site in the graph, in graph order."""
    sites = []
    for node in graph.nodes:
        if _is_call(node, SDPA_TARGETS):
            site = _sdpa_site(node)
        elif _is_softmax(node):
            site = _handwritten_site(node)
        else:
            continue
        if site is not None:
            sites.append(site)
    return sites


def detect_attention(state: PassState) -> None:
    """Find every attention site: an SDPA call, or hand-written attention."""
    state.sites = find_attention(state.gm.graph)
