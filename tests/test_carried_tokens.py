"""Token maps carried across graph breaks (t4dopt/passes/carried_tokens.py), against a float64 reference.

A model that builds its tokens in one graph (a Conv3d patch embedding) and attends over them in another
(after a graph break, as HunyuanVideo 1.5) gets its joint attention sparse with no layout option; a
tensor that was not made by the compiled producer (a copy, an in-place change, a tensor from elsewhere)
carries nothing, and the consumer then runs dense, after a warning, with the dense model's numbers.
"""

import pytest
import torch
import torch.nn.functional as F

import t4dopt
from t4dopt import masks
from t4dopt.passes.carried_tokens import CARRIED
from reference import dense_masked_attention

FRAMES, HEIGHT, WIDTH, DIM, HEADS = 3, 8, 8, 32, 2
TOKENS = (HEIGHT // 2) * (WIDTH // 2)
SPARSE = {"policy": "sculpt4d", "block_size": 8, "strides": (1, 2), "anchor_frames": 0}


class Embed(torch.nn.Module):
    """[B, C, F, H, W] latents -> [B, F * H/2 * W/2, DIM] tokens, frame-major (a Conv3d patch embedding)."""

    def __init__(self):
        super().__init__()
        self.patch = torch.nn.Conv3d(4, DIM, kernel_size=(1, 2, 2), stride=(1, 2, 2))

    def forward(self, latents):
        return self.patch(latents).flatten(2).transpose(1, 2)


class Attend(torch.nn.Module):
    """Self-attention over the tokens it is given, plus a residual."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(DIM, 3 * DIM)

    def heads(self, tokens):
        b, n, _ = tokens.shape
        return self.qkv(tokens).view(b, n, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)

    def forward(self, tokens):
        q, k, v = self.heads(tokens)
        out = F.scaled_dot_product_attention(q, k, v)
        return tokens + out.transpose(1, 2).flatten(2)

    def reference(self, tokens, token_mask):
        q, k, v = self.heads(tokens)
        out = dense_masked_attention(q, k, v, token_mask).float()
        return tokens + out.transpose(1, 2).flatten(2)


class Broken(torch.nn.Module):
    """Embed, a graph break, then attention: the attention's graph receives the tokens as a plain input."""

    def __init__(self):
        super().__init__()
        self.embed, self.attend = Embed(), Attend()

    def forward(self, latents):
        tokens = self.embed(latents)
        torch._dynamo.graph_break()
        return self.attend(tokens)


def _compiled(module):
    return torch.compile(module, backend="turbo4d", options={"sparse": SPARSE, "target": "eager"})


@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()
    CARRIED.reset()
    yield
    torch._dynamo.reset()
    CARRIED.reset()


def _layout():
    return masks.sculpt4d(FRAMES, TOKENS, block_size=8, strides=(1, 2), anchor_frames=0)


def test_a_graph_break_between_the_patch_embedding_and_the_attention_keeps_it_sparse():
    torch.manual_seed(0)
    model = Broken().eval()
    latents = torch.randn(2, 4, FRAMES, HEIGHT, WIDTH)
    with torch.no_grad(), t4dopt.report.collecting() as report:
        got = _compiled(model)(latents)
        tokens = model.embed(latents)
        want = model.attend.reference(tokens, _layout().token_mask())
        dense = model(latents)
    (site,) = report.sites
    assert site.kind == "spatiotemporal" and site.action == "sparse", site.reason
    assert "carried across a graph break" in site.evidence and f"{FRAMES} frames x {TOKENS} tokens" in site.evidence
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-4, atol=1e-5)
    assert (got - dense).abs().max() > 1e-3, "the mask must change the result, or this test proves nothing"


