"""The shipped tiny diffusers testbeds (wan-tiny, cogvideox-tiny): they load, sample in seconds, denoise
the procedural scenes far better than untrained twins, and sample as diffusers' pipelines call them."""

import copy
import inspect
import json
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import FirstBlockCacheConfig

import t4dopt
from t4dopt.data.tasks import EVAL_SEED, loss_at, video_batch
from t4dopt.models import flow_matching_timesteps, pretrained, sample_diffusers
from t4dopt.models.diffusers_testbeds import TESTBEDS, Denoiser, build_transformer, diffusers_class
from t4dopt.models.pretrained import DIFFUSERS_PRETRAINED, WEIGHTS

REPOSITORY = Path(__file__).resolve().parents[1]


def _held_out(name, batch, seed):
    return video_batch(batch, channels_first=TESTBEDS[name].channels_first, seed=seed)


def test_weights_are_shipped_small_with_their_metadata():
    from safetensors import safe_open

    assert set(DIFFUSERS_PRETRAINED) >= {"wan-tiny", "cogvideox-tiny"}
    for name in DIFFUSERS_PRETRAINED:
        path = WEIGHTS / f"{name}.safetensors"
        assert path.stat().st_size <= 5e6, f"{name}: {path.stat().st_size / 1e6:.1f} MB"
        with safe_open(str(path), framework="pt") as file:
            info = json.loads(file.metadata()["t4dopt"])
        assert info["library"] == "diffusers" and info["architecture"] == TESTBEDS[name].architecture
        assert info["config"] == json.loads(json.dumps(TESTBEDS[name].config))
        assert info["task"]["kind"] == "video" and "encoder_hidden_states" in info["task"]["conditioning"]
        assert info["eval"]["loss_t0.5"] < info["eval"]["untrained_loss_t0.5"]


def test_unknown_name_lists_the_diffusers_testbeds_too():
    with pytest.raises(ValueError, match="wan-tiny, cogvideox-tiny"):
        pretrained("wan-small")


def test_without_diffusers_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers now raises ImportError
    with pytest.raises(ImportError, match=r"t4dopt\[diffusers\]"):
        pretrained("wan-tiny")


@torch.no_grad()
@pytest.mark.parametrize("name", DIFFUSERS_PRETRAINED)
def test_loads_and_samples_in_seconds(name):
    diffusers_class(TESTBEDS[name].architecture)  # diffusers imports its model classes lazily: not counted
    start = time.perf_counter()
    model = pretrained(name)
    assert type(model).__name__ == TESTBEDS[name].architecture and not model.training
    x0, cond = _held_out(name, 2, EVAL_SEED)
    sample = sample_diffusers(model, torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)), cond, steps=4)
    assert sample.shape == x0.shape and torch.isfinite(sample).all()
    assert time.perf_counter() - start < 20


@torch.no_grad()
@pytest.mark.parametrize("name", DIFFUSERS_PRETRAINED)
def test_a_reused_call_rebuilds_every_block_in_one_sum(name):
    """Every sublayer of the testbeds is a unit and the units are adjacent (Wan's ``.type_as(h)`` after each
    addition included): a call reusing them all rebuilds the stack in one sum, not one per unit."""
    model = pretrained(name)
    compiled = torch.compile(copy.deepcopy(model), backend="turbo4d", options={"target": "eager", "cache": {}})
    x0, cond = _held_out(name, 1, EVAL_SEED)
    sample_diffusers(compiled, torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)), cond, steps=2)
    (runtime,) = t4dopt.cache.registry.runtimes_of(compiled)
    per_block = {"wan-tiny": 3, "cogvideox-tiny": 2}[name]  # self-attention (and cross-attention), feed-forward
    assert len(runtime.program.units) == per_block * model.config.num_layers
    assert [(span.first, span.last) for span in runtime.program.spans()] == [(0, len(runtime.program.units) - 1)]


