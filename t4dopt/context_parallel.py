"""Block-sparse attention under diffusers' context parallelism (``ContextParallelConfig``, ``enable_parallelism``).

**Ulysses** needs nothing here: every rank attends the whole sequence for a share of the heads, and
the layout pass follows the sequence through diffusers' all-to-all (`t4dopt.passes.sequence_trace`),
so ``torch.compile(model, backend="turbo4d")`` proves and rewrites the joint attention as on one GPU.

**Ring** gives each rank one chunk of the queries and attends it to every rank's key/value chunk,
merging the partial results by their log-sum-exp. `use_sparse_ring` registers a diffusers attention
backend, ``turbo4d`` (``supports_context_parallel=True``), on the model's attention processors. It
runs the ring itself: it gathers the key/value chunks as diffusers' ring does (one all-gather over
the ring group), then for each chunk pair calls ``t4d::block_sparse_attention_chunk`` (query chunk
``rank``, key chunk ``j``: offsets into the global layout) and merges by log-sum-exp.

The layout: this backend runs while dynamo traces the model, before the turbo4d backend sees any
graph, so without a layout (`use_sparse_ring(model)`) it traces with a stand-in table
(`t4dopt.ops.chunk.DEFERRED`, every chunk pair called) that the turbo4d backend replaces by the table
of the layout it proves from the graph (`t4dopt.passes.ring_layouts`: the sequence diffusers shards,
read as on one GPU); such a model runs only under ``torch.compile(backend="turbo4d")``. With a layout
given, the plan is made here: pairs that keep no block are skipped, decided once per model.

Why a backend that runs its own loop rather than a rewrite of diffusers' per-chunk calls: on CPU
diffusers has no ring-capable backend at all (``native`` refuses ``return_lse``, ``_native_flash`` has
no CPU kernel); in diffusers' loop the key chunk a call sees is the loop counter's, which no graph
shows; and its sigmoid merge turns a ``-inf`` log-sum-exp (a row that keeps no key of a chunk) into
NaN. Here the offsets are facts, not readings: diffusers' equipartition sharder gives rank r the
tokens ``r * S : (r + 1) * S`` of every sharded sequence and the all-gather returns the chunks in
rank order; the merge (`t4dopt.ops.chunk.merge_chunks`) keeps such rows at zero. A layout given
by hand is used as with `t4dopt.block_sparse_attention`; a call whose lengths do not match it (the
sequence is not ``world`` chunks of the layout) raises rather than guess, and the turbo4d backend
checks its grid against the sequence the graph shows diffusers sharding (a contradiction is refused). Attention whose
keys are not that sequence (cross-attention to text) runs dense over the gathered keys, exact whether
the text is sharded or replicated (a key repeated on every rank leaves the softmax unchanged).

`enable_parallelism` is diffusers' ``model.enable_parallelism`` that also runs on CPU (diffusers
divides by ``torch.accelerator.device_count()``, 0 without an accelerator). `group_of` names the
context-parallel group the cache reduces its drifts over (`t4dopt.cache`).
"""

from __future__ import annotations

import contextlib
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from t4dopt.block_layout import BlockLayout
from t4dopt.errors import T4DOptionError

BACKEND = "turbo4d"
"""Self-attention over the sharded sequence: block-sparse ring attention under the model's layout."""
DENSE_BACKEND = "turbo4d_dense"
"""Every other attention of the model under ring: dense over the gathered keys."""


class DeferredRing(NamedTuple):
    """A ring whose layout the turbo4d backend proves (`use_sparse_ring` without a layout): this rank and the ring."""

    rank: int
    world: int


class RingPlan(NamedTuple):
    """What the ring backend runs on one rank: the layout, the ring, and the chunk pairs that keep a block."""

    layout: BlockLayout
    rank: int
    world: int
    chunk: int
    """Tokens per rank (the layout's length over the ring degree)."""
    kept: tuple[int, ...]
    """Key chunks the query chunk ``rank`` keeps any block of, in ring order (from ``rank`` on)."""


def ring_plan(layout: BlockLayout, rank: int, world: int) -> RingPlan:
    """The chunk pairs of query chunk `rank` of `world` equal chunks of `layout` that keep any block."""
    from t4dopt.ops.chunk import pair_keeps_blocks

    if world < 1 or not 0 <= rank < world:
        raise T4DOptionError(f"ring_degree={world} with rank {rank}: expected 0 <= rank < ring_degree",
                             option="ring_degree",
                             value=world)
    if layout.seq_len % world:
        raise T4DOptionError(f"ring_degree={world}: the layout's {layout.seq_len} tokens do not split into {world} "
                             f"equal ring chunks (allowed: a divisor of {layout.seq_len})",
                             option="ring_degree", value=world, allowed=f"a divisor of {layout.seq_len}")
    chunk = layout.seq_len // world
    order = [(rank + step) % world for step in range(world)]
    kept = tuple(j for j in order if pair_keeps_blocks(layout, rank * chunk, chunk, j * chunk, chunk))
    return RingPlan(layout, rank, world, chunk, kept)


