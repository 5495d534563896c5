"""The cache runtime (options["cache"]): regions and chains, exactness, generations, guidance, no syncs."""

import dataclasses
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import t4dopt
import t4dopt.cache.build as cache_build
from support import NoResidual
from reference import dense_masked_attention
from t4dopt.cache.arithmetic import Arithmetic, rebuilt
from t4dopt.cache.build import prepare
from t4dopt.cache.lowered import LazyLowered
from t4dopt.cache.registry import runtimes_of
from t4dopt.models import SCMNet, Sculpt4DDiT
from t4dopt.export.capture import node_values
from t4dopt.fx_utils import example_tensor
from t4dopt.models.pretrained import pretrained
from t4dopt.models.sampler import flow_matching_timesteps, sample_flow_matching
from t4dopt.options import CacheSpec, parse_options
from t4dopt.passes import analyze
from t4dopt.cache.graph.functional import functional_residuals
from t4dopt.cache.graph.regions import find_regions
from t4dopt.cache.graph.segments import refresh_rows, split
from t4dopt.cache.graph.step_graphs import reused_graph
from t4dopt.quality import psnr

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

V, T, P = 4, 8, 64
LAYOUT = {"frames": T, "views": V, "tokens_per_frame": P}
STEPS = 10


@pytest.fixture(scope="module")
def scm() -> SCMNet:
    return pretrained("scm-tiny").eval()


def scm_inputs(seed: int, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise and conditioning tokens shaped for the shipped scm-tiny (channels read from its config)."""
    config = pretrained("scm-tiny").config
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, V, T, P, config.in_channels, generator=generator),
            torch.randn(batch, config.cond_tokens, config.cond_dim, generator=generator))


def compiled(model: nn.Module, cache: dict | None, **options) -> nn.Module:
    options = {"target": "eager", "layout": LAYOUT, **options}
    if cache is not None:
        options["cache"] = cache
    return torch.compile(model, backend="turbo4d", options=options)


def sample(model, seed: int, steps: int = STEPS, batch: int = 1) -> torch.Tensor:
    x, cond = scm_inputs(seed, batch)
    with torch.no_grad():
        return sample_flow_matching(model, x, cond, steps=steps)


def graph_of(model: nn.Module, *args) -> tuple[torch.fx.GraphModule, list]:
    """The graph dynamo hands a backend for `model(*args)`, and its example inputs."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append((gm, example_inputs))
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=capture, fullgraph=True)(*args)
    return graphs[0]


def plan_of(model: nn.Module, *args, layout=LAYOUT):
    gm, _ = graph_of(model, *args)
    decisions = analyze(gm, parse_options({"layout": layout}))
    return gm, find_regions(gm.graph, decisions, dict(gm.named_modules()))


# --- regions and chains --------------------------------------------------------------------------


def test_scmnet_sublayers_are_units_and_spatial_camera_motion_form_chains(scm):
    x, cond = scm_inputs(0)
    _, plan = plan_of(scm, x, torch.ones(1), cond)
    names = [u.name for u in plan.units]
    assert names == [f"blocks.{b}.{s}" for b in (0, 1) for s in ("spatial", "camera", "motion", "cross", "mlp")]
    assert [u.kind for u in plan.units[:5]] == ["spatial", "view", "temporal", "cross", "other"]
    assert [c.units for c in plan.chains] == [(0, 1, 2), (5, 6, 7)]
    assert [u.token_site is not None for u in plan.units[:5]] == [False, True, True, False, False]
    assert plan.stream_input.name == "l_x_"


def test_joint_dit_has_units_but_no_chain():
    torch.manual_seed(0)
    model = Sculpt4DDiT("tiny", depth=1, frames=4).eval()
    cfg = model.config
    x = torch.randn(1, 4, cfg.tokens_per_frame, cfg.in_channels)
    cond = torch.randn(1, cfg.image_tokens, cfg.cond_dim)
    _, plan = plan_of(model, x, torch.ones(1), cond, layout={"frames": 4, "tokens_per_frame": cfg.tokens_per_frame})
    kinds = [u.kind for u in plan.units]
    assert "spatial" in kinds and "spatiotemporal" in kinds
    assert plan.chains == []




