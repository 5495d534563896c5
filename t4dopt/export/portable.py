"""Block-sparse attention in standard ops only, for runtimes without the ``t4d`` domain.

The block table is known when the model is exported, so it becomes a few small constant
tensors. q, k and v are gathered into padded blocks of ``slot`` tokens (partial and prefix
blocks padded at their tail), then each query block gathers the key and value blocks it keeps
by the block table itself: ``max_kv`` blocks, the padding ones masked by an additive bias, like
the padded tail tokens. Attention is then one batched MatMul, Softmax, MatMul per query block
over its kept keys only: ``blocks x slot x max_kv x slot`` scores rather than ``N x N``.

`make_portable` swaps each ``t4d.block_sparse_attention`` node of a rewritten FX graph for
`portable_attention`, which torch.onnx turns into Gather, MatMul, Add, Softmax and Reshape.

A key mask (`t4dopt.ops.key_mask`) is gathered like the keys and added to the scores; there the
masked slots are -inf rather than the lowest finite value, and rows left with no key (whose
Softmax is NaN) are replaced by zeros with a Where.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from t4dopt.block_layout import BlockLayout
from t4dopt.fx_utils import example_tensor
from t4dopt.ops import key_mask as key_masks
from t4dopt.ops.schema import OpArguments, resolve_scale

import t4dopt.ops  # noqa: F401  (registers torch.ops.t4d)

T4D_OP = torch.ops.t4d.block_sparse_attention.default


@dataclass(frozen=True)
class PortableTables:
    """One block table as the constants `portable_attention` takes; all O(N + blocks x max_kv).

    Masked entries get half the dtype's lowest value from each of the two biases, so a masked
    tail token of a padding block sums to the lowest value, never to -inf.

    Attributes:
        pad_index: int64 [blocks * slot]; the token in each padded slot (padding reads token 0).
        kv_blocks: int64 [blocks * max_kv]; the block table's kv_indices (padding entries name block 0).
        key_bias: [blocks, slot]; 0 for a block's tokens, masked for its padded tail.
        slot_bias: [blocks, max_kv, 1]; 0 for kept key blocks, masked for padding (0 throughout
            for query blocks that keep nothing: their output is zeroed by `row_keep`).
        output_index: int64 [seq_len]; the padded slot holding each token's output.
        row_keep: [blocks, 1, 1] of 1 and 0, or None when every query block keeps a key block.
    """

    pad_index: torch.Tensor
    kv_blocks: torch.Tensor
    key_bias: torch.Tensor
    slot_bias: torch.Tensor
    output_index: torch.Tensor
    row_keep: torch.Tensor | None

    @classmethod
    def from_layout(cls, layout: BlockLayout, dtype: torch.dtype = torch.float32) -> PortableTables:
        starts = layout.block_starts.long()
        lengths = starts[1:] - starts[:-1]
        counts = layout.kv_counts.long()
        blocks, max_kv = layout.kv_indices.shape
        slot = int(lengths.max())
        offsets = torch.arange(slot)
        masked = torch.finfo(dtype).min / 2

        token_valid = offsets < lengths.unsqueeze(1)
        pad_index = torch.where(token_valid, starts[:-1].unsqueeze(1) + offsets, 0)
        key_bias = torch.where(token_valid, 0.0, masked)

        kept = torch.arange(max_kv) < counts.unsqueeze(1)
        empty = counts == 0
        kv_blocks = torch.where(kept, layout.kv_indices.long(), 0)
        slot_bias = torch.where(kept | empty.unsqueeze(1), 0.0, masked).unsqueeze(2)

        block = layout.block_of_token()
        output_index = block * slot + torch.arange(layout.seq_len) - starts[block]
        row_keep = (~empty).to(dtype).view(blocks, 1, 1) if bool(empty.any()) else None
        return cls(pad_index.reshape(-1), kv_blocks.reshape(-1), key_bias.to(dtype), slot_bias.to(dtype),
                   output_index, row_keep)


def portable_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pad_index: torch.Tensor,
    kv_blocks: torch.Tensor,
    key_bias: torch.Tensor,
    slot_bias: torch.Tensor,
    output_index: torch.Tensor,
    row_keep: torch.Tensor | None,
    scale: float,
    key_mask_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``t4d.block_sparse_attention`` on q, k, v [B, H, N, D] from `PortableTables`, in gathers and matmuls.

    `key_mask_bias` [B or 1, N] in q's dtype: the key mask as an additive bias (`key_mask.as_bias`).
    """
    b, h, _, d = q.shape
    blocks, slot = key_bias.shape
    max_kv = slot_bias.shape[1]

    def kept_blocks(x: torch.Tensor) -> torch.Tensor:
        padded = x.index_select(2, pad_index).reshape(b, h, blocks, slot, x.shape[-1])
        return padded.index_select(2, kv_blocks).reshape(b, h, blocks, max_kv * slot, x.shape[-1])

    queries = q.index_select(2, pad_index).reshape(b, h, blocks, slot, d) * scale
    bias = (key_bias.index_select(0, kv_blocks).reshape(blocks, max_kv, slot) + slot_bias)
    bias = bias.reshape(blocks, 1, max_kv * slot)
    scores = queries @ kept_blocks(k).transpose(-1, -2)
    if key_mask_bias is None:
        out = torch.softmax(scores + bias, dim=-1) @ kept_blocks(v)
        if row_keep is not None:
            out = out * row_keep
    else:
        masks = key_mask_bias.shape[0]
        gathered = key_mask_bias.index_select(1, pad_index).reshape(masks, blocks, slot)
        gathered = gathered.index_select(1, kv_blocks).reshape(masks, 1, blocks, 1, max_kv * slot)
        kept = bias == 0  # [blocks, 1, max_kv * slot]: the slots of the kept key blocks' tokens
        scores = (scores + gathered).masked_fill(~kept, -torch.inf)
        out = torch.softmax(scores, dim=-1) @ kept_blocks(v)
        alive = (kept & (gathered > -torch.inf)).any(dim=-1, keepdim=True)  # [B, 1, blocks, 1, 1]
        if row_keep is not None:
            alive = alive & (row_keep > 0)
        out = torch.where(alive, out, torch.zeros((), dtype=out.dtype))
    return out.reshape(b, h, blocks * slot, -1).index_select(2, output_index)


