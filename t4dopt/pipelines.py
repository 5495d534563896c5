"""One line for diffusers pipelines: ``t4dopt.enable(pipe, sparse=..., cache=...)``.

`enable` compiles the pipeline's transformer(s) with the turbo4d backend and ties the cache to
the pipeline: each call of the pipeline is one generation (`t4dopt.generation`), and the
guidance branches the pipeline names with ``transformer.cache_context("cond")`` /
``("uncond")`` (Wan, CogVideoX's ``"cond_uncond"`` and others) are the cache's branches, so
nothing has to be detected. `follow_cache_context` alone does the second part for a
transformer compiled by hand. Processors that would break the graph inside an attention are
swapped for equivalent ones first (`t4dopt.make_traceable`).

diffusers is imported only when a diffusers model is handled.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from t4dopt.cache import scope
from t4dopt.options import TOP_LEVEL_KEYS, parse_options
from t4dopt.traceable_processors import make_traceable

TRANSFORMERS = ("transformer", "transformer_2")
"""The pipeline attributes holding denoisers (Wan 2.2 has a second one for low noise)."""
HOOK_NAME = "t4dopt_cache_context"


def _unwrapped(module: torch.nn.Module) -> torch.nn.Module:
    return getattr(module, "_orig_mod", module)


def follow_cache_context(transformer: torch.nn.Module) -> bool:
    """Make ``transformer.cache_context(name)`` name the cache's guidance branch for its calls inside.

    Registers a stateful diffusers hook whose state manager diffusers hands each cache
    context; it sets the branch (`t4dopt.cache.scope.set_branch`) for this transformer's
    compiled graphs and clears it when the context ends. Install it before compiling
    (`enable` does): installed later, the transformer's forward changes and dynamo compiles it
    again. Returns False for a model without ``cache_context`` (not a diffusers model).
    """
    module = _unwrapped(transformer)
    if not callable(getattr(module, "cache_context", None)):
        return False
    from diffusers.hooks import HookRegistry, ModelHook
    from diffusers.hooks.hooks import BaseState, StateManager

    registry = HookRegistry.check_if_exists_or_initialize(module)
    if registry.get_hook(HOOK_NAME) is not None:
        return True
    target = scope.Target.of([module])

    class _Names(StateManager):
        """Receives each cache context diffusers sets on the transformer (and None when it ends)."""

        def set_context(self, context: Any) -> None:
            super().set_context(context)
            scope.set_branch(self, target, getattr(context, "name", None) if context is not None else None)

    class _CacheContextHook(ModelHook):
        _is_stateful = True

        def __init__(self) -> None:
            super().__init__()
            self.names = _Names(BaseState)

        def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
            return module

    registry.register_hook(_CacheContextHook(), HOOK_NAME)
    return True


def _denoisers(pipe: Any) -> list[tuple[str | None, torch.nn.Module]]:
    """The pipeline's transformers by attribute, or the model itself when `pipe` is a module."""
    if isinstance(pipe, torch.nn.Module):
        return [(None, pipe)]
    found = [(name, getattr(pipe, name, None)) for name in TRANSFORMERS]
    found = [(name, module) for name, module in found if isinstance(module, torch.nn.Module)]
    if not found:
        raise TypeError(f"t4dopt.enable: {type(pipe).__name__} has no transformer to compile "
                        f"(looked for {', '.join(TRANSFORMERS)}); pass the denoiser module itself")
    return found


def _generation_calls(pipe: Any, models: list[torch.nn.Module]) -> None:
    """Give `pipe`'s class a ``__call__`` that runs each pipeline call as one generation of `models`."""
    cls = type(pipe)
    if getattr(cls, "_t4dopt_generations", False):
        return
    call: Callable = cls.__call__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with scope.generation(*models):
            return call(self, *args, **kwargs)

    __call__.__doc__ = call.__doc__
    pipe.__class__ = type(cls.__name__, (cls,), {"__call__": __call__, "_t4dopt_generations": True,
                                                 "__module__": cls.__module__})


def enable(pipe: Any, *, sparse: Any = None, cache: Any = None, layout: Mapping[str, Any] | None = None,
           **options: Any) -> Any:
    """Compile `pipe`'s transformer(s) with turbo4d and tie the cache to the pipeline's calls; returns `pipe`
    (for a module, the module compiled in place).

    `pipe` is a diffusers pipeline (its ``transformer`` and ``transformer_2``) or a denoiser
    module. `sparse`, `cache`, `layout` and the other turbo4d options (``target``, ``strict``,
    ``verify``) are checked first (`T4DOptionError`). Each transformer gets graph-break-free
    equivalents of the diffusers processors dynamo cannot trace (`make_traceable`: Mochi's joint
    attention), follows its ``cache_context`` names (`follow_cache_context`) and is compiled in place
    (``module.compile``); each pipeline call then runs as one generation, so the cache starts
    empty and frees its state when the call returns.
    """
    unknown = sorted(set(options) - set(TOP_LEVEL_KEYS) - {"sparse", "cache", "layout"})
    if unknown:
        parse_options({key: options[key] for key in unknown})  # raises, naming the first unknown option
    settings = {"sparse": sparse, "cache": cache, "layout": dict(layout or {}), **options}
    parse_options(settings)
    denoisers = []
    for name, module in _denoisers(pipe):
        if module is not _unwrapped(module):
            # Already wrapped by torch.compile: compile the model itself, in place, instead.
            module = _unwrapped(module)
            if name is not None:
                setattr(pipe, name, module)
        make_traceable(module)
        follow_cache_context(module)
        module.compile(backend="turbo4d", options=settings)
        denoisers.append((name, module))
    if isinstance(pipe, torch.nn.Module):
        return denoisers[0][1]
    _generation_calls(pipe, [module for _, module in denoisers])
    return pipe
