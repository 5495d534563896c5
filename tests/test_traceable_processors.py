"""`t4dopt.make_traceable`: diffusers' Mochi attention processor swapped for a graph-break-free equivalent.

The processor is checked in float64 against diffusers' own ``MochiAttnProcessor2_0`` (run eagerly, as
diffusers ships it) for any text mask: batch elements with different masks, masks that are not a prefix
(Mochi compacts the valid text outputs to the front), no valid text, all valid. The whole tiny Mochi with
padded text, made sparse through `t4dopt.enable`, is checked against the model as diffusers builds it, run
eagerly with the policy's explicit boolean mask over the sequence its own attention sees (video + the valid
text; text tokens are global in the mask).
"""

import copy
import warnings

import pytest

pytest.importorskip("diffusers")

import torch
import torch.nn.functional as F
from diffusers.models import attention_processor as diffusers_processors
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

import diffusers_coverage as coverage
import diffusers_models as dm
import t4dopt
from diffusers_coverage import POLICY
from t4dopt.report import collecting
from t4dopt.traceable_processors import TraceableMochiAttnProcessor

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

VIDEO, WIDTH, TEXT_WIDTH, HEADS, HEAD_DIM = 10, 32, 8, 2, 16


DIFFUSERS = diffusers_processors.MochiAttnProcessor2_0


def _attention(context_pre_only: bool = False, processor=None) -> diffusers_processors.MochiAttention:
    torch.manual_seed(0)
    return diffusers_processors.MochiAttention(query_dim=WIDTH, heads=HEADS, dim_head=HEAD_DIM, added_kv_proj_dim=TEXT_WIDTH,
                          added_proj_bias=False, out_dim=WIDTH, out_context_dim=TEXT_WIDTH,
                          context_pre_only=context_pre_only, processor=processor or DIFFUSERS()).eval()


ATTENTIONS = {pre: _attention(pre).double() for pre in (False, True)}
"""A block's attention, and the last block's (``context_pre_only``: no text output projection)."""


def _inputs(mask: torch.Tensor, seed: int, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    batch, text = mask.shape
    angles = torch.randn(VIDEO, HEADS, HEAD_DIM // 2, generator=generator)
    return (torch.randn(batch, VIDEO, WIDTH, generator=generator, dtype=dtype),
            torch.randn(batch, text, TEXT_WIDTH, generator=generator, dtype=dtype), mask, (angles.cos(), angles.sin()))


masks = st.tuples(st.integers(1, 3), st.integers(1, 6)).flatmap(
    lambda size: st.lists(st.lists(st.sampled_from([0, 1, 1, 3]), min_size=size[1], max_size=size[1]),
                          min_size=size[0], max_size=size[0]))


@settings(max_examples=60, deadline=None, derandomize=True, database=None)  # the same cases on every run
@given(mask=masks, dtype=st.sampled_from([torch.int64, torch.bool, torch.float32]), context_pre_only=st.booleans(),
       rotary=st.booleans(), seed=st.integers(0, 2 ** 16))
@example(mask=[[1, 0, 1, 1]], dtype=torch.int64, context_pre_only=False, rotary=True, seed=0)  # not a prefix
@example(mask=[[1, 1, 1, 1, 0, 0], [1, 0, 1, 1, 0, 1], [0, 0, 0, 0, 0, 0]], dtype=torch.int64, context_pre_only=False,
         rotary=True, seed=1)  # a prefix, holes, no valid text
@example(mask=[[1, 1, 1], [1, 1, 1]], dtype=torch.bool, context_pre_only=True, rotary=False, seed=2)  # all valid
def test_the_traceable_processor_equals_diffusers_for_any_text_mask(mask, dtype, context_pre_only, rotary, seed):
    attention = ATTENTIONS[context_pre_only]
    hidden, text, mask, angles = _inputs(torch.tensor(mask).to(dtype), seed)
    angles = angles if rotary else None
    with torch.no_grad():
        want = DIFFUSERS()(attention, hidden, text, mask, angles)
        got = TraceableMochiAttnProcessor()(attention, hidden, text, mask, angles)
    assert len(got) == len(want) == 2
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)


class _Subclassed(DIFFUSERS):
    pass


class MochiAttnProcessor2_0:
    """A user's processor with diffusers' name, in another file: neither replaced nor taken for diffusers' own in
    the graph-break report. It keeps the first element's valid text keys with ``torch.nonzero``."""

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb=None):
        kept = torch.nonzero(attention_mask[0]).flatten()
        text = encoder_hidden_states[:, kept]

        def heads(x):
            return x.unflatten(2, (attn.heads, -1)).transpose(1, 2)

        key = heads(torch.cat([attn.to_k(hidden_states), attn.add_k_proj(text)], 1))
        value = heads(torch.cat([attn.to_v(hidden_states), attn.add_v_proj(text)], 1))
        out = F.scaled_dot_product_attention(heads(attn.to_q(hidden_states)), key, value)
        return attn.to_out[0](out.transpose(1, 2).flatten(2)), encoder_hidden_states


