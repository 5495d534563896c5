"""Detection and layout inference on small graphs, without rewriting."""

import math

import pytest
import torch
import torch.nn.functional as F

from t4dopt.options import LayoutHints, Options
from t4dopt.passes import analyze
from t4dopt.passes.detect import find_attention
from support import captured_graph


def _kinds(fn, *inputs, **hints):
    decisions = analyze(captured_graph(fn, *inputs), Options(layout=LayoutHints(**hints)))
    return [d.layout.kind.value for d in decisions], [d.site for d in decisions]


def test_sdpa_call_forms_are_all_found():
    def fn(q, k, v, mask):
        a = F.scaled_dot_product_attention(q, k, v)
        b = F.scaled_dot_product_attention(q, k, v, mask, 0.0, False)
        c = F.scaled_dot_product_attention(query=q, key=k, value=v, is_causal=True, scale=0.5)
        d = torch.nn.functional.scaled_dot_product_attention(q, k[:, :1], v[:, :1], enable_gqa=True)
        return a + b + c + d

    q = torch.randn(1, 2, 8, 4)
    sites = find_attention(captured_graph(fn, q, q, q, torch.zeros(8, 8)).graph)
    assert len(sites) == 4
    assert sites[1].attn_mask is not None and sites[2].is_causal and sites[2].scale == 0.5
    assert sites[3].enable_gqa and sites[3].key_shape == (1, 1, 8, 4)


def test_softmax_that_is_not_attention_is_ignored():
    def fn(q, k, v):
        w = (q @ k.transpose(-2, -1)).softmax(dim=-2) @ v     # softmax over queries: not attention
        p = (q @ k.transpose(-2, -1)).softmax(-1)
        return w, p @ v, p                                     # weights also returned: cannot fuse
    q = torch.randn(1, 2, 8, 4)
    assert find_attention(captured_graph(fn, q, q, q).graph) == []


def test_scale_applied_after_the_mask_is_not_mistaken_for_sdpa():
    def fn(q, k, v, mask):
        return ((q @ k.transpose(-2, -1) + mask) * 0.5).softmax(-1) @ v
    q = torch.randn(1, 2, 8, 4)
    assert find_attention(captured_graph(fn, q, q, q, torch.zeros(8, 8)).graph) == []


def test_additive_mask_and_scale_of_handwritten_attention():
    def fn(q, k, v, mask):
        return (torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(4) + mask).softmax(-1) @ v
    q = torch.randn(1, 2, 8, 4)
    (site,) = find_attention(captured_graph(fn, q, q, q, torch.zeros(8, 8)).graph)
    assert site.form == "handwritten" and site.scale == pytest.approx(0.5) and site.attn_mask is not None


def test_axes_from_the_layout_and_thecaptured_graph():
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
    # Without the option nothing in this graph tells time from space (a token-major model with the
    # sizes swapped draws the same graph): every self-attention stays unknown, the joint one names the option.
    decisions = analyze(captured_graph(fn, *inputs), Options())
    assert [d.layout.kind.value for d in decisions] == ["unknown", "unknown", "unknown", "cross"]
    assert "{'frames': 4, 'tokens_per_frame': 6}" in decisions[2].layout.evidence


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


# --- a rewrite only where the graph proves it (issue 14): q, k, v one sequence, frame-major ------------

