"""The `options=` of ``torch.compile(model, backend="turbo4d", options=...)``, parsed and checked.

Every unknown key or bad value raises `T4DOptionError` naming the option, the value and what
is allowed, before any graph is touched.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from t4dopt import masks
from t4dopt.lowering import TARGETS
from t4dopt.errors import T4DOptionError

LAYOUT_KEYS = ("frames", "views", "tokens_per_frame", "prefix_tokens", "suffix_tokens", "height", "width")
GLOBAL_TOKEN_KEYS = ("prefix_tokens", "suffix_tokens")
"""Layout keys that may be 0: global tokens before and after the video."""
TOP_LEVEL_KEYS = ("layout", "sparse", "cache", "target", "strict", "verify", "trust_layout")
CACHE_KEYS = ("threshold", "warmup", "final", "max_reuse", "token_ratio", "levels", "steps", "order")
CACHE_LEVELS = ("block", "token", "chain")
DEFAULT_POLICY = "sculpt4d"


@dataclass(frozen=True)
class LayoutHints:
    """What the user told us about the token grid; every field optional.

    Token order: ``prefix_tokens`` global tokens, the frames, then ``suffix_tokens`` global tokens.
    Each hint is checked against the graph: one the graph contradicts leaves the site dense, one the
    graph cannot confirm too unless ``Options.trust_layout`` (see `t4dopt.passes.layout`).
    """

    frames: int | None = None
    views: int | None = None
    tokens_per_frame: int | None = None
    prefix_tokens: int | None = None
    suffix_tokens: int | None = None
    height: int | None = None
    width: int | None = None


@dataclass(frozen=True)
class SparseSpec:
    """A mask policy (name or rule on block coordinates) and its parameters."""

    policy: str | Callable
    params: Mapping[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.policy if isinstance(self.policy, str) else getattr(self.policy, "__name__", "custom")


@dataclass(frozen=True)
class CacheSpec:
    """Reuse across denoising steps (Turbo4DGen); see the README's cache section for each field.

    ``threshold`` is the relative L1 drift of a unit's input since it was last computed below
    which its output is reused (0: never reuse). ``steps`` is the sampling loop's length; only
    with it can the ``final`` steps be recognised. ``order`` 0 reuses a stored residual as it
    is; 1 carries it along its change per step between the last two computations.
    """

    threshold: float = 0.05
    warmup: int = 2
    final: int = 1
    max_reuse: int = 4
    token_ratio: float = 0.25
    levels: tuple[str, ...] = CACHE_LEVELS
    steps: int | None = None
    order: int = 1


@dataclass(frozen=True)
class Options:
    layout: LayoutHints = LayoutHints()
    sparse: SparseSpec | None = None
    cache: CacheSpec | None = None
    target: str = "inductor"
    strict: bool = False
    verify: bool = False
    trust_layout: bool = False
    """Use the layout option where the graph neither confirms nor contradicts it (a warning names each site)."""


def _fail(option: str, value: Any, allowed: str) -> T4DOptionError:
    return T4DOptionError(f"turbo4d option {option}={value!r} is not valid; allowed: {allowed}")


def _check_dict(option: str, value: Any, keys: tuple[str, ...], key_name: Callable[[str], str]) -> None:
    """`value` must be a mapping whose keys are among `keys`; `key_name` names a key in errors."""
    if not isinstance(value, Mapping):
        raise _fail(option, value, f"a dict with keys {list(keys)}")
    unknown = sorted(set(value) - set(keys))
    if unknown:
        raise _fail(key_name(unknown[0]), value[unknown[0]], f"the keys {list(keys)}")


def _parse_layout(value: Any) -> LayoutHints:
    if value is None:
        return LayoutHints()
    if isinstance(value, LayoutHints):
        return value
    _check_dict("layout", value, LAYOUT_KEYS, lambda key: f"layout[{key!r}]")
    for key, item in value.items():
        minimum = 0 if key in GLOBAL_TOKEN_KEYS else 1
        if item is not None and (isinstance(item, bool) or not isinstance(item, int) or item < minimum):
            raise _fail(f"layout[{key!r}]", item, f"None or an integer >= {minimum}")
    hints = LayoutHints(**value)
    if (hints.height is None) != (hints.width is None):
        missing, given = ("width", "height") if hints.width is None else ("height", "width")
        raise _fail(f"layout[{given!r}]", getattr(hints, given), f"{given} together with {missing} (or neither)")
    if hints.height and hints.width and hints.tokens_per_frame:
        if hints.height * hints.width != hints.tokens_per_frame:
            raise _fail("layout['tokens_per_frame']", hints.tokens_per_frame,
                        f"height * width = {hints.height * hints.width} (or leave it out)")
    if hints.height and hints.width and not hints.tokens_per_frame:
        hints = LayoutHints(**{**value, "tokens_per_frame": hints.height * hints.width})
    return hints


def _parse_sparse(value: Any) -> SparseSpec | None:
    if value is None or value is False:
        return None
    if isinstance(value, SparseSpec):
        spec = value
    elif isinstance(value, str) or callable(value):
        spec = SparseSpec(value, {})
    elif isinstance(value, Mapping):
        params = dict(value)
        spec = SparseSpec(params.pop("policy", DEFAULT_POLICY), params)
    else:
        raise _fail("sparse", value, f"None, a policy name {sorted(masks.POLICIES)}, a callable "
                                     "rule(query_frame, query_block, key_frame, key_block), or a dict "
                                     "{'policy': name, **parameters}")
    if isinstance(spec.policy, str):
        if spec.policy not in masks.POLICIES:
            raise _fail("sparse['policy']", spec.policy, f"{sorted(masks.POLICIES)} or a callable")
        allowed = masks.policy_parameters(spec.policy)
    elif callable(spec.policy):
        allowed = ("block_size",)
    else:
        raise _fail("sparse['policy']", spec.policy, f"{sorted(masks.POLICIES)} or a callable")
    for key in spec.params:
        if key not in allowed:
            raise _fail(f"sparse[{key!r}]", spec.params[key], f"the parameters of {spec.name}: {list(allowed)}")
    try:
        masks.build(spec.policy, 2, 8, **spec.params)
    except (ValueError, TypeError) as error:
        raise T4DOptionError(f"turbo4d option sparse={dict(spec.params)!r} for {spec.name}: {error}") from None
    return spec


def _count(option: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _fail(option, value, f"an integer >= {minimum}")
    return value


def _parse_cache(value: Any) -> CacheSpec | None:
    if value is None or value is False:
        return None
    if isinstance(value, CacheSpec):
        return value
    if value is True:
        return CacheSpec()
    _check_dict("cache", value, CACHE_KEYS, lambda key: f"cache[{key!r}]")
    fields = dict(value)
    threshold = fields.get("threshold", CacheSpec.threshold)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold < float("inf"):
        raise _fail("cache['threshold']", threshold, "a number >= 0 (0 never reuses)")
    fields["threshold"] = float(threshold)
    for key, minimum in (("warmup", 0), ("final", 0), ("max_reuse", 1)):
        if key in fields:
            _count(f"cache[{key!r}]", fields[key], minimum)
    ratio = fields.get("token_ratio", CacheSpec.token_ratio)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise _fail("cache['token_ratio']", ratio, "a number in (0, 1]: the share of rows recomputed")
    fields["token_ratio"] = float(ratio)
    levels = fields.get("levels", CACHE_LEVELS)
    if not isinstance(levels, (list, tuple, set, frozenset)) or not all(isinstance(level, str) and level in CACHE_LEVELS for level in levels):
        raise _fail("cache['levels']", levels, f"a list drawn from {list(CACHE_LEVELS)}")
    fields["levels"] = tuple(level for level in CACHE_LEVELS if level in levels)
    if fields.get("steps") is not None:
        _count("cache['steps']", fields["steps"], 1)
    if fields.get("order", 1) not in (0, 1) or isinstance(fields.get("order"), bool):
        raise _fail("cache['order']", fields["order"], "0 (reuse the residual as stored) or 1 (extrapolate it)")
    return CacheSpec(**fields)


def _parse_flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(name, value, "True or False")
    return value


def parse_options(options: Mapping[str, Any] | Options | None) -> Options:
    """Check and normalise the backend options; raise `T4DOptionError` on anything bad."""
    if options is None:
        return Options()
    if isinstance(options, Options):
        return options
    _check_dict("options", options, TOP_LEVEL_KEYS, lambda key: key)
    target = options.get("target", "inductor")
    if target not in TARGETS:
        raise _fail("target", target, f"one of {list(TARGETS)}")
    return Options(
        layout=_parse_layout(options.get("layout")),
        sparse=_parse_sparse(options.get("sparse")),
        cache=_parse_cache(options.get("cache")),
        target=target,
        strict=_parse_flag("strict", options.get("strict", False)),
        verify=_parse_flag("verify", options.get("verify", False)),
        trust_layout=_parse_flag("trust_layout", options.get("trust_layout", False)),
    )
