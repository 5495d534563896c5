"""`t4dopt.enable` on tiny diffusers pipelines (WanPipeline, CogVideoXPipeline), end to end, offline.

Every part of each pipeline is built here from a small random config: a word-level tokenizer
over a local vocabulary (transformers' ``PreTrainedTokenizerFast`` on a ``tokenizers`` model),
a one-layer (U)T5 encoder, a tiny VAE, the transformer and the scheduler. The layout is passed
as a hint (frames and tokens per frame from the latent grid, text tokens before the video for
CogVideoX) until layout inference lands.

With sparse attention and the cache at threshold 0, the pipeline's video equals the same
pipeline run eagerly with its joint attention masked by the policy's explicit boolean mask
(plain SDPA, independent of t4dopt's op). With the cache reusing work, each pipeline call is
one generation whose guidance branches are the pipeline's ``cache_context`` names: two calls
with one seed give the same video, and so does a fresh compile.
"""

import contextlib
import warnings

import pytest

pytest.importorskip("diffusers")

import torch
import torch.nn.functional as F
from diffusers import (AutoencoderKLCogVideoX, AutoencoderKLWan, CogVideoXDDIMScheduler, CogVideoXPipeline,
                       CogVideoXTransformer3DModel, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel)
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

import t4dopt
from t4dopt import masks
from t4dopt.cache import generations as cache_generations
from t4dopt.report import collecting

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

WORDS = "<pad> </s> <unk> a cat dog walks runs on the beach in snow red blue video of".split()
TEXT_TOKENS, BLOCK_SIZE = 8, 4
CALL = {"prompt": "a red cat walks on the beach", "negative_prompt": "snow", "num_frames": 17, "height": 64,
        "width": 64, "num_inference_steps": 4, "guidance_scale": 4.0, "max_sequence_length": TEXT_TOKENS,
        "output_type": "pt"}
# 17 frames -> 5 latent frames (temporal compression 4); 64 px -> 8 latent -> 4 x 4 patches of 2.
GRID = {"frames": 5, "tokens_per_frame": 16}
SPARSE = {"policy": "sculpt4d", "block_size": BLOCK_SIZE}


def tokenizer():
    words = Tokenizer(models.WordLevel({word: index for index, word in enumerate(WORDS)}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def wan_pipeline():
    torch.manual_seed(0)
    encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(WORDS), d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                          num_heads=2, relative_attention_num_buckets=8)).eval()
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4).eval()
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32).eval()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return WanPipeline(tokenizer=tokenizer(), text_encoder=encoder, vae=vae, scheduler=scheduler,
                       transformer=transformer), dict(GRID)


def cogvideox_pipeline():
    torch.manual_seed(0)
    encoder = T5EncoderModel(T5Config(vocab_size=len(WORDS), d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                      num_heads=2, relative_attention_num_buckets=8)).eval()
    vae = AutoencoderKLCogVideoX(block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1,
                                 norm_num_groups=2, temporal_compression_ratio=4, sample_height=64,
                                 sample_width=64).eval()
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=16, num_layers=2, sample_width=8, sample_height=8, sample_frames=17, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=TEXT_TOKENS).eval()
    scheduler = CogVideoXDDIMScheduler(clip_sample=False, prediction_type="v_prediction", timestep_spacing="trailing")
    return CogVideoXPipeline(tokenizer=tokenizer(), text_encoder=encoder, vae=vae, transformer=transformer,
                             scheduler=scheduler), {**GRID, "prefix_tokens": TEXT_TOKENS}


PIPELINES = {"wan": wan_pipeline, "cogvideox": cogvideox_pipeline}