@torch.no_grad()
@pytest.mark.parametrize("name", DIFFUSERS_PRETRAINED)
def test_trained_model_denoises_far_better_than_its_untrained_twin(name):
    model = pretrained(name)
    info = model.pretrained_info
    torch.manual_seed(0)
    twin = build_transformer(info["architecture"], info["config"]).eval()
    x0, cond = _held_out(name, 8, EVAL_SEED + 1)  # other scenes than the ones the training script scored
    trained, untrained = loss_at(Denoiser(model), x0, cond, 0.5), loss_at(Denoiser(twin), x0, cond, 0.5)
    print(f"{name}: loss at t=0.5 trained {trained:.3f}, untrained {untrained:.3f}")
    assert trained <= 0.25 * untrained


@torch.no_grad()
@pytest.mark.parametrize("name", DIFFUSERS_PRETRAINED)
def test_trained_model_draws_the_scene_it_is_shown(name):
    # From noise, 20 Euler steps land nearer the held-out scene whose first frame conditions them
    # than an untrained twin's sample does, and nearer than the same sample is to another scene.
    model = pretrained(name)
    torch.manual_seed(0)
    twin = build_transformer(model.pretrained_info["architecture"], model.pretrained_info["config"]).eval()
    x0, cond = _held_out(name, 4, EVAL_SEED + 2)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    sample, untrained = sample_diffusers(model, noise, cond, steps=20), sample_diffusers(twin, noise, cond, steps=20)
    error = (sample - x0).square().mean()
    assert error < 0.5 * (untrained - x0).square().mean()
    assert error < 0.5 * (sample - x0.roll(1, dims=0)).square().mean()


@torch.no_grad()
def test_sample_is_flow_matching_euler_called_as_diffusers_pipelines_call():
    # An explicit Euler loop written here, calling the transformer by hand, is the reference.
    model = pretrained("wan-tiny")
    x0, cond = _held_out("wan-tiny", 1, EVAL_SEED)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    times = flow_matching_timesteps(5, shift=3.0).tolist()
    x = noise
    for t, t_next in zip(times[:-1], times[1:]):
        v = model(hidden_states=x, timestep=torch.tensor([1000 * t]), encoder_hidden_states=cond, return_dict=False)[0]
        x = x + (t_next - t) * v
    seen = []
    sample = sample_diffusers(model, noise, cond, steps=5, shift=3.0, on_step=lambda i, t: seen.append((i, t)))
    torch.testing.assert_close(sample, x, rtol=0, atol=1e-6)
    assert torch.equal(sample, sample_diffusers(model, noise, cond, steps=5, shift=3.0))
    assert [i for i, _ in seen] == list(range(5)) and [t for _, t in seen] == pytest.approx([1000 * t for t in times[:-1]])


def test_each_call_runs_inside_the_transformers_cache_context():
    class Recorder:
        """Stands in for a diffusers transformer: records the cache context of every call."""

        def __init__(self):
            self.context, self.calls = None, []

        def cache_context(self, name, **kwargs):
            recorder = self

            class Scope:
                def __enter__(self):
                    recorder.context = (name, kwargs)

                def __exit__(self, *exc):
                    recorder.context = None

            return Scope()

        def __call__(self, hidden_states, timestep, encoder_hidden_states, return_dict):
            self.calls.append((self.context, float(timestep[0])))
            return (torch.zeros_like(hidden_states),)

    recorder = Recorder()
    sample_diffusers(recorder, torch.ones(1, 3, 2, 4, 4), torch.zeros(1, 4, 24), steps=4)
    times = flow_matching_timesteps(4).tolist()
    assert recorder.calls == [(("cond", {"step_index": i, "sigma": t, "num_inference_steps": 4}), pytest.approx(1000 * t))
                              for i, t in enumerate(times[:-1])]
    assert recorder.context is None