def test_model_without_residual_sublayers_is_left_uncached_with_a_warning_or_an_error():
    model, x = NoResidual().eval(), torch.randn(2, 16, 8)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        out = torch.compile(model, backend="turbo4d", options={"target": "eager", "cache": {}})(x)
    assert torch.allclose(out, model(x))
    assert any("left uncached" in str(w.message) for w in caught if issubclass(w.category, t4dopt.T4DWarning))
    torch._dynamo.reset()
    with pytest.raises(Exception, match="left uncached"), torch.no_grad():
        torch.compile(model, backend="turbo4d", options={"target": "eager", "cache": {}, "strict": True})(x)


# --- exactness ---------------------------------------------------------------------------------------


def test_threshold_zero_is_exactly_the_uncached_model(scm):
    uncached = sample(compiled(scm, None), seed=1)
    torch._dynamo.reset()
    model = compiled(scm, {"threshold": 0.0})
    assert torch.equal(sample(model, seed=1), uncached)
    sample(model, seed=2)
    assert all(u.calls == u.computed == STEPS for u in t4dopt.cache_report(scm).units)  # the last generation only


@pytest.fixture(params=["step graphs", "segments"])
def calls_run_as(request, monkeypatch) -> str:
    """Run uniform calls as whole-call graphs (the default) or, with them switched off, segment by segment."""
    if request.param == "segments":
        monkeypatch.setattr(cache_build, "step_graphs", lambda *args: None)
    return request.param


def test_calls_computed_in_full_are_exactly_the_uncached_model(scm, calls_run_as):
    """Warm-up over every step: all levels on, yet every unit computes."""
    uncached = sample(compiled(scm, None), seed=2)
    torch._dynamo.reset()
    model = compiled(scm, {"threshold": 10.0, "warmup": STEPS})
    assert torch.equal(sample(model, seed=2), uncached)
    assert all(u.computed == u.calls == STEPS for u in t4dopt.cache_report(scm).units)
    assert all((r.executor.step_graphs is None) == (calls_run_as == "segments") for r in runtimes_of(scm))


def compiled_runtime(model: nn.Module, cache: dict, seed: int):
    """`model` compiled with `cache` and called once, and the runtime that call built (state reset)."""
    before = set(runtimes_of(model))
    result = compiled(model, cache)
    sample(result, seed, steps=1)
    (runtime,) = set(runtimes_of(model)) - before
    t4dopt.reset(model)
    return result, runtime


class CountingCalls:
    def __init__(self, function):
        self.function, self.calls = function, 0

    def __call__(self, *args):
        self.calls += 1
        return self.function(*args)


def test_uniform_calls_run_as_one_graph_and_match_segments(scm):
    """Fixed-stride reuse: computed calls run the tapped graph, reused calls the rebuilt graph, no segment runs."""
    cache = {"threshold": 10.0, "max_reuse": 3, "steps": STEPS}
    segmented, runtime = compiled_runtime(scm, cache, 16)
    runtime.executor.step_graphs = None
    expected = sample(segmented, 16)
    torch._dynamo.reset()
    model, runtime = compiled_runtime(scm, cache, 16)
    graphs = runtime.executor.step_graphs
    computed, reused = CountingCalls(graphs.computed), {}

    def reused_for(orders):
        return reused.setdefault(orders, CountingCalls(graphs.reused(orders)))

    runtime.executor.step_graphs = dataclasses.replace(graphs, computed=computed, reused=reused_for)
    segments = runtime.executor.segments
    segments.runners = [runners._replace(plain=CountingCalls(runners.plain)) for runners in segments.runners]
    got = sample(model, 16)
    report = t4dopt.cache_report(scm).units
    assert computed.calls == report[0].computed and computed.calls < STEPS
    assert sum(r.calls for r in reused.values()) == STEPS - computed.calls
    assert all(runners.plain.calls == 0 for runners in segments.runners)
    assert torch.allclose(got, expected, atol=1e-5)


def test_mixed_calls_through_segments_match_segments_alone(scm, calls_run_as):
    """Drift-driven reuse mixes computed and reused units within a call; every path gives the same sample."""
    cache = {"threshold": 0.2, "max_reuse": 3, "steps": STEPS}
    results = {}
    for path in ("default", "segments"):
        torch._dynamo.reset()
        model, runtime = compiled_runtime(scm, cache, 17)
        if path == "segments":
            runtime.executor.step_graphs = None
        results[path] = sample(model, 17)
    modes = t4dopt.cache_report(scm).units
    assert sum(u.computed for u in modes) < STEPS * len(modes)
    assert torch.allclose(results["default"], results["segments"], atol=1e-5)


