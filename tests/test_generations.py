"""Cached state never crosses generations: each loop equals a fresh compile of the same loop, exactly.

Every scenario below once leaked state between generations (issue 14, item 2): a warm-up or
stray call before a loop, a restart at a lower timestep, per-element timesteps, interleaved
generations in one thread or in two, many calls at one timestep. Each is run on one compiled
model and compared with a fresh compile (``torch._dynamo.reset()`` and compile again) that
runs only the loop in question: ``torch.equal``, or the call is refused (computed in full,
with a `T4DWarning`) and equals full compute exactly.

The model is `denoising.TinyDenoiser`; the cache settings reuse most steps after the warm-up,
so stale state would change the sample.
"""

import contextlib
import random
import threading
import warnings

import pytest
import torch

import t4dopt
from denoising import (CACHE, FRAMES, STEPS, TinyDenoiser, compiled, fresh, loop, noise, reused, text,
                       timestep_tensor, times)
from t4dopt.cache import generations as cache_generations
from t4dopt.cache.registry import runtimes_of

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

@pytest.fixture
def model():
    return TinyDenoiser().eval()


def test_the_cache_settings_reuse_and_change_the_sample(model):
    """Reuse happens, and differs from full compute: stale state would show."""
    x, cond = noise(0), text(0)
    cached = loop(compiled(model), x, cond, times())
    assert reused(model) > 0
    full = loop(fresh(model, {"threshold": 0.0}), x, cond, times())
    assert not torch.allclose(cached, full, atol=1e-4)


# --- calls before a loop -------------------------------------------------------------------------


@pytest.mark.parametrize("warmup_t, warmup_latents, warmup_text", [
    (1000.0, "other", "same"),
    (500.0, "other", "same"),
    (1000.0, "same", "same"),       # the loop's own first call, made once before the loop
    (500.0, "same", "same"),
    (700.0, "other", "other"),      # a stray call with other text
    (1000.0, "other", "zeros"),     # ... with the unconditional branch's text
    (1500.0, "other", "same"),      # above the loop's start
    (300.0, "same", "zeros"),
])
def test_a_call_before_the_loop_leaves_no_trace(model, warmup_t, warmup_latents, warmup_text):
    x, cond = noise(1), text(1)
    other = {"same": x, "other": noise(99)}[warmup_latents]
    other_text = {"same": cond, "other": text(99), "zeros": torch.zeros_like(cond)}[warmup_text]
    model_c = compiled(model)
    with torch.no_grad():
        model_c(other, timestep_tensor(warmup_t), other_text)
    got = loop(model_c, x, cond, times(), uncond=torch.zeros_like(cond))
    expected = loop(fresh(model), x, cond, times(), uncond=torch.zeros_like(cond))
    assert torch.equal(got, expected)


def test_several_stray_calls_then_a_guided_loop(model):
    x, cond = noise(2), text(2)
    model_c = compiled(model)
    with torch.no_grad():
        for seed, t in [(50, 900.0), (51, 1000.0), (52, 400.0), (53, 1000.0)]:
            model_c(noise(seed), timestep_tensor(t), text(seed))
    got = loop(model_c, x, cond, times(), uncond=torch.zeros_like(cond))
    assert torch.equal(got, loop(fresh(model), x, cond, times(), uncond=torch.zeros_like(cond)))


# --- generations after generations -----------------------------------------------------------------


