"""What a user (or a diffusers pipeline) says about its calls: generation scopes and branch names.

``with t4dopt.generation(model):`` marks the calls made inside it as one generation: they
see no state from before it and leave none after it (its state is freed on exit). Inside,
``with t4dopt.branch(model, "uncond"):`` names the guidance branch (or request) of the calls
it holds; diffusers pipelines name theirs with ``transformer.cache_context("cond")``, which
`t4dopt.pipelines` turns into the same thing. What is said here always wins over what the
runtime would otherwise detect (`t4dopt.cache.generations`).

Both live in context variables, so they belong to the thread (or asyncio task) that entered
them: two threads each in their own scope never share state.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


class ScopeUser(Protocol):
    """A runtime holding state for a scope; told when the scope ends."""

    def end_scope(self, scope: Scope) -> None: ...


@dataclass(frozen=True)
class Target:
    """The compiled graphs a scope or branch applies to: those of some models, or of some runtimes; all when empty."""

    parameters: frozenset[int] = frozenset()
    runtimes: frozenset[int] = frozenset()

    @classmethod
    def of(cls, models: Iterable[Any]) -> Target:
        """`models` are modules (compiled or not) or cache runtimes (`t4dopt.deploy` bundles hold one)."""
        parameters, runtimes = set(), set()
        for model in models:
            runtime = getattr(model, "runtime", model)
            if isinstance(model, torch.nn.Module):
                parameters.update(id(t) for t in itertools.chain(model.parameters(), model.buffers()))
            elif callable(getattr(runtime, "end_scope", None)):
                runtimes.add(id(runtime))
            else:
                raise TypeError(f"t4dopt.generation: {type(model).__name__} is neither a model (torch.nn.Module) "
                                "nor a loaded bundle")
        return cls(frozenset(parameters), frozenset(runtimes))

    @property
    def everything(self) -> bool:
        return not self.parameters and not self.runtimes

    def covers(self, runtime: object, parameter_key: tuple[int, ...]) -> bool:
        """Whether a call of `runtime` with parameters `parameter_key` (their ids) falls under this target."""
        if self.everything or id(runtime) in self.runtimes:
            return True
        return bool(parameter_key) and parameter_key[0] in self.parameters


_tokens = itertools.count(1)


@dataclass(eq=False)
class Scope:
    """One explicit generation: a token unique in the process, what it covers, the runtimes holding its state."""

    target: Target
    token: int = field(default_factory=lambda: next(_tokens))
    users: weakref.WeakSet = field(default_factory=weakref.WeakSet)

    def used_by(self, runtime: ScopeUser) -> None:
        self.users.add(runtime)

    def end(self) -> None:
        """Free the state every runtime holds for this scope."""
        for user in list(self.users):
            user.end_scope(self)
        self.users.clear()


@dataclass(frozen=True, eq=False)
class Branch:
    """A name for the calls of `target` made while it is active (a guidance branch or a request)."""

    target: Target
    name: str
    owner: object = None
    """Who set it, when it is set and cleared by calls rather than a ``with`` (a diffusers hook)."""


_scopes: ContextVar[tuple[Scope, ...]] = ContextVar("t4dopt_generation_scopes", default=())
_branches: ContextVar[tuple[Branch, ...]] = ContextVar("t4dopt_branches", default=())


@contextmanager
def generation(*models: Any) -> Iterator[Scope]:
    """Calls of `models`' compiled graphs (every compiled graph when none is given) inside are one generation.

    They start from empty cache state and their state is freed on exit. Scopes nest; the
    innermost that covers a call wins.
    """
    scope = Scope(Target.of(models))
    token = _scopes.set(_scopes.get() + (scope,))
    try:
        yield scope
    finally:
        _scopes.reset(token)
        scope.end()


@contextmanager
def branch(model: Any, name: str) -> Iterator[None]:
    """Calls of `model` inside are the guidance branch (or request) `name`: they keep state apart from other names."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"t4dopt.branch name={name!r}: expected a non-empty string")
    token = _branches.set(_branches.get() + (Branch(Target.of([model]), name),))
    try:
        yield
    finally:
        _branches.reset(token)


def set_branch(owner: object, target: Target, name: str | None) -> None:
    """Set (or clear, with None) the branch `owner` names for `target`: for hooks called on entry and on exit."""
    kept = tuple(b for b in _branches.get() if b.owner is not owner)
    _branches.set(kept + ((Branch(target, name, owner),) if name is not None else ()))


def active_scope(runtime: object, parameter_key: tuple[int, ...]) -> Scope | None:
    """The innermost scope covering a call of `runtime` with `parameter_key`, if any."""
    for scope in reversed(_scopes.get()):
        if scope.target.covers(runtime, parameter_key):
            return scope
    return None


def active_branch(runtime: object, parameter_key: tuple[int, ...]) -> str | None:
    """The innermost branch name covering a call of `runtime` with `parameter_key`, if any."""
    for named in reversed(_branches.get()):
        if named.target.covers(runtime, parameter_key):
            return named.name
    return None
