"""Where a mask may vary (t4dopt/passes/attention_masks.py `varying_dims`), checked against its values.

The reading must be sound: a dim it calls constant must be constant in the value the graph computes,
for any chain of the ops it reads (and ops it does not read, which must count as varying everywhere).
"""

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings, strategies as st

from t4dopt.passes.attention_masks import _and_factors, varying_dims
from support import captured_graph

B, N, PAD = 2, 6, 2

STEPS = ("repeat_queries", "repeat_heads", "expand_queries", "transpose", "transpose_by_keyword", "permute",
         "permute_by_keyword", "invert", "and_transposed", "or_other", "flip", "cast_bool")


def _apply(step: str, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    if step == "repeat_queries" and x.shape[2] == 1:
        return x.repeat(1, 1, N, 1)
    if step == "repeat_heads" and x.shape[1] == 1:
        return x.repeat(1, 2, 1, 1)
    if step == "expand_queries" and x.shape[2] == 1:
        return x.expand(-1, -1, N, -1)
    if step == "transpose":
        return x.transpose(2, 3)
    if step == "transpose_by_keyword":
        return x.transpose(dim0=1, dim1=3)
    if step == "permute":
        return x.permute(0, 1, 3, 2)
    if step == "permute_by_keyword":
        return x.permute(dims=(0, 3, 2, 1))
    if step == "invert":
        return ~x
    if step == "and_transposed" and x.shape[2] == x.shape[3]:
        return x & x.transpose(2, 3)
    if step == "or_other":
        return x | other
    if step == "flip":  # not read: must count as varying everywhere
        return x.flip(-1)
    if step == "cast_bool":
        return x.to(torch.int32).bool()
    return x


def _constant_along(value: torch.Tensor, dim: int) -> bool:
    return bool((value == value.narrow(dim, 0, 1)).all())


@settings(max_examples=25, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(steps=st.lists(st.sampled_from(STEPS), max_size=5), seed=st.integers(0, 2 ** 16))
def test_a_dim_read_as_constant_is_constant(steps, seed):
    generator = torch.Generator().manual_seed(seed)
    valid = torch.rand(B, N - PAD, generator=generator) > 0.4
    other = torch.rand(B, 1, 1, N, generator=generator) > 0.5

    def mask(valid, other):
        x = F.pad(valid, (PAD, 0), value=True).view(B, 1, 1, N)
        for step in steps:
            x = _apply(step, x, other)
        return x

    gm = captured_graph(mask, valid, other)
    node = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    node = node[0] if isinstance(node, (tuple, list)) else node
    value = mask(valid, other)
    dims = varying_dims(node)
    assert dims is not None
    for dim in range(-value.dim(), 0):
        if dim not in dims:
            assert _constant_along(value, dim), (steps, dim, dims)


def test_hunyuan_video_15s_mask_is_a_key_mask_and_a_query_mask():
    def mask(valid):
        rows = F.pad(valid, (PAD, 0), value=True).bool().view(B, 1, 1, N).repeat(1, 1, N, 1)
        return (rows & rows.transpose(2, 3)).bool()

    gm = captured_graph(mask, torch.ones(B, N - PAD, dtype=torch.bool))
    node = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    node = node[0] if isinstance(node, (tuple, list)) else node
    keys, queries = _and_factors(node)
    assert varying_dims(keys) == {-4, -1} and varying_dims(queries) == {-4, -2}
