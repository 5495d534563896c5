"""What the attention mask a model passes means to the block table: nothing, per-key, or structured.

A model's mask is combined with the block mask, never dropped, or the site stays dense:

- a mask the graph computes from constants alone (``arange`` comparisons, ``ones``) is evaluated
  here, at compile time: one that keeps every key is no mask; one over queries and keys
  ([N, N], as SkyReels-V2's block-causal diffusion-forcing mask) becomes a block layout
  (`t4dopt.block_layout.BlockLayout.from_token_mask`, exact or refused) intersected with the policy
  by the sparsify pass;
- a mask that depends on the inputs is combined at run time only when it masks keys alone
  (SDPA's key-padding shape: [B, 1, 1, N], [B, 1, N], [1, N] or [N]; boolean or additive, as
  HunyuanVideo's text padding): it becomes the op's ``key_mask`` (`t4dopt.ops.key_mask`: a mask
  that keeps every key runs unmasked). Anything else stays dense with the reason.

Positions need no proof here: SDPA applies ``mask[..., i, j]`` to query i and key j whatever they
are, and so does the rewrite.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx

from .state import PassState
from t4dopt.fx_utils import dtype_of, example_value, shape_of, source_line
from t4dopt.sites import AttentionSite, SiteMask

FOLD_LIMIT = 1 << 25
"""Largest tensor (elements) the compile-time evaluation of a constant mask may build."""


def _ancestors(node: fx.Node) -> list[fx.Node] | None:
    """`node` and what it is computed from, in graph order, or None when that reads a graph input."""
    seen: dict[fx.Node, None] = {}
    stack = [node]
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        if current.op in ("placeholder", "output") or current.op not in ("call_function", "call_method", "get_attr"):
            return None
        seen[current] = None
        stack.extend(current.all_input_nodes)
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    return sorted(seen, key=order.__getitem__)


def constant_value(node: fx.Node) -> torch.Tensor | None:
    """The value of a tensor the graph computes from constants only (None when it reads an input or is too big)."""
    nodes = _ancestors(node)
    if nodes is None:
        return None
    for n in nodes:
        value = example_value(n)
        if isinstance(value, torch.Tensor) and value.numel() > FOLD_LIMIT:
            return None
    values: dict[fx.Node, object] = {}
    module = node.graph.owning_module

    def load(a):
        return fx.node.map_arg(a, lambda n: values[n])

    try:
        for n in nodes:
            if n.op == "get_attr":
                target = module
                for part in str(n.target).split("."):
                    target = getattr(target, part)
                values[n] = target
            elif n.op == "call_function":
                values[n] = n.target(*load(n.args), **load(n.kwargs))
            else:
                self_, *rest = load(n.args)
                values[n] = getattr(self_, n.target)(*rest, **load(n.kwargs))
    except Exception:  # an op that does not run outside the graph (fake-only, device): not a constant we can read
        return None
    value = values[node]
    return value.detach().cpu() if isinstance(value, torch.Tensor) else None


def _keeps_everything(value: torch.Tensor) -> bool:
    return bool(value.all()) if value.dtype == torch.bool else bool((value == 0).all())


def _key_only(shape: tuple[int, ...], batch: int) -> bool:
    """Whether a mask of `shape` broadcast to [batch, heads, N, N] depends on the batch element and key alone."""
    if len(shape) > 4:
        return False
    padded = (1,) * (4 - len(shape)) + shape
    return padded[1] == 1 and padded[2] == 1 and padded[0] in (1, batch)


def read_mask(site: AttentionSite) -> SiteMask | None:
    """What the site's mask means to the block table (None: it has none)."""
    mask = site.attn_mask
    if mask is None:
        return None
    shape, dtype = shape_of(mask), dtype_of(mask)
    n, where = site.key_len, f"{mask.name} (at {source_line(mask)})"
    if shape is None or dtype is None:
        return SiteMask("unsupported", reason=f"its attention mask {where} has no static shape")
    if dtype != torch.bool and not dtype.is_floating_point:
        return SiteMask("unsupported", reason=f"its attention mask {where} is of dtype {dtype}")
    if len(site.query_shape) != 4:
        return SiteMask("unsupported", reason="an attention mask on a site that is not [B, H, N, D]")
    batch = site.query_shape[0]
    value = constant_value(mask)
    if value is not None:
        if _keeps_everything(value):
            return SiteMask("none", evidence=f"the attention mask {where} keeps every key (read at compile time)")
        if _key_only(shape, batch):
            return SiteMask("keys", node=mask, evidence=f"the constant key mask {where}")
        if len(shape) >= 2 and shape[-2:] == (site.query_len, n) and math.prod(shape[:-2]) == 1:
            return SiteMask("structured", value=value.reshape(shape[-2:]),
                            evidence=f"the structured mask {where}, read at compile time")
        return SiteMask("unsupported", reason=f"its attention mask {where} {list(shape)} differs per batch element "
                                              "or head over queries and keys")
    if _key_only(shape, batch) and shape[-1] == n:
        return SiteMask("keys", node=mask, evidence=f"the key mask {where} {list(shape)}, applied at run time")
    return SiteMask("unsupported", reason=f"its attention mask {where} {list(shape)} depends on the inputs and masks "
                                          "queries as well as keys; only key masks combine with a block table at "
                                          "run time")


def read_attention_masks(state: PassState) -> None:
    """Read each site's attention mask: none, a key mask (run time), a structured one (compile time), or unsupported."""
    state.masks = [read_mask(site) for site in state.sites]