def _gathered(key: torch.Tensor, value: torch.Tensor, config) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every rank's (key, value) chunk, in rank order: one all-gather over the ring (differentiable with grad on)."""
    import torch.distributed._functional_collectives as funcol

    gather = funcol.all_gather_tensor_autograd if torch.is_grad_enabled() else funcol.all_gather_tensor
    both = gather(torch.stack([key, value]).contiguous(), 0, config._ring_mesh.get_group())
    return [(both[2 * j], both[2 * j + 1]) for j in range(config.ring_degree)]


def _ring_context(parallel_config):
    config = getattr(parallel_config, "context_parallel_config", None)
    if config is None or config.ring_degree <= 1:
        return None
    if config.ulysses_degree > 1:
        raise NotImplementedError("t4dopt's ring backend runs ring_degree > 1 with ulysses_degree == 1 only")
    return config


def _all_keys(key, value, config) -> tuple[torch.Tensor, torch.Tensor]:
    chunks = _gathered(key, value, config)
    return (torch.cat([c[0] for c in chunks], dim=1), torch.cat([c[1] for c in chunks], dim=1))


def _dense(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
           return_lse=False, _parallel_config=None):
    if return_lse:
        raise ValueError(f"the {DENSE_BACKEND} attention backend does not return the log-sum-exp")
    config = _ring_context(_parallel_config)
    if config is not None:
        key, value = _all_keys(key, value, config)
        if attn_mask is not None:
            raise NotImplementedError(f"{DENSE_BACKEND}: a mask under ring attention")
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                         scale=scale, enable_gqa=enable_gqa)
    return out.transpose(1, 2)


def _sparse_ring(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
                 return_lse=False, _parallel_config=None):
    """[B, S, H, D] in and out, as diffusers' backends: the ring over the plan's kept chunk pairs."""
    from t4dopt.ops.chunk import block_sparse_attention_chunk, merge_chunks

    config = _ring_context(_parallel_config)
    plan: RingPlan | DeferredRing | None = getattr(_parallel_config, "_t4d_ring", None)
    if config is None or plan is None:
        raise RuntimeError(f"the {BACKEND} attention backend runs under ring context parallelism after "
                           "t4dopt.context_parallel.use_sparse_ring(model, layout)")
    if isinstance(plan, DeferredRing):
        plan = _deferred_plan(plan, query.shape[1])
    if attn_mask is not None or is_causal or dropout_p or enable_gqa:
        raise NotImplementedError(f"{BACKEND}: masks, is_causal, dropout and grouped heads under ring attention")
    if query.shape[1] != plan.chunk or key.shape[1] != plan.chunk:
        raise ValueError(f"{BACKEND}: queries of {query.shape[1]} and keys of {key.shape[1]} tokens per rank, but "
                         f"the ring of {plan.world} ranks has chunks of {plan.chunk} tokens")
    chunks = _gathered(key, value, config)
    q = query.transpose(1, 2)
    out = lse = None
    for j in plan.kept:
        k, v = (x.transpose(1, 2) for x in chunks[j])
        part, part_lse = block_sparse_attention_chunk(q, k, v, plan.layout, plan.rank * plan.chunk, j * plan.chunk,
                                                      scale=scale)
        out, lse = merge_chunks(out, lse, part.float(), part_lse.float())
    if out is None:  # the query chunk keeps no block at all
        out = q.new_zeros(q.shape[:3] + (value.shape[-1],), dtype=torch.float32)
        lse = q.new_full(q.shape[:3], float("-inf"), dtype=torch.float32)
    out = out.to(query.dtype).transpose(1, 2)
    return (out, lse.transpose(1, 2)) if return_lse else out


def _deferred_plan(ring: DeferredRing, chunk: int) -> RingPlan:
    """Every chunk pair over the stand-in table `t4dopt.ops.chunk.DEFERRED`, which the turbo4d backend replaces by
    the layout it proves; outside a turbo4d compile there is nothing to run."""
    from t4dopt.ops.chunk import DEFERRED

    if not torch.compiler.is_compiling():
        raise RuntimeError(f"the {BACKEND} attention backend without a layout runs only under "
                           "torch.compile(model, backend='turbo4d'), which proves the layout from the graph; "
                           "to run otherwise, pass one: use_sparse_ring(model, t4dopt.masks.sculpt4d(...))")
    order = tuple((ring.rank + step) % ring.world for step in range(ring.world))
    return RingPlan(DEFERRED, ring.rank, ring.world, chunk, order)