class ResidualStack(nn.Module):
    """Timestep-conditioned attention + MLP blocks over [B, 32, 4] tokens; `in_place` spells ``h += f(h)``;
    `cast` spells the MLP's residual as Wan does, ``h = (h.float() + mlp(h)).type_as(h)``."""

    def __init__(self, in_place: bool, skip: bool = False, cast: bool = False):
        super().__init__()
        self.in_place, self.skip, self.cast = in_place, skip, cast
        self.embed, self.time, self.head = nn.Linear(4, 16), nn.Linear(1, 16), nn.Linear(16, 4)
        self.qkv = nn.ModuleList(nn.Linear(16, 48) for _ in range(2))
        self.mlp = nn.ModuleList(nn.Linear(16, 16) for _ in range(2))

    def forward(self, x, t):
        h = self.embed(x) + self.time(t.view(-1, 1, 1))
        start = h
        for qkv, mlp in zip(self.qkv, self.mlp):
            q, k, v = qkv(h).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
            attention = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
            if self.in_place:
                h += attention
                h += mlp(h)
            elif self.cast:
                h = h + attention
                h = (h.float() + mlp(h)).type_as(h)
            else:
                h = h + attention
                h = h + mlp(h)
        # With `skip`, `start` is the stream's own tensor: in place, it has seen every addition.
        return self.head(h + start if self.skip else h)


def run_residual_stack(model: nn.Module, cache: dict | None) -> list[torch.Tensor]:
    compiled_model = torch.compile(model, backend="turbo4d", options={
        "target": "eager", "layout": {"frames": 4, "tokens_per_frame": 8}, **({"cache": cache} if cache else {})})
    x = torch.randn(1, 32, 4, generator=torch.Generator().manual_seed(0))
    # The same latents at every timestep is no sampling loop: an explicit scope says it is one generation.
    with torch.no_grad(), t4dopt.generation(model):
        return [compiled_model(x, torch.full((1,), float(t))) for t in torch.linspace(1, 0, 6)]


def test_in_place_residual_additions_are_cached_like_out_of_place_ones():
    torch.manual_seed(0)
    out_of_place = ResidualStack(in_place=False).eval()
    in_place = ResidualStack(in_place=True).eval()
    in_place.load_state_dict(out_of_place.state_dict())
    cache = {"threshold": 10.0, "max_reuse": 3, "steps": 6}
    expected = run_residual_stack(out_of_place, cache)
    torch._dynamo.reset()
    got = run_residual_stack(in_place, cache)
    assert sum(u.reused for u in t4dopt.cache_report(in_place).units) > 0
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, expected))


def test_second_order_reuse_is_newtons_polynomial_through_the_last_three_residuals():
    """order=2: a reused unit adds ``r2 + slope * s + curvature * s * (s + gap)``. Computed at steps 0, 1, 2 and
    reused at step 3 (s = gap = 1) that is ``3 r2 - 3 r1 + r0``; at step 4 too (a slope is carried no farther
    than its gap). Checked against each sublayer's residual in the eager model, written out here."""
    torch.manual_seed(0)
    model = ResidualStack(in_place=False).eval()
    got = run_residual_stack(model, {"threshold": 10.0, "max_reuse": 3, "warmup": 3, "final": 1, "steps": 6,
                                     "order": 2})
    assert [(u.computed, u.reused) for u in t4dopt.cache_report(model).units] == [(4, 2)] * 4
    x = torch.randn(1, 32, 4, generator=torch.Generator().manual_seed(0))

    def eager(t):
        """The stream's entry, each sublayer's residual, and the output, at timestep `t`."""
        h = entry = model.embed(x) + model.time(t.view(-1, 1, 1))
        residuals = []
        for qkv, mlp in zip(model.qkv, model.mlp):
            q, k, v = qkv(h).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
            residuals.append(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))
            h = h + residuals[-1]
            residuals.append(mlp(h))
            h = h + residuals[-1]
        return entry, residuals, model.head(h)

    with torch.no_grad():
        runs = [eager(torch.full((1,), float(t))) for t in torch.linspace(1, 0, 6)]
        last_three = list(zip(runs[0][1], runs[1][1], runs[2][1]))
        predicted = sum(3 * r2 - 3 * r1 + r0 for r0, r1, r2 in last_three)
        along_slope = sum(2 * r2 - r1 for _, r1, r2 in last_three)
        for step in (0, 1, 2, 5):
            assert torch.allclose(got[step], runs[step][2], atol=1e-6)
        for step in (3, 4):
            error = (got[step] - model.head(runs[step][0] + predicted)).abs().max()
            first_order = (got[step] - model.head(runs[step][0] + along_slope)).abs().max()
            assert error < 1e-6 and first_order > 1e-5


