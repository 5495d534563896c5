"""Tiny random configs of diffusers' video transformers, their inputs, and the token grid each one has.

Every maker returns a `TinyModel`: the model (eval, seeded), its forward inputs, and `grid`: the joint
self-attention's sequence as the model builds it (prefix tokens, frames x tokens per frame, suffix
tokens), derived here from the config and the input shapes (patch sizes, text length): what the
backend must find on its own. `hint` is the layout option a model needs because its graph cannot show
the grid (LTX-Video gets latents already packed); None for the others. `traceable` marks a model compiled
after `t4dopt.make_traceable` (Mochi: its processor breaks the graph inside the attention). Nothing is
downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class TinyModel:
    name: str
    model: torch.nn.Module
    inputs: dict[str, Any]
    grid: dict[str, int] | None
    """frames, tokens_per_frame, prefix_tokens, suffix_tokens of the joint self-attention (None: no joint)."""
    joint_sites: int = 0
    """How many joint self-attentions over the whole video the model has."""
    graph_sites: int | None = None
    """How many of them the compiled graphs hold, when fewer: dynamo compiles one graph for a block class and runs
    it for every block of the model (HunyuanVideo 1.5, whose blocks compile apart after its graph break)."""
    hint: dict[str, int] | None = None
    key_padding: torch.Tensor | None = None
    """bool [B, N]: keys the model masks out of the joint attention (text padding), None when it masks none."""
    cache_units: int = 0
    """How many residual sublayers the cache must make units of: sublayers per block times blocks, in graphs that
    are whole denoisers (a model whose graph breaks has none)."""
    traceable: bool = False
    """Compiled after `t4dopt.make_traceable` (on a copy: the references run the model as diffusers builds it)."""

    @property
    def length(self) -> int:
        g = self.grid
        return g["prefix_tokens"] + g["frames"] * g["tokens_per_frame"] + g["suffix_tokens"]


def _grid(frames: int, tokens: int, prefix: int = 0, suffix: int = 0) -> dict[str, int]:
    return {"frames": frames, "tokens_per_frame": tokens, "prefix_tokens": prefix, "suffix_tokens": suffix}


def _seeded(cls, **config):
    torch.manual_seed(0)
    return cls(**config).eval()


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


T = torch.tensor([500])
TEXT = 6


def cogvideox() -> TinyModel:
    """CogVideoX 1.0: [B, F, C, H, W], a per-frame Conv2d patch embedding, text in front."""
    from diffusers import CogVideoXTransformer3DModel

    model = _seeded(CogVideoXTransformer3DModel, num_attention_heads=2, attention_head_dim=8, in_channels=4,
                    out_channels=4, time_embed_dim=8, text_embed_dim=8, num_layers=2, sample_width=16,
                    sample_height=16, sample_frames=17, patch_size=2, temporal_compression_ratio=4,
                    max_text_seq_length=TEXT)
    inputs = {"hidden_states": _randn(1, 5, 4, 16, 16), "encoder_hidden_states": _randn(1, TEXT, 8, seed=1),
              "timestep": T}
    return TinyModel("CogVideoX 1.0", model, inputs, _grid(5, 64, prefix=TEXT), 2, cache_units=2 * 2)


def cogvideox_15() -> TinyModel:
    """CogVideoX 1.5: patch_size_t=2, a reshape + linear patch embedding of the 5-D latent (10 frames -> 5)."""
    from diffusers import CogVideoXTransformer3DModel

    model = _seeded(CogVideoXTransformer3DModel, num_attention_heads=2, attention_head_dim=8, in_channels=4,
                    out_channels=4, time_embed_dim=8, text_embed_dim=8, num_layers=2, sample_width=12,
                    sample_height=16, sample_frames=37, patch_size=2, patch_size_t=2, temporal_compression_ratio=4,
                    max_text_seq_length=TEXT, use_rotary_positional_embeddings=True,
                    use_learned_positional_embeddings=False)
    inputs = {"hidden_states": _randn(1, 10, 4, 16, 12), "encoder_hidden_states": _randn(1, TEXT, 8, seed=1),
              "timestep": T}
    return TinyModel("CogVideoX 1.5", model, inputs, _grid(5, 8 * 6, prefix=TEXT), 2, cache_units=2 * 2)


def _wan_config(**extra):
    return dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
                text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", rope_max_seq_len=32, **extra)


def _wan_inputs(frames=5):
    return {"hidden_states": _randn(1, 4, frames, 16, 12), "timestep": T, "encoder_hidden_states": _randn(1, 7, 16, seed=1)}


def wan21() -> TinyModel:
    """Wan 2.1: [B, C, F, H, W], a Conv3d patch embedding; self-attention, then cross-attention to text."""
    from diffusers import WanTransformer3DModel

    return TinyModel("Wan 2.1", _seeded(WanTransformer3DModel, **_wan_config()), _wan_inputs(), _grid(5, 48), 2,
                     cache_units=3 * 2)


def wan22() -> TinyModel:
    """Wan 2.2 (TI2V): one timestep per token ([B, F * P]), a Conv3d patch embedding."""
    from diffusers import WanTransformer3DModel

    inputs = _wan_inputs()
    inputs["timestep"] = torch.full((1, 5 * 48), 500)
    inputs["timestep"][:, :48] = 0  # the first frame is the clean conditioning frame
    return TinyModel("Wan 2.2", _seeded(WanTransformer3DModel, **_wan_config()), inputs, _grid(5, 48), 2,
                     cache_units=3 * 2)


def wan_vace() -> TinyModel:
    """WanVACE: control blocks read the control video, padded with a zero-length concatenation."""
    from diffusers import WanVACETransformer3DModel

    model = _seeded(WanVACETransformer3DModel, **_wan_config(vace_layers=[0, 1], vace_in_channels=8))
    inputs = _wan_inputs()
    inputs["control_hidden_states"] = _randn(1, 8, 5, 16, 12, seed=2)
    inputs["control_hidden_states_scale"] = torch.ones(2)
    # The main blocks add the control blocks' hints, made from the stream beside them: no region of theirs is
    # single-entry, so only the control block's sublayers are units.
    return TinyModel("WanVACE", model, inputs, _grid(5, 48), 4, cache_units=3)


def skyreels_v2() -> TinyModel:
    """SkyReels-V2: Wan's layout (Conv3d), text by cross-attention."""
    from diffusers import SkyReelsV2Transformer3DModel

    model = _seeded(SkyReelsV2Transformer3DModel, **_wan_config())
    return TinyModel("SkyReels-V2", model, _wan_inputs(), _grid(5, 48), 2, cache_units=3 * 2)


