"""The turbo4d passes on tiny random diffusers video transformers: CogVideoX, Latte, Wan.

Each model's attention is found inside its transformer blocks and read against the token grid
derived from the model's own config (patch sizes, temporal compression, text length); joint
spatio-temporal attention is rewritten, and the rewritten model is checked against the same
model run eagerly with its joint attention computed by plain SDPA under the explicit boolean
token mask of the policy (independent of t4dopt's op).
"""

import contextlib
import warnings

import pytest

pytest.importorskip("diffusers")

import torch
import torch.nn.functional as F
from diffusers import CogVideoXTransformer3DModel, LatteTransformer3DModel, WanTransformer3DModel

import t4dopt
from t4dopt import masks

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

BLOCK_SIZE = 16
SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


# --- tiny models and their token grids, derived from config and input shapes -------------------


def cogvideox():
    """CogVideoX 1.0 (patch_size_t=None): latent input [B, F, C, H, W], text tokens before the video tokens."""
    torch.manual_seed(0)
    latent_frames = 5
    model = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=8, num_layers=2, sample_width=16, sample_height=16,
        sample_frames=(latent_frames - 1) * 4 + 1, patch_size=2, temporal_compression_ratio=4,
        max_text_seq_length=6,
    ).eval()
    cfg = model.config
    assert cfg.patch_size_t is None, "CogVideoX 1.0 patching: no temporal patching in the transformer"
    frames = (cfg.sample_frames - 1) // cfg.temporal_compression_ratio + 1
    inputs = {
        "hidden_states": torch.randn(1, frames, cfg.in_channels, cfg.sample_height, cfg.sample_width),
        "encoder_hidden_states": torch.randn(1, cfg.max_text_seq_length, cfg.text_embed_dim),
        "timestep": torch.tensor([500]),
    }
    b, f, c, h, w = inputs["hidden_states"].shape
    assert f == frames == latent_frames
    layout = {"frames": f, "tokens_per_frame": (h // cfg.patch_size) * (w // cfg.patch_size),
              "prefix_tokens": inputs["encoder_hidden_states"].shape[1]}
    return model, inputs, layout


def wan():
    """Wan: input [B, C, F, H, W], patch_size (t, h, w); joint self-attention, then cross-attention to text."""
    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(2, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    ).eval()
    inputs = {
        "hidden_states": torch.randn(1, 4, 10, 16, 16),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, 7, 16),
    }
    pt, ph, pw = model.config.patch_size
    b, c, f, h, w = inputs["hidden_states"].shape
    layout = {"frames": f // pt, "tokens_per_frame": (h // ph) * (w // pw), "prefix_tokens": 0}
    assert layout["frames"] == 5 and layout["tokens_per_frame"] == 64
    return model, inputs, layout


def latte(frames=3):
    """Latte: input [B, C, F, H, W]; spatial blocks (with cross-attention) alternate with temporal blocks."""
    torch.manual_seed(0)
    model = LatteTransformer3DModel(
        sample_size=8, num_layers=1, patch_size=2, attention_head_dim=4, num_attention_heads=2,
        caption_channels=8, in_channels=4, cross_attention_dim=8, out_channels=8, attention_bias=True,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6, video_length=frames,
    ).eval()
    inputs = {
        "hidden_states": torch.randn(1, 4, frames, 8, 8),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, 5, 8),
    }
    p = model.config.patch_size
    b, c, f, h, w = inputs["hidden_states"].shape
    return model, inputs, {"frames": f, "tokens_per_frame": (h // p) * (w // p)}


def _joint_len(layout):
    return layout.get("prefix_tokens", 0) + layout["frames"] * layout["tokens_per_frame"]


def _policy(layout):
    return masks.build("sculpt4d", layout["frames"], layout["tokens_per_frame"],
                       prefix_tokens=layout.get("prefix_tokens", 0), block_size=BLOCK_SIZE)


def _explain(model, inputs, layout):
    options = {"sparse": {"policy": "sculpt4d", "block_size": BLOCK_SIZE}}
    if layout is not None:
        options["layout"] = layout
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = t4dopt.explain(model, **inputs, options=options)
    return report, [w for w in caught if issubclass(w.category, t4dopt.T4DWarning)]


def _kinds(report):
    return [(s.kind, s.action) for s in report.sites]


def _relative(a, b):
    return float((a - b).abs().max() / b.abs().max())


# --- detection and layout --------------------------------------------------------------------


def test_cogvideox_joint_text_video_attention_is_spatiotemporal_with_text_prefix():
    model, inputs, layout = cogvideox()
    assert layout == {"frames": 5, "tokens_per_frame": 64, "prefix_tokens": 6}
    report, warned = _explain(model, inputs, layout)
    assert _kinds(report) == [("spatiotemporal", "sparse")] * 2, report.table()
    assert not warned
    density = _policy(layout).density
    assert density < 0.9
    for layer, site in enumerate(report.sites):
        assert site.module == f"transformer_blocks.{layer}.attn1"
        assert site.shape == (1, 2, _joint_len(layout), 8)
        assert site.density == pytest.approx(density) and site.density < 1
        # The token order was checked against the graph: text concatenated in front, then frame-major.
        assert "6 prefix + 5 frames x 64 tokens" in site.evidence and "Conv2d patch embedding" in site.evidence
    assert 0 < report.flops_saved < 1


def test_cogvideox_without_layout_reads_the_grid_from_its_patch_embedding():
    # The per-frame Conv2d patch embedding folds the 5 frames into its batch and cuts 8 x 8 patches.
    model, inputs, layout = cogvideox()
    report, warned = _explain(model, inputs, None)
    assert _kinds(report) == [("spatiotemporal", "sparse")] * 2 and not warned
    assert all("6 prefix + 5 frames x 64 tokens" in s.evidence for s in report.sites)
    assert report.sites[0].density == pytest.approx(_policy(layout).density)


def test_cogvideox_layout_that_contradicts_the_graph_is_not_trusted():
    model, inputs, layout = cogvideox()
    # 6 + 10 x 32 = 326 tokens as well, but the graph builds the sequence as 5 frames x 64 tokens.
    wrong = {**layout, "frames": 10, "tokens_per_frame": 32}
    report, warned = _explain(model, inputs, wrong)
    assert _kinds(report) == [("unknown", "dense")] * 2
    assert "the graph shows 5 frames x 64 tokens" in report.sites[0].evidence
    assert len(warned) == 2
    # Text placed elsewhere than the graph says (no prefix, 326 = 2 x 163) is not trusted either.
    report, _ = _explain(model, inputs, {"frames": 2, "tokens_per_frame": 163, "prefix_tokens": 0})
    assert [s.kind for s in report.sites] == ["unknown"] * 2


def test_latte_spatial_and_temporal_blocks_stay_dense():
    model, inputs, layout = latte()
    assert layout == {"frames": 3, "tokens_per_frame": 16}
    report, warned = _explain(model, inputs, layout)
    assert _kinds(report) == [("spatial", "dense"), ("cross", "dense"), ("temporal", "dense")], report.table()
    assert [s.module for s in report.sites] == [
        "transformer_blocks.0.attn1", "transformer_blocks.0.attn2", "temporal_transformer_blocks.0.attn1"]
    assert [s.shape[-2] for s in report.sites] == [16, 16, 3]
    assert all(s.density == 1.0 for s in report.sites) and not warned
    # Without a layout the patch embedding (a per-image Conv2d) tells the patches of a frame from the frames.
    report, warned = _explain(model, inputs, None)
    assert _kinds(report) == [("spatial", "dense"), ("cross", "dense"), ("temporal", "dense")]
    assert not warned


def test_latte_patch_grid_is_not_mistaken_for_frames_x_tokens():
    # 4 frames of 4 x 4 patches: the spatial sequence is a merge of two axes (4 x 4) and the
    # temporal site attends over 4 tokens; that must not be read as 4 frames x 4 tokens.
    model, inputs, layout = latte(frames=4)
    assert layout == {"frames": 4, "tokens_per_frame": 16}
    report, _ = _explain(model, inputs, None)
    assert all(s.kind != "spatiotemporal" and s.action == "dense" for s in report.sites), report.table()


def test_wan_joint_self_attention_and_cross_attention_to_text():
    model, inputs, layout = wan()
    report, warned = _explain(model, inputs, {"frames": layout["frames"], "tokens_per_frame": layout["tokens_per_frame"]})
    assert _kinds(report) == [("spatiotemporal", "sparse"), ("cross", "dense")] * 2, report.table()
    assert [s.module for s in report.sites] == ["blocks.0.attn1", "blocks.0.attn2", "blocks.1.attn1", "blocks.1.attn2"]
    assert not warned
    joint = report.sites[0]
    assert joint.shape[-2] == _joint_len(layout) == 320
    assert joint.density == pytest.approx(_policy(layout).density) and joint.density < 0.9
    # The 5 x (8 x 8) patches of the Conv3d patch embedding are followed through Wan's rotary embedding.
    assert "Conv3d patch embedding" in joint.evidence
    assert report.sites[1].shape[-2] == 320 and "attend 7 keys" in report.sites[1].evidence

    # Without a layout: the Conv3d's depth is time, so the same grid is read from the graph.
    report, warned = _explain(model, inputs, None)
    assert _kinds(report) == [("spatiotemporal", "sparse"), ("cross", "dense")] * 2
    assert not warned

    # Position-major reading (10 x 32) of the same 320 tokens contradicts the graph's 5 x 8 x 8.
    report, _ = _explain(model, inputs, {"frames": 10, "tokens_per_frame": 32})
    assert [s.kind for s in report.sites] == ["unknown", "cross"] * 2


# --- rewrite correctness -----------------------------------------------------------------------


@contextlib.contextmanager
def masked_joint_sdpa(joint_len, token_mask):
    """Eager SDPA with `token_mask` added to every self-attention over `joint_len` tokens."""
    original = F.scaled_dot_product_attention
    calls = []

    def sdpa(*args, **kwargs):
        bound = dict(zip(SDPA_ARGS, args), **kwargs)
        q, k = bound["query"], bound["key"]
        if q.shape[-2] == joint_len and k.shape[-2] == q.shape[-2]:
            assert bound.get("attn_mask") is None and not bound.get("is_causal")
            bound["attn_mask"] = token_mask
            calls.append(q.shape)
        return original(**bound)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)
        yield calls


@pytest.mark.parametrize("make", [cogvideox, wan], ids=["cogvideox", "wan"])
def test_rewritten_model_equals_eager_model_with_explicit_token_mask(make):
    model, inputs, layout = make()
    policy = _policy(layout)
    assert policy.density < 0.9 and policy.seq_len == _joint_len(layout)
    compiled = torch.compile(model, backend="turbo4d", options={
        "layout": layout, "sparse": {"policy": "sculpt4d", "block_size": BLOCK_SIZE}, "target": "eager"})
    with torch.no_grad():
        got = compiled(**inputs).sample
        with masked_joint_sdpa(_joint_len(layout), policy.token_mask()) as calls:
            want = model(**inputs).sample
        dense = model(**inputs).sample
    assert len(calls) == 2, "the reference must mask both joint attentions"
    assert _relative(got, want) < 1e-4
    assert _relative(got, dense) > 1e-3, "the mask must change the output, or this test proves nothing"


@pytest.mark.parametrize("make", [cogvideox, wan], ids=["cogvideox", "wan"])
def test_sparse_none_is_a_passthrough(make):
    model, inputs, layout = make()
    compiled = torch.compile(model, backend="turbo4d", options={"layout": layout, "sparse": None, "target": "eager"})
    with warnings.catch_warnings():
        warnings.simplefilter("error", t4dopt.T4DWarning)
        with torch.no_grad():
            got = compiled(**inputs).sample
    with torch.no_grad():
        want = model(**inputs).sample
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