def test_a_tensor_the_producer_did_not_make_carries_nothing_and_runs_dense():
    torch.manual_seed(1)
    embed, attend = Embed().eval(), Attend().eval()
    embed_c, attend_c = _compiled(embed), _compiled(attend)
    latents = torch.randn(1, 4, FRAMES, HEIGHT, WIDTH)
    token_mask = _layout().token_mask()
    with torch.no_grad():
        tokens = embed_c(latents)
        with t4dopt.report.collecting() as report:
            got = attend_c(tokens)
        assert [s.action for s in report.sites] == ["sparse"]
        torch.testing.assert_close(got.double(), attend.reference(tokens, token_mask).double(), rtol=1e-4, atol=1e-5)

        changed = embed_c(latents)
        changed.mul_(1.0)  # changed in place since the producer made it: its token map no longer counts
        for made_elsewhere in (tokens.clone(), changed):
            with pytest.warns(t4dopt.T4DWarning, match="does not carry them"):
                got = attend_c(made_elsewhere)
            torch.testing.assert_close(got, attend(made_elsewhere), rtol=1e-5, atol=1e-6)

        again = embed_c(latents)  # made by the producer again: sparse again
        torch.testing.assert_close(attend_c(again).double(), attend.reference(again, token_mask).double(),
                                   rtol=1e-4, atol=1e-5)


def test_strict_raises_on_a_call_whose_input_lost_its_carried_token_maps():
    embed, attend = Embed().eval(), Attend().eval()
    strict = {"sparse": SPARSE, "target": "eager", "strict": True}
    embed_c = torch.compile(embed, backend="turbo4d", options=strict)
    attend_c = torch.compile(attend, backend="turbo4d", options=strict)
    latents = torch.randn(1, 4, FRAMES, HEIGHT, WIDTH)
    with torch.no_grad():
        attend_c(embed_c(latents))  # carried: sparse, nothing to say
        with pytest.raises(t4dopt.T4DUnsupportedError, match="does not carry them.*strict=True"):
            attend_c(embed_c(latents).clone())


def test_a_consumer_compiled_on_a_plain_tensor_stays_dense_and_says_what_it_needs():
    attend = Attend().eval()
    tokens = torch.randn(1, FRAMES * TOKENS, DIM)
    with torch.no_grad(), pytest.warns(t4dopt.T4DWarning, match="tokens_per_frame"):
        got = _compiled(attend)(tokens)
    torch.testing.assert_close(got, attend(tokens), rtol=1e-5, atol=1e-6)


def test_a_consumer_that_reorders_the_carried_tokens_is_not_fooled():
    torch.manual_seed(2)
    embed, attend = Embed().eval(), Attend().eval()

    def flipped(tokens):
        return attend(tokens.flip(1))

    with torch.no_grad():
        tokens = _compiled(embed)(torch.randn(1, 4, FRAMES, HEIGHT, WIDTH))
        with t4dopt.report.collecting() as report, pytest.warns(t4dopt.T4DWarning):
            got = torch.compile(flipped, backend="turbo4d", options={"sparse": SPARSE, "target": "eager"})(tokens)
    assert [s.action for s in report.sites] == ["dense"]
    torch.testing.assert_close(got, flipped(tokens), rtol=1e-5, atol=1e-6)


class Mlp(torch.nn.Module):
    """A position-wise block with no attention: what it carries on comes from its input alone."""

    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(DIM, 2 * DIM), torch.nn.Linear(2 * DIM, DIM)

    def forward(self, tokens):
        return tokens + self.down(F.gelu(self.up(tokens)))


def test_a_graph_in_between_carries_on_only_what_its_input_carried():
    torch.manual_seed(3)
    embed, mlp, attend = Embed().eval(), Mlp().eval(), Attend().eval()
    embed_c, mlp_c, attend_c = _compiled(embed), _compiled(mlp), _compiled(attend)
    latents = torch.randn(1, 4, FRAMES, HEIGHT, WIDTH)
    with torch.no_grad():
        tokens = embed_c(latents)
        hidden = mlp_c(tokens)
        torch.testing.assert_close(attend_c(hidden).double(), attend.reference(hidden, _layout().token_mask()).double(),
                                   rtol=1e-4, atol=1e-5)
        plain = mlp_c(tokens.clone())  # the MLP graph ran on a tensor that carries nothing: so does its output
        with pytest.warns(t4dopt.T4DWarning, match="does not carry them"):
            got = attend_c(plain)
        torch.testing.assert_close(got, attend(plain), rtol=1e-5, atol=1e-6)
