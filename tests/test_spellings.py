"""One row per spelling in `t4dopt.passes.spellings`: a tiny function written that way is found with the right
q, k, v, scale and mask, and a near miss of it is not read that way.

Each reading is also checked against an independent float64 attention computed from the tensors the site names,
so a site is never only found, it is found meaning what the graph computes. A new spelling in the table is one
new row here; `test_every_table_entry_has_a_row` fails until it has one.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

from t4dopt.passes.detect import find_attention
from t4dopt.passes.spellings import TABLES

N, D = 8, 4
_generator = torch.Generator().manual_seed(0)
Q, K, V = (torch.randn(2, 2, N, D, generator=_generator) for _ in range(3))
MASK = torch.randn(N, N, generator=_generator)


@dataclass(frozen=True)
class Row:
    """``fn(q, k, v, mask)`` in one spelling; `near_miss` a function that must not be read the same way."""

    table: str
    entry: str
    fn: Callable
    near_miss: Callable
    scale: float | None = 1.0
    masked: bool = False
    key_given_transposed: bool = False
    batched_3d: bool = False

    @property
    def id(self) -> str:
        return f"{self.table}: {self.entry}" + (" (k^T given)" if self.key_given_transposed else "")


ROWS = [
    Row("sdpa", "F.scaled_dot_product_attention",
        lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=0.3),
        near_miss=lambda q, k, v, m: F.scaled_dot_product_attention(k, q, v, attn_mask=m, scale=0.3),
        scale=0.3, masked=True),
    Row("sdpa", "F.scaled_dot_product_attention",
        lambda q, k, v, m: F.scaled_dot_product_attention(query=q, key=k, value=v),
        near_miss=lambda q, k, v, m: F.scaled_dot_product_attention(q, v, k),
        scale=None),
    # A fused aten kernel called directly: item 0 of its (output, logsumexp) is the attention (found to be reported).
    Row("fused_sdpa", "torch.ops.aten._scaled_dot_product_*_attention",
        lambda q, k, v, m: torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=m,
                                                                                      scale=0.3),
        near_miss=lambda q, k, v, m: torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default(v, k, q),
        scale=0.3, masked=True),
    # k^T: the product is q @ (that), softmax over the keys, then @ v.
    Row("key_transposes", "k.transpose(-2, -1)",
        lambda q, k, v, m: (q @ k.transpose(-2, -1)).softmax(-1) @ v,
        near_miss=lambda q, k, v, m: (q @ k.transpose(-2, -1).contiguous()).softmax(-1) @ v),
    Row("key_transposes", "k.transpose(-2, -1)",
        lambda q, k, v, m: (q @ torch.swapaxes(k, 3, 2)).softmax(-1) @ v,
        near_miss=lambda q, k, v, m: (q @ torch.swapaxes(k, 3, 2).contiguous()).softmax(-1) @ v),
    Row("key_transposes", "k.mT",
        lambda q, k, v, m: (q @ k.mT).softmax(-1) @ v,
        near_miss=lambda q, k, v, m: (q @ k.mT.contiguous()).softmax(-1) @ v),
    Row("key_transposes", "k.permute(..., -1, -2)",
        lambda q, k, v, m: (q @ k.permute(0, 1, 3, 2)).softmax(-1) @ v,
        near_miss=lambda q, k, v, m: (q @ k.permute(1, 0, 3, 2)).softmax(-1) @ v),
    # q @ k^T; a near miss lets the scores escape (also returned), so they cannot be fused away.
    Row("scores", "torch.matmul(q, k^T)",
        lambda q, k, v, m: torch.matmul(q, k.transpose(-2, -1)).softmax(-1) @ v,
        near_miss=lambda q, k, v, m: ((s := torch.matmul(q, k.transpose(-2, -1))).softmax(-1) @ v, s)),
    Row("scores", "torch.matmul(q, k^T)",
        lambda q, kt, v, m: q.matmul(kt).softmax(-1) @ v,
        near_miss=lambda q, kt, v, m: ((s := q.matmul(kt)).softmax(-1) @ v, s), key_given_transposed=True),
    Row("scores", "q @ k^T",
        lambda q, k, v, m: (q @ k.transpose(-2, -1)).softmax(-1) @ v,
        near_miss=lambda q, k, v, m: ((s := q @ k.transpose(-2, -1)).softmax(-1) @ v, s)),
    Row("scores", "torch.bmm(q, k^T)",
        lambda q, k, v, m: torch.bmm(q, k.transpose(1, 2)).softmax(-1).bmm(v),
        near_miss=lambda q, k, v, m: ((s := torch.bmm(q, k.transpose(1, 2))).softmax(-1).bmm(v), s), batched_3d=True),
    Row("scores", "torch.einsum('...id,...jd->...ij', q, k)",
        lambda q, k, v, m: torch.einsum("bhid,bhjd->bhij", q, k).softmax(-1) @ v,
        near_miss=lambda q, k, v, m: torch.einsum("bhid,bhjd->bhji", q, k).softmax(-1) @ v),
    Row("scores", "torch.einsum('...id,...jd->...ij', q, k)",
        lambda q, kt, v, m: torch.einsum("b h i d, b h d j -> b h i j", q, kt).softmax(-1) @ v,
        near_miss=lambda q, kt, v, m: torch.einsum("bhid,bhdj->bhji", q, kt).softmax(-1) @ v,
        key_given_transposed=True),
    Row("scores", "torch.baddbmm(mask, q, k^T, alpha=scale)",
        lambda q, k, v, m: torch.baddbmm(m, q, k.transpose(1, 2), alpha=0.5).softmax(-1).bmm(v),
        near_miss=lambda q, k, v, m: torch.baddbmm(m, q, k.transpose(1, 2), beta=0.5).softmax(-1).bmm(v),
        scale=0.5, masked=True, batched_3d=True),
    Row("scores", "torch.baddbmm(mask, q, k^T, alpha=scale)",
        lambda q, k, v, m: torch.baddbmm(torch.empty(4, N, N), q, k.transpose(1, 2), beta=0, alpha=0.5)
        .softmax(-1).bmm(v),
        near_miss=lambda q, k, v, m: m.baddbmm(q, k.transpose(1, 2), beta=2).softmax(-1).bmm(v),
        scale=0.5, batched_3d=True),
    # Scale and mask: a number, before the mask.
    Row("scales", "scores * c",
        lambda q, k, v, m: (q @ k.mT * 0.5).softmax(-1) @ v,
        near_miss=lambda q, k, v, m: (q @ k.mT * m).softmax(-1) @ v, scale=0.5),
    Row("scales", "scores * c",
        lambda q, k, v, m: torch.mul(0.25, q @ k.mT).softmax(-1) @ v,
        near_miss=lambda q, k, v, m: (q @ k.mT).mul(other=0.25).softmax(-1) @ v, scale=0.25),
    Row("scales", "scores / c",
        lambda q, k, v, m: (q @ k.mT / math.sqrt(D)).softmax(-1) @ v,
        near_miss=lambda q, k, v, m: (math.sqrt(D) / (q @ k.mT)).softmax(-1) @ v, scale=0.5),
    Row("masks", "scores + mask",
        lambda q, k, v, m: (q @ k.mT * 0.5 + m).softmax(-1) @ v,
        near_miss=lambda q, k, v, m: ((q @ k.mT + m) * 0.5).softmax(-1) @ v, scale=0.5, masked=True),
    Row("masks", "scores + mask",
        lambda q, k, v, m: torch.add(m, q @ k.mT).softmax(-1) @ v,
        near_miss=lambda q, k, v, m: (q @ k.mT + m + m).softmax(-1) @ v, masked=True),
    # Casts (a float32 softmax between casts), softmax over the keys.
    Row("casts", "x.float() / x.half() / x.bfloat16()",
        lambda q, k, v, m: (q @ k.mT * 0.5).float().softmax(-1).float() @ v,
        near_miss=lambda q, k, v, m: ((p := (q @ k.mT * 0.5).softmax(-1).float()) @ v, p), scale=0.5),
    Row("casts", "x.to(dtype) / x.type(dtype)",
        lambda q, k, v, m: (q @ k.mT).to(torch.float32).softmax(-1).type(torch.float32) @ v,
        near_miss=lambda q, k, v, m: (q @ k.mT).softmax(-1).to(v) @ v),
    Row("casts", "x.type_as(y)",
        lambda q, k, v, m: (q @ k.mT).softmax(-1).type_as(v) @ v,
        near_miss=lambda q, k, v, m: ((p := (q @ k.mT).softmax(-1).type_as(v)) @ v, p)),
    Row("softmaxes", "F.softmax(scores, dim=-1)",
        lambda q, k, v, m: F.softmax(q @ k.mT, dim=-1) @ v,
        near_miss=lambda q, k, v, m: F.softmax(q @ k.mT, dim=-2) @ v),
    Row("softmaxes", "F.softmax(scores, dim=-1)",
        lambda q, k, v, m: torch.softmax(q @ k.mT, 3, dtype=torch.float32) @ v,
        near_miss=lambda q, k, v, m: torch.softmax(q @ k.mT, 2, dtype=torch.float32) @ v),
    Row("softmaxes", "scores.softmax(-1)",
        lambda q, k, v, m: (q @ k.mT).softmax(dim=3) @ v,
        near_miss=lambda q, k, v, m: (q @ k.mT).softmax(dim=0) @ v),
    # probabilities @ v; a near miss lets the weights escape, or multiplies them from the other side.
    Row("weighted_sums", "torch.matmul(p, v)",
        lambda q, k, v, m: torch.matmul((q @ k.mT).softmax(-1), v),
        near_miss=lambda q, k, v, m: (torch.matmul(p := (q @ k.mT).softmax(-1), v), p)),
    Row("weighted_sums", "p @ v",
        lambda q, k, v, m: (q @ k.mT).softmax(-1) @ v,
        near_miss=lambda q, k, v, m: v.mT @ (q @ k.mT).softmax(-1)),
    Row("weighted_sums", "torch.bmm(p, v)",
        lambda q, k, v, m: torch.bmm((q @ k.mT).softmax(-1), v),
        near_miss=lambda q, k, v, m: (torch.bmm(p := (q @ k.mT).softmax(-1), v), p), batched_3d=True),
    Row("weighted_sums", "torch.einsum('...ij,...jd->...id', p, v)",
        lambda q, k, v, m: torch.einsum("bhij,bhjd->bhid", (q @ k.mT).softmax(-1), v),
        near_miss=lambda q, k, v, m: torch.einsum("bhij,bhid->bhid", (q @ k.mT).softmax(-1), v)),
]


def _inputs(row: Row) -> tuple[torch.Tensor, ...]:
    q, k, v = (x.reshape(-1, N, D) if row.batched_3d else x for x in (Q, K, V))
    return q, k.transpose(-2, -1).contiguous() if row.key_given_transposed else k, v, MASK


def _capture(fn, inputs) -> tuple[fx.GraphModule, dict[str, torch.Tensor]]:
    """dynamo's graph of `fn` and the value of each of its nodes on `inputs`."""
    captured = []

    def backend(gm, example_inputs):
        captured.append((gm, example_inputs))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=backend, fullgraph=True)(*inputs)
    gm, example_inputs = captured[0]
    values: dict[str, torch.Tensor] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, node):
            values[node.name] = result = super().run_node(node)
            return result

    Recorder(gm).run(*example_inputs)
    return gm, values