def skyreels_v2_df() -> TinyModel:
    """SkyReels-V2 with diffusion forcing: a block-causal mask over frames (2 per block), one timestep per frame."""
    from diffusers import SkyReelsV2Transformer3DModel

    model = _seeded(SkyReelsV2Transformer3DModel, **_wan_config(num_frame_per_block=2))
    inputs = _wan_inputs(frames=6)
    inputs["timestep"] = torch.tensor([[900, 900, 600, 600, 300, 300]])
    inputs["enable_diffusion_forcing"] = True
    return TinyModel("SkyReels-V2 (diffusion forcing)", model, inputs, _grid(6, 48), 2, cache_units=3 * 2)


def _hunyuan_inputs(valid_text: int):
    mask = torch.zeros(1, TEXT, dtype=torch.int64)
    mask[:, :valid_text] = 1
    return {"hidden_states": _randn(1, 4, 3, 16, 12), "timestep": T, "encoder_hidden_states": _randn(1, TEXT, 16, seed=1),
            "encoder_attention_mask": mask, "pooled_projections": _randn(1, 8, seed=2),
            "guidance": torch.tensor([3.0])}


def hunyuan_video(valid_text: int = TEXT) -> TinyModel:
    """HunyuanVideo: Conv3d patch embedding, [video, text] joint attention, a boolean key-padding mask on the text."""
    from diffusers import HunyuanVideoTransformer3DModel

    model = _seeded(HunyuanVideoTransformer3DModel, in_channels=4, out_channels=4, num_attention_heads=2,
                    attention_head_dim=16, num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=2,
                    patch_size_t=1, text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(4, 6, 6))
    inputs = _hunyuan_inputs(valid_text)
    grid = _grid(3, 48, suffix=TEXT)
    keep = torch.ones(1, 3 * 48 + TEXT, dtype=torch.bool)
    keep[:, 3 * 48 + valid_text:] = False
    name = "HunyuanVideo" + (" (text padding)" if valid_text < TEXT else "")
    return TinyModel(name, model, inputs, grid, 2, key_padding=keep if valid_text < TEXT else None, cache_units=2 + 1)


def hunyuan_video_padded() -> TinyModel:
    return hunyuan_video(valid_text=4)


