"""SCMNet: shapes, which axes each attention mixes, fullgraph compile, and what explain sees."""

import pytest
import torch

import t4dopt
from t4dopt.models import SCMNet

B, V, T, P, C = 1, 4, 8, 16, 12


@pytest.fixture(scope="module")
def model() -> SCMNet:
    torch.manual_seed(0)
    return SCMNet("tiny").eval()


@pytest.fixture(scope="module")
def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(B, V, T, P, C, generator=generator)
    cond = torch.randn(B, 64, 12, generator=generator)
    return x, torch.full((B,), 0.5), cond


@torch.no_grad()
def test_forward_keeps_the_token_grid(model, inputs):
    out = model(*inputs)
    assert out.shape == (B, V, T, P, C) and torch.isfinite(out).all()
    x, _, cond = inputs
    other = model(x[:, :2, :3].repeat(2, 1, 1, 1, 1), torch.rand(2), cond.repeat(2, 1, 1))
    assert other.shape == (2, 2, 3, P, C)


@torch.no_grad()
@pytest.mark.parametrize("axis", ["view", "frame"])
def test_camera_and_motion_attention_mix_their_axis(model, inputs, axis):
    x, t, cond = inputs
    perturbed = x.clone()
    if axis == "view":
        perturbed[:, 1] += 1.0
    else:
        perturbed[:, :, -1] += 1.0
    before, after = model(x, t, cond), model(perturbed, t, cond)
    assert (after[:, 0, 0] - before[:, 0, 0]).abs().max() > 1e-4


@torch.no_grad()
def test_each_attention_mixes_only_its_axis():
    """With cross-attention and MLP switched off, one camera layer touches only the other views."""
    torch.manual_seed(0)
    single = SCMNet("tiny", depth=1).eval()
    block = single.blocks[0]
    for name in ("spatial", "motion", "cross"):
        torch.nn.init.zeros_(getattr(block, name).out.weight)
        torch.nn.init.zeros_(getattr(block, name).out.bias)
    torch.nn.init.zeros_(block.mlp[2].weight)
    torch.nn.init.zeros_(block.mlp[2].bias)
    x = torch.randn(B, V, T, P, C)
    t, cond = torch.full((B,), 0.5), torch.randn(B, 64, 12)
    perturbed = x.clone()
    perturbed[:, 1, 2, 3] += 1.0
    change = (single(perturbed, t, cond) - single(x, t, cond)).abs().amax(dim=-1)[0]
    touched = change > 1e-6
    assert touched[:, 2, 3].all(), "every view of the same frame and position sees the change"
    assert touched.sum() == V


def test_fullgraph_compile_matches_eager(model, inputs):
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(*inputs), model(*inputs))


def test_explain_names_spatial_view_temporal_and_cross(model, inputs):
    torch._dynamo.reset()
    report = t4dopt.explain(model, *inputs, options={"layout": {"frames": T, "views": V, "tokens_per_frame": P}})
    kinds = {site.module.rsplit(".", 1)[-1]: site.kind for site in report.sites}
    assert len(report.sites) == 4 * model.config.depth
    assert kinds == {"spatial": "spatial", "camera": "view", "motion": "temporal", "cross": "cross"}


def test_sv4d_config_builds_on_meta():
    with torch.device("meta"):
        big = SCMNet("sv4d")
    config = big.config
    assert (config.hidden, config.heads, config.views, config.frames, config.tokens_per_frame) == (1024, 16, 8, 5, 576)
    assert 1e8 < sum(p.numel() for p in big.parameters()) < 1e10
    with pytest.raises(ValueError, match="unknown config"):
        SCMNet("no-such-model")
