"""Find attention in the torch-level FX graph that dynamo hands a backend.

Three forms are recognised, each piece in any spelling of `t4dopt.passes.spellings`:

- an SDPA call;
- a direct call of one of aten's fused attention kernels (form ``"fused"``: reported, never rewritten,
  `t4dopt.passes.fused_attention`);
- hand-written attention: ``scores = q @ k^T``, an optional scale, an optional additive mask,
  softmax over the last dim (with or without a float upcast and a cast back), then
  ``probabilities @ v``. Each intermediate must feed only the next piece: weights or scores
  that are also used elsewhere cannot be fused. A factor applied after the mask would scale
  the mask too, which is not attention as SDPA computes it: refused.

Nothing is changed here; the result is a list of `AttentionSite`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch.fx as fx

from .fused_attention import FUSED
from .spellings import (CASTS, FUSED_SDPA, MASKS, SCALES, SCORES, SDPA, SOFTMAXES, WEIGHTED_SUMS, Scores, SdpaCall,
                        first_match)
from .state import PassState
from t4dopt.fx_utils import dtype_of, module_path, shape_of
from t4dopt.sites import AttentionSite


def _dtype_name(node: fx.Node) -> str:
    return str(dtype_of(node)).replace("torch.", "")


def _sdpa_site(node: fx.Node, call: SdpaCall, form: str = "sdpa", op: str = "") -> AttentionSite:
    q, k, v = call.query, call.key, call.value
    return AttentionSite(
        name=node.name, form=form, op=op, query=q, key=k, value=v, output=node, nodes=[node],
        query_shape=shape_of(q), key_shape=shape_of(k), value_shape=shape_of(v),
        dtype=_dtype_name(q),
        scale=call.scale,
        attn_mask=call.attn_mask if isinstance(call.attn_mask, fx.Node) else None,
        is_causal=bool(call.is_causal),
        dropout_p=float(call.dropout_p or 0.0),
        enable_gqa=bool(call.enable_gqa),
        module_path=module_path(node),
    )


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


class _WeightedSumChain(NamedTuple):
    """Forward from the softmax: the softmax, its casts and the product with v."""

    nodes: list[fx.Node]
    value: fx.Node


class _ScoresChain(NamedTuple):
    """Backward from the softmax: casts, scale factors and mask met, then the QK^T product (last of ``nodes``)."""

    nodes: list[fx.Node]
    scale: float
    mask: fx.Node | None
    scores: Scores


def _weighted_sum(softmax: fx.Node) -> _WeightedSumChain | None:
    """Optional casts after the softmax, then the product with v."""
    nodes = [softmax]
    product = _only_user(softmax)
    while product is not None and first_match(CASTS, product) is not None:
        nodes.append(product)
        product = _only_user(product)
    found = first_match(WEIGHTED_SUMS, product)
    if found is None or found.probabilities is not nodes[-1]:
        return None
    return _WeightedSumChain(nodes + [product], found.value)


def _reaches_scores(node: fx.Node) -> bool:
    """Whether casts and scale factors above `node` end in a QK^T product."""
    while isinstance(node, fx.Node):
        if first_match(SCORES, node) is not None:
            return True
        source = first_match(CASTS, node)
        if source is None and (scaled := first_match(SCALES, node)) is not None:
            source = scaled.input
        if source is None:
            return False
        node = source
    return False


def _scores(scores_input: fx.Node) -> _ScoresChain | None:
    """Walking up from the softmax input: optional casts, an additive mask, scale factors, then QK^T."""
    nodes, scale, mask = [], 1.0, None
    current = scores_input
    while True:
        if not isinstance(current, fx.Node) or len(current.users) != 1:
            return None
        if (source := first_match(CASTS, current)) is not None:
            nodes.append(current)
            current = source
        elif (scaled := first_match(SCALES, current)) is not None:
            scale *= scaled.factor
            nodes.append(current)
            current = scaled.input
        elif mask is None and (terms := first_match(MASKS, current)) is not None:
            if scale != 1.0:  # met walking up: the factor comes after the mask
                return None
            left, right = terms
            if not (isinstance(left, fx.Node) and isinstance(right, fx.Node)):
                return None
            nodes.append(current)
            current, mask = (left, right) if _reaches_scores(left) else (right, left)
        else:
            break
    scores = first_match(SCORES, current)
    if scores is None or (scores.bias is not None and mask is not None):
        return None
    return _ScoresChain(nodes + [current], scale, mask if scores.bias is None else scores.bias, scores)


def _handwritten_site(softmax: fx.Node, scores_input: fx.Node) -> AttentionSite | None:
    forward = _weighted_sum(softmax)
    backward = _scores(scores_input) if forward is not None else None
    if backward is None:
        return None
    output = forward.nodes[-1]
    q, k, value = backward.scores.query, backward.scores.key, forward.value
    shapes = [shape_of(x) for x in (q, k, value)]
    if any(s is None or len(s) < 2 for s in shapes):
        return None
    return AttentionSite(
        name=output.name, form="handwritten", query=q, key=k, value=value, output=output,
        nodes=forward.nodes + backward.nodes, query_shape=shapes[0], key_shape=shapes[1], value_shape=shapes[2],
        dtype=_dtype_name(q),
        scale=backward.scale * backward.scores.alpha, attn_mask=backward.mask,
        key_transposed=backward.scores.key_transposed,
        module_path=module_path(output),
    )


def find_attention(graph: fx.Graph) -> list[AttentionSite]:
    """Every attention site in the graph, in graph order."""
    sites = []
    for node in graph.nodes:
        if (call := first_match(SDPA, node)) is not None:
            site = _sdpa_site(node, call)
        elif (fused := first_match(FUSED_SDPA, node)) is not None:
            site = _sdpa_site(node, fused.call, FUSED, fused.op)
        elif (scores_input := first_match(SOFTMAXES, node)) is not None:
            site = _handwritten_site(node, scores_input)
        else:
            continue
        if site is not None:
            sites.append(site)
    return sites


def detect_attention(state: PassState) -> None:
    """Find every attention site: SDPA, a fused aten call, or hand-written in any spelling of the table."""
    state.sites = find_attention(state.gm.graph)