class _Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.known = _attention(processor=DIFFUSERS())
        self.subclassed = _attention(processor=_Subclassed())
        self.user_attn = _attention(processor=MochiAttnProcessor2_0())
        self.other = diffusers_processors.Attention(query_dim=WIDTH, heads=HEADS, dim_head=HEAD_DIM,
                                                    processor=diffusers_processors.AttnProcessor2_0())
        self.proj = nn.Linear(WIDTH, WIDTH)

    def forward(self, hidden, text, mask):
        return self.user_attn(self.proj(hidden), text, mask)


def test_make_traceable_replaces_only_diffusers_own_processor_and_names_what_it_left():
    holder = _Holder()
    kept = {name: getattr(holder, name).processor for name in ("subclassed", "user_attn", "other")}
    with pytest.warns(t4dopt.T4DWarning, match="left 2 attention processor") as caught:
        assert t4dopt.make_traceable(torch.compile(holder)) == ["known"]  # the model under a compile wrapper too
    (message,) = [str(w.message) for w in caught if issubclass(w.category, t4dopt.T4DWarning)]
    assert "subclassed (_Subclassed)" in message and "user_attn (MochiAttnProcessor2_0)" in message
    assert "other (" not in message
    assert type(holder.known.processor) is TraceableMochiAttnProcessor
    assert all(getattr(holder, name).processor is processor for name, processor in kept.items())
    swapped = holder.known.processor
    with pytest.warns(t4dopt.T4DWarning):
        assert t4dopt.make_traceable(holder) == []  # again: nothing changes
    assert holder.known.processor is swapped


def test_a_break_in_a_processor_it_does_not_know_keeps_dynamos_hint():
    holder = _Holder()
    hidden, text, mask, _ = _inputs(torch.tensor([[1, 0, 1, 1]]), seed=0, dtype=torch.float32)
    with pytest.warns(t4dopt.T4DWarning, match="not in the compiled graph"):
        report = t4dopt.explain(holder, hidden, text, mask, options={"sparse": POLICY})
    (hidden_site,) = [s for s in report.sites if s.evidence == "graph break"]
    assert "test_traceable_processors.py:" in hidden_site.reason and "nonzero" in hidden_site.reason
    assert "capture_dynamic_output_shape_ops" in hidden_site.reason and "make_traceable" not in hidden_site.reason


def _relative(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_mochi_with_padded_text_is_sparse_through_enable_and_equals_its_own_processor_under_the_explicit_mask():
    tiny = dm.mochi(batch=2)
    padding = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 0, 1, 1, 0, 1]])  # 4 of 6 valid: a prefix, and holes
    inputs = {**tiny.inputs, "encoder_attention_mask": padding}
    model = copy.deepcopy(tiny.model)
    with collecting() as report, warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        assert t4dopt.enable(model, sparse=POLICY, target="eager") is model
        got = model(**inputs, return_dict=False)[0]
    assert not [w for w in caught if issubclass(w.category, t4dopt.T4DWarning)]
    joint = [s for s in report.sites if s.kind == "spatiotemporal"]
    assert [s.name for s in joint] == ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]
    assert all(s.action == "sparse" and "key mask" in s.reason for s in joint), report.table()

    # The reference is Mochi as diffusers builds it (enable changed the copy), whose own attention sees video +
    # the valid text of each element: the policy's mask over those tokens.
    assert [type(b.attn1.processor) for b in tiny.model.transformer_blocks] == [DIFFUSERS] * 2
    full = coverage.token_mask(tiny)
    video = tiny.length - dm.TEXT
    seen = [torch.cat([torch.ones(video, dtype=torch.bool), row.bool()]) for row in padding]
    masks = [full[keep][:, keep] for keep in seen]
    assert torch.equal(masks[0], masks[1])  # text tokens are global: which ones are valid does not matter
    with torch.no_grad(), coverage.masked_joint_sdpa(video + 4, masks[0]) as calls:
        want = tiny.model(**inputs, return_dict=False)[0]
    assert len(calls) == 2 * 2, "every joint attention of both batch elements must be masked"
    assert _relative(got, want) < 1e-4
    with torch.no_grad(), coverage.masked_joint_sdpa(tiny.length, full):
        unpadded = tiny.model(**tiny.inputs, return_dict=False)[0]
    assert _relative(unpadded, want) > 1e-3, "the padding must change the output, or this test proves nothing"
    assert _relative(got[0], got[1]) > 1e-3, "the two elements' masks must matter"

    # Other holes, 4 valid again: the same graph (no shape depends on the mask), as exact.
    padding = torch.tensor([[0, 1, 1, 0, 1, 1], [1, 1, 0, 1, 1, 0]])
    inputs = {**tiny.inputs, "encoder_attention_mask": padding}
    with collecting() as again, torch.no_grad():
        got = model(**inputs, return_dict=False)[0]
    assert again.graphs == 0, "a new mask must not compile again"
    with torch.no_grad(), coverage.masked_joint_sdpa(video + 4, masks[0]):
        want = tiny.model(**inputs, return_dict=False)[0]
    assert _relative(got, want) < 1e-4
