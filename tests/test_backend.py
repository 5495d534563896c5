"""The turbo4d backend end to end, checked against an independent dense reference with an explicit mask."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import t4dopt
from t4dopt import masks
from support import JointVideoAttention, cause_chain, dense_reference

FRAMES, TOKENS, DIM = 3, 12, 32


def _compile(model, **options):
    torch._dynamo.reset()
    return torch.compile(model, backend="turbo4d", options={"target": "eager", **options})


def _options(prefix=0, block_size=8, policy="sculpt4d"):
    return {"layout": {"frames": FRAMES, "tokens_per_frame": TOKENS, "prefix_tokens": prefix},
            "sparse": {"policy": policy, "block_size": block_size}}


@pytest.mark.parametrize("spelling", ["sdpa", "sdpa_kwargs", "matmul_div", "operator_mul_upcast", "einsum",
                                      "bmm_scaled_q", "baddbmm"])
@pytest.mark.parametrize("prefix", [0, 5])
def test_every_spelling_of_joint_attention_becomes_the_masked_attention(spelling, prefix):
    torch.manual_seed(0)
    model = JointVideoAttention(DIM, spelling=spelling, prefix=prefix).eval()
    x = torch.randn(2, FRAMES, TOKENS, DIM)
    layout = masks.sculpt4d(FRAMES, TOKENS, block_size=8, prefix_tokens=prefix, strides=(1, 2), anchor_frames=0)
    assert layout.density < 0.9
    options = _options(prefix)
    options["sparse"].update(strides=(1, 2), anchor_frames=0)
    with torch.no_grad():
        got = _compile(model, **options)(x)
        want = dense_reference(model, x, layout.token_mask())
        unmasked = model(x)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    assert (got - unmasked).abs().max() > 1e-3, "the mask must change the result, or this test proves nothing"


@pytest.mark.parametrize("policy", sorted(masks.POLICIES))
def test_each_policy_through_the_backend(policy):
    torch.manual_seed(1)
    model = JointVideoAttention(DIM, prefix=3).eval()
    x = torch.randn(1, FRAMES, TOKENS, DIM)
    layout = masks.build(policy, FRAMES, TOKENS, block_size=8, prefix_tokens=3)
    with torch.no_grad():
        got = _compile(model, **_options(prefix=3, policy=policy))(x)
    torch.testing.assert_close(got.double(), dense_reference(model, x, layout.token_mask()), rtol=1e-4, atol=1e-5)


def test_explain_reports_every_site_with_kind_action_and_density():
    model = JointVideoAttention(DIM, prefix=4).eval()
    report = t4dopt.explain(model, torch.randn(1, FRAMES, TOKENS, DIM), options=_options(prefix=4))
    kinds = [(s.kind, s.action) for s in report.sites]
    assert kinds == [("spatial", "dense"), ("spatiotemporal", "sparse")]
    joint = report.sites[1]
    expected = masks.sculpt4d(FRAMES, TOKENS, block_size=8, prefix_tokens=4).density
    assert joint.density == pytest.approx(expected) and joint.density < 1
    assert report.sites[0].reason and "spatial" in report.sites[0].reason
    assert 0 < report.flops_saved < 1
    table = report.table()
    assert "spatiotemporal" in table and "saved" in table and joint.name in table


def test_position_major_sequence_is_left_dense_with_a_warning():
    torch.manual_seed(2)
    model = JointVideoAttention(DIM, position_major=True).eval()
    x = torch.randn(1, FRAMES, TOKENS, DIM)
    with pytest.warns(t4dopt.T4DWarning, match="left dense"):
        got = _compile(model, **_options())(x)
    torch.testing.assert_close(got, model(x))
    with pytest.warns(t4dopt.T4DWarning, match="token-major"):
        report = t4dopt.explain(model, x, options=_options())
    assert report.sites[1].kind == "unknown" and report.sites[1].action == "dense"
    assert "token-major" in report.sites[1].reason


def test_strict_turns_a_dense_fallback_into_an_error():
    model = MaskedJoint("runtime-full").eval()
    x = torch.randn(1, FRAMES, TOKENS, DIM)
    with pytest.raises(Exception, match="attention mask") as error:
        _compile(model, **_options(prefix=4), strict=True)(x)
    assert t4dopt.T4DUnsupportedError in cause_chain(error.value)
    with pytest.warns(t4dopt.T4DWarning, match="varies over queries and keys together"):
        got = _compile(model, **_options(prefix=4))(x)
    torch.testing.assert_close(got, model(x))


class MaskedJoint(torch.nn.Module):
    """Joint attention over prefix + frames x tokens with a mask the model passes, of one `kind`."""

    def __init__(self, kind, prefix=4):
        super().__init__()
        self.kind, self.prefix = kind, prefix
        self.qkv = torch.nn.Linear(DIM, 3 * DIM)
        self.text = torch.nn.Parameter(torch.randn(prefix, DIM))
        self.attend = F.scaled_dot_product_attention

    def mask(self, x, valid):
        n, b = self.prefix + FRAMES * TOKENS, x.shape[0]
        frame = torch.cat([torch.full((self.prefix,), -1), torch.arange(FRAMES).repeat_interleave(TOKENS)])
        if self.kind == "keys-bool":
            return (torch.arange(n) >= self.prefix - valid.unsqueeze(1)).view(b, 1, 1, n)
        if self.kind == "keys-additive":
            keep = torch.arange(n) >= self.prefix - valid.unsqueeze(1)
            return torch.zeros(b, 1, 1, n).masked_fill(~keep.view(b, 1, 1, n), float("-inf"))
        if self.kind == "ones":
            return torch.ones(1, 1, n, n, dtype=torch.bool)
        if self.kind == "frame-causal":  # a constant block-causal mask over frames, global tokens free
            return ((frame.view(1, n) <= frame.view(n, 1)) | (frame.view(1, n) < 0) | (frame.view(n, 1) < 0)).view(1, 1, n, n)
        if self.kind == "token-causal":  # a constant mask that does not fall on the blocks
            return torch.ones(n, n, dtype=torch.bool).tril().view(1, 1, n, n)
        if self.kind == "padding-repeat":  # HunyuanVideo 1.5's spelling: validity per token, padded, repeated, ANDed
            text = torch.arange(self.prefix) >= self.prefix - valid.unsqueeze(1)
            rows = F.pad(text, (0, n - self.prefix), value=True).view(b, 1, 1, n).repeat(1, 1, n, 1)
            return (rows & rows.transpose(2, 3)).bool()
        if self.kind == "padding-broadcast":
            keep = torch.arange(n) >= self.prefix - valid.unsqueeze(1)
            return keep[:, None, :, None] & keep[:, None, None, :]
        if self.kind == "queries-only":
            return (torch.arange(n) >= self.prefix - valid.unsqueeze(1)).view(b, 1, n, 1)
        if self.kind == "runtime-full":
            rows = torch.cat([torch.ones(b, self.prefix, dtype=torch.bool), x.flatten(1, 2).sum(-1) > -1e9], 1)
            return rows.view(b, 1, n, 1) | torch.eye(n, dtype=torch.bool)
        raise ValueError(self.kind)

    def forward(self, x, valid=None):
        b = x.shape[0]
        valid = torch.full((b,), self.prefix) if valid is None else valid
        tokens = torch.cat([self.text.expand(b, -1, -1), x.flatten(1, 2)], 1)
        q, k, v = self.qkv(tokens).view(b, -1, 3, 2, DIM // 2).permute(2, 0, 3, 1, 4)
        out = self.attend(q, k, v, attn_mask=self.mask(x, valid))
        return out.transpose(1, 2).flatten(2)

    def reference(self, x, token_mask, valid=None):
        """The model with its attention in float64 under `token_mask` combined with its own mask."""
        def attend(q, k, v, attn_mask):
            scores = q.double() @ k.double().transpose(-1, -2) * (DIM // 2) ** -0.5
            if attn_mask.dtype == torch.bool:
                scores = scores.masked_fill(~attn_mask, float("-inf"))
            else:
                scores = scores + attn_mask.double()
            scores = scores.masked_fill(~token_mask, float("-inf"))
            kept = scores.amax(-1, keepdim=True) > float("-inf")  # rows that keep no key come out as zeros (SDPA)
            return (scores.masked_fill(~kept, 0).softmax(-1) * kept).matmul(v.double()).float()

        self.attend = attend
        try:
            return self(x, valid)
        finally:
            self.attend = F.scaled_dot_product_attention


@pytest.mark.parametrize("kind", ["keys-bool", "keys-additive", "ones", "frame-causal", "padding-repeat",
                                  "padding-broadcast", "queries-only"])
def test_a_mask_the_model_passes_is_combined_with_the_block_mask(kind):
    torch.manual_seed(6)
    model = MaskedJoint(kind).eval()
    x, valid = torch.randn(2, FRAMES, TOKENS, DIM), torch.tensor([4, 1])
    layout = masks.sculpt4d(FRAMES, TOKENS, block_size=4, prefix_tokens=4, strides=(1, 2), anchor_frames=0)
    options = _options(prefix=4, block_size=4)
    options["sparse"].update(strides=(1, 2), anchor_frames=0)
    with torch.no_grad(), t4dopt.report.collecting() as report:
        got = _compile(model, **options, verify=True)(x, valid)  # verify: the reference path keeps the mask too
    (site,) = report.sites
    assert site.action == "sparse", site.reason
    if kind == "frame-causal":
        assert site.density < layout.density - 0.1 and "model mask" in site.reason
    else:
        assert site.density == pytest.approx(layout.density)
    with torch.no_grad():
        want = model.reference(x, layout.token_mask(), valid)
        unmasked = model.reference(x, torch.ones_like(layout.token_mask()), valid)
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-4, atol=1e-5)
    assert (got - unmasked).abs().max() > 1e-3


@pytest.mark.parametrize("kind, words", [("token-causal", "does not fall on the blocks"),
                                         ("runtime-full", "varies over queries and keys together")])
def test_a_mask_that_does_not_combine_keeps_the_site_dense(kind, words):
    model = MaskedJoint(kind).eval()
    x = torch.randn(1, FRAMES, TOKENS, DIM)
    with pytest.warns(t4dopt.T4DWarning, match=words), torch.no_grad():
        got = _compile(model, **_options(prefix=4, block_size=4))(x)
        torch.testing.assert_close(got, model(x))


def test_without_layout_hints_tokens_given_as_a_grid_stay_dense():
    # x arrives as [B, F, P, C] tokens, no patch embedding: the graph cannot tell the frames from the tokens.
    model = JointVideoAttention(DIM, prefix=4).eval()
    with pytest.warns(t4dopt.T4DWarning, match="tokens_per_frame"):
        report = t4dopt.explain(model, torch.randn(1, FRAMES, TOKENS, DIM), options={"sparse": "sculpt4d"})
    joint = report.sites[1]
    assert (joint.kind, joint.action) == ("unknown", "dense")
    assert f"{{'frames': {FRAMES}, 'tokens_per_frame': {TOKENS}}}" in joint.evidence


def test_models_without_4d_structure_and_sparse_none_are_unchanged():
    torch.manual_seed(3)
    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0).eval()
    x = torch.randn(2, 10, 32)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", t4dopt.T4DWarning)
        assert torch.equal(_compile(layer, sparse="sculpt4d", layout={"frames": 4, "tokens_per_frame": 16})(x), layer(x))
    model = JointVideoAttention(DIM).eval()
    x = torch.randn(1, FRAMES, TOKENS, DIM)
    with torch.no_grad():
        assert torch.equal(_compile(model, layout=_options()["layout"], sparse=None)(x), model(x))


def test_verify_checks_the_first_call_against_the_dense_masked_reference(monkeypatch):
    model = JointVideoAttention(DIM).eval()
    x = torch.randn(1, FRAMES, TOKENS, DIM)
    with torch.no_grad():
        _compile(model, **_options(), verify=True)(x)

    import t4dopt.backend as backend

    real_lower = backend._lower
    monkeypatch.setattr(backend, "_lower", lambda gm, inputs, target: (lambda *a: [o + 0.1 for o in real_lower(gm, inputs, target)(*a)]))
    with pytest.raises(t4dopt.T4DVerifyError, match="differs"), torch.no_grad():
        _compile(model, **_options(), verify=True)(x)


def test_backend_is_registered_by_name():
    assert "turbo4d" in torch._dynamo.list_backends(exclude_tags=())


def test_gradients_flow_through_the_rewritten_graph():
    torch.manual_seed(4)
    model = JointVideoAttention(DIM)
    x = torch.randn(1, FRAMES, TOKENS, DIM, requires_grad=True)
    _compile(model, **_options())(x).square().sum().backward()
    got = x.grad.clone()
    x.grad = None
    layout = masks.sculpt4d(FRAMES, TOKENS, block_size=8)
    dense_reference(model, x, layout.token_mask()).square().sum().backward()
    torch.testing.assert_close(got.double(), x.grad.double(), rtol=1e-3, atol=1e-5)


@pytest.mark.inductor
def test_inductor_end_to_end_on_the_reference_dit(monkeypatch):
    from t4dopt.models import Sculpt4DDiT, make_inputs
    import dataclasses
    from t4dopt.models import CONFIGS

    config = dataclasses.replace(CONFIGS["tiny"], frames=4, tokens_per_frame=40)
    torch.manual_seed(5)
    model = Sculpt4DDiT(config).eval()
    noise, cond = make_inputs(config, seed=0)
    t = torch.full((1,), 0.7)
    options = {"layout": {"frames": 4, "tokens_per_frame": 40}, "sparse": {"block_size": 16}}
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(model, backend="turbo4d", options=options)(noise, t, cond)

    joint = masks.sculpt4d(4, 40, block_size=16).token_mask()
    sdpa = F.scaled_dot_product_attention

    def masked_sdpa(q, k, v, *args, **kwargs):
        if q.shape[-2] == k.shape[-2] == joint.shape[0]:
            scores = (q.double() @ k.double().transpose(-1, -2)) * q.shape[-1] ** -0.5
            return scores.masked_fill(~joint, float("-inf")).softmax(-1).matmul(v.double()).to(q.dtype)
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", masked_sdpa)
    with torch.no_grad():
        want = model(noise, t, cond)
        monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
        dense = model(noise, t, cond)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (got - dense).abs().max() > 1e-4