def test_a_cast_after_the_residual_addition_stays_inside_its_unit():
    """Wan's sublayers: ``(h.float() + f(h)).type_as(h)`` reads only the entry's dtype after the addition. The
    cast belongs to the unit, so the units stay adjacent and a reused call rebuilds the stack in one sum;
    reused, it equals the same model spelt plainly."""
    torch.manual_seed(0)
    plain = ResidualStack(in_place=False).eval()
    cast = ResidualStack(in_place=False, cast=True).eval()
    cast.load_state_dict(plain.state_dict())
    cache = {"threshold": 10.0, "max_reuse": 3, "steps": 6}
    expected = run_residual_stack(plain, cache)
    torch._dynamo.reset()
    got = run_residual_stack(cast, cache)
    runtime = next(iter(runtimes_of(cast)))
    assert len(runtime.program.spans()) == 1
    assert sum(u.reused for u in t4dopt.cache_report(cast).units) > 0
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, expected))


class CastDownStack(nn.Module):
    """One block whose MLP residual is added in float32 and cast down to bfloat16, which the head then runs in."""

    def __init__(self):
        super().__init__()
        self.embed, self.time = nn.Linear(4, 16), nn.Linear(1, 16)
        self.qkv, self.mlp, self.head = nn.Linear(16, 48), nn.Linear(16, 16), nn.Linear(16, 4).to(torch.bfloat16)

    def forward(self, x, t):
        h = self.embed(x) + self.time(t.view(-1, 1, 1))
        q, k, v = self.qkv(h).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
        h = h + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        h = (h + self.mlp(h)).to(torch.bfloat16)
        return self.head(h)


def test_a_cast_to_another_dtype_stays_out_of_its_unit():
    """A rebuilt exit (entry + residual) has the entry's dtype: a cast to another one is not the unit's."""
    _, plan = plan_of(CastDownStack().eval(), torch.randn(1, 32, 4), torch.ones(1))
    mlp = plan.units[-1]
    assert mlp.name == "mlp" and example_tensor(mlp.exit).dtype == torch.float32, mlp.exit


def test_a_bfloat16_unit_ending_in_a_cast_reuses_its_cast_residual():
    """In bfloat16 the ``type_as`` after ``h.float() + mlp(h)`` rounds: the unit's exit is the rounded value, so
    a reuse adds ``exit - entry`` of the last computation in bfloat16, every unit's in one sum. Computed
    steps equal the model exactly; reused ones equal that rule, written out here on the eager model."""
    torch.manual_seed(0)
    model = ResidualStack(in_place=False, cast=True).eval().to(torch.bfloat16)
    compiled_model = torch.compile(model, backend="turbo4d", options={
        "target": "eager", "layout": {"frames": 4, "tokens_per_frame": 8},
        "cache": {"threshold": 10.0, "max_reuse": 3, "warmup": 3, "final": 1, "steps": 6, "order": 0}})
    x = torch.randn(1, 32, 4, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    times = [torch.full((1,), float(t), dtype=torch.bfloat16) for t in torch.linspace(1, 0, 6)]
    with torch.no_grad(), t4dopt.generation(model):
        got = [compiled_model(x, t) for t in times]
    assert [(u.computed, u.reused) for u in t4dopt.cache_report(model).units] == [(4, 2)] * 4
    assert len(next(iter(runtimes_of(model))).program.spans()) == 1

    with torch.no_grad():
        for step in (0, 1, 2, 5):
            assert torch.equal(got[step], model(x, times[step]))
        h = model.embed(x) + model.time(times[2].view(-1, 1, 1))
        saved = []
        for qkv, mlp in zip(model.qkv, model.mlp):
            q, k, v = qkv(h).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
            after = h + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
            saved.append(after - h)
            h, after = after, (after.float() + mlp(after)).type_as(after)
            saved.append(after - h)
            h = after
        total = saved[0]
        for residual in saved[1:]:
            total = total + residual
        for step in (3, 4):
            entry = model.embed(x) + model.time(times[step].view(-1, 1, 1))
            expected = model.head(entry + total)
            assert torch.allclose(got[step].float(), expected.float(), atol=2e-2, rtol=0)
            assert (got[step].float() - model.head(entry).float()).abs().max() > 0.1


def test_a_span_reused_in_one_sum_measures_every_units_drift():
    """Reused in one sum, a span's inner entries are never made: the drift of its entry is read back for every
    unit in it, so per-unit decisions do not run on rates left over from each unit's last computation."""
    torch.manual_seed(0)
    model = ResidualStack(in_place=False).eval()
    compiled_model = torch.compile(model, backend="turbo4d", options={
        "target": "eager", "layout": {"frames": 4, "tokens_per_frame": 8},
        "cache": {"threshold": 10.0, "max_reuse": 3, "warmup": 2, "decision": "unit"}})
    x = torch.randn(1, 32, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), t4dopt.generation(model):
        for t in torch.linspace(1, 0, 6):
            compiled_model(x, torch.full((1,), float(t)))
        # After the sixth call (computed), the rates are those read back from the fifth (reused).
        runtime = next(iter(runtimes_of(model)))
        (track,) = [track for domain in runtime.generations.domains.values() for track in domain.tracks]
        rates = [memory.drift.rate for memory in track.slot.units]
    assert len(runtime.program.spans()) == 1
    assert [(u.computed, u.reused) for u in t4dopt.cache_report(model).units] == [(3, 3)] * 4
    assert rates[0] is not None and rates == [rates[0]] * len(rates), rates


def test_in_place_addition_another_value_sees_is_left_in_place():
    torch.manual_seed(0)
    model = ResidualStack(in_place=True, skip=True).eval()
    gm, _ = graph_of(model, torch.randn(1, 32, 4), torch.ones(1))
    assert functional_residuals(gm.graph) == 0
    uncached = [model(torch.randn(1, 32, 4, generator=torch.Generator().manual_seed(0)), torch.full((1,), float(t)))
                for t in torch.linspace(1, 0, 6)]
    with pytest.warns(t4dopt.T4DWarning, match="left uncached"):
        got = run_residual_stack(model, {"threshold": 10.0, "max_reuse": 3})
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, uncached))


