"""``t4d::block_sparse_attention_planned``: our Triton forward kernel as a ``torch.library.triton_op``.

Compiled ahead of time, ``t4d::block_sparse_attention`` stays an opaque call that the loading
process must answer in Python. A triton_op shows AOTInductor the Triton kernel inside, which it
compiles into the package like its own kernels, so a CUDA package needs no Python at run time.
The op takes the kernel's plan (`triton_kernel.Plan`) instead of the block table;
`plan_sites` rewrites a graph's block-sparse calls into it.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx
from torch.library import triton_op, wrap_triton

from t4dopt.ops import block_sparse, triton_kernel

PLANNED_OP = "t4d::block_sparse_attention_planned"


@triton_op(PLANNED_OP, mutates_args=())
def block_sparse_attention_planned(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tiles: torch.Tensor,
                                   full_starts: torch.Tensor, partial_starts: torch.Tensor,
                                   partial_ends: torch.Tensor, block_m: int, block_n: int,
                                   scale: float) -> torch.Tensor:
    """Block-sparse attention of q, k, v [B, H, N, D] (last dim contiguous) over a precomputed plan."""
    plan = triton_kernel.Plan(block_m, block_n, q.shape[2], tiles, full_starts, partial_starts, partial_ends)
    out, lse = triton_kernel._outputs(q, v)
    config = triton_kernel.default_config(max(q.shape[-1], v.shape[-1]), q.dtype)
    triton_kernel.launch(wrap_triton(triton_kernel._forward_kernel), q, k, v, out, lse, plan, scale, config)
    return out


def _constant(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    return gm.get_buffer(node.target)


def _site_inputs(gm: fx.GraphModule, args: tuple, sites: list[fx.Node]) -> dict[fx.Node, torch.Tensor]:
    """The values of the q and v inputs of `sites` when `gm` runs on `args`."""
    wanted = {node.args[i] for node in sites for i in (0, 2)}
    values: dict[fx.Node, torch.Tensor] = {}
    interpreter = fx.Interpreter(gm)
    run_node = interpreter.run_node

    def record(node: fx.Node):
        result = run_node(node)
        if node in wanted:
            values[node] = result
        return result

    interpreter.run_node = record
    with torch.no_grad():
        interpreter.run(*args)
    return values


def plan_sites(gm: fx.GraphModule, args: tuple) -> int:
    """Rewrite each ``t4d.block_sparse_attention`` call of `gm` (run on `args`) whose block table is a
    buffer and whose inputs our Triton kernel runs into ``t4d.block_sparse_attention_planned``, with
    the plan as buffers; returns how many calls were rewritten."""
    sites = [n for n in gm.graph.nodes
             if n.op == "call_function" and n.target is torch.ops.t4d.block_sparse_attention.default
             and all(isinstance(t, fx.Node) and t.op == "get_attr" for t in n.args[3:6])]
    values = _site_inputs(gm, args, sites) if sites else {}
    count = 0
    for node in sites:
        q, k, v, counts, indices, starts, _, scale = node.args[:8]
        query, value = values[q], values[v]
        scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
        if triton_kernel.supports(query, value, scale) is not None:
            continue
        table = block_sparse._table_for(query, *(_constant(gm, t) for t in (counts, indices, starts)))
        plan = table.triton_plan(query.device)
        with gm.graph.inserting_before(node):
            buffers = []
            for name in ("tiles", "full_starts", "partial_starts", "partial_ends"):
                target = f"_t4d_plan{count}_{name}"
                gm.register_buffer(target, getattr(plan, name))
                buffers.append(gm.graph.get_attr(target))
            contiguous = [gm.graph.call_method("contiguous", (x,)) for x in (q, k, v)]
            planned = gm.graph.call_function(torch.ops.t4d.block_sparse_attention_planned.default,
                                             (*contiguous, *buffers, plan.block_m, plan.block_n, scale))
        node.replace_all_uses_with(planned)
        gm.graph.erase_node(node)
        count += 1
    if count:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return count