def hunyuan_video_15(valid_text: int = TEXT) -> TinyModel:
    """HunyuanVideo 1.5: its graph breaks at `if is_t2v:` (a tensor condition), so its blocks compile as graphs of
    their own and get the video's token map from the graph holding the patch embedding (carried across the
    break); its attention masks padded text queries as well as keys (the image tokens of a t2v call are
    always padding)."""
    from diffusers import HunyuanVideo15Transformer3DModel

    model = _seeded(HunyuanVideo15Transformer3DModel, in_channels=4, out_channels=4, num_attention_heads=2,
                    attention_head_dim=16, num_layers=2, num_refiner_layers=1, patch_size=1, patch_size_t=1,
                    text_embed_dim=16, text_embed_2_dim=8, image_embed_dim=8, rope_axes_dim=(4, 6, 6),
                    task_type="t2v")
    keep = (torch.arange(TEXT) < valid_text).to(torch.int64)[None]
    inputs = {"hidden_states": _randn(1, 4, 3, 8, 6), "timestep": T.float(),
              "encoder_hidden_states": _randn(1, TEXT, 16, seed=1), "encoder_attention_mask": keep,
              "encoder_hidden_states_2": _randn(1, 3, 8, seed=2), "encoder_attention_mask_2": torch.ones(1, 3, dtype=torch.int64),
              "image_embeds": torch.zeros(1, 4, 8)}
    name = "HunyuanVideo 1.5" + (" (text padding)" if valid_text < TEXT else "")
    return TinyModel(name, model, inputs, _grid(3, 48, suffix=13), 2, graph_sites=1,
                     key_padding=keep.bool() if valid_text < TEXT else None)


def hunyuan_video_15_padded() -> TinyModel:
    return hunyuan_video_15(valid_text=4)


def motif_video() -> TinyModel:
    from diffusers import MotifVideoTransformer3DModel

    model = _seeded(MotifVideoTransformer3DModel, in_channels=4, out_channels=4, num_attention_heads=2,
                    attention_head_dim=16, num_layers=1, num_single_layers=1, patch_size=2, patch_size_t=1,
                    text_embed_dim=16, rope_axes_dim=(4, 6, 6))
    inputs = {"hidden_states": _randn(1, 4, 3, 16, 12), "timestep": T, "encoder_hidden_states": _randn(1, TEXT, 16, seed=1),
              "encoder_attention_mask": torch.ones(1, TEXT, dtype=torch.int64)}
    return TinyModel("MotifVideo", model, inputs, _grid(3, 48, suffix=TEXT), 2, cache_units=2 + 1)


def mochi(batch: int = 1) -> TinyModel:
    """Mochi: [video, text] joint attention over the valid text tokens (`torch.nonzero`: a graph break), so it is
    compiled after `t4dopt.make_traceable`. Two-stream blocks; the last one drops the text stream."""
    from diffusers import MochiTransformer3DModel

    model = _seeded(MochiTransformer3DModel, patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=2,
                    pooled_projection_dim=8, in_channels=4, text_embed_dim=16, time_embed_dim=8, max_sequence_length=TEXT)
    inputs = {"hidden_states": _randn(batch, 4, 3, 16, 12), "encoder_hidden_states": _randn(batch, TEXT, 16, seed=1),
              "timestep": T.expand(batch), "encoder_attention_mask": torch.ones(batch, TEXT, dtype=torch.int64)}
    # Block 0's attention and its two feed-forwards (streams packed), block 1's attention (the text stream ends
    # there) and feed-forward.
    return TinyModel("Mochi", model, inputs, _grid(3, 48, suffix=TEXT), 2, cache_units=4, traceable=True)


def ltx_video() -> TinyModel:
    """LTX-Video: latents packed by the pipeline ([B, F*H*W, C]); frames, height, width are forward arguments."""
    from diffusers import LTXVideoTransformer3DModel

    model = _seeded(LTXVideoTransformer3DModel, in_channels=8, out_channels=8, num_attention_heads=2,
                    attention_head_dim=8, cross_attention_dim=16, num_layers=2, caption_channels=16)
    inputs = {"hidden_states": _randn(1, 3 * 8 * 6, 8), "encoder_hidden_states": _randn(1, TEXT, 16, seed=1),
              "timestep": T, "encoder_attention_mask": torch.ones(1, TEXT, dtype=torch.int64),
              "num_frames": 3, "height": 8, "width": 6}
    return TinyModel("LTX-Video", model, inputs, _grid(3, 48), 2, hint={"frames": 3, "height": 8, "width": 6},
                     cache_units=3 * 2)


