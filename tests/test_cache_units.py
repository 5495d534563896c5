"""Cache units on real blocks: writes into fresh buffers made functional, two-stream blocks packed, per-model coverage.

`JointRopeDenoiser` is a hand-written MMDiT-style model: video and text carried as two streams through
one joint attention per block, Wan's rotary embedding written into ``torch.empty_like`` buffers, then an
FFN per stream. Its sublayers are written out as methods, so the test computes the stored-residual rule
(each stream's output = its new input + the residuals stored at the last computation) by hand.
"""

import operator
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import diffusers_models as dm
import t4dopt
from t4dopt.cache.arithmetic import SaveKind
from t4dopt.cache.graph.functional import functional_writes, written
from t4dopt.cache.graph.streams import packed, unpacked
from t4dopt.cache.registry import runtimes_of

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

TOKENS, TEXT, CHANNELS, WIDTH, HEADS, BLOCKS = 12, 5, 4, 16, 2, 2


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding: pairs rotated, written into a fresh buffer."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class JointRopeDenoiser(nn.Module):
    """Latents [B, N, C], timestep [B], text [B, T, D]; two streams through `BLOCKS` joint blocks."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.text, self.head = nn.Linear(CHANNELS, WIDTH), nn.Linear(8, WIDTH), nn.Linear(WIDTH, CHANNELS)
        self.time = nn.Sequential(nn.Linear(1, WIDTH), nn.SiLU(), nn.Linear(WIDTH, WIDTH))
        self.qkv, self.qkv_text, self.out, self.out_text = (
            nn.ModuleList(nn.Linear(WIDTH, n * WIDTH) for _ in range(BLOCKS)) for n in (3, 3, 1, 1))
        self.ff, self.ff_text = (nn.ModuleList(nn.Sequential(nn.Linear(WIDTH, 2 * WIDTH), nn.GELU(),
                                                             nn.Linear(2 * WIDTH, WIDTH)) for _ in range(BLOCKS))
                                 for _ in range(2))
        angles = torch.arange(TOKENS)[:, None] * 0.3 ** torch.arange(WIDTH // HEADS // 2)[None]
        self.register_buffer("cos", angles.cos())
        self.register_buffer("sin", angles.sin())

    def stems(self, x, t, text):
        return self.embed(x) + self.time(t.reshape(-1, 1, 1).float() / 1000), self.text(text)

    def attention(self, i, h, e):
        def heads(qkv):
            return qkv.unflatten(-1, (3, HEADS, -1)).permute(2, 0, 3, 1, 4)

        q, k, v = heads(self.qkv[i](h))
        qt, kt, vt = heads(self.qkv_text[i](e))
        q, k = rope(q, self.cos, self.sin), rope(k, self.cos, self.sin)
        joint = F.scaled_dot_product_attention(torch.cat([qt, q], 2), torch.cat([kt, k], 2), torch.cat([vt, v], 2))
        joint = joint.transpose(1, 2).flatten(2)
        return h + self.out[i](joint[:, TEXT:]), e + self.out_text[i](joint[:, :TEXT])

    def feed_forward(self, i, h, e):
        return h + self.ff[i](h), e + self.ff_text[i](e)

    def forward(self, x, t, text):
        h, e = self.stems(x, t, text)
        for i in range(BLOCKS):
            h, e = self.attention(i, h, e)
            h, e = self.feed_forward(i, h, e)
        return self.head(h)


def inputs(step: int):
    generator = torch.Generator().manual_seed(step)
    return (torch.randn(1, TOKENS, CHANNELS, generator=generator), torch.full((1,), 900.0 - 100 * step),
            torch.randn(1, TEXT, 8, generator=torch.Generator().manual_seed(99)))


def compiled(model, cache=None):
    options = {"target": "eager", "sparse": None, **({"cache": cache} if cache is not None else {})}
    return torch.compile(model, backend="turbo4d", options=options)


def run(model, steps: int, cache=None) -> list[torch.Tensor]:
    fn = compiled(model, cache)
    with torch.no_grad(), t4dopt.generation(model), warnings.catch_warnings():
        warnings.simplefilter("ignore", t4dopt.T4DWarning)
        return [fn(*inputs(step)) for step in range(steps)]


@pytest.fixture(scope="module")
def joint():
    return JointRopeDenoiser().eval()


def test_two_stream_rope_blocks_are_units_and_exact_when_computed(joint):
    """Threshold 0 and calls computed in full (the tapped graph saving both streams) equal the uncached model."""
    uncached = run(joint, 3)
    with torch.no_grad():
        assert torch.equal(uncached[0], joint(*inputs(0)))
    torch._dynamo.reset()
    assert all(torch.equal(a, b) for a, b in zip(run(joint, 3, {"threshold": 0.0}), uncached))
    # Threshold 0 runs the graph as it came, not the one packed for the cache (which concatenates every
    # sublayer's two addends): the computed graph has the packing, the plain one none.
    (runtime,) = runtimes_of(joint)
    graphs = runtime.executor.step_graphs
    assert _packing_nodes(graphs.computed(SaveKind.FIRST).run.gm) > 0
    assert _packing_nodes(graphs.plain.gm) == 0
    report = t4dopt.cache_report(joint)
    (graph,) = report.graphs
    # Each block: the joint attention (both streams, RoPE functionalised), then both FFNs as one unit.
    assert [u.kind != "other" for u in graph.units] == [True, False] * BLOCKS  # attention, then no attention
    assert report.units_found == [u.name for u in graph.units]
    torch._dynamo.reset()
    computed = run(joint, 3, {"threshold": 10.0, "warmup": 3, "order": 0})
    assert all(torch.equal(a, b) for a, b in zip(computed, uncached))
    assert all(u.computed == 3 for u in t4dopt.cache_report(joint).units)


def _packing_nodes(gm: torch.fx.GraphModule) -> int:
    return sum(node.target in (packed, unpacked) for node in gm.graph.nodes)


def test_a_reused_two_stream_step_adds_both_streams_stored_residuals(joint):
    """Step 2 reuses every unit: each stream = its new input + the residuals of step 1, summed in unit order."""
    got = run(joint, 3, {"threshold": 10.0, "warmup": 2, "max_reuse": 8, "order": 0, "levels": ["block"]})
    assert [u.reused for u in t4dopt.cache_report(joint).units] == [1] * 2 * BLOCKS
    with torch.no_grad():
        h, e = joint.stems(*inputs(1))
        residuals = []
        for i in range(BLOCKS):
            for sublayer in (joint.attention, joint.feed_forward):
                new_h, new_e = sublayer(i, h, e)
                residuals.append((new_h - h, new_e - e))
                h, e = new_h, new_e
        h, e = joint.stems(*inputs(2))
        total_h, total_e = residuals[0]
        for r_h, r_e in residuals[1:]:
            total_h, total_e = total_h + r_h, total_e + r_e
        want = joint.head(h + total_h)
    assert torch.equal(got[2], want)
    assert not torch.equal(got[2], joint(*inputs(2)))  # a reuse, not a computation


def graph_of(model, *args) -> torch.fx.GraphModule:
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=capture, fullgraph=True)(*args)
    return graphs[0]


class Writes(nn.Module):
    """In-place writes of each kind: `case` picks one."""

    def __init__(self, case: str):
        super().__init__()
        self.case = case

    def forward(self, x):
        if self.case == "read between writes":
            buffer = torch.zeros_like(x)
            buffer[:, 0] = x[:, 0] * 2
            total = buffer.sum(1, keepdim=True)  # sees the first write only
            buffer[:, 1] = total[:, 0]
            buffer /= 3
            return buffer + total
        if self.case == "into a projection":
            y = x * 3
            y[:, 1:] = y[:, :1] + 1
            return y.type_as(x) * 2
        if self.case == "into the input":
            x[:, 0] = 0
            return x * 2
        buffer = torch.zeros_like(x)
        view = buffer[:, :2]
        buffer[:, 0] = 1
        return view * 2  # another view sees the write


@pytest.mark.parametrize("case", ["read between writes", "into a projection"])
def test_writes_into_fresh_buffers_become_values_and_compute_the_same(case):
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    gm = graph_of(Writes(case), x.clone())
    result = functional_writes(gm.graph)
    assert result.rewritten >= 1 and not result.refused
    gm.recompile()
    assert not any(n.target in (operator.setitem, operator.itruediv) for n in gm.graph.nodes)
    assert any(n.target is written for n in gm.graph.nodes)
    assert torch.equal(gm(x.clone())[0], Writes(case)(x.clone()))


@pytest.mark.parametrize("case, reason", [("into the input", "graph input"), ("seen by a view", "would see the write")])
def test_writes_others_could_see_stay_in_place_with_the_reason(case, reason):
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    gm = graph_of(Writes(case), x.clone())
    result = functional_writes(gm.graph)
    assert result.rewritten == 0 and result.refused and all(reason in r.reason for r in result.refused)
    assert any(n.target is operator.setitem for n in gm.graph.nodes)


def test_packed_stream_views_keep_each_streams_layout():
    from t4dopt.cache.graph.streams import layout_of, unpacked

    video = torch.randn(2, 5, 3).transpose(1, 2)  # dense, not contiguous
    text = torch.randn(2, 4, 3)
    layouts = (layout_of(video), layout_of(text))
    views = unpacked(packed((video, text), layouts), layouts)
    assert [v.stride() for v in views] == [video.stride(), text.stride()]
    assert torch.equal(views[0], video) and torch.equal(views[1], text)
    assert layout_of(torch.randn(2, 6, 3)[:, 1:]) is None  # a slice is not dense


# --- diffusers families: exact at threshold 0 (every family's units: tests/test_diffusers.py) ----------

EXACT = [dm.wan21, dm.cogvideox, dm.hunyuan_video, dm.easyanimate]
"""Functionalised RoPE (Wan, EasyAnimate) and packed two-stream blocks (CogVideoX, HunyuanVideo, EasyAnimate)."""


@pytest.mark.parametrize("make", EXACT, ids=[m.__name__ for m in EXACT])
def test_functionalised_and_two_stream_families_are_exact_at_threshold_zero(make):
    tiny = make()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = tiny.model(**tiny.inputs, return_dict=False)[0]
        options = {"target": "eager", "sparse": None, "cache": {"threshold": 0.0}}
        got = torch.compile(tiny.model, backend="turbo4d", options=options)(**tiny.inputs, return_dict=False)[0]
        graphs = t4dopt.cache_report(tiny.model).graphs
        torch._dynamo.reset()
        # A first call with reuse on computes every unit through the prepared graph (streams packed, writes
        # functional), saving as it goes; threshold 0 runs the graph as it came.
        options["cache"] = {"threshold": 10.0}
        saving = torch.compile(tiny.model, backend="turbo4d", options=options)(**tiny.inputs, return_dict=False)[0]
    assert torch.equal(got, want) and torch.equal(saving, want)
    cached = [unit for graph in graphs if not graph.reason for unit in graph.units]
    assert len(cached) == tiny.cache_units
    assert any(unit.kind not in ("other", "cross") for unit in cached)  # the joint self-attention is a unit


class PositionEveryBlock(nn.Module):
    """Cosmos's habit: a positional embedding made ``.type_as(latents)`` and added before every block."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.head = nn.Linear(CHANNELS, WIDTH), nn.Linear(WIDTH, CHANNELS)
        self.position = nn.Parameter(torch.randn(TOKENS, WIDTH))
        self.mlp = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(BLOCKS))

    def forward(self, x):
        h, position = self.embed(x), self.position.type_as(x)
        for mlp in self.mlp:
            h = h + position
            h = h + mlp(h)
        return self.head(h)


def test_a_value_read_only_for_its_dtype_carries_no_data_from_it():
    """``position.type_as(x)`` does not depend on x: every block's sublayer stays a single-entry region."""
    from t4dopt.cache.graph.regions import find_regions

    gm = graph_of(PositionEveryBlock().eval(), torch.randn(1, TOKENS, CHANNELS))
    plan = find_regions(gm.graph, [], dict(gm.named_modules()))
    assert [unit.name for unit in plan.units] == [f"mlp.{i}" for i in range(BLOCKS)]
