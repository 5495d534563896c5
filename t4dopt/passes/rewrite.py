"""Replace the sites marked sparse with the ``t4d::block_sparse_attention`` op.

The op takes [B, H, N, D]; sites of another rank are reshaped to [-1, 1, N, D] and back. The
block table travels as buffers of the graph module, on the device of the site's tensors; a key
mask the model passes goes to the op as its ``key_mask`` ([B, N]); query rows a query mask drops are
zeroed after it. With ``reference=True`` the same
sites become SDPA with the explicit boolean token mask (and the model's own mask) instead: the
dense reference that ``verify`` compares against.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from .state import PassState
from t4dopt.compat import register_graph_buffer_source
from t4dopt.fx_utils import device_of, dtype_of, shape_of
from t4dopt.sites import SiteDecision

import t4dopt.ops  # noqa: F401  (registers torch.ops.t4d)


def add_buffer(gm: fx.GraphModule, name: str, tensor: torch.Tensor) -> fx.Node:
    """`tensor` as a buffer of `gm` named `name`, and the graph node that reads it (inserted where the graph is)."""
    gm.register_buffer(name, tensor)
    register_graph_buffer_source(gm, name)
    return gm.graph.get_attr(name)


def _as_bhnd(graph: fx.Graph, node: fx.Node, shape: tuple[int, ...]) -> fx.Node:
    if len(shape) == 4:
        return node
    return graph.call_method("reshape", (node, -1, 1, shape[-2], shape[-1]))


def _with_model_mask(graph: fx.Graph, token_mask: fx.Node, site) -> fx.Node:
    """The block mask combined with the mask the model passes (the reference keeps both, as the op does)."""
    mask = site.attn_mask
    if mask is None:
        return token_mask
    if dtype_of(mask) == torch.bool:
        return graph.call_function(operator.and_, (mask, token_mask))
    return graph.call_function(torch.where, (token_mask, mask, -math.inf))


def _one_of(graph: fx.Graph, mask: fx.Node, kept: tuple[int, int], size: tuple[int, int]) -> fx.Node:
    """`mask` (broadcast to [B, H, Nq, Nk], constant along the dims not in `kept`) as [b, 1, Nq, 1] or [b, 1, 1, Nk]:
    one entry along each constant dim, the kept dim (2 or 3) expanded to its `size`."""
    shape = shape_of(mask)
    padded = (1,) * (4 - len(shape)) + shape
    node = graph.call_method("reshape", (mask, *padded)) if len(shape) != 4 else mask
    for dim in (1, 2, 3):
        if dim not in kept and padded[dim] != 1:
            node = graph.call_method("narrow", (node, dim, 0, 1))
    dim, length = size
    if padded[dim] != length:
        target = [padded[0], 1, 1, 1]
        target[dim] = length
        node = graph.call_method("expand", (node, *target))
    return node


def _as_batch_by_keys(graph: fx.Graph, mask: fx.Node, keys: int) -> fx.Node:
    """A key mask the model passes (constant over heads and queries: [B, 1, 1, N], or that repeated over the
    queries) as the op's [B, N] (or [1, N])."""
    node = _one_of(graph, mask, (0, 3), (3, keys))
    batch = ((1,) * (4 - len(shape_of(mask))) + shape_of(mask))[0]
    return graph.call_method("reshape", (node, batch, keys))


def _query_rows_zeroed(graph: fx.Graph, out: fx.Node, mask: fx.Node, queries: int) -> fx.Node:
    """`out` with the rows the model's boolean query mask drops set to zero (SDPA gives such rows zeros)."""
    rows = _one_of(graph, mask, (0, 2), (2, queries))
    return graph.call_function(torch.where, (rows, out, 0.0))


def _rewrite_site(gm: fx.GraphModule, index: int, decision: SiteDecision, reference: bool) -> None:
    site, graph = decision.site, gm.graph
    layout = decision.block_layout
    device = device_of(site.query)
    with graph.inserting_before(site.output):
        key = graph.call_method("transpose", (site.key, -2, -1)) if site.key_transposed else site.key
        key_shape = site.key_shape[:-2] + (site.key_shape[-1], site.key_shape[-2]) if site.key_transposed else site.key_shape
        q = _as_bhnd(graph, site.query, site.query_shape)
        k = _as_bhnd(graph, key, key_shape)
        v = _as_bhnd(graph, site.value, site.value_shape)
        heads, kv_heads = site.query_shape[-3] if len(site.query_shape) == 4 else 1, key_shape[-3] if len(key_shape) == 4 else 1
        if heads != kv_heads:
            k = graph.call_method("repeat_interleave", (k, heads // kv_heads), {"dim": 1})
            v = graph.call_method("repeat_interleave", (v, heads // kv_heads), {"dim": 1})
        prefix = f"_t4d_site{index}"
        if reference:
            mask = _with_model_mask(graph, add_buffer(gm, f"{prefix}_token_mask", layout.token_mask().to(device)), site)
            out = graph.call_function(F.scaled_dot_product_attention, (q, k, v),
                                      {"attn_mask": mask, "scale": site.scale})
        else:
            counts, indices, starts = (
                add_buffer(gm, f"{prefix}_{name}", tensor)
                for name, tensor in zip(("kv_counts", "kv_indices", "block_starts"), layout.tensors(device))
            )
            key_mask = (_as_batch_by_keys(graph, decision.key_mask, site.key_len)
                        if decision.key_mask is not None else None)
            out = graph.call_function(torch.ops.t4d.block_sparse_attention.default,
                                      (q, k, v, counts, indices, starts, layout.block_size, site.scale, key_mask))
            if decision.query_mask is not None:
                out = _query_rows_zeroed(graph, out, decision.query_mask, site.query_len)
        if len(site.query_shape) != 4:
            out = graph.call_method("reshape", (out, *site.query_shape[:-1], site.value_shape[-1]))
    site.output.replace_all_uses_with(out)
    decision.rewritten_output = out
    for node in reversed(site.nodes):
        if not node.users:
            graph.erase_node(node)


def rewrite_sparse_sites(state: PassState) -> None:
    """Replace the sites decided sparse by the t4d block-sparse op (by masked SDPA for the reference)."""
    gm, sparse = state.gm, [(i, d) for i, d in enumerate(state.decisions) if d.action == "sparse"]
    for index, decision in sparse:
        _rewrite_site(gm, index, decision, state.reference)
    if sparse:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
