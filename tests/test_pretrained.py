"""Shipped tiny models: they load, sample, and denoise procedural scenes far better than untrained twins."""

import time

import pytest
import torch

import t4dopt
from t4dopt.data import from_tokens, render_scenes, to_tokens
from t4dopt.data.tasks import EVAL_SEED, loss_at, scene_batch
from t4dopt.models import pretrained, sample_flow_matching
from t4dopt.models.joint_mask import joint_mask, set_joint_mask
from t4dopt.models.pretrained import PRETRAINED, WEIGHTS, build


def test_scenes_are_deterministic_per_seed_and_in_range():
    first, again, other = render_scenes(2, seed=5), render_scenes(2, seed=5), render_scenes(2, seed=6)
    assert first.shape == (2, 4, 8, 3, 16, 16) and first.dtype == torch.float32
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert first.min() >= -1 and first.max() <= 1


def test_cameras_and_motion_change_the_images():
    video = render_scenes(4, views=3, frames=5, size=32, seed=1)
    assert video.shape == (4, 3, 5, 3, 32, 32)
    for a, b in ((0, 1), (1, 2), (0, 2)):
        assert (video[:, a] - video[:, b]).abs().mean() > 0.01, f"views {a} and {b} look alike"
    assert (video[:, :, 0] - video[:, :, -1]).abs().mean() > 0.01, "first and last frame look alike"


def test_tokens_round_trip():
    video = render_scenes(1, views=2, frames=2, seed=2)
    tokens = to_tokens(video)
    assert tokens.shape == (1, 2, 2, 64, 12)
    assert torch.equal(from_tokens(tokens, 16), video)
    with pytest.raises(ValueError, match="patch"):
        to_tokens(video, patch=3)


def test_weights_are_shipped_and_small():
    files = [WEIGHTS / f"{name}.safetensors" for name in PRETRAINED]
    assert all(f.exists() for f in files)
    assert sum(f.stat().st_size for f in files) <= 30e6


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="scm-tiny, joint-tiny, joint-tiny-sculpt4d"):
        pretrained("no-such-model")


@torch.no_grad()
@pytest.mark.parametrize("name", PRETRAINED)
def test_loads_and_samples_in_seconds(name):
    start = time.perf_counter()
    model = pretrained(name)
    task = model.pretrained_info["task"]
    x0, cond = scene_batch(task["kind"], 2, views=task["views"], frames=task["frames"], size=task["size"],
                           patch=task["patch"], seed=EVAL_SEED)
    sample = sample_flow_matching(model, torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)), cond, steps=4)
    assert sample.shape == x0.shape and torch.isfinite(sample).all()
    assert time.perf_counter() - start < 20


@torch.no_grad()
@pytest.mark.parametrize("name", PRETRAINED)
def test_trained_model_denoises_far_better_than_its_untrained_twin(name):
    model = pretrained(name)
    info = model.pretrained_info
    task = info["task"]
    torch.manual_seed(0)
    twin = build(info["architecture"], info["config"]).eval()
    x0, cond = scene_batch(task["kind"], 8, views=task["views"], frames=task["frames"], size=task["size"],
                           patch=task["patch"], seed=EVAL_SEED + 1)
    trained, untrained = loss_at(model, x0, cond, 0.5), loss_at(twin, x0, cond, 0.5)
    print(f"{name}: loss at t=0.5 trained {trained:.3f}, untrained {untrained:.3f}")
    assert trained <= 0.5 * untrained


@torch.no_grad()
def test_sculpt4d_model_keeps_the_mask_it_was_trained_with():
    model = pretrained("joint-tiny-sculpt4d")
    mask = joint_mask(model)
    expected = t4dopt.masks.sculpt4d(8, 64, block_size=16).token_mask()
    assert mask is not None and torch.equal(mask, expected) and not mask.all()
    assert joint_mask(pretrained("joint-tiny")) is None


@torch.no_grad()
def test_turbo4d_sculpt4d_rewrite_reproduces_the_masked_model():
    masked = pretrained("joint-tiny-sculpt4d")
    dense = set_joint_mask(pretrained("joint-tiny-sculpt4d"), None)
    x0, cond = scene_batch("joint", 1, seed=EVAL_SEED)
    t = torch.full((1,), 0.5)
    options = {"layout": {"frames": 8, "tokens_per_frame": 64}, "sparse": {"policy": "sculpt4d", "block_size": 16},
               "target": "eager"}
    torch._dynamo.reset()
    sparse = torch.compile(dense, backend="turbo4d", options=options)
    torch.testing.assert_close(sparse(x0, t, cond), masked(x0, t, cond), atol=1e-4, rtol=1e-4)
    assert (dense(x0, t, cond) - masked(x0, t, cond)).abs().max() > 1e-2