@pytest.mark.parametrize("same_text", [True, False])
@pytest.mark.parametrize("same_noise", [True, False])
@pytest.mark.parametrize("stop_after, start", [(3, 0.6), (2, 0.9), (5, 0.45), (1, 0.95)])
def test_a_generation_stopped_early_then_one_restarting_lower(model, same_text, same_noise, stop_after, start):
    """img2img-like: an image noised to `start`; nothing tells the runtime a new generation begins."""
    x, cond = noise(3), text(3)
    model_c = compiled(model)
    schedule = times()
    loop(model_c, x, cond, schedule[:stop_after + 1])
    image = noise(77)
    restart_noise = x if same_noise else noise(78)
    start_latents = (1 - start) * image + start * restart_noise
    restart_text = cond if same_text else text(4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = loop(model_c, start_latents, restart_text, times(STEPS, start))
    expected = loop(fresh(model), start_latents, restart_text, times(STEPS, start))
    assert torch.equal(got, expected)
    messages = [str(w.message) for w in caught if issubclass(w.category, t4dopt.T4DWarning)]
    # Only a restart that looks like the next step by its timestep needs to say it was not confirmed.
    assert len(messages) <= 1 and all("not confirmed" in m for m in messages)


def test_back_to_back_generations_reuse_and_equal_fresh_runs(model):
    model_c = compiled(model)
    runs = [loop(model_c, noise(seed), text(seed % 2), times()) for seed in (10, 11, 10)]
    assert torch.equal(runs[0], runs[2])
    assert torch.equal(runs[1], loop(fresh(model), noise(11), text(1), times()))
    assert reused(model) > 0


@pytest.mark.parametrize("shape", ["frames", "tokens"])
def test_per_element_timesteps_second_run_equals_a_fresh_run(model, shape):
    """Diffusion forcing's per-frame [B, F] and Wan 2.2's per-token [B, F*P] timesteps: whole tensors compared."""
    model_c = compiled(model)
    first = loop(model_c, noise(5), text(5), times(), shape=shape)
    assert reused(model) > 0
    second = loop(model_c, noise(6), text(5), times(), shape=shape)
    assert torch.equal(second, loop(fresh(model), noise(6), text(5), times(), shape=shape))
    assert not torch.equal(first, second)


def diffusion_forcing(model, x, cond, steps=STEPS):
    """Per-frame timesteps on their own schedules (frame j at ``(1 - s / steps) ** (1 + j)``), each its own Euler step."""
    def timesteps(step):
        return torch.tensor([[1000.0 * (1 - step / steps) ** (1 + frame) for frame in range(FRAMES)]])

    with torch.no_grad():
        for step in range(steps):
            t, t_next = timesteps(step), timesteps(step + 1)
            x = x + ((t_next - t) / 1000).reshape(1, FRAMES, 1, 1) * model(x, t, cond)
    return x


def test_per_frame_schedules_second_run_equals_a_fresh_run(model):
    """Frames stepping by their own amounts: the steps continuity cannot confirm compute in full, with a warning."""
    model_c = compiled(model)
    with pytest.warns(t4dopt.T4DWarning, match="not confirmed"):
        diffusion_forcing(model_c, noise(7), text(7))
    got = diffusion_forcing(model_c, noise(8), text(7))
    assert torch.equal(got, diffusion_forcing(fresh(model), noise(8), text(7)))
    # In an explicit scope every step continues: more reuse, and equal to a fresh compile running it in a scope.
    detected = reused(model)
    model_c = fresh(model)
    with t4dopt.generation(model):
        scoped = diffusion_forcing(model_c, noise(8), text(7))
    assert reused(model) > detected
    model_f = fresh(model)
    with t4dopt.generation(model):
        assert torch.equal(scoped, diffusion_forcing(model_f, noise(8), text(7)))


# --- interleaved generations ----------------------------------------------------------------------


def interleaved(model, requests, schedule, seed):
    """Several guided generations advanced step by step on one model, their calls shuffled within each step."""
    order = random.Random(seed)
    states = [x for x, _ in requests]
    with torch.no_grad():
        for t, t_next in zip(schedule[:-1], schedule[1:]):
            calls = [(i, branch) for i in range(len(requests)) for branch in ("cond", "uncond")]
            order.shuffle(calls)
            predictions = {}
            for i, branch in calls:
                cond = requests[i][1] if branch == "cond" else torch.zeros_like(requests[i][1])
                predictions[i, branch] = model(states[i], timestep_tensor(t), cond)
            for i in range(len(requests)):
                c, u = predictions[i, "cond"], predictions[i, "uncond"]
                states[i] = states[i] + (t_next - t) / 1000 * (u + 3.0 * (c - u))
    return states


@pytest.mark.parametrize("same_text", [True, False])
def test_two_generations_interleaved_in_one_thread_each_equal_a_fresh_run(model, same_text):
    requests = [(noise(20), text(20)), (noise(21), text(20 if same_text else 21))]
    got = interleaved(compiled(model), requests, times(), seed=0)
    assert reused(model) > 0
    for (x, cond), result in zip(requests, got):
        assert torch.equal(result, loop(fresh(model), x, cond, times(), uncond=torch.zeros_like(cond)))


def test_guidance_branches_in_varying_order_keep_their_own_state(model):
    x, cond = noise(22), text(22)
    rng = random.Random(3)
    order = [rng.random() < 0.5 for _ in range(STEPS)]
    assert 0 < sum(order) < STEPS
    got = loop(compiled(model), x, cond, times(), uncond=torch.zeros_like(cond), order=order)
    expected = loop(fresh(model), x, cond, times(), uncond=torch.zeros_like(cond))
    assert torch.equal(got, expected)


@pytest.mark.parametrize("scoped", [False, True])
def test_two_threads_on_one_compiled_model_each_equal_a_fresh_run(model, scoped):
    requests = [(noise(30), text(30)), (noise(31), text(30))]
    model_c = compiled(model)
    results, errors = {}, []
    barrier = threading.Barrier(2)

    def stepping(x, cond, t, t_next):
        barrier.wait(timeout=60)
        return x + (t_next - t) / 1000 * model_c(x, timestep_tensor(t), cond)

    def worker(index):
        try:
            x, cond = requests[index]
            schedule = times()
            with torch.no_grad(), (t4dopt.generation(model) if scoped else contextlib.nullcontext()):
                for t, t_next in zip(schedule[:-1], schedule[1:]):
                    x = stepping(x, cond, t, t_next)
            results[index] = x
        except BaseException as error:  # noqa: BLE001 (reported below)
            errors.append(error)
            barrier.abort()

    with torch.no_grad():
        model_c(noise(0), timestep_tensor(1000.0), text(0))  # compile before the threads start
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    assert reused(model) > 0
    for index, (x, cond) in enumerate(requests):
        assert torch.equal(results[index], loop(fresh(model), x, cond, times()))


# --- explicit scopes and branch names ----------------------------------------------------------------


def test_a_scope_starts_a_generation_even_where_detection_would_continue(model):
    """Steps 0-3 outside, then steps 4-8 inside a scope: the scope's calls start from empty state."""
    x, cond = noise(40), text(40)
    schedule = times()
    model_c = compiled(model)
    half = loop(model_c, x, cond, schedule[:5])
    with t4dopt.generation(model):
        got = loop(model_c, half, cond, schedule[4:])
    assert runtimes_of(model)[0].held_bytes() > 0  # the detection track of steps 0-3 is still held
    model_f = fresh(model)
    with t4dopt.generation(model):
        expected = loop(model_f, half, cond, schedule[4:])
    assert torch.equal(got, expected)


def test_a_scope_frees_its_state_on_exit(model):
    model_c = compiled(model)
    with t4dopt.generation(model_c):
        loop(model_c, noise(41), text(41), times(), uncond=torch.zeros_like(text(41)))
        (runtime,) = runtimes_of(model)
        assert runtime.held_bytes() > 0
    assert runtime.held_bytes() == 0
    assert reused(model) > 0


def test_branch_names_win_over_the_inputs(model):
    """Conditioning that changes every step splits detection's branches; named branches keep their state."""
    x, cond = noise(42), text(42)

    def run(model_c):
        state = x
        with torch.no_grad(), t4dopt.generation(model):
            for step, (t, t_next) in enumerate(zip(times()[:-1], times()[1:])):
                with t4dopt.branch(model, "cond"):
                    c = model_c(state, timestep_tensor(t), cond + 0.01 * step)
                with t4dopt.branch(model, "uncond"):
                    u = model_c(state, timestep_tensor(t), torch.zeros_like(cond))
                state = state + (t_next - t) / 1000 * (u + 3 * (c - u))
        return state

    got = run(compiled(model))
    assert reused(model) > 0
    assert torch.equal(got, run(fresh(model)))


def test_warns_once_when_calls_are_not_confirmed(model):
    """A stochastic sampler (fresh noise each step) is not confirmed: each call computes in full, one warning."""
    def ancestral(model_c, seed):
        x, cond, generator = noise(seed), text(seed), torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for t, t_next in zip(times()[:-1], times()[1:]):
                x = x + (t_next - t) / 1000 * model_c(x, timestep_tensor(t), cond)
                x = x + 0.05 * torch.randn(x.shape, generator=generator)
        return x

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = ancestral(compiled(model), 43)
    assert sum("not confirmed" in str(w.message) for w in caught) == 1
    assert reused(model) == 0
    assert torch.equal(got, ancestral(fresh(model, {"threshold": 0.0}), 43))


# --- memory ---------------------------------------------------------------------------------------


def test_memory_stays_bounded_over_a_thousand_calls_at_one_timestep(model):
    model_c = compiled(model)
    held = []
    with torch.no_grad():
        for call in range(1000):
            model_c(noise(call % 7), timestep_tensor(500.0), text(call % 3))
            if call in (99, 999):
                (runtime,) = runtimes_of(model)
                held.append(runtime.held_bytes())
    assert 0 < held[1] <= 1.25 * held[0]
    assert sum(len(d.tracks) for d in runtime.generations.domains.values()) <= cache_generations.MAX_TRACKS


def test_a_generation_of_known_length_is_freed_after_its_last_step(model):
    model_c = compiled(model, {**CACHE, "steps": STEPS})
    loop(model_c, noise(44), text(44), times(), uncond=torch.zeros_like(text(44)))
    (runtime,) = runtimes_of(model)
    assert runtime.held_bytes() == 0 and reused(model) > 0


def test_inference_mode_sampling_reuses_and_equals_a_fresh_run(model):
    """Tensors made under inference mode carry no version counter; continuity still works."""
    x, cond = noise(45), text(45)

    def run(model_c):
        with torch.inference_mode():
            return loop(model_c, x, cond, times(), uncond=torch.zeros_like(cond))

    model_c = compiled(model)
    run(model_c)
    second = run(model_c)
    assert reused(model) > 0
    assert torch.equal(second, run(fresh(model)))


def test_a_scope_names_models_or_bundles():
    with pytest.raises(TypeError, match="neither a model"):
        with t4dopt.generation("model"):
            pass


def test_a_new_model_never_reads_a_dead_models_history():
    """Histories are found by the model's parameter object, not its id (ids are reused once freed)."""
    import gc

    from t4dopt.cache import continuity

    key = ((1, 4), torch.float32, torch.device("cpu"))
    first = torch.zeros(3)
    kept = continuity.history(first, key, 1)
    kept.records.append(continuity.Record((0.5,), (0,)))
    ident = id(first)
    del first
    gc.collect()
    assert ident not in continuity._histories.by_model
    for _ in range(10_000):  # a new tensor soon takes the freed id; it must start empty all the same
        second = torch.zeros(3)
        if id(second) == ident:
            break
    assert not continuity.history(second, key, 1).records


def test_a_new_model_is_not_taken_for_a_dead_one_in_reports():
    """`cache_report(model)` finds runtimes by the parameter objects, not their ids."""
    from t4dopt.cache.parameters import ParameterSet

    first = torch.nn.Parameter(torch.zeros(2))
    held = ParameterSet([first])
    assert held.holds(first)
    ident = id(first)
    del first
    for _ in range(10_000):
        second = torch.nn.Parameter(torch.zeros(2))
        if id(second) == ident:
            break
    assert not held.holds(second)
