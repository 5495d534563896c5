"""Detection and layout inference on small graphs, without rewriting."""

import math

import pytest
import torch
import torch.nn.functional as F

from t4dopt.options import LayoutHints, Options
from t4dopt.passes import analyze
from t4dopt.passes.detect import find_attention


def _graph(fn, *inputs):
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=capture, fullgraph=True)(*inputs)
    return graphs[0]


def _kinds(fn, *inputs, **hints):
    decisions = analyze(_graph(fn, *inputs), Options(layout=LayoutHints(**hints)))
    return [d.layout.kind.value for d in decisions], [d.site for d in decisions]


def test_sdpa_call_forms_are_all_found():
    def fn(q, k, v, mask):
        a = F.scaled_dot_product_attention(q, k, v)
        b = F.scaled_dot_product_attention(q, k, v, mask, 0.0, False)
        c = F.scaled_dot_product_attention(query=q, key=k, value=v, is_causal=True, scale=0.5)
        d = torch.nn.functional.scaled_dot_product_attention(q, k[:, :1], v[:, :1], enable_gqa=True)
        return a + b + c + d

    q = torch.randn(1, 2, 8, 4)
    sites = find_attention(_graph(fn, q, q, q, torch.zeros(8, 8)).graph)
    assert len(sites) == 4
    assert sites[1].attn_mask is not None and sites[2].is_causal and sites[2].scale == 0.5
    assert sites[3].enable_gqa and sites[3].key_shape == (1, 1, 8, 4)


def test_softmax_that_is_not_attention_is_ignored():
    def fn(q, k, v):
        w = (q @ k.transpose(-2, -1)).softmax(dim=-2) @ v     # softmax over queries: not attention
        p = (q @ k.transpose(-2, -1)).softmax(-1)
        return w, p @ v, p                                     # weights also returned: cannot fuse
    q = torch.randn(1, 2, 8, 4)
    assert find_attention(_graph(fn, q, q, q).graph) == []


def test_scale_applied_after_the_mask_is_not_mistaken_for_sdpa():
    def fn(q, k, v, mask):
        return ((q @ k.transpose(-2, -1) + mask) * 0.5).softmax(-1) @ v
    q = torch.randn(1, 2, 8, 4)
    assert find_attention(_graph(fn, q, q, q, torch.zeros(8, 8)).graph) == []


def test_additive_mask_and_scale_of_handwritten_attention():
    def fn(q, k, v, mask):
        return (torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(4) + mask).softmax(-1) @ v
    q = torch.randn(1, 2, 8, 4)
    (site,) = find_attention(_graph(fn, q, q, q, torch.zeros(8, 8)).graph)
    assert site.form == "handwritten" and site.scale == pytest.approx(0.5) and site.attn_mask is not None


def test_axes_from_the_layout_and_the_graph():
    frames, tokens, dim = 4, 6, 8

    def fn(x, ctx):
        b = x.shape[0]
        spatial = x.reshape(b * frames, 1, tokens, dim)
        temporal = x.permute(0, 2, 1, 3).reshape(b * tokens, 1, frames, dim)
        joint = x.reshape(b, 1, frames * tokens, dim)
        return (F.scaled_dot_product_attention(spatial, spatial, spatial).sum()
                + F.scaled_dot_product_attention(temporal, temporal, temporal).sum()
                + F.scaled_dot_product_attention(joint, joint, joint).sum()
                + F.scaled_dot_product_attention(joint, ctx, ctx).sum())

    inputs = torch.randn(2, frames, tokens, dim), torch.randn(2, 1, 5, dim)
    kinds, _ = _kinds(fn, *inputs, frames=frames, tokens_per_frame=tokens)
    assert kinds == ["spatial", "temporal", "spatiotemporal", "cross"]
    kinds, _ = _kinds(fn, *inputs)
    assert kinds == ["spatial", "temporal", "spatiotemporal", "cross"], "frames and tokens inferred from the graph"


def test_views_axis_and_ambiguous_lengths():
    views, frames, tokens, dim = 3, 3, 3, 4

    def fn(x):
        across_views = x.permute(0, 2, 3, 1, 4).reshape(-1, 1, views, dim)
        return F.scaled_dot_product_attention(across_views, across_views, across_views)

    kinds, _ = _kinds(fn, torch.randn(1, views, frames, tokens, dim), frames=frames, views=views, tokens_per_frame=tokens)
    assert kinds == ["unknown"], "3 tokens could be spatial, temporal or view: ambiguous stays unknown"
    kinds, _ = _kinds(fn, torch.randn(1, views, frames, tokens, dim), frames=frames, views=views, tokens_per_frame=8)
    assert kinds == ["unknown"]
    kinds, _ = _kinds(fn, torch.randn(1, views, frames, tokens, dim), frames=5, views=views, tokens_per_frame=8)
    assert kinds == ["view"]
