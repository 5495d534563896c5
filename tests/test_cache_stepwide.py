"""The step-wide decision (``cache={"decision": "step"}``): one decision per call for every unit.

Each call then computes every unit (the whole graph, saving as it goes) or reuses every unit
(the whole graph with every span rebuilt from stored residuals), never segment by segment.
Checked: exact at threshold 0 and when every call computes; a reused step against the stored
residual rule written out here on the eager model; generations each equal a fresh compile;
the probe (the first unit's predicted drift) and ``max_reuse`` in the policy; bad values.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import t4dopt
from denoising import STEPS, WIDTH, TinyDenoiser, compiled, fresh, loop, noise, reused, text, times
from t4dopt.cache import executor, policy
from t4dopt.cache.registry import runtimes_of
from t4dopt.cache.state import DriftState
from t4dopt.options import CacheSpec, parse_options

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

STEP = {"threshold": 0.6, "max_reuse": 3, "warmup": 1, "final": 0, "decision": "step"}


@pytest.fixture(scope="module")
def model():
    return TinyDenoiser().eval()


@pytest.fixture
def paths(monkeypatch) -> list[executor.CallPath]:
    """The path every cached call takes, in order."""
    taken: list[executor.CallPath] = []
    run = executor.Executor.run

    def counted(self, plan, args):
        taken.append(plan.path)
        return run(self, plan, args)

    monkeypatch.setattr(executor.Executor, "run", counted)
    return taken


def modes_per_call(model) -> set[tuple[int, int]]:
    """(computed, reused) of each unit over the last generation."""
    return {(u.computed, u.reused) for u in t4dopt.cache_report(model).units}


def test_threshold_zero_and_calls_computed_in_full_are_exactly_the_uncached_model(model, paths):
    x, cond = noise(0), text(0)
    uncached = loop(compiled(model, None), x, cond, times())
    for cache in ({**STEP, "threshold": 0.0}, {**STEP, "threshold": 10.0, "warmup": STEPS}):
        assert torch.equal(loop(fresh(model, cache), x, cond, times()), uncached)
    assert paths == [executor.CallPath.PLAIN] * STEPS + [executor.CallPath.COMPUTED] * STEPS


def test_calls_are_whole_computed_or_whole_reused_never_segments(model, paths):
    """At a threshold where some calls reuse, every unit takes one mode per call and each call one whole graph."""
    loop(compiled(model, STEP), noise(1), text(1), times())
    assert set(paths) == {executor.CallPath.COMPUTED, executor.CallPath.REUSED}
    assert len(modes_per_call(model)) == 1  # every unit computed (and reused) at the same calls
    assert reused(model) > 0


def eager_parts(model: TinyDenoiser, x: torch.Tensor, t: float, cond: torch.Tensor):
    """TinyDenoiser's forward written out: the stream entering the blocks, each sublayer's residual, the head."""
    b, f, p, c = x.shape
    h = entry = (model.embed(x) + model.time(torch.full((b, 1, 1, 1), t) / 1000)).reshape(b, f * p, -1)
    k_text, v_text = model.text(cond).chunk(2, dim=-1)
    residuals = []
    for qkv, cross, mlp in zip(model.qkv, model.cross, model.mlp):
        q, k, v = qkv(h).unflatten(-1, (3, 2, WIDTH // 2)).permute(2, 0, 3, 1, 4)
        residuals.append(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))
        h = h + residuals[-1]
        residuals.append(F.scaled_dot_product_attention(cross(h), k_text, v_text))
        h = h + residuals[-1]
        residuals.append(mlp(h))
        h = h + residuals[-1]
    return entry, residuals, lambda stream: model.head(stream).reshape(b, f, p, c)


@pytest.mark.parametrize("order", [0, 1])
def test_a_reused_step_adds_every_stored_residual_to_the_new_entry(model, order):
    """Computed at steps 0 and 1, reused at 2 and 3 (max_reuse 2), computed at 4 and 5: a reused step is
    ``head(entry_t + sum r1)`` (order 0) or ``head(entry_t + sum (2 r1 - r0))`` (order 1: the slope between the
    last two computations, carried one step: no farther than the gap it was measured over)."""
    steps, x, cond = 6, noise(2), text(2)
    schedule = times(steps)
    cache = {"threshold": 10.0, "max_reuse": 2, "warmup": 2, "final": 1, "steps": steps, "order": order,
             "decision": "step"}
    compiled_model = compiled(model, cache)
    got, inputs = [], x
    with torch.no_grad():
        for t, t_next in zip(schedule[:-1], schedule[1:]):
            got.append(compiled_model(inputs, torch.full((1,), t), cond))
            inputs = inputs + (t_next - t) / 1000 * got[-1]
        units = t4dopt.cache_report(model).units
        assert len(units) == 6 and {(u.computed, u.reused) for u in units} == {(4, 2)}
        step_inputs = [x]
        for out, t, t_next in zip(got, schedule[:-1], schedule[1:]):
            step_inputs.append(step_inputs[-1] + (t_next - t) / 1000 * out)
        parts = [eager_parts(model, step_inputs[i], schedule[i], cond) for i in range(steps)]
        r0, r1 = parts[0][1], parts[1][1]
        stored = sum(r1) if order == 0 else sum(2 * b - a for a, b in zip(r0, r1))
        other = sum(2 * b - a for a, b in zip(r0, r1)) if order == 0 else sum(r1)
        for step in (0, 1, 4, 5):
            entry, residuals, head = parts[step]
            assert torch.allclose(got[step], head(entry + sum(residuals)), atol=1e-5)
        for step in (2, 3):
            entry, _, head = parts[step]
            assert (got[step] - head(entry + stored)).abs().max() < 1e-5
            assert (got[step] - head(entry + other)).abs().max() > 1e-4


def test_back_to_back_and_guided_generations_each_equal_a_fresh_compile(model):
    model_c = compiled(model, STEP)
    runs = [loop(model_c, noise(seed), text(seed % 2), times()) for seed in (10, 11, 10)]
    uncond = torch.zeros_like(text(3))
    guided = loop(model_c, noise(3), text(3), times(), uncond=uncond)
    assert reused(model) > 0
    assert torch.equal(runs[0], runs[2])
    assert torch.equal(runs[1], loop(fresh(model, STEP), noise(11), text(1), times()))
    assert torch.equal(guided, loop(fresh(model, STEP), noise(3), text(3), times(), uncond=uncond))


def test_the_probe_is_the_first_units_drift_and_every_unit_must_be_allowed_to_reuse():
    spec = CacheSpec(threshold=0.1, warmup=1, final=0, max_reuse=2, decision="step")

    def states(rates, reuses=(0, 0, 0)):
        return [DriftState(rate=r, since=1, reuses=n, stored=True) for r, n in zip(rates, reuses)]

    def choose(units, decision="step"):
        return policy.choose(dataclasses.replace(spec, decision=decision), 3, 0.5, units, [], [],
                             [False] * len(units))

    R, C = policy.Mode.REUSE, policy.Mode.COMPUTE
    assert choose(states([0.05, 0.5, 0.5])) == [R, R, R]
    assert choose(states([0.05, 0.5, 0.5]), "unit") == [R, C, C]
    assert choose(states([0.2, 0.01, 0.01])) == [C, C, C]
    assert choose(states([0.05, 0.01, 0.01], reuses=(0, 2, 0))) == [C, C, C]   # one unit at max_reuse
    assert choose([DriftState(rate=None, since=1, stored=True)] + states([0.0, 0.0])) == [C, C, C]
    assert choose(states([0.01, 0.01, 0.01])[:2] + [DriftState()]) == [C, C, C]  # nothing stored yet
    assert policy.choose(spec, 0, 0.0, states([0.0, 0.0, 0.0]), [], [], [False] * 3) == [C, C, C]  # warm-up


@pytest.mark.parametrize("value", ["steps", "Step", "", 1, None, True, ["step"]])
def test_bad_decision_values_name_the_option_the_value_and_the_allowed_ones(value):
    with pytest.raises(t4dopt.T4DOptionError) as error:
        parse_options({"cache": {"decision": value}})
    assert (error.value.option, error.value.value) == ("cache['decision']", value)
    message = str(error.value)
    assert f"cache['decision']={value!r}" in message and '"unit"' in message and '"step"' in message


@pytest.mark.parametrize("decisions", [("block",), (), "step"])
def test_bad_calibrate_decisions_raise(model, decisions):
    with pytest.raises(t4dopt.T4DOptionError, match="decisions"):
        t4dopt.calibrate(model, lambda m: loop(m, noise(0), text(0), times()), {"psnr": 30.0},
                         options={"target": "eager"}, decisions=decisions)


class ViewAsStack(nn.Module):
    """Two blocks spelling the MLP's residual ``h = (h + mlp(h)).view_as(h)``: the ``view_as`` reads the MLP's
    entry outside its sublayer, so the attention's span and the MLP's touch (one's exit is the other's
    entry) without being one span. (A cast spelt so, as Wan's ``type_as``, belongs to the sublayer.)"""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.time, self.head = nn.Linear(4, 16), nn.Linear(1, 16), nn.Linear(16, 4)
        self.qkv = nn.ModuleList(nn.Linear(16, 48) for _ in range(2))
        self.mlp = nn.ModuleList(nn.Linear(16, 16) for _ in range(2))

    def forward(self, x, t):
        h = self.embed(x) + self.time(t.view(-1, 1, 1))
        for qkv, mlp in zip(self.qkv, self.mlp):
            q, k, v = qkv(h).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
            h = h + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
            h = (h + mlp(h)).view_as(h)
        return self.head(h)


def test_touching_spans_reuse_as_one_whole_graph_equal_to_segments(paths):
    """Each reused span starts from the value rebuilding the span before it (as segment by segment does),
    not from that span's computed exit: the whole reused graph needs none of the units' nodes."""
    model = ViewAsStack().eval()
    cache = {"threshold": 10.0, "max_reuse": 2, "warmup": 2, "final": 1, "steps": 6, "decision": "step"}
    x = torch.randn(1, 32, 4, generator=torch.Generator().manual_seed(0))
    results = {}
    for path in ("whole", "segments"):
        torch._dynamo.reset()
        compiled_model = torch.compile(model, backend="turbo4d", options={
            "target": "eager", "layout": {"frames": 4, "tokens_per_frame": 8}, "cache": cache})
        earlier = set(runtimes_of(model))
        with torch.no_grad(), t4dopt.generation(model):
            results[path] = [compiled_model(x, torch.ones(1))]
            (runtime,) = set(runtimes_of(model)) - earlier
            if path == "segments":
                runtime.executor.step_graphs = None
            results[path] += [compiled_model(x, torch.full((1,), float(t))) for t in torch.linspace(1, 0, 6)[1:]]
        spans = runtime.executor.spans
        assert len(spans) > 1 and any(runtime.program.units[a.last].exit == runtime.program.units[b.first].entry
                                      for a, b in zip(spans, spans[1:]))
    whole = paths[:6]
    assert executor.CallPath.REUSED in whole and executor.CallPath.SEGMENTS not in whole
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(results["whole"], results["segments"]))