def _example(node: fx.Node) -> torch.Tensor:
    value = example_tensor(node)
    if value is None:
        raise ValueError(f"make_portable: node {node.name} carries no example tensor in its meta")
    return value


def _register_tables(gm: fx.GraphModule, prefix: str, tables: PortableTables,
                     device: torch.device) -> list[fx.Node | None]:
    """Buffers for `tables` and get_attr nodes reading them (at the graph's insertion point)."""
    nodes: list[fx.Node | None] = []
    for name in ("pad_index", "kv_blocks", "key_bias", "slot_bias", "output_index", "row_keep"):
        tensor = getattr(tables, name)
        if tensor is None:
            nodes.append(None)
            continue
        gm.register_buffer(f"{prefix}_{name}", tensor.to(device))
        nodes.append(gm.graph.get_attr(f"{prefix}_{name}"))
    return nodes


def make_portable(gm: fx.GraphModule) -> int:
    """Replace every ``t4d.block_sparse_attention`` node of `gm` by `portable_attention`; returns how many.

    The op's block-table buffers are dropped and index tensors registered in their place, once
    per distinct table (by content) and dtype.
    """
    graph = gm.graph
    sites = [node for node in graph.nodes if node.op == "call_function" and node.target is T4D_OP]
    registered: dict[tuple, list[fx.Node | None]] = {}
    table_buffers: set[str] = set()
    for node in sites:
        call = OpArguments.of_call(node.args, node.kwargs)
        example = _example(call.q)
        targets = (call.block_starts.target, call.kv_counts.target, call.kv_indices.target)
        table_buffers.update(targets)
        table = tuple(getattr(gm, target) for target in targets)
        key = (*(t.cpu().numpy().tobytes() for t in table), example.dtype)
        with graph.inserting_before(node):
            if key not in registered:
                tables = PortableTables.from_layout(BlockLayout(*table, block_size=call.block_size), example.dtype)
                registered[key] = _register_tables(gm, f"_t4d_portable{len(registered)}", tables, example.device)
            scale = resolve_scale(call.scale, example.shape[-1])
            mask = None
            if call.key_mask is not None:
                mask = graph.call_function(key_masks.as_bias, (call.key_mask, None, example.dtype))
            replacement = graph.call_function(portable_attention,
                                              (call.q, call.k, call.v, *registered[key], scale, mask))
        node.replace_all_uses_with(replacement)
        graph.erase_node(node)
    graph.eliminate_dead_code()
    still_read = {node.target for node in graph.nodes if node.op == "get_attr"}
    for target in table_buffers - still_read:
        delattr(gm, target)
    graph.lint()
    gm.recompile()
    return len(sites)
