"""Two CPU ranks (gloo) under diffusers' context parallelism: Ulysses and Ring, sparse and cached.

A tiny WanTransformer3DModel (2 layers, 2 heads x 16, 5 latent frames of 8 x 8, patch (1, 2, 2): 80 tokens)
is compiled with turbo4d (sculpt4d, target="eager", and the cache) on each of two spawned ranks, once
under Ulysses and once under Ring (`t4dopt.context_parallel.use_sparse_ring(model)`, the layout proven by the
backend from the graph). Every call of an 8-step
sampling loop is gathered from both ranks. Checked against this process: the first call against the
single-process model whose joint self-attentions run the explicit Sculpt4D token mask in float64
(`reference.sculpt4d_token_mask`), and the whole loop against the single-process cached loop, which
must reuse work (so a cache that diverged between ranks, or from one process, is seen; at this
threshold a drift measured on one rank's shard alone crosses it at another step than the whole
sequence's). One more call each: the ring under a layout given by hand (against the explicit mask), under one
the graph contradicts (refused), and diffusers' own ring (its ``_native_flash`` backend, one fused aten call per
key/value chunk: each reported as a site left dense, with a warning). The workers are
spawned once for all scenarios, and compute the single-process references too, side by side, after their group
is gone.
"""

from __future__ import annotations

import datetime
import os
import warnings
import socket
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

from t4dopt.errors import T4DOptionError, T4DWarning
from t4dopt.masks import sculpt4d

FRAMES, SIDE, HEADS, HEAD_DIM, WORLD, STEPS = 5, 8, 2, 16, 2, 8
TOKENS = FRAMES * (SIDE // 2) ** 2
SPARSE = {"policy": "sculpt4d", "block_size": 4, "strides": (1, 2), "anchor_frames": 0}
CACHE = {"threshold": 0.2, "warmup": 2, "final": 1, "steps": STEPS, "order": 0}
OPTIONS = {"sparse": SPARSE, "target": "eager", "cache": CACHE}


def make_model():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=HEAD_DIM,
                                 in_channels=4, out_channels=4, text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2,
                                 cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32).eval()


def inputs():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(1, 4, FRAMES, SIDE, SIDE, generator=generator), torch.randn(1, 7, 16, generator=generator)


def sample(model, latents, text) -> list[torch.Tensor]:
    """An 8-step Euler loop; every call's output, as diffusers' pipelines call the model (return_dict=False)."""
    outputs = []
    times = torch.linspace(1000, 0, STEPS + 1)
    with torch.no_grad():
        for step in range(STEPS):
            out = model(hidden_states=latents, timestep=times[step:step + 1], encoder_hidden_states=text,
                        return_dict=False)[0]
            outputs.append(out)
            latents = latents + (times[step + 1] - times[step]) / 1000 * out
    return outputs


def reuses(model) -> list[tuple[str, int, int]]:
    """(name, reused, bypassed) per cached sublayer of `model` in its last generation."""
    import t4dopt

    return [(u.name, u.reused, u.bypassed) for u in t4dopt.cache_report(model).units]


def ring_layout():
    return sculpt4d(FRAMES, TOKENS // FRAMES, block_size=SPARSE["block_size"], strides=SPARSE["strides"],
                    anchor_frames=SPARSE["anchor_frames"])


def _scenario(kind: str, rank: int) -> dict:
    from diffusers import ContextParallelConfig
    from t4dopt.context_parallel import enable_parallelism, use_sparse_ring
    from t4dopt.report import collecting

    model = make_model()
    degrees = {"ulysses_degree": WORLD} if kind == "ulysses" else {"ring_degree": WORLD}
    enable_parallelism(model, ContextParallelConfig(**degrees))
    if kind == "ring":  # no layout: the backend proves it from the graph (the explicit form: `_ring_explicit`)
        use_sparse_ring(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="turbo4d", options=OPTIONS)
    with collecting() as report, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outputs = sample(compiled, *inputs())
    return {"outputs": torch.stack(outputs), "graphs": report.graphs,
            "sites": [(s.name, s.kind, s.action) for s in report.sites], "reused": reuses(model),
            "warnings": [str(w.message) for w in caught if issubclass(w.category, T4DWarning)]}


