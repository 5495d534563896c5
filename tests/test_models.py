"""The reference models: shapes, temporal mixing, other grids, fullgraph compile, sampler, full-size config."""

import pytest
import torch

from t4dopt.models import CONFIGS, Sculpt4DDiT, flow_matching_timesteps, make_inputs, sample_flow_matching


@pytest.fixture(scope="module")
def tiny() -> Sculpt4DDiT:
    torch.manual_seed(0)
    return Sculpt4DDiT("tiny").eval()


@torch.no_grad()
def test_forward_keeps_the_latent_shape(tiny):
    noise, cond = make_inputs(tiny.config)
    out = tiny(noise, torch.full((1,), 0.5), cond)
    assert noise.shape == (1, tiny.config.frames, tiny.config.tokens_per_frame, tiny.config.in_channels)
    assert out.shape == noise.shape and torch.isfinite(out).all()


@torch.no_grad()
def test_joint_attention_lets_frame_zero_see_the_last_frame(tiny):
    noise, cond = make_inputs(tiny.config)
    t = torch.full((1,), 0.5)
    perturbed = noise.clone()
    perturbed[:, -1] += 1.0
    before, after = tiny(noise, t, cond), tiny(perturbed, t, cond)
    assert (after[:, 0] - before[:, 0]).abs().max() > 1e-4


@torch.no_grad()
@pytest.mark.parametrize("frames, batch", [(2, 2), (5, 1), (5, 2)])
def test_same_weights_run_other_frame_counts_and_batches(tiny, frames, batch):
    noise, cond = make_inputs(tiny.config, batch=batch, frames=frames)
    out = tiny(noise, torch.rand(batch), cond)
    assert out.shape == (batch, frames, tiny.config.tokens_per_frame, tiny.config.in_channels)
    assert torch.isfinite(out).all()


def test_overrides_and_unknown_names():
    model = Sculpt4DDiT("tiny", frames=8, tokens_per_frame=40)
    assert (model.config.frames, model.config.tokens_per_frame, model.config.hidden) == (8, 40, CONFIGS["tiny"].hidden)
    with pytest.raises(ValueError, match="unknown config"):
        Sculpt4DDiT("no-such-model")


@torch.no_grad()
def test_fullgraph_compile_matches_eager(tiny):
    noise, cond = make_inputs(tiny.config, seed=3)
    t = torch.full((1,), 0.25)
    torch._dynamo.reset()
    compiled = torch.compile(tiny, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(noise, t, cond), tiny(noise, t, cond))


@torch.no_grad()
def test_sampler_is_deterministic_per_seed(tiny):
    first, second, other = (sample_flow_matching(tiny, *make_inputs(tiny.config, seed=s), steps=3) for s in (1, 1, 2))
    assert first.shape == (1, tiny.config.frames, tiny.config.tokens_per_frame, tiny.config.in_channels)
    assert torch.equal(first, second) and not torch.equal(first, other)
    seen: list[tuple[int, float]] = []
    sample_flow_matching(tiny, *make_inputs(tiny.config), steps=3, callback=lambda i, t, x: seen.append((i, t)))
    assert [i for i, _ in seen] == [0, 1, 2] and seen[0][1] == 1.0


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_timesteps_fall_from_one_to_zero(shift):
    t = flow_matching_timesteps(10, shift)
    assert t.shape == (11,) and t[0] == 1 and t[-1] == 0 and bool((t[1:] < t[:-1]).all())


def test_shift_spends_more_steps_at_high_noise():
    assert bool((flow_matching_timesteps(10, 3.0)[1:-1] > flow_matching_timesteps(10)[1:-1]).all())
    with pytest.raises(ValueError, match="steps=0"):
        flow_matching_timesteps(0)


def test_hunyuan_config_builds_on_meta_at_billions_of_parameters():
    with torch.device("meta"):
        model = Sculpt4DDiT("hunyuan3d-2.1")
    config = model.config
    assert (config.hidden, config.heads, config.head_dim, config.depth) == (2048, 16, 128, 21)
    assert (config.frames, config.tokens_per_frame, config.image_tokens, config.cond_dim) == (16, 4096, 1370, 1024)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"hunyuan3d-2.1: {parameters / 1e9:.2f}B parameters")
    assert 1e9 < parameters < 1e10