def _attention64(q, k, v, scale, mask):
    """softmax(q k^T * scale + mask) v in float64, written out here."""
    q, k, v = (x.double() for x in (q, k, v))
    scores = q @ k.transpose(-2, -1) * (1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if mask is not None:
        scores = scores + mask.double()
    return torch.softmax(scores, dim=-1) @ v


def _check_sound(site, values):
    """The site's reading (q, k, v, scale, mask) computes what the graph computes at its output."""
    key = values[site.key.name]
    key = key.transpose(-2, -1) if site.key_transposed else key
    mask = values[site.attn_mask.name] if site.attn_mask is not None else None
    want = _attention64(values[site.query.name], key, values[site.value.name], site.scale, mask)
    got = values[site.output.name]
    got = got[0] if isinstance(got, tuple) else got  # a fused aten call: (output, logsumexp, ...)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def _placeholders(row: Row) -> list[str]:
    """dynamo's node names for the row's inputs q, k (or k^T), v, mask: ``l_<parameter>_``."""
    return [f"l_{name}_" for name in inspect.signature(row.fn).parameters]


def _reads_as(site, row: Row) -> bool:
    """Whether `site` names the inputs q, k (or k^T), v the way `row` spells them."""
    q, k, v, _ = _placeholders(row)
    return (site.query.name, site.key.name, site.value.name, site.key_transposed) == (q, k, v, row.key_given_transposed)


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_spelling_is_found_with_its_q_k_v_scale_and_mask(row):
    gm, values = _capture(row.fn, _inputs(row))
    (site,) = find_attention(gm.graph)
    assert _reads_as(site, row), (site.query.name, site.key.name, site.value.name, site.key_transposed)
    assert site.scale == (None if row.scale is None else pytest.approx(row.scale))
    mask = site.attn_mask.name if site.attn_mask is not None else None
    assert mask == (_placeholders(row)[3] if row.masked else None)
    _check_sound(site, values)


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_near_miss_of_a_spelling_is_not_read_that_way(row):
    gm, values = _capture(row.near_miss, _inputs(row))
    sites = find_attention(gm.graph)
    assert not any(_reads_as(site, row) for site in sites)
    for site in sites:
        _check_sound(site, values)


def test_every_table_entry_has_a_row():
    entries = {(table, spelling.name) for table, spellings in TABLES.items() for spelling in spellings}
    assert entries == {(row.table, row.entry) for row in ROWS}
