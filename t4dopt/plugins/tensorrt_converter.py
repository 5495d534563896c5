"""torch-tensorrt dynamo converter: ``torch.ops.t4d.block_sparse_attention.default`` -> the TensorRT plugin.

`register_converter` adds the converter to torch-tensorrt's table (``dynamo_tensorrt_converter``);
torch_tensorrt.dynamo.compile then puts each t4d op into the engine as one
``t4d::block_sparse_attention`` plugin layer (`tensorrt_plugins`), its block table packed into the
plugin's constant plan tensors at conversion time. The converter takes a node only when its
table is constant (``get_attr`` buffers, as the turbo4d passes store it) and its inputs are ones
the plugin runs; other nodes (one with a key mask, which the plugin does not take) stay in PyTorch.

Imports of tensorrt and torch_tensorrt are lazy: this module imports without them, and
`register_converter` raises an ImportError naming ``t4dopt[tensorrt]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from t4dopt.fx_utils import example_tensor
from t4dopt.ops.schema import TABLE_ARGUMENTS, OpArguments, resolve_scale
from t4dopt.plugins import tensorrt_plugins as plugins  # (imports t4dopt.ops: torch.ops.t4d is registered)

T4D_OP = torch.ops.t4d.block_sparse_attention.default

_registered_aot: bool | None = None


def node_supported(node: torch.fx.Node) -> str | None:
    """None when the converter takes this op node, else why not (the node then runs in PyTorch)."""
    call = OpArguments.of_call(node.args, node.kwargs)
    q, v, scale = call.q, call.v, call.scale
    if not all(isinstance(t, torch.fx.Node) and t.op == "get_attr" for t in call.tables):
        return "its block table is not constant (get_attr buffers)"
    if call.key_mask is not None:
        return "it takes a key mask, which the plugin does not"
    q_meta, v_meta = example_tensor(q), example_tensor(v)
    if q_meta is None or v_meta is None:
        return "q and v carry no tensor metadata"
    head_dim = q_meta.shape[-1]
    return plugins.unsupported_reason(q_meta.dtype, head_dim, v_meta.shape[-1],
                                      resolve_scale(scale, head_dim),
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
        call = OpArguments.of_call(args, kwargs)
        tables = plugins.pack_tables(*(constant_array(t, field) for t, field in zip(call.tables, TABLE_ARGUMENTS)))
        inputs = [get_trt_tensor(ctx, x, f"{name}_{field}") for x, field in zip((call.q, call.k, call.v), "qkv")]
        inputs += [get_trt_tensor(ctx, array, f"{name}_{field}") for field, array in tables.arrays().items()]
        head_dim = inputs[0].shape[-1]
        plugin = getattr(getattr(trtp.op, plugins.PLUGIN_NAMESPACE), plugins.PLUGIN_NAME)(
            *inputs, block_size=int(call.block_size), scale=resolve_scale(call.scale, head_dim), layout="",
            block_m=tables.block_m, block_n=tables.block_n)
        layer = ctx.net.add_plugin(plugin, aot=aot)
        layer.name = f"[{target}]-[{name}]"
        return layer.get_output(0)

    _registered_aot = aot


def lower_tensorrt(gm: torch.fx.GraphModule, example_inputs: Sequence[torch.Tensor], *,
                   aot: bool = True) -> Callable[..., Any]:
    """`gm` (a graph the turbo4d passes rewrote) compiled by torch_tensorrt.dynamo.compile, t4d ops as plugins.

    The graph is exported with torch.export on `example_inputs` (CUDA tensors; the engine takes
    their shapes and dtypes), then compiled with our converter registered, so each t4d op becomes a
    plugin layer in the engine. Returns the compiled module (callable like `gm`).
    """
    torch_tensorrt = plugins.require("torch_tensorrt")
    plugins.require_cuda("target='tensorrt'")
    register_converter(aot=aot)
    inputs = tuple(example_inputs)
    with torch.no_grad():
        program = torch.export.export(gm, inputs)
        return torch_tensorrt.dynamo.compile(program, arg_inputs=list(inputs), min_block_size=1)
