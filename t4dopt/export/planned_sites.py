"""Rewrite block-sparse calls into the planned Triton op before an AOTInductor export on CUDA.

`plan_sites` replaces each ``t4d.block_sparse_attention`` call whose block table is a buffer and
whose inputs our Triton kernel runs by ``t4d.block_sparse_attention_planned``
(`t4dopt.ops.triton_op`), with the kernel's plan as buffers, so AOTInductor compiles the kernel
into the package. A key mask becomes the float32 key bias the planned op takes, computed in the
graph (`t4dopt.ops.key_mask.as_bias`).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from t4dopt.export.capture import node_values
from t4dopt.ops import key_mask, tables, triton_kernel
from t4dopt.ops.schema import OpArguments, resolve_scale
from t4dopt.ops.triton_op import block_sparse_attention_planned  # noqa: F401  (registers the op)

PLAN_FIELDS = ("tiles", "full_starts", "partial_starts", "partial_ends")


def plan_sites(gm: fx.GraphModule, args: tuple) -> int:
    """Rewrite the sites of `gm` (run on `args`) the Triton kernel runs; returns how many were rewritten."""
    sites = [n for n in gm.graph.nodes
             if n.op == "call_function" and n.target is torch.ops.t4d.block_sparse_attention.default
             and all(isinstance(t, fx.Node) and t.op == "get_attr" for t in n.args[3:6])]
    if not sites:
        return 0
    values = node_values(gm, args, {node.args[i].name for node in sites for i in (0, 2)})
    count = 0
    for node in sites:
        call = OpArguments.of_call(node.args, node.kwargs)
        query, value = values[call.q.name], values[call.v.name]
        scale = resolve_scale(call.scale, query.shape[-1])
        if triton_kernel.supports(query, value, scale) is not None:
            continue
        table = tables.table_for(query, *(gm.get_buffer(t.target) for t in call.tables))
        plan = table.triton_plan(query.device)
        with gm.graph.inserting_before(node):
            buffers = []
            for name in PLAN_FIELDS:
                target = f"_t4d_plan{count}_{name}"
                gm.register_buffer(target, getattr(plan, name))
                buffers.append(gm.graph.get_attr(target))
            contiguous = [gm.graph.call_method("contiguous", (x,)) for x in (call.q, call.k, call.v)]
            bias = None
            if call.key_mask is not None:
                bias = gm.graph.call_function(key_mask.as_bias, (call.key_mask, query.shape[0], torch.float32))
            planned = gm.graph.call_function(torch.ops.t4d.block_sparse_attention_planned.default,
                                             (*contiguous, *buffers, plan.block_m, plan.block_n, scale, bias))
        node.replace_all_uses_with(planned)
        gm.graph.erase_node(node)
        count += 1
    if count:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return count
