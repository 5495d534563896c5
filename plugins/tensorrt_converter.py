"""torch-tensorrt dynamo converter: ``torch.ops.t4d.block_sparse_attention.default`` -> the TensorRT plugin.

`register_converter` adds the converter to torch-tensorrt's table (``dynamo_tensorrt_converter``);
torch_tensorrt.dynamo.compile then puts each t4d op into the engine as one
``t4d::block_sparse_attention`` plugin layer (`tensorrt_plugins`), its block table packed into the
plugin's constant plan tensors at conversion time. The converter takes a node only when its
table is constant (``get_attr`` buffers, as the turbo4d passes store it) and its inputs are ones
the plugin runs; other nodes stay in PyTorch.

Imports of tensorrt and torch_tensorrt are lazy: this module imports without them, and
`register_converter` raises an ImportError naming ``t4dopt[tensorrt]``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from t4dopt.plugins import tensorrt_plugins as plugins  # (imports t4dopt.ops: torch.ops.t4d is registered)

T4D_OP = torch.ops.t4d.block_sparse_attention.default
TABLE_ARGS = (3, 4, 5)
"""Positions of kv_counts, kv_indices, block_starts among the op's arguments."""

_registered_aot: bool | None = None


def op_arguments(args: tuple, kwargs: dict) -> tuple[Any, Any, Any, tuple, int, float | None]:
    """(q, k, v, (kv_counts, kv_indices, block_starts), block_size, scale) of a call of the op."""
    q, k, v, kv_counts, kv_indices, block_starts, block_size = args[:7]
    scale = args[7] if len(args) > 7 else kwargs.get("scale")
    return q, k, v, (kv_counts, kv_indices, block_starts), int(block_size), scale


def node_supported(node: torch.fx.Node) -> str | None:
    """None when the converter takes this op node, else why not (the node then runs in PyTorch)."""
    q, _, v, tables, _, scale = op_arguments(node.args, node.kwargs)
    if not all(isinstance(t, torch.fx.Node) and t.op == "get_attr" for t in tables):
        return "its block table is not constant (get_attr buffers)"
    q_meta, v_meta = (x.meta.get("val") if isinstance(x, torch.fx.Node) else None for x in (q, v))
    if not isinstance(q_meta, torch.Tensor) or not isinstance(v_meta, torch.Tensor):
        return "q and v carry no tensor metadata"
    head_dim = q_meta.shape[-1]
    return plugins.unsupported_reason(q_meta.dtype, head_dim, v_meta.shape[-1],
                                      plugins.default_scale(head_dim) if scale is None else scale,
                                      q_meta.shape[0] * q_meta.shape[1])


def constant_array(value: Any, name: str) -> np.ndarray:
    """A block-table argument as numpy: torch-tensorrt hands frozen buffers to converters as tensors or arrays."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value
    raise TypeError(f"{plugins.PLUGIN_ID}: {name} must be a constant tensor at conversion time, got "
                    f"{type(value).__name__}")


def register_converter(*, aot: bool = True) -> None:
    """Register the plugin (`tensorrt_plugins.register`) and the converter with torch-tensorrt (once).

    `aot` (default) puts the plugin's AOT implementation in the engine: our Triton kernel as PTX, no
    Python at run time. ``aot=False`` uses the JIT implementation (Python, on TensorRT's stream).
    """
    global _registered_aot
    if _registered_aot is not None:
        if _registered_aot != aot:
            raise ValueError(f"the {plugins.PLUGIN_ID} converter is already registered with aot={_registered_aot}")
        return
    plugins.register()
    plugins.require("torch_tensorrt")
    trtp = plugins.require("tensorrt.plugin")
    from torch_tensorrt.dynamo.conversion import dynamo_tensorrt_converter
    from torch_tensorrt.dynamo.conversion._ConverterRegistry import ConverterPriority
    from torch_tensorrt.dynamo.conversion.converter_utils import get_trt_tensor

    def validate(node: torch.fx.Node, settings: Any = None) -> bool:
        return node_supported(node) is None

    @dynamo_tensorrt_converter(T4D_OP, capability_validator=validate, priority=ConverterPriority.HIGH,
                               supports_dynamic_shapes=True)
    def convert(ctx: Any, target: Any, args: tuple, kwargs: dict, name: str) -> Any:
        q, k, v, table, block_size, scale = op_arguments(args, kwargs)
        tables = plugins.pack_tables(*(constant_array(t, field) for t, field in
                                       zip(table, ("kv_counts", "kv_indices", "block_starts"))))
        inputs = [get_trt_tensor(ctx, x, f"{name}_{field}") for x, field in zip((q, k, v), "qkv")]
        inputs += [get_trt_tensor(ctx, array, f"{name}_{field}") for field, array in tables.arrays().items()]
        head_dim = inputs[0].shape[-1]
        scale = plugins.default_scale(head_dim) if scale is None else float(scale)
        call = getattr(getattr(trtp.op, plugins.PLUGIN_NAMESPACE), plugins.PLUGIN_NAME)(
            *inputs, block_size=block_size, scale=scale, layout="", block_m=tables.block_m, block_n=tables.block_n)
        layer = ctx.net.add_plugin(call, aot=aot)
        layer.name = f"[{target}]-[{name}]"
        return layer.get_output(0)

    _registered_aot = aot
