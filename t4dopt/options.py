"""The `options=` of ``torch.compile(model, backend="turbo4d", options=...)``, parsed and checked.

Every unknown key or bad value raises `T4DOptionError` naming the option, the value and what
is allowed, before any graph is touched.
"""

from __future__ import annotations

import dataclasses
import math
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
CACHE_KEYS = ("threshold", "warmup", "final", "max_reuse", "token_ratio", "levels", "steps", "order", "decision")
CACHE_LEVELS = ("block", "token", "chain")
ORDERS = (0, 1, 2)
"""Values of the cache's ``order`` option: how a reused residual is extrapolated."""
DECISIONS = ("unit", "step")
"""Values of the cache's ``decision`` option: one decision per unit, or one per call for every unit."""
DEFAULT_POLICY = "sculpt4d"
TRIAL_FRAMES, TRIAL_BLOCKS = 64, 3
"""The grid a policy is tried on when the options are checked: more frames than video DiTs' latents have."""


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
    is; 1 carries it along its change per step between the last two computations; 2 also bends it
    with the change of that change over the last three (Newton's divided differences, as
    TaylorSeer's finite-difference Taylor terms). ``decision`` "unit" decides per unit from its
    own drift (calls may mix computed and reused units, and those run segment by segment);
    "step" decides once per call for every unit from the first unit's drift, as FirstBlockCache
    and TeaCache do, so each call runs one whole lowered graph (`t4dopt.cache.policy`).
    """

    threshold: float = 0.05
    warmup: int = 2
    final: int = 1
    max_reuse: int = 4
    token_ratio: float = 0.25
    levels: tuple[str, ...] = CACHE_LEVELS
    steps: int | None = None
    order: int = 1
    decision: str = "unit"


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
    return T4DOptionError(f"turbo4d option {option}={value!r} is not valid; allowed: {allowed}",
                          option=option, value=value, allowed=allowed)


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
    _try_policy(spec)
    return spec


def _try_policy(spec: SparseSpec) -> None:
    """Build the policy on a trial grid (`TRIAL_FRAMES` frames of `TRIAL_BLOCKS` blocks): bad parameters, a
    callable that raises, answers anything but bool or leaves a query block with no key block, and a policy
    that skips nothing even there (strides all 1, a window or anchor wider than any video) fail here.

    Whether a policy skips anything on a model's own grid is decided per site (`masks.dense_reason`).
    """
    block_size = spec.params.get("block_size", 128)
    usable = isinstance(block_size, int) and not isinstance(block_size, bool) and block_size >= 1
    try:  # a bad block_size is refused by the policy itself, named as such
        layout = masks.build(spec.policy, TRIAL_FRAMES, TRIAL_BLOCKS * block_size if usable else 8, **spec.params)
    except (ValueError, TypeError) as error:
        raise T4DOptionError(f"turbo4d option sparse={_shown(spec)}: {error}", option="sparse",
                             value=spec.policy) from error
    empty = masks.empty_row_reason(layout)
    if empty is not None:
        raise T4DOptionError(f"turbo4d option sparse={_shown(spec)}: on {TRIAL_FRAMES} frames of {TRIAL_BLOCKS} "
                             f"blocks, {empty}; a policy keeps at least one key block per query block "
                             "(its own, usually)", option="sparse", value=spec.policy)
    if masks.dense_reason(layout) is not None:
        raise T4DOptionError(f"turbo4d option sparse={_shown(spec)} keeps every block pair even of {TRIAL_FRAMES} "
                             f"frames of {TRIAL_BLOCKS} blocks: it would skip nothing on any video (use sparse=None "
                             "for dense attention)", option="sparse", value=spec.policy)


def _shown(spec: SparseSpec) -> str:
    return repr({"policy": spec.name, **spec.params})


def _check_sparse_against_layout(spec: SparseSpec | None, layout: LayoutHints) -> None:
    """Parameters the layout option itself contradicts (more anchor frames than frames)."""
    anchors = spec.params.get("anchor_frames") if spec is not None else None
    if anchors is not None and layout.frames is not None and anchors > layout.frames:
        raise _fail("sparse['anchor_frames']", anchors,
                    f"at most layout['frames']={layout.frames} (with every frame an anchor nothing is skipped)")


def _count(option: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _fail(option, value, f"an integer >= {minimum}")
    return value


def cache_spec(fields: Mapping[str, Any], name: Callable[[str], str] = lambda key: f"cache[{key!r}]") -> CacheSpec:
    """The `CacheSpec` of `fields` (names as in `CACHE_KEYS`, missing ones default), every value checked.

    The one check of a cache schedule's values, for the backend's options and for a bundle's
    manifest (`t4dopt.deploy`); `name` names a field in the `T4DOptionError` it raises.
    """
    unknown = sorted(set(fields) - set(CACHE_KEYS))
    if unknown:
        raise _fail(name(unknown[0]), fields[unknown[0]], f"the keys {list(CACHE_KEYS)}")
    spec = {**dataclasses.asdict(CacheSpec()), **fields}
    threshold = spec["threshold"]
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold < math.inf:
        raise _fail(name("threshold"), threshold, "a number >= 0 (0 never reuses)")
    for key, minimum in (("warmup", 0), ("final", 0), ("max_reuse", 1)):
        _count(name(key), spec[key], minimum)
    ratio = spec["token_ratio"]
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise _fail(name("token_ratio"), ratio, "a number in (0, 1]: the share of rows recomputed")
    levels = spec["levels"]
    if (not isinstance(levels, (list, tuple, set, frozenset)) or not levels
            or not all(isinstance(level, str) and level in CACHE_LEVELS for level in levels)):
        raise _fail(name("levels"), levels, f"a non-empty list drawn from {list(CACHE_LEVELS)} "
                                            "(cache=None turns the cache off)")
    steps = spec["steps"]
    if steps is not None:
        _count(name("steps"), steps, 1)
    order = spec["order"]
    if isinstance(order, bool) or not isinstance(order, int) or order not in ORDERS:
        raise _fail(name("order"), order, "0 (reuse the residual as stored), 1 (extrapolate it along its slope) or 2 (also along "
                                    "its curvature), an integer")
    decision = spec["decision"]
    if not isinstance(decision, str) or decision not in DECISIONS:
        raise _fail(name("decision"), decision, '"unit" (each unit decides from its own drift) or "step" (one '
                                                "decision per call for every unit, from the first unit's drift)")
    return CacheSpec(**{**spec, "threshold": float(threshold), "token_ratio": float(ratio),
                        "levels": tuple(level for level in CACHE_LEVELS if level in levels)})


def parse_cache(value: Any, recorded: Mapping[str, Any] | None = None) -> CacheSpec | None:
    """The ``cache`` option: None / False (no cache), True (defaults), a `CacheSpec` or a dict of settings.

    A dict's settings replace those of `recorded` (a bundle's schedule, `t4dopt.deploy.load`'s
    ``cache=``), or the defaults.
    """
    if value is None or value is False:
        return None
    if value is True:
        return cache_spec(recorded or {})
    if isinstance(value, CacheSpec):
        return cache_spec(dataclasses.asdict(value))
    _check_dict("cache", value, CACHE_KEYS, lambda key: f"cache[{key!r}]")
    spec = cache_spec({**(recorded or {}), **value})
    if "final" in value and spec.final and spec.steps is None:
        raise _fail("cache['final']", spec.final, "only together with cache['steps'] (the final steps are "
                                                  "known only from the loop's length), or leave it out")
    return spec


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
    layout, sparse = _parse_layout(options.get("layout")), _parse_sparse(options.get("sparse"))
    _check_sparse_against_layout(sparse, layout)
    return Options(
        layout=layout,
        sparse=sparse,
        cache=parse_cache(options.get("cache")),
        target=target,
        strict=_parse_flag("strict", options.get("strict", False)),
        verify=_parse_flag("verify", options.get("verify", False)),
        trust_layout=_parse_flag("trust_layout", options.get("trust_layout", False)),
    )


def check_options(options: Mapping[str, Any] | Options | None) -> Options:
    """Check turbo4d options before the first call; raises `T4DOptionError` directly, returns them parsed.

    The backend runs this same check on the first call, where dynamo wraps any error in
    ``BackendCompilerFailed``. A callable policy is tried on a small grid here: one that raises,
    answers anything but bool, or leaves a query block with no key block is refused.
    """
    return parse_options(options)