def _diffusers_ring(rank: int) -> dict:
    """diffusers' own ring attention (its ``_native_flash`` backend, the one whose ring runs on CPU tensors at all):
    one ``aten._scaled_dot_product_flash_attention`` call per key/value chunk. The report comes from the compile;
    the call itself then fails on CPU, which has no kernel for that op (on a GPU it runs, dense)."""
    from diffusers import ContextParallelConfig
    from t4dopt.context_parallel import enable_parallelism
    from t4dopt.report import collecting

    model = make_model()
    enable_parallelism(model, ContextParallelConfig(ring_degree=WORLD))
    model.set_attention_backend("_native_flash")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="turbo4d", options={"sparse": SPARSE, "target": "eager"})
    latents, text = inputs()
    error = ""
    with collecting() as report, warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        try:
            compiled(hidden_states=latents, timestep=torch.tensor([1000.0]), encoder_hidden_states=text,
                     return_dict=False)
        except NotImplementedError as failure:
            error = str(failure).splitlines()[0]
    return {"sites": [(s.name, s.kind, s.action, s.reason) for s in report.sites], "error": error,
            "warnings": [str(w.message) for w in caught if issubclass(w.category, T4DWarning)]}


def _ring_explicit(layout) -> dict:
    """One call of the ring under a layout given by hand: its output and kept chunk pairs, or the T4DOptionError."""
    from diffusers import ContextParallelConfig
    from t4dopt.context_parallel import enable_parallelism, use_sparse_ring

    model = make_model()
    enable_parallelism(model, ContextParallelConfig(ring_degree=WORLD))
    kept = use_sparse_ring(model, layout).kept
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="turbo4d", options={"sparse": SPARSE, "target": "eager"})
    latents, text = inputs()
    try:
        with torch.no_grad():
            output = compiled(hidden_states=latents, timestep=torch.tensor([1000.0]), encoder_hidden_states=text,
                              return_dict=False)[0]
    except Exception as error:  # dynamo wraps the backend's error
        while error is not None and not isinstance(error, T4DOptionError):
            error = error.__cause__ or getattr(error, "inner_exception", None)
        return {"option": getattr(error, "option", None), "message": str(error)}
    return {"output": output, "kept": kept}