def video(pipe, seed=0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return pipe(**CALL, generator=torch.Generator().manual_seed(seed)).frames


@contextlib.contextmanager
def masked_joint_sdpa(joint_len, token_mask):
    """Eager SDPA with `token_mask` on every self-attention over `joint_len` tokens (the joint ones)."""
    original = F.scaled_dot_product_attention
    calls = []

    def sdpa(query, key, value, attn_mask=None, *args, **kwargs):
        if query.shape[-2] == joint_len and key.shape[-2] == joint_len:
            assert attn_mask is None
            attn_mask = token_mask
            calls.append(query.shape)
        return original(query, key, value, attn_mask, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)
        yield calls


@pytest.mark.parametrize("name", list(PIPELINES))
def test_pipeline_with_sparse_and_cache_at_threshold_zero_equals_the_explicit_mask(name):
    pipe, layout = PIPELINES[name]()
    policy = masks.build("sculpt4d", layout["frames"], layout["tokens_per_frame"],
                         prefix_tokens=layout.get("prefix_tokens", 0), block_size=BLOCK_SIZE)
    assert policy.density < 0.9
    dense = video(pipe)
    with masked_joint_sdpa(policy.seq_len, policy.token_mask()) as calls:
        expected = video(pipe)
    # Two joint attentions a call; Wan calls twice a step (guidance), CogVideoX once on a batch of two.
    assert len(calls) == {"wan": 4, "cogvideox": 2}[name] * CALL["num_inference_steps"]
    t4dopt.enable(pipe, sparse=SPARSE, cache={"threshold": 0.0}, layout=layout, target="eager")
    with warnings.catch_warnings(record=True), collecting() as report:
        warnings.simplefilter("always")
        got = video(pipe)
    assert [site.action for site in report.sites].count("sparse") == 2
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert (got - dense).abs().max() > 1e-3 * dense.abs().max(), "the mask must change the video"


def transformer_inputs(pipe, name):
    """One call's inputs for explaining the transformer (shapes as the pipeline passes them)."""
    generator = torch.Generator().manual_seed(0)
    text = torch.randn(1, TEXT_TOKENS, 16, generator=generator)
    if name == "wan":
        return {"hidden_states": torch.randn(1, 4, 5, 8, 8, generator=generator), "timestep": torch.tensor([500]),
                "encoder_hidden_states": text}
    return {"hidden_states": torch.randn(1, 5, 4, 8, 8, generator=generator), "timestep": torch.tensor([500]),
            "encoder_hidden_states": text}


CACHE = {"threshold": 0.5, "warmup": 1, "max_reuse": 3}


def test_each_wan_pipeline_call_is_a_generation_whose_branches_are_its_cache_contexts(monkeypatch):
    pipe, layout = wan_pipeline()
    t4dopt.enable(pipe, sparse=SPARSE, cache=CACHE, layout=layout, target="eager")
    names = []
    branch = cache_generations.scope.active_branch
    monkeypatch.setattr(cache_generations.scope, "active_branch",
                        lambda *args: names.append(branch(*args)) or names[-1])
    first = video(pipe)
    assert set(names) == {"cond", "uncond"} and len(names) == 2 * CALL["num_inference_steps"]
    report = t4dopt.cache_report(pipe.transformer)
    assert sum(u.reused for u in report.units) > 0
    assert report.held_bytes == 0, "the pipeline call's generation is freed when it returns"
    assert torch.equal(video(pipe), first)
    other_seed = video(pipe, seed=1)
    assert not torch.equal(other_seed, first)

    torch._dynamo.reset()
    fresh, _ = wan_pipeline()
    t4dopt.enable(fresh, sparse=SPARSE, cache=CACHE, layout=layout, target="eager")
    assert torch.equal(video(fresh, seed=1), other_seed)


def test_cogvideox_pipeline_caches_its_two_stream_blocks():
    pipe, layout = cogvideox_pipeline()
    expected = video(pipe)
    t4dopt.enable(pipe, cache=CACHE, layout=layout, target="eager")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "turbo4d cache: graph left uncached", t4dopt.T4DWarning)
        got = video(pipe)
    units = t4dopt.cache_report(pipe.transformer).units
    assert units and sum(u.reused + u.bypassed for u in units) > 0  # it reuses work now ...
    assert (got - expected).abs().mean() < 0.01  # ... near full compute (random weights; threshold 0 is exact: above)


def test_enable_checks_options_first():
    pipe, layout = wan_pipeline()
    with pytest.raises(t4dopt.T4DOptionError, match="threshold"):
        t4dopt.enable(pipe, cache={"threshold": -1.0})
    with pytest.raises(t4dopt.T4DOptionError, match="bogus"):
        t4dopt.enable(pipe, bogus=1)
    with pytest.raises(TypeError, match="no transformer"):
        t4dopt.enable(object(), cache={})


def test_enable_on_a_transformer_follows_cache_context_in_a_loop_of_ones_own():
    """A hand-written guidance loop naming its branches with cache_context, inside one generation scope."""
    pipe, layout = wan_pipeline()
    transformer = t4dopt.enable(pipe.transformer, cache=CACHE, layout=layout, target="eager")
    inputs = transformer_inputs(pipe, "wan")
    x, text = inputs["hidden_states"], inputs["encoder_hidden_states"]

    def run():
        state = x
        with torch.no_grad(), t4dopt.generation(transformer):
            for t in (999, 750, 500, 250):
                with transformer.cache_context("cond"):
                    c = transformer(hidden_states=state, timestep=torch.tensor([t]), encoder_hidden_states=text).sample
                with transformer.cache_context("uncond"):
                    u = transformer(hidden_states=state, timestep=torch.tensor([t]),
                                    encoder_hidden_states=text + 0.1 * t / 1000).sample
                state = state - 0.25 * (u + 4 * (c - u))
        return state

    first = run()
    assert sum(u.reused for u in t4dopt.cache_report(transformer).units) > 0
    assert torch.equal(run(), first)
