"""Sparse sites survive Ulysses context parallelism: the sequence is traced through diffusers' all-to-all.

diffusers' Ulysses (``TemplatedUlyssesAttention``) shards the sequence across ranks, then before attention
swaps it for the heads with ``_c10d_functional.all_to_all_single`` (+ ``wait_tensor``): every rank attends
the whole sequence for a share of the heads, so the block mask is the one of the whole sequence. One
process here: a gloo group of one rank runs the model for real (the all-to-all is the identity) and must
equal the explicit-mask reference; a model written for two ranks, traced on that group with the group's
rank read as 1 of 2, must be read as the whole sequence (its shard, chunk 1, gathered back), and a shard
that is not this rank's must keep the site dense. The two-rank run is a separate test (issue 18).
"""

import contextlib
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import t4dopt
import t4dopt.compat
from reference import grid_labels, sculpt4d_token_mask
from t4dopt.report import collecting

attention_dispatch = pytest.importorskip("diffusers.models.attention_dispatch")

FRAMES, HEIGHT, WIDTH, DIM, HEADS = 3, 4, 4, 16, 4
BLOCK = 4
OPTIONS = {"sparse": {"policy": "sculpt4d", "block_size": BLOCK, "strides": (1, 2), "anchor_frames": 0},
           "target": "eager"}


@pytest.fixture(scope="module")
def group():
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    created = not dist.is_initialized()
    if created:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(port)
        dist.init_process_group("gloo", rank=0, world_size=1)
    yield dist.group.WORLD
    if created:
        dist.destroy_process_group()


class UlyssesJoint(torch.nn.Module):
    """A Conv3d patch embedding, the sequence sharded as diffusers' hook does (``chunk(world)[rank]``), then joint
    attention in diffusers' Ulysses pattern (all-to-all to the whole sequence and a share of the heads, and back)."""

    def __init__(self, group, world=1, rank=0, shard=None):
        super().__init__()
        torch.manual_seed(0)
        self.group, self.world, self.rank = group, world, rank
        self.shard = rank if shard is None else shard
        self.embed = torch.nn.Conv3d(3, DIM, (1, 2, 2), (1, 2, 2))
        self.qkv = torch.nn.Linear(DIM, 3 * DIM)
        self.attend = F.scaled_dot_product_attention

    def forward(self, video):
        tokens = self.embed(video).flatten(2).transpose(1, 2)            # [B, F*H*W, C]
        local = tokens.chunk(self.world, dim=1)[self.shard]              # this rank's shard of the sequence
        b, s_local, _ = local.shape
        q, k, v = self.qkv(local).unflatten(-1, (3, HEADS, -1)).unbind(2)  # [B, S_local, H, D] each
        a2a, w, h_local = attention_dispatch._all_to_all_single, self.world, HEADS // self.world

        def gather(x):  # sequence shards -> the whole sequence, a share of the heads
            x = x.reshape(b, s_local, w, h_local, -1).permute(2, 1, 0, 3, 4).contiguous()
            return a2a(x, self.group).flatten(0, 1).permute(1, 0, 2, 3).contiguous()

        q, k, v = (gather(x).transpose(1, 2) for x in (q, k, v))         # [B, H_local, S, D]
        out = self.attend(q, k, v).transpose(1, 2)                       # [B, S, H_local, D]
        out = out.reshape(b, w, s_local, h_local, -1).permute(1, 3, 0, 2, 4).contiguous()
        out = a2a(out, self.group).flatten(0, 1).permute(1, 2, 0, 3).contiguous()
        return out.flatten(2) + local


def _mask():
    return sculpt4d_token_mask(grid_labels(FRAMES, HEIGHT * WIDTH), block_size=BLOCK, strides=(1, 2), anchor_frames=0)


def _compile(model, video):
    torch._dynamo.reset()
    with torch.no_grad(), collecting() as report:
        out = torch.compile(model, backend="turbo4d", options=OPTIONS)(video)
    return out, report


def test_one_rank_ulysses_is_sparse_and_equals_the_explicit_mask(group):
    model = UlyssesJoint(group).eval()
    video = torch.randn(1, 3, FRAMES, 2 * HEIGHT, 2 * WIDTH)
    got, report = _compile(model, video)
    (site,) = report.sites
    assert (site.kind, site.action) == ("spatiotemporal", "sparse"), site.reason
    mask = _mask()

    def masked(q, k, v):
        scores = q.double() @ k.double().transpose(-1, -2) * q.shape[-1] ** -0.5
        return scores.masked_fill(~mask, float("-inf")).softmax(-1).matmul(v.double()).float()

    with torch.no_grad():
        model.attend = masked
        want = model(video)
        model.attend = F.scaled_dot_product_attention
        dense = model(video)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (got - dense).abs().max() > 1e-3


@pytest.mark.parametrize("shard, sparse", [(1, True), (0, False)])
def test_a_two_rank_shard_is_read_back_as_the_whole_sequence(group, monkeypatch, shard, sparse):
    # Traced on a one-rank group (the all-to-all keeps its shape); the group is read as rank 1 of 2.
    model = UlyssesJoint(group, world=2, rank=1, shard=shard).eval()
    video = torch.randn(1, 3, FRAMES, 2 * HEIGHT, 2 * WIDTH)
    monkeypatch.setattr(t4dopt.compat, "process_group_rank", lambda name: (1, 2))
    torch._dynamo.reset()
    with torch.no_grad(), collecting() as report, (pytest.warns(t4dopt.T4DWarning) if not sparse else contextlib.nullcontext()):
        torch.compile(model, backend="turbo4d", options=OPTIONS)(video)
    (site,) = report.sites
    assert site.shape[-2] == FRAMES * HEIGHT * WIDTH
    if sparse:
        assert (site.kind, site.action) == ("spatiotemporal", "sparse"), site.reason
        assert site.density == pytest.approx(float(_mask().float().mean()))
    else:
        assert site.action == "dense" and "not this rank's" in site.reason