def _worker(rank: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # A short timeout: ranks whose cache decisions diverged wait in a collective the other never enters.
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        results = {kind: _scenario(kind, rank) for kind in ("ulysses", "ring")}
        results["diffusers_ring"] = _diffusers_ring(rank)
        results["ring_explicit"] = _ring_explicit(ring_layout())
        # Of the right length, but 10 frames x 8 tokens where the graph shows 5 x 16: refused.
        results["ring_contradicted"] = _ring_explicit(sculpt4d(2 * FRAMES, TOKENS // (2 * FRAMES),
                                                               block_size=SPARSE["block_size"],
                                                               strides=SPARSE["strides"],
                                                               anchor_frames=SPARSE["anchor_frames"]))
    finally:
        dist.destroy_process_group()
    # The single-process references, one per worker (they run side by side), after the group is gone.
    results["reference"] = masked_first_call() if rank == 0 else single_cached()
    torch.save(results, os.path.join(folder, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    import torch.multiprocessing as mp

    folder = str(tmp_path_factory.mktemp("context_parallel"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sys.path.insert(0, os.path.dirname(__file__))  # the workers import this module by name
    mp.spawn(_worker, args=(port, folder), nprocs=WORLD, join=True)
    return [torch.load(os.path.join(folder, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def masked_first(ranks):
    return ranks[0]["reference"]


@pytest.fixture(scope="module")
def one_process_cached(ranks):
    return ranks[1]["reference"]


def masked_first_call():
    """The single-process model, its joint self-attentions over the explicit token mask in float64."""
    from reference import grid_labels, sculpt4d_token_mask

    mask = sculpt4d_token_mask(grid_labels(FRAMES, TOKENS // FRAMES), block_size=SPARSE["block_size"],
                               strides=SPARSE["strides"], anchor_frames=SPARSE["anchor_frames"])
    original = F.scaled_dot_product_attention

    def attention(query, key, value, *args, **kwargs):
        q, k, v = query, key, value
        if q.shape[-2] != TOKENS or k.shape[-2] != TOKENS:
            return original(q, k, v, *args, **kwargs)
        scores = q.double() @ k.double().transpose(-1, -2) * q.shape[-1] ** -0.5
        return scores.masked_fill(~mask, float("-inf")).softmax(-1).matmul(v.double()).to(q.dtype)

    model = make_model()
    latents, text = inputs()
    F.scaled_dot_product_attention = attention
    try:
        with torch.no_grad():
            return model(hidden_states=latents, timestep=torch.tensor([1000.0]), encoder_hidden_states=text,
                         return_dict=False)[0]
    finally:
        F.scaled_dot_product_attention = original


def single_cached():
    """The single-process cached loop (sparse too) and its reuse counts."""
    model = make_model()
    torch._dynamo.reset()
    outputs = sample(torch.compile(model, backend="turbo4d", options=OPTIONS), *inputs())
    return torch.stack(outputs), reuses(model)


@pytest.mark.parametrize("kind", ["ulysses", "ring"])
def test_sparse_equals_the_explicit_mask(ranks, masked_first, kind):
    for result in ranks:
        torch.testing.assert_close(result[kind]["outputs"][0], masked_first, rtol=0, atol=1e-5)
    if kind == "ulysses":
        joint = [s for s in ranks[0][kind]["sites"] if s[1] == "spatiotemporal"]
        assert len(joint) == 2 and all(action == "sparse" for _, _, action in joint), ranks[0][kind]["sites"]
        # Site names as users write them, also through diffusers' hooked forwards.
        assert [name for name, _, _ in joint] == ["blocks.0.attn1", "blocks.1.attn1"]
    assert ranks[0][kind]["graphs"] == 1
    # The ring's layout is the one the graph proves: no warning that it is unconfirmed or left dense.
    assert not [w for r in ranks for w in r[kind]["warnings"] if "left dense" in w or "not confirmed" in w]


def test_ring_under_a_layout_given_by_hand(ranks, masked_first):
    for result in ranks:
        torch.testing.assert_close(result["ring_explicit"]["output"], masked_first, rtol=0, atol=1e-5)
    assert [r["ring_explicit"]["kept"] for r in ranks] == [(0, 1), (1, 0)]


@pytest.mark.parametrize("kind", ["ulysses", "ring"])
def test_cached_loop_equal_on_both_ranks_and_to_one_process(ranks, one_process_cached, kind):
    want, reused = one_process_cached
    assert sum(r + b for _, r, b in reused) > 0  # the single-process loop reuses work, so a diverging decision shows
    torch.testing.assert_close(ranks[0][kind]["outputs"], ranks[1][kind]["outputs"], rtol=0, atol=0)
    torch.testing.assert_close(ranks[0][kind]["outputs"], want, rtol=0, atol=1e-5)
    assert ranks[0][kind]["reused"] == ranks[1][kind]["reused"] == reused


def test_diffusers_own_ring_is_reported_dense_chunk_by_chunk(ranks):
    """Each of diffusers' per-chunk fused calls is a site left dense, named, with the reason and a warning."""
    for result in ranks:
        fused = [s for s in result["diffusers_ring"]["sites"] if "flash_attention" in s[0]]
        assert len(fused) == 2 * WORLD, result["diffusers_ring"]["sites"]  # 2 layers x one call per key/value chunk
        assert {name.split("[")[0] for name, _, _, _ in fused} == {"blocks.0.attn1", "blocks.1.attn1"}
        for _, kind, action, reason in fused:
            assert (kind, action) == ("unknown", "dense")
            assert f"one of {WORLD} over the same queries" in reason and "use_sparse_ring" in reason, reason
        assert sum("aten._scaled_dot_product_flash_attention" in w for w in result["diffusers_ring"]["warnings"]) \
            == 2 * WORLD
        assert "_scaled_dot_product_flash_attention" in result["diffusers_ring"]["error"]  # no CPU kernel


def test_a_ring_layout_the_graph_contradicts_is_refused(ranks):
    for result in ranks:
        contradicted = result["ring_contradicted"]
        assert contradicted["option"] == "layout", contradicted["message"]
        assert "frames=10, tokens_per_frame=8" in contradicted["message"]
        assert "graph shows frames=5, tokens_per_frame=16" in contradicted["message"]