B, F_, P_, C_, H_ = 1, 3, 8, 16, 2
_generator = torch.Generator().manual_seed(0)
W_QKV = torch.randn(3 * C_, C_, generator=_generator)
FREQS = torch.polar(torch.ones(F_ * P_, C_ // 2), torch.randn(F_ * P_, C_ // 2, generator=_generator))
COS, SIN = torch.randn(F_ * P_, C_, generator=_generator), torch.randn(F_ * P_, C_, generator=_generator)
PERM = torch.randperm(F_ * P_, generator=_generator)


def _heads(t):
    return t.unflatten(-1, (H_, -1)).transpose(1, 2)


def _attend(q, k=None, v=None):
    k = q if k is None else k
    return F.scaled_dot_product_attention(_heads(q), _heads(k), _heads(k if v is None else v))


def _projected(t):
    return F.linear(t, W_QKV).chunk(3, -1)


def _complex_rope(z):
    zc = torch.view_as_complex(z.float().reshape(*z.shape[:-1], -1, 2))
    return torch.view_as_real(zc * FREQS).flatten(-2)


def _rotate_half(z):
    z1, z2 = z.chunk(2, -1)
    return z * COS + torch.cat([-z2, z1], -1) * SIN


def _interleaved(z):
    z1, z2 = z.unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.empty_like(z)
    out[..., 0::2] = z1 * COS[..., 0::2] - z2 * SIN[..., 1::2]
    out[..., 1::2] = z1 * SIN[..., 1::2] + z2 * COS[..., 0::2]
    return out.type_as(z)


def _roped(tokens, rope):
    q, k, v = _projected(tokens)
    return _attend(rope(q), rope(k), v)


FRAME_MAJOR = {"frames": F_, "tokens_per_frame": P_}
CASES = {
    # name: (fn, input shapes, layout option, expected kind, words of the evidence)
    "equal-length cross attention": (lambda x, y: _attend(x.flatten(1, 2), y.flatten(1, 2)),
                                     [(B, F_, P_, C_)] * 2, FRAME_MAJOR, "cross", ["l_y_"]),
    "keys partly from another tensor": (lambda x, y: _attend(x.flatten(1, 2), torch.cat(
        [x.flatten(1, 2)[:, :P_], y.flatten(1, 2)[:, P_:]], 1)), [(B, F_, P_, C_)] * 2, FRAME_MAJOR, "cross", ["l_y_"]),
    "values from another frame": (lambda x: _attend(x[:, 0], x[:, 0], x[:, 1]), [(B, F_, P_, C_)],
                                  {"frames": 2, "tokens_per_frame": 4}, "cross", ["values"]),
    "keys from the frames reversed": (lambda x: _attend(x.flatten(1, 2), x.flatten(1, 2).flip(1)),
                                      [(B, F_, P_, C_)], FRAME_MAJOR, "unknown", ["flip"]),
    "everything from the frames reversed": (lambda x: _attend(x.flip(1).flatten(1, 2)), [(B, F_, P_, C_)],
                                            FRAME_MAJOR, "unknown", ["flip"]),
    "tokens rolled": (lambda x: _attend(x.flatten(1, 2).roll(3, 1)), [(B, F_, P_, C_)], FRAME_MAJOR, "unknown", ["roll"]),
    "index permutation": (lambda x: _attend(x.flatten(1, 2)[:, PERM]), [(B, F_, P_, C_)], FRAME_MAJOR,
                          "unknown", ["tensor"]),
    "index_select permutation": (lambda x: _attend(x.flatten(1, 2).index_select(1, PERM)), [(B, F_, P_, C_)],
                                 FRAME_MAJOR, "unknown", ["index_select"]),
    "gathered tokens": (lambda x: _attend(x.flatten(1, 2).gather(1, PERM.view(1, -1, 1).expand(B, -1, C_))),
                        [(B, F_, P_, C_)], FRAME_MAJOR, "unknown", ["gather"]),
    "frames repeated": (lambda x: _attend(x.repeat_interleave(2, dim=1).flatten(1, 2)), [(B, F_, P_ // 2, C_)],
                        FRAME_MAJOR, "unknown", ["repeat_interleave"]),
    "complex rope, token-major": (lambda x: _roped(x.flatten(1, 2), _complex_rope), [(B, P_, F_, C_)], FRAME_MAJOR,
                                  "unknown", ["not frame-major"]),
    "rotate-half rope, token-major": (lambda x: _roped(x.flatten(1, 2), _rotate_half), [(B, P_, F_, C_)],
                                      FRAME_MAJOR, "unknown", ["not frame-major"]),
    "token-major with P == F": (lambda x: _attend(x.flatten(1, 2)), [(B, 4, 4, C_)],
                                {"frames": 4, "tokens_per_frame": 4}, "unknown", ["coincide"]),
    "frame-major with P == F (cannot be told apart)": (lambda x: _attend(x.flatten(1, 2)), [(B, 4, 4, C_)],
                                                       {"frames": 4, "tokens_per_frame": 4}, "unknown", ["coincide"]),
    "[B, H, W, F, C] with H == F": (lambda x: _attend(x.flatten(1, 3)), [(B, 3, 4, 3, C_)],
                                    {"frames": 3, "height": 3, "width": 4}, "unknown", ["height=3 x width=4"]),
    "[B, H, W, F, C] with H == W == F": (lambda x: _attend(x.flatten(1, 3)), [(B, 3, 3, 3, C_)],
                                         {"frames": 3, "height": 3, "width": 3}, "unknown", ["coincide"]),
    "packed tokens, no grid visible": (lambda x: _attend(x), [(B, F_ * P_, C_)], FRAME_MAJOR, "unknown",
                                       ["not visible", "trust_layout"]),
    # Positive controls: the same models written frame-major are proven.
    "complex rope, frame-major": (lambda x: _roped(x.flatten(1, 2), _complex_rope), [(B, F_, P_, C_)], FRAME_MAJOR,
                                  "spatiotemporal", ["match the layout option"]),
    "rotate-half rope, frame-major": (lambda x: _roped(x.flatten(1, 2), _rotate_half), [(B, F_, P_, C_)],
                                      FRAME_MAJOR, "spatiotemporal", []),
    "interleaved rope, frame-major": (lambda x: _roped(x.flatten(1, 2), _interleaved), [(B, F_, P_, C_)],
                                      FRAME_MAJOR, "spatiotemporal", []),
    "fused qkv": (lambda x: F.scaled_dot_product_attention(*F.linear(x.flatten(1, 2), W_QKV).view(
        B, F_ * P_, 3, H_, -1).permute(2, 0, 3, 1, 4)), [(B, F_, P_, C_)], FRAME_MAJOR, "spatiotemporal", []),
    "[B, F, H, W, C] with height and width": (lambda x: _attend(x.flatten(1, 3)), [(B, 3, 2, 4, C_)],
                                              {"frames": 3, "height": 2, "width": 4}, "spatiotemporal", []),
    "text joined after the video, as long as it": (
        lambda x, text: _roped(torch.cat([x.flatten(1, 2), text], 1), lambda z: z), [(B, F_, P_, C_), (B, F_ * P_, C_)],
        FRAME_MAJOR, "spatiotemporal", [f"{F_ * P_} suffix"]),
    "text joined before the video": (
        lambda x, text: _roped(torch.cat([text, x.flatten(1, 2)], 1), lambda z: z), [(B, F_, P_, C_), (B, 5, C_)],
        FRAME_MAJOR, "spatiotemporal", ["5 prefix"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_site_is_joint_only_when_the_graph_proves_one_frame_major_sequence(case):
    fn, shapes, layout, kind, words = CASES[case]
    inputs = [torch.randn(*shape, generator=torch.Generator().manual_seed(1)) for shape in shapes]
    (decision,) = analyze(captured_graph(fn, *inputs), Options(layout=LayoutHints(**layout)))
    assert decision.layout.kind.value == kind, decision.layout.evidence
    for word in words:
        assert word in decision.layout.evidence


def test_trust_layout_takes_an_unconfirmed_option_but_never_a_contradicted_one():
    from t4dopt.options import parse_options

    def packed(x):
        return _attend(x)

    def token_major(x):
        return _attend(x.flatten(1, 2))

    options = parse_options({"layout": FRAME_MAJOR, "sparse": {"block_size": 4}, "trust_layout": True})
    (decision,) = analyze(captured_graph(packed, torch.randn(B, F_ * P_, C_)), options)
    assert (decision.layout.kind.value, decision.action) == ("spatiotemporal", "sparse")
    assert decision.layout.trusted and decision.warn and "trust_layout=True" in decision.reason
    (decision,) = analyze(captured_graph(token_major, torch.randn(B, P_, F_, C_)), options)
    assert (decision.layout.kind.value, decision.action) == ("unknown", "dense")
    (decision,) = analyze(captured_graph(lambda x: _attend(x.flatten(1, 2).flip(1)), torch.randn(B, F_, P_, C_)), options)
    assert (decision.layout.kind.value, decision.action) == ("unknown", "dense") and "flip" in decision.reason