def test_readme_example_runs():
    readme = (REPOSITORY / "README.md").read_text()
    section = readme.split("### Trained tiny diffusers testbeds", 1)[1].split("\n### ", 1)[0]
    namespace = {}
    exec(compile(re.findall(r"```python\n(.+?)\n```", section, flags=re.S)[0], "README testbed example", "exec"),
         namespace)
    assert namespace["video"].shape == namespace["x0"].shape == (1, 3, 8, 16, 16)


def test_cache_peers_bench_quick_mode_runs(tmp_path):
    # The smoke test of bench/cache_peers.py: a few steps, one setting each, dynamo's eager backend.
    out = tmp_path / "peers.md"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPOSITORY), os.environ.get("PYTHONPATH")]))}
    subprocess.run([sys.executable, "bench/cache_peers.py", "--quick", "--threads", "1", "--families", "turbo4d",
                    "FirstBlockCache", "--markdown", str(out), "--plot-dir", str(tmp_path)],
                   cwd=REPOSITORY, env=env, check=True, timeout=300, capture_output=True)
    text = out.read_text()
    for row in ("| full compute |  | compiled |", "| turbo4d | threshold 0 | compiled |",
                "| turbo4d | threshold 0.3, max_reuse 4 | compiled |",
                "| turbo4d | threshold 0.3, max_reuse 4, step-wide | compiled |",
                "| FirstBlockCache | threshold 0.1 | eager |", "| FirstBlockCache | threshold 0.1 | compiled |"):
        assert row in text, text
    # Every turbo4d row ran through its cache in every timed round, though a hooked copy of the class
    # (FirstBlockCache, compiled) made dynamo skip the class's forward: the bench keeps that to its own compile.
    assert "ran without its cache" not in text and "no units" not in text, text
    # calibrate's pick is marked, or the line says why there is none (at 3 steps nothing may pay).
    assert "(calibrate's pick)" in text or re.search(r"^- calibrate: .+", text, flags=re.M), text
    assert (tmp_path / "cache_peers_wan-tiny_3.png").stat().st_size > 0


@pytest.mark.usefixtures("fresh_dynamo")
def test_a_hooked_copy_compiled_apart_leaves_the_other_copies_on_their_cache():
    # A copy with a diffusers cache hook breaks its graph inside the blocks' loop when compiled, and dynamo
    # then skips the class's forward for every copy. Compiled with isolate_recompiles, the hooked copy keeps
    # that to itself and our compiled copy still runs every call through its cache (CacheReport.total_calls
    # counts them); compiled without it, where dynamo skips our copy's forward, the warning says what to do.
    if "isolate_recompiles" not in inspect.signature(torch.compile).parameters:
        pytest.skip("torch.compile has no isolate_recompiles before torch 2.13")
    model = pretrained("wan-tiny")
    clean, cond = _held_out("wan-tiny", 1, EVAL_SEED)
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))
    ours_model = copy.deepcopy(model)
    ours = torch.compile(ours_model, backend="turbo4d",
                         options={"target": "eager", "cache": {"threshold": 0.5, "steps": 4, "warmup": 1, "final": 0}})

    def sampled(compiled) -> torch.Tensor:
        with torch.no_grad():
            return sample_diffusers(compiled, noise, cond, steps=4)

    def hooked(isolated: bool) -> None:
        copied = copy.deepcopy(model)
        copied.enable_cache(FirstBlockCacheConfig(threshold=0.1))
        sampled(torch.compile(copied, backend="eager", **({"isolate_recompiles": True} if isolated else {})))
        copied._reset_stateful_cache()

    first = sampled(ours)
    assert t4dopt.cache_report(ours_model).total_calls == 4
    hooked(isolated=True)
    assert torch.equal(sampled(ours), first)
    assert t4dopt.cache_report(ours_model).total_calls == 8
    hooked(isolated=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sampled(ours)
    if t4dopt.cache_report(ours_model).total_calls == 8:  # this torch skips our copy's forward now
        assert any("isolate_recompiles=True" in str(w.message) and "torch._dynamo.reset()" in str(w.message)
                   for w in caught), [str(w.message)[:200] for w in caught]