def test_step_counts_past_the_end_of_the_table_stay_exact():
    arithmetic = Arithmetic(lambda gm: gm, limit=4)
    like = torch.zeros(3)
    assert float(arithmetic.steps(3, like)) == 3.0
    assert float(arithmetic.steps(9, like)) == 9.0 and float(arithmetic.inverse(9, like)) == pytest.approx(1 / 9)
    assert float(arithmetic.inverse(0, like)) == 1.0


def test_reused_graph_drops_every_sublayer_and_what_only_they_use(scm):
    x, cond = scm_inputs(0)
    gm, plan = plan_of(scm, x, torch.ones(1), cond)
    program = prepare(gm, analyze(gm, parse_options({"layout": LAYOUT})), CacheSpec()).program
    graph = reused_graph(gm, plan, program.spans(), [1] * len(program.spans())).module.graph
    targets = [node.target for node in graph.nodes if node.op == "call_function"]
    assert F.scaled_dot_product_attention not in targets
    # Left: the patch embedding and the final layer; the timestep MLP and modulation fed only the sublayers.
    assert sum(target in (F.linear, torch._C._nn.linear) for target in targets) == 2
    assert [node.target for node in graph.nodes if node.op == "call_function"].count(rebuilt) == len(program.spans())


def test_refresh_rows_recomputes_the_most_moved_rows_exactly():
    generator = torch.Generator().manual_seed(0)
    rows, heads, length, dim = 12, 2, 5, 8
    q, k, v = (torch.randn(rows, heads, length, dim, generator=generator) for _ in range(3))
    reference_q = q.clone()
    moved = [3, 7, 10]
    reference_q[moved] += 0.5
    reference_q[0] += 0.01
    cached = torch.randn(rows, heads, length, dim, generator=generator)
    out, new_reference = refresh_rows(q, k, v, reference_q, cached, len(moved), None, False)
    full = torch.ones(length, length, dtype=torch.bool)
    expected = dense_masked_attention(q[moved].double(), k[moved].double(), v[moved].double(), full)
    assert torch.allclose(out[moved].double(), expected, atol=1e-6)
    kept = [i for i in range(rows) if i not in moved]
    assert torch.equal(out[kept], cached[kept])
    assert torch.equal(new_reference[moved], q[moved]) and torch.equal(new_reference[kept], reference_q[kept])


