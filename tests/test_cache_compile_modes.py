"""Every way of compiling gives the same numbers with the cache on (issue 14, item 5).

- Regional compilation (diffusers' ``compile_repeated_blocks``) hands the backend one block's
  graph, shared by every block: it has no timestep, so the cache refuses it (uncached, with a
  warning naming the cause; an error with ``strict=True``) and the model computes exactly as
  without the cache.
- A model dynamo later recompiles into per-submodule graphs (a graph break inside its blocks)
  gets those graphs refused the same way, and its earlier whole-model graph keeps working.
- One compiled graph serving two modules of one class (dynamo shares compiled code between
  instances) keeps each module's state apart: interleaved loops of both equal fresh compiles.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import t4dopt
from t4dopt.cache.registry import runtimes_of
from denoising import TinyDenoiser, compiled, fresh, loop, noise, reused, text, times

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def t4d_warnings(caught):
    return [str(w.message) for w in caught if issubclass(w.category, t4dopt.T4DWarning)]


# --- regional compilation --------------------------------------------------------------------------


def tiny_wan():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32).eval()
    inputs = {"hidden_states": torch.randn(1, 4, 2, 8, 8, generator=torch.Generator().manual_seed(0)),
              "encoder_hidden_states": torch.randn(1, 7, 16, generator=torch.Generator().manual_seed(1))}
    return model, inputs


def wan_loop(model, inputs, steps=4):
    x = inputs["hidden_states"]
    with torch.no_grad():
        for t, t_next in zip(times(steps)[:-1], times(steps)[1:]):
            velocity = model(hidden_states=x, timestep=torch.tensor([t]),
                             encoder_hidden_states=inputs["encoder_hidden_states"]).sample
            x = x + (t_next - t) / 1000 * velocity
    return x


def test_regional_compilation_is_refused_and_computes_as_without_the_cache():
    model, inputs = tiny_wan()
    expected = wan_loop(model, inputs)
    options = {"target": "eager", "cache": {"threshold": 0.3}, "layout": {"frames": 2, "tokens_per_frame": 16}}
    model.compile_repeated_blocks(backend="turbo4d", options=options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = wan_loop(model, inputs)
    messages = t4d_warnings(caught)
    assert any("left uncached" in m and "compile_repeated_blocks" in m for m in messages), messages
    assert runtimes_of(model) == [] and t4dopt.cache_report(model).units == []
    assert torch.equal(got, expected)


def test_regional_compilation_with_strict_raises():
    model, inputs = tiny_wan()
    model.compile_repeated_blocks(backend="turbo4d", options={
        "target": "eager", "cache": {}, "strict": True, "layout": {"frames": 2, "tokens_per_frame": 16}})
    with pytest.raises(Exception, match="no timestep input"):
        wan_loop(model, inputs, steps=1)


# --- a model recompiled into per-submodule graphs ------------------------------------------------------


class Block(nn.Module):
    """Attention and MLP sublayers modulated by the timestep embedding; `split` puts a graph break inside."""

    def __init__(self, width=32):
        super().__init__()
        self.split = False
        self.qkv, self.mlp, self.modulation = nn.Linear(width, 3 * width), nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, h, temb):
        q, k, v = self.qkv(h + self.modulation(temb)).unflatten(-1, (3, 2, h.shape[-1] // 2)).permute(2, 0, 3, 1, 4)
        h = h + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        if self.split:
            torch._dynamo.graph_break()
        return h + self.mlp(h)


class Stack(nn.Module):
    def __init__(self, width=32, depth=3):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.time, self.head = nn.Linear(4, width), nn.Linear(1, width), nn.Linear(width, 4)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))

    def forward(self, x, timestep, text):
        b, f, p, c = x.shape
        h = self.embed(x).reshape(b, f * p, -1) + text.mean(1, keepdim=True)
        temb = self.time(timestep.view(-1, 1, 1) / 1000)
        for block in self.blocks:
            h = block(h, temb)
        return self.head(h).reshape(b, f, p, c)

    def set_split(self, split):
        for block in self.blocks:
            block.split = split


def text_for_stack(seed):
    return torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(seed))


def test_a_model_recompiled_into_per_block_graphs_refuses_them_and_keeps_its_whole_graph(monkeypatch):
    model = Stack().eval()
    x, cond = noise(1), text_for_stack(1)
    model_c = compiled(model)
    first = loop(model_c, x, cond, times())
    assert reused(model) > 0
    (whole,) = runtimes_of(model)

    # Dynamo recompiles on the changed attribute; the break inside each block makes graphs per block.
    model.set_split(True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        split = loop(model_c, x, cond, times())
    assert any("left uncached" in m and "no timestep input" in m for m in t4d_warnings(caught))
    assert runtimes_of(model) == [whole], "the per-block graphs keep no cache state"
    with torch.no_grad():
        model.set_split(False)
        uncompiled = loop(model, x, cond, times())
        model.set_split(True)
    assert torch.allclose(split, uncompiled, atol=1e-6, rtol=0)

    # Back without the break. Dynamo either runs the whole graph again (whose runtime then starts a
    # new generation, as a fresh compile would) or keeps to per-block graphs (refused): never a mix.
    model.set_split(False)
    placed, place = [], whole.generations.place
    monkeypatch.setattr(whole.generations, "place", lambda *args: placed.append(args) or place(*args))
    again = loop(model_c, x, cond, times())
    if placed:
        assert torch.equal(again, first)
    else:
        assert torch.allclose(again, uncompiled, atol=1e-6, rtol=0)


# --- one graph for two modules ------------------------------------------------------------------------


def test_one_compiled_graph_serving_two_modules_keeps_their_state_apart():
    """Dynamo shares compiled code between instances of a class: one runtime serves both models."""
    first, second = TinyDenoiser(seed=0).eval(), TinyDenoiser(seed=1).eval()
    first_c, second_c = compiled(first), compiled(second)
    x, cond = noise(2), text(2)
    schedule = times()
    states = [x, x]
    with torch.no_grad():
        for t, t_next in zip(schedule[:-1], schedule[1:]):
            ts = torch.full((1,), t)
            for index, model_c in ((1, second_c), (0, first_c)):
                states[index] = states[index] + (t_next - t) / 1000 * model_c(states[index], ts, cond)
    assert runtimes_of(first) == runtimes_of(second) and len(runtimes_of(first)) == 1
    assert reused(first) > 0
    assert torch.equal(states[0], loop(fresh(first), x, cond, schedule))
    assert torch.equal(states[1], loop(fresh(second), x, cond, schedule))
    assert not torch.equal(states[0], states[1])
