"""Direct calls of aten's fused attention kernels are reported sites left dense, and read as attention downstream.

The model: a joint attention over frames x tokens computed by ``aten._scaled_dot_product_flash_attention_for_cpu``
(directly, or as two key/value chunks merged by their log-sum-exp as a ring attention does), added to the stream,
then a joint SDPA attention over the same tokens. The fused call must stay dense with a reason and a T4DWarning
(an error under strict=True), and the SDPA after it must still be proven and made sparse: the sequence trace
follows the fused call's output and log-sum-exp. The reference: the same model with the SDPA under the explicit
Sculpt4D token mask in float64, written here.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import t4dopt
from support import cause_chain
from t4dopt import masks
from t4dopt.cache.graph.regions import find_regions
from t4dopt.compat import FUSED_SDPA_OPS
from t4dopt.options import parse_options
from t4dopt.passes import analyze
from t4dopt.passes.detect import find_attention

FRAMES, TOKENS, DIM, HEADS = 3, 8, 16, 2
OPTIONS = {"layout": {"frames": FRAMES, "tokens_per_frame": TOKENS},
           "sparse": {"policy": "sculpt4d", "block_size": 4, "strides": (1, 2), "anchor_frames": 0}, "target": "eager"}
FLASH_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


class FusedThenJoint(nn.Module):
    """A fused aten attention (``form``: "direct" or "ring", two key chunks merged by log-sum-exp), then SDPA."""

    def __init__(self, form: str):
        super().__init__()
        torch.manual_seed(0)
        self.form = form
        self.first, self.second = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, 3 * DIM)
        self.reference_mask: torch.Tensor | None = None
        """When set: the SDPA runs under this boolean token mask in float64 (the test's reference)."""

    @staticmethod
    def _heads(x):
        b, n, c = x.shape
        return x.view(b, n, 3, HEADS, c // (3 * HEADS)).permute(2, 0, 3, 1, 4)

    def _fused(self, q, k, v):
        if self.form == "direct":
            return FLASH_CPU(q, k, v, scale=0.3)[0]
        half = k.shape[-2] // 2
        out_a, lse_a = FLASH_CPU(q, k[:, :, :half], v[:, :, :half])
        out_b, lse_b = FLASH_CPU(q, k[:, :, half:], v[:, :, half:])
        lse = torch.logaddexp(lse_a, lse_b)
        return out_a * (lse_a - lse).exp().unsqueeze(-1) + out_b * (lse_b - lse).exp().unsqueeze(-1)

    def forward(self, x):
        b, f, p, c = x.shape
        tokens = x.reshape(b, f * p, c)
        tokens = tokens + self._fused(*self._heads(self.first(tokens))).transpose(1, 2).reshape(b, f * p, c)
        q, k, v = self._heads(self.second(tokens))
        if self.reference_mask is None:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            scores = (q.double() @ k.double().transpose(-1, -2)) * q.shape[-1] ** -0.5
            out = scores.masked_fill(~self.reference_mask, float("-inf")).softmax(-1).matmul(v.double()).to(q.dtype)
        return out.transpose(1, 2).reshape(b, f, p, c)


def _compile(model, **options):
    torch._dynamo.reset()
    return torch.compile(model, backend="turbo4d", options={**OPTIONS, **options})


@pytest.fixture(scope="module")
def x():
    return torch.randn(1, FRAMES, TOKENS, DIM, generator=torch.Generator().manual_seed(1))


def _reference(model, x):
    layout = masks.sculpt4d(FRAMES, TOKENS, block_size=4, strides=(1, 2), anchor_frames=0)
    assert layout.density < 0.9
    model.reference_mask = layout.token_mask()
    try:
        with torch.no_grad():
            return model(x)
    finally:
        model.reference_mask = None


@pytest.mark.parametrize("form, words", [("direct", "direct fused aten call"),
                                         ("ring", "one of 2 over the same queries")])
def test_a_fused_call_is_reported_dense_and_the_attention_after_it_is_still_proven(form, words, x):
    model = FusedThenJoint(form).eval()
    with pytest.warns(t4dopt.T4DWarning, match=words), torch.no_grad():
        got = _compile(model)(x)
    want = _reference(model, x)
    with torch.no_grad():
        unmasked = model(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)  # the fused call unchanged, the SDPA masked
    assert (got - unmasked).abs().max() > 1e-3, "the mask must change the result, or this test proves nothing"

    with pytest.warns(t4dopt.T4DWarning, match="_scaled_dot_product_flash_attention_for_cpu"):
        report = t4dopt.explain(model, x, options=OPTIONS)
    fused, joint = report.sites[:-1], report.sites[-1]
    assert len(fused) == (1 if form == "direct" else 2)
    for site in fused:
        assert site.action == "dense" and words in site.reason and "use_sparse_ring" in site.reason, site.reason
        assert site.shape == (1, HEADS, FRAMES * TOKENS, DIM // HEADS)
    if form == "direct":  # its queries and keys are proven one joint sequence, and the reason says so
        assert fused[0].kind == "spatiotemporal" and "proves it joint" in fused[0].reason
        assert "F.scaled_dot_product_attention" in fused[0].reason
    else:
        assert {site.kind for site in fused} == {"unknown"}
    assert (joint.kind, joint.action) == ("spatiotemporal", "sparse"), joint
    assert "aten._scaled_dot_product_flash_attention_for_cpu" in report.table()


def test_strict_refuses_a_fused_call(x):
    with pytest.raises(Exception, match="direct fused aten call") as error:
        _compile(FusedThenJoint("direct").eval(), strict=True)(x)
    assert t4dopt.T4DUnsupportedError in cause_chain(error.value)


def test_without_a_mask_policy_a_fused_call_is_reported_without_a_warning(x):
    model = FusedThenJoint("direct").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", t4dopt.T4DWarning)
        report = t4dopt.explain(model, x, options={"sparse": None})
    assert [(s.action, s.reason) for s in report.sites][0] == ("dense", "sparse=None: no mask policy chosen")


@pytest.mark.parametrize("form", ["direct", "ring"])
def test_the_cache_counts_fused_calls_as_the_attention_of_their_sublayer(form, x):
    graphs: list[fx.GraphModule] = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(FusedThenJoint(form).eval(), backend=capture)(x)
    gm = graphs[0]
    plan = find_regions(gm.graph, analyze(gm, parse_options(OPTIONS)), dict(gm.named_modules()))
    unit = next(u for u in plan.units if u.name == "first")
    assert [d.site.form for d in unit.sites] == ["fused"] * (1 if form == "direct" else 2)
    assert unit.token_site is None  # the token level prunes SDPA rows only


def _arguments(op: str, q, k, v, mask):
    """A call of `op` with a mask and scale 0.3, in the argument names of its schema."""
    fn = getattr(torch.ops.aten, op)
    if op == "_scaled_dot_product_flash_attention":
        return fn(q, k, v, scale=0.3)
    if op == "_scaled_dot_product_flash_attention_for_cpu":
        return fn(q, k, v, attn_mask=mask, scale=0.3)
    if op == "_scaled_dot_product_fused_attention_overrideable":
        return fn(q, k, v, mask, scale=0.3)
    return fn(q, k, v, mask, True, scale=0.3)  # efficient, cudnn: attn_bias, compute_log_sumexp


@pytest.mark.parametrize("op", FUSED_SDPA_OPS)
def test_every_fused_op_is_found_with_its_q_k_v_scale_and_mask(op):
    """Captured without running (most of these kernels have no CPU implementation; their fake ones do)."""
    graphs: list[fx.GraphModule] = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return lambda *args: (args[0],)

    q, k, v = (torch.randn(1, 2, 8, 4) for _ in range(3))
    torch._dynamo.reset()
    torch.compile(lambda q, k, v, m: _arguments(op, q, k, v, m)[0], backend=capture, fullgraph=True)(
        q, k, v, torch.zeros(8, 8))
    (site,) = find_attention(graphs[0].graph)
    assert (site.form, site.op) == ("fused", f"aten.{op}")
    assert (site.query.name, site.key.name, site.value.name) == ("l_q_", "l_k_", "l_v_")
    assert site.scale == pytest.approx(0.3)
    assert (site.attn_mask.name if site.attn_mask is not None else None) == (
        None if op == "_scaled_dot_product_flash_attention" else "l_m_")
    schema = getattr(torch.ops.aten, op).default._schema
    assert schema.returns[0].name == "output" and schema.returns[1].name in ("logsumexp", "log_sumexp")