def test_pruned_segment_recomputes_rows_like_the_full_segment(scm):
    """The token variant of the camera unit: with every row recomputed it equals the full unit."""
    x, cond = scm_inputs(3)
    gm, example_inputs = graph_of(scm, x, torch.full((1,), 0.5), cond)
    plan = find_regions(gm.graph, analyze(gm, parse_options({"layout": LAYOUT})), dict(gm.named_modules()))
    camera = plan.units[1]
    segment = next(s for s in split(gm, plan, token_ratio=1.0) if s.unit == camera.index)
    values = node_values(gm, tuple(example_inputs))
    with torch.no_grad():
        inputs = [values[n.name] for n in segment.inputs]
        *full_out, query, rows = segment.token_full(*inputs)
        *pruned_out, new_query, new_rows = segment.token_pruned(*inputs, query + 1.0, torch.zeros_like(rows))
    assert torch.equal(full_out[0], values[camera.exit.name])
    assert torch.allclose(pruned_out[0], full_out[0], atol=1e-6)
    assert torch.allclose(new_rows, rows, atol=1e-6) and torch.equal(new_query, query)


# --- generations, guidance, batch size -------------------------------------------------------------


def test_back_to_back_generations_each_equal_a_fresh_run(scm):
    cache = {"threshold": 0.1}
    model = compiled(scm, cache)
    first, second, first_again = sample(model, 4), sample(model, 5), sample(model, 4)
    torch._dynamo.reset()
    fresh_second = sample(compiled(scm, cache), 5)
    assert torch.equal(second, fresh_second)
    assert torch.equal(first, first_again)
    assert t4dopt.cache_report(scm).flops_saved > 0.2


def test_reset_restarts_a_generation_at_the_same_timestep(scm):
    cache = {"threshold": 0.1}
    model = compiled(scm, cache)
    x, cond = scm_inputs(6)
    times = flow_matching_timesteps(STEPS).tolist()
    with torch.no_grad():
        # A generation cut short after 4 steps, then the same generation from its start.
        partial = x
        for t, t_next in zip(times[:4], times[1:5]):
            partial = partial + (t_next - t) * model(partial, torch.full((1,), t), cond)
        assert t4dopt.reset(scm) >= 1
        restarted = sample_flow_matching(model, x, cond, steps=STEPS)
    torch._dynamo.reset()
    assert torch.equal(restarted, sample(compiled(scm, cache), 6))


def guided(model, seed: int, *, uncond_first: bool) -> torch.Tensor:
    """Two calls per step (guidance with scale 1): the unconditional one must not disturb the other."""
    x, cond = scm_inputs(seed)
    times = flow_matching_timesteps(STEPS).tolist()
    with torch.no_grad():
        for t, t_next in zip(times[:-1], times[1:]):
            t_batch = torch.full((1,), t)
            if uncond_first:
                model(x, t_batch, torch.zeros_like(cond))
                velocity = model(x, t_batch, cond)
            else:
                velocity = model(x, t_batch, cond)
                model(x, t_batch, torch.zeros_like(cond))
            x = x + (t_next - t) * velocity
    return x


def test_two_calls_per_step_keep_separate_state(scm):
    cache = {"threshold": 0.1}
    with_guidance = guided(compiled(scm, cache), 7, uncond_first=False)
    report = t4dopt.cache_report(scm)
    assert all(u.calls == 2 * STEPS for u in report.units)
    torch._dynamo.reset()
    assert torch.equal(with_guidance, sample(compiled(scm, cache), 7))


def test_batch_size_change_starts_a_new_generation(scm):
    cache = {"threshold": 0.1}
    model = compiled(scm, cache)
    one, two = sample(model, 8, batch=1), sample(model, 8, batch=2)
    torch._dynamo.reset()
    assert torch.equal(two, sample(compiled(scm, cache), 8, batch=2))
    torch._dynamo.reset()
    assert torch.equal(one, sample(compiled(scm, cache), 8, batch=1))


# --- decisions: quality, levels, syncs ---------------------------------------------------------------


def test_trained_scm_keeps_its_sample_at_a_moderate_threshold(scm):
    full = sample(scm, 9, steps=20)
    cached = sample(compiled(scm, {"threshold": 0.1}), 9, steps=20)
    report = t4dopt.cache_report(scm)
    assert psnr(cached, full) >= 30.0
    assert sum(u.reused + u.bypassed for u in report.units) > 0.4 * sum(u.calls for u in report.units)