def register_diffusers_backends() -> None:
    """Add ``turbo4d`` and ``turbo4d_dense`` to diffusers' attention backends (once; both support context parallelism)."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    from t4dopt.compat import add_diffusers_backend_name

    for name, function in ((BACKEND, _sparse_ring), (DENSE_BACKEND, _dense)):
        member = add_diffusers_backend_name(name)
        if member not in _AttentionBackendRegistry._backends:
            _AttentionBackendRegistry.register(member, supports_context_parallel=True)(function)


def _is_self_attention(module: torch.nn.Module) -> bool:
    flag = getattr(module, "is_cross_attention", None)
    if flag is not None:
        return not flag
    return getattr(module, "cross_attention_dim", None) in (None, getattr(module, "query_dim", None))


def use_sparse_ring(model: torch.nn.Module, layout: BlockLayout | None = None) -> RingPlan | DeferredRing:
    """Run `model`'s self-attentions as block-sparse ring attention (after ``enable_parallelism`` with
    ``ContextParallelConfig(ring_degree=world)``); its other attentions run dense over the gathered keys.

    Without `layout`, the turbo4d backend proves the layout from the graph, as on one GPU, and builds the mask
    of its ``options['sparse']`` policy (`t4dopt.passes.ring_layouts`); the model then runs only under
    ``torch.compile(model, backend="turbo4d")``. With `layout` (``t4dopt.masks.sculpt4d(frames, tokens, ...)``,
    covering the whole sequence the self-attentions see) it runs under any compile or none, and the turbo4d
    backend checks it against the graph. Returns this rank's plan (which chunk pairs it computes), or the
    `DeferredRing` the backend completes.
    """
    if layout is not None and not isinstance(layout, BlockLayout):
        raise TypeError(f"layout must be a t4dopt.BlockLayout or None, got {type(layout).__name__}")
    parallel = getattr(model, "_parallel_config", None)
    config = getattr(parallel, "context_parallel_config", None)
    if config is None or config.ring_degree <= 1 or config.ulysses_degree > 1:
        raise T4DOptionError("use_sparse_ring needs a model after enable_parallelism with "
                             "ContextParallelConfig(ring_degree > 1, ulysses_degree=1)", option="ring_degree",
                             value=None if config is None else config.ring_degree, allowed="> 1 with ulysses 1")
    register_diffusers_backends()
    rank, world = int(config._ring_local_rank), int(config.ring_degree)
    if layout is None:
        from t4dopt.ops.chunk import DEFERRED
        from t4dopt.ops.tables import layout_tensors

        parameter = next(model.parameters(), None)
        layout_tensors(DEFERRED, parameter.device if parameter is not None else torch.device("cpu"))
        plan = DeferredRing(rank, world)
    else:
        plan = ring_plan(layout, rank, world)
    parallel._t4d_ring = plan
    for module in model.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "_attention_backend"):
            processor._attention_backend = BACKEND if _is_self_attention(module) else DENSE_BACKEND
    return plan


@contextlib.contextmanager
def _accelerators_counted():
    """``torch.accelerator.device_count()`` at least 1 inside: diffusers takes the rank modulo it (0 on CPU)."""
    accelerator = torch.accelerator
    original = accelerator.device_count
    if original() > 0:
        yield
        return
    accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        accelerator.device_count = original


def _quiet_split_hook() -> None:
    """Let dynamo pass over the ``logger.warning_once`` of diffusers' split hook (a tensor of unexpected rank,
    such as Wan 2.1's 1-D timestep, is left whole) instead of breaking the graph there: the cache needs the
    whole denoiser in one graph. Inside compiled code that warning is not printed."""
    from diffusers.hooks import context_parallel as hooks

    import logging

    for method in (getattr(hooks.logger, "warning_once", None), getattr(logging.Logger, "warning_once", None)):
        if method is not None:
            torch._dynamo.config.ignore_logging_functions.add(method)


def _prime_split_hooks(model: torch.nn.Module) -> None:
    """Fill in what diffusers' split hooks compute on their first call (the parameter indices of the hooked
    module's forward, by ``inspect.signature``, which dynamo cannot trace: a graph break per hooked block),
    exactly as the hook would."""
    import inspect

    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        for hook in getattr(registry, "hooks", {}).values():
            metadata = getattr(hook, "module_forward_metadata", None)
            if metadata is None or getattr(metadata, "cached_parameter_indices", 0) is not None:
                continue
            if getattr(metadata, "_cls", None) is not None:
                names = list(inspect.signature(metadata._cls.forward).parameters)[1:]
                metadata.cached_parameter_indices = {name: i for i, name in enumerate(names)}


def enable_parallelism(model: torch.nn.Module, config: Any) -> torch.nn.Module:
    """``model.enable_parallelism(config=config)``, also on CPU (where diffusers would divide by zero devices),
    and ready for one ``torch.compile`` graph without an eager call first (`_prime_split_hooks`,
    `_quiet_split_hook`)."""
    with _accelerators_counted():
        model.enable_parallelism(config=config)
    _prime_split_hooks(model)
    _quiet_split_hook()
    return model


def group_of(model: torch.nn.Module):
    """The process group of `model`'s context parallelism (diffusers' flattened mesh), or None."""
    config = getattr(getattr(model, "_parallel_config", None), "context_parallel_config", None)
    mesh = getattr(config, "_flattened_mesh", None)
    return None if mesh is None else mesh.get_group()