def allegro() -> TinyModel:
    from diffusers import AllegroTransformer3DModel

    model = _seeded(AllegroTransformer3DModel, patch_size=2, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
                    in_channels=4, out_channels=4, num_layers=2, cross_attention_dim=16, sample_height=16,
                    sample_width=12, sample_frames=3, caption_channels=16)
    inputs = {"hidden_states": _randn(1, 4, 3, 16, 12), "encoder_hidden_states": _randn(1, TEXT, 16, seed=1), "timestep": T}
    return TinyModel("Allegro", model, inputs, _grid(3, 48), 2, cache_units=3 * 2)


def easyanimate() -> TinyModel:
    from diffusers import EasyAnimateTransformer3DModel

    model = _seeded(EasyAnimateTransformer3DModel, num_attention_heads=2, attention_head_dim=16, in_channels=4,
                    out_channels=4, patch_size=2, sample_width=12, sample_height=16, num_layers=2, mmdit_layers=2,
                    time_embed_dim=8, text_embed_dim=16)
    inputs = {"hidden_states": _randn(1, 4, 3, 16, 12), "timestep": T, "encoder_hidden_states": _randn(1, TEXT, 16, seed=1)}
    return TinyModel("EasyAnimate", model, inputs, _grid(3, 48, prefix=TEXT), 2, cache_units=2 * 2)


def cosmos() -> TinyModel:
    from diffusers import CosmosTransformer3DModel

    model = _seeded(CosmosTransformer3DModel, in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                    num_layers=2, text_embed_dim=16, adaln_lora_dim=8, max_size=(8, 32, 32), patch_size=(1, 2, 2),
                    concat_padding_mask=False)  # True resizes the padding mask with torchvision
    inputs = {"hidden_states": _randn(1, 4, 3, 16, 12), "timestep": T, "encoder_hidden_states": _randn(1, TEXT, 16, seed=1)}
    return TinyModel("Cosmos", model, inputs, _grid(3, 48), 2, cache_units=3 * 2)


def consisid() -> TinyModel:
    from diffusers import ConsisIDTransformer3DModel

    model = _seeded(ConsisIDTransformer3DModel, num_attention_heads=2, attention_head_dim=8, in_channels=4,
                    out_channels=4, time_embed_dim=8, text_embed_dim=8, num_layers=2, sample_width=12, sample_height=16,
                    sample_frames=9, patch_size=2, temporal_compression_ratio=4, max_text_seq_length=TEXT)
    inputs = {"hidden_states": _randn(1, 3, 4, 16, 12), "encoder_hidden_states": _randn(1, TEXT, 8, seed=1), "timestep": T}
    return TinyModel("ConsisID", model, inputs, _grid(3, 48, prefix=TEXT), 2, cache_units=2 * 2)


def latte() -> TinyModel:
    from diffusers import LatteTransformer3DModel

    model = _seeded(LatteTransformer3DModel, sample_size=8, num_layers=1, patch_size=2, attention_head_dim=4,
                    num_attention_heads=2, caption_channels=8, in_channels=4, cross_attention_dim=8, out_channels=8,
                    attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                    norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6, video_length=3)
    inputs = {"hidden_states": _randn(1, 4, 3, 8, 8), "timestep": T, "encoder_hidden_states": _randn(1, 5, 8, seed=1)}
    return TinyModel("Latte", model, inputs, None, cache_units=3 + 2)


def sana_video() -> TinyModel:
    from diffusers import SanaVideoTransformer3DModel

    model = _seeded(SanaVideoTransformer3DModel, in_channels=4, out_channels=4, num_attention_heads=2,
                    attention_head_dim=8, num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=8,
                    cross_attention_dim=16, caption_channels=16, sample_size=8)
    inputs = {"hidden_states": _randn(1, 4, 3, 16, 12), "encoder_hidden_states": _randn(1, TEXT, 16, seed=1), "timestep": T}
    return TinyModel("SanaVideo", model, inputs, None, cache_units=3 * 2)


MODELS = [cogvideox, cogvideox_15, wan21, wan22, wan_vace, skyreels_v2, skyreels_v2_df, hunyuan_video, hunyuan_video_padded,
          hunyuan_video_15, motif_video, mochi, ltx_video, allegro, easyanimate, cosmos, consisid, latte, sana_video]