@pytest.mark.parametrize("levels, used", [(["block"], "reused"), (["token"], "pruned"), (["chain"], "bypassed")])
def test_each_level_alone_does_only_its_own_kind_of_reuse(scm, levels, used):
    sample(compiled(scm, {"threshold": 0.3, "levels": levels}), 10)
    units = t4dopt.cache_report(scm).units
    totals = {kind: sum(getattr(u, kind) for u in units) for kind in ("reused", "pruned", "bypassed")}
    assert totals[used] > 0
    assert all(count == 0 for kind, count in totals.items() if kind != used)
    if used != "reused":
        assert all(getattr(u, used) == 0 for u in units if u.kind in ("cross", "other"))


def test_first_order_extrapolation_keeps_closer_to_full_compute(scm):
    full = sample(scm, 16, steps=30)
    quality = {}
    for order in (0, 1):
        torch._dynamo.reset()
        cached = sample(compiled(scm, {"threshold": 0.2, "max_reuse": 6, "order": order, "steps": 30}), 16, steps=30)
        quality[order] = psnr(cached, full)
    assert quality[1] > quality[0]


def test_reused_sublayers_keep_the_model_dtype():
    torch.manual_seed(0)
    model = SCMNet(pretrained("scm-tiny").config, depth=1).eval().to(torch.bfloat16)
    x, cond = scm_inputs(17)
    with torch.no_grad():
        out = sample_flow_matching(compiled(model, {"threshold": 10.0, "warmup": 3}), x.bfloat16(), cond.bfloat16(),
                                   steps=STEPS)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert sum(u.reused + u.bypassed for u in t4dopt.cache_report(model).units) > 0


def test_warmup_final_and_max_reuse_are_honoured(scm):
    sample(compiled(scm, {"threshold": 10.0, "warmup": 3, "final": 2, "max_reuse": 2, "steps": STEPS}), 11)
    for unit in t4dopt.cache_report(scm).units:
        assert unit.calls == STEPS
        # Steps 0-2 and 8-9 computed; in between at most two reuses in a row: 3-4 reused, 5 computed, 6-7 reused.
        assert unit.computed == 6


def test_one_device_read_per_call(scm, monkeypatch):
    model = compiled(scm, {"threshold": 0.1})
    sample(model, 12, steps=3)
    x, cond = scm_inputs(12)
    times = flow_matching_timesteps(STEPS).tolist()
    reads = []
    for name in ("tolist", "item", "__bool__", "__float__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, _o=original, _n=name: reads.append(_n) or _o(self))
    with torch.no_grad():
        for t, t_next in zip(times[:-1], times[1:]):
            x = x + (t_next - t) * model(x, torch.full((1,), t), cond)
    monkeypatch.undo()
    assert len(reads) <= STEPS
    assert sum(u.reused + u.bypassed + u.pruned for u in t4dopt.cache_report(scm).units) > 0


def test_gradients_enabled_compute_in_full_and_warn(scm):
    model = compiled(scm, {"threshold": 10.0})
    x, cond = scm_inputs(13)
    with pytest.warns(t4dopt.T4DWarning, match="gradients are enabled"):
        out = model(x, torch.ones(1), cond)
    assert torch.allclose(out, scm(x, torch.ones(1), cond), atol=1e-5)


def test_report_table_names_every_unit(scm):
    sample(compiled(scm, {"threshold": 0.2}), 14)
    report = t4dopt.cache_report(scm)
    text = report.table()
    assert "blocks.1.motion" in text and "attention FLOPs saved" in text
    assert 0 < report.flops_saved < 1
    for unit in report.units:
        assert unit.computed + unit.reused + unit.pruned + unit.bypassed == unit.calls == STEPS
        assert 0 <= unit.flops_saved <= unit.flops_dense + 1e-3


@pytest.mark.parametrize("cache, option", [
    ({"threshold": -0.1}, "cache['threshold']"),
    ({"threshold": "high"}, "cache['threshold']"),
    ({"warmup": -1}, "cache['warmup']"),
    ({"max_reuse": 0}, "cache['max_reuse']"),
    ({"token_ratio": 1.5}, "cache['token_ratio']"),
    ({"levels": ["block", "frame"]}, "cache['levels']"),
    ({"levels": "block"}, "cache['levels']"),
    ({"steps": 0}, "cache['steps']"),
    ({"order": 3}, "cache['order']"),
    ({"thresold": 0.1}, "cache['thresold']"),
    ([0.1], "cache"),
])
def test_bad_cache_options_name_the_option(cache, option):
    with pytest.raises(t4dopt.T4DOptionError) as error:
        parse_options({"cache": cache})
    assert option in str(error.value) and "allowed" in str(error.value)


def test_inductor_segments_match_eager_segments():
    torch.manual_seed(0)
    config = pretrained("scm-tiny").config
    model = SCMNet(config, depth=1).eval()
    cache = {"threshold": 0.2, "warmup": 1}
    eager = sample(compiled(model, cache), 15, steps=5)
    torch._dynamo.reset()
    inductor = sample(compiled(model, cache, target="inductor"), 15, steps=5)
    assert (inductor - eager).abs().max() <= 1e-4 * eager.abs().max()
    assert not math.isnan(float(inductor.sum()))


# --- lowered graphs: what they are keyed by ------------------------------------------------------


def test_lowered_graphs_are_keyed_by_strides_and_grad_mode():
    graph = torch.fx.symbolic_trace(lambda a: a * 2)
    lowerings = []

    def lower(gm, example_inputs):
        lowerings.append([(tuple(a.shape), a.stride()) for a in example_inputs])
        return gm

    lazy = LazyLowered(graph, lower)
    base = torch.randn(3, 4)
    lazy(base)
    lazy(base.clone())                 # same shape and strides: no new lowering
    lazy(base.t().contiguous().t())    # same shape, transposed strides
    with torch.no_grad():
        lazy(base)                     # no autograd
    assert lowerings == [[((3, 4), (4, 1))], [((3, 4), (1, 3))], [((3, 4), (4, 1))]]


class FusedCamera(nn.Module):
    """Camera attention over [B*T*P, V] rows, from one fused qkv projection of the permuted tokens.

    Its queries are a strided view of the projection: tapped from the whole-call graph they
    arrive non-contiguous, from the previous prune contiguous.
    """

    GRID = {"views": 4, "frames": 3, "tokens_per_frame": 5}

    def __init__(self, channels=16, heads=2):
        super().__init__()
        torch.manual_seed(0)
        self.channels, self.heads = channels, heads
        self.embed, self.time, self.head = nn.Linear(4, channels), nn.Linear(1, channels), nn.Linear(channels, 4)
        self.cond = nn.Linear(4, channels)
        self.qkv, self.out = nn.Linear(channels, 3 * channels), nn.Linear(channels, channels)

    def forward(self, x, t, cond):
        b, v, f, p, _ = x.shape
        c = self.channels
        h = self.embed(x) + self.time(t.view(-1, 1, 1, 1, 1)) + self.cond(cond).mean(1).view(b, 1, 1, 1, c)
        rows = h.permute(0, 2, 3, 1, 4).reshape(b * f * p, v, c)
        q, k, value = self.qkv(rows).view(b * f * p, v, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attention = F.scaled_dot_product_attention(q, k, value).transpose(1, 2).reshape(b, f, p, v, c)
        h = h + self.out(attention.permute(0, 3, 1, 2, 4))
        return self.head(h)


@pytest.mark.inductor
def test_pruned_rows_arriving_with_other_strides_get_their_own_lowering():
    model = FusedCamera().eval()
    grid = FusedCamera.GRID
    x = torch.randn(1, grid["views"], grid["frames"], grid["tokens_per_frame"], 4, generator=torch.Generator().manual_seed(0))
    cond = torch.randn(1, 3, 4, generator=torch.Generator().manual_seed(1))
    # Step 0 computes; steps 1-3 prune (the first from tapped rows, the next from pruned ones); 4 computes; 5 prunes.
    cache = {"threshold": 10.0, "levels": ["token"], "warmup": 1, "max_reuse": 3}
    results = {}
    for target in ("eager", "inductor"):
        torch._dynamo.reset()
        model_c = torch.compile(model, backend="turbo4d", options={"target": target, "layout": grid, "cache": cache})
        with torch.no_grad():
            results[target] = sample_flow_matching(model_c, x, cond, steps=6)
        (unit,) = t4dopt.cache_report(model).units
        assert (unit.kind, unit.computed, unit.pruned) == ("view", 3, 3)
    (runtime,) = runtimes_of(model)
    (pruned,) = [r.pruned for r in runtime.executor.segments.runners if r.pruned is not None]
    assert len(pruned.lowered) == 2, "the rows came with two layouts, each lowered for its own"
    assert (results["inductor"] - results["eager"]).abs().max() <= 1e-4 * results["eager"].abs().max()
