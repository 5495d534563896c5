"""`export_tensorrt` (``t4dopt.export.tensorrt``): a serialized TensorRT engine, with the t4d op as a plugin;
``options={"target": "tensorrt"}`` goes through torch-tensorrt instead (`t4dopt.plugins.tensorrt_converter.lower_tensorrt`).

`export_tensorrt`:

1. from a model, write the custom-domain ONNX (`export_onnx`, ``ops="custom"``) beside the engine;
   or take an ``.onnx`` file written that way;
2. `to_plugin_nodes`: turn each ``t4d.BlockSparseAttention`` node into the node TensorRT's ONNX
   parser maps to our plugin: op type ``block_sparse_attention`` with a ``plugin_namespace="t4d"``
   attribute (and ``aot=1`` for the AOT implementation), its block-table initializers replaced by
   the packed plan (`tensorrt_plugins.pack_tables`), and a second output for the log-sum-exp;
3. parse that with ``tensorrt.OnnxParser`` (plugin registered) and build a serialized engine.

TensorRT, torch-tensorrt and a CUDA GPU are checked for first, with errors that say what to
install, before any export work is done.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from t4dopt.ops.schema import ONNX_DOMAIN, ONNX_MASKED_OP_TYPE, ONNX_OP_TYPE
from t4dopt.options import Options
from t4dopt.plugins import tensorrt_plugins as plugins
from t4dopt.plugins.tensorrt_plugins import require_cuda
from t4dopt.export.result import ExportedArtifact

TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
                "INT64": torch.int64, "INT8": torch.int8, "UINT8": torch.uint8, "BOOL": torch.bool}
"""torch dtypes of engine inputs and outputs, by ``tensorrt.DataType`` name."""


@dataclass(frozen=True)
class TensorRTResult(ExportedArtifact):
    """What `export_tensorrt` wrote (a serialized engine); `sites` is None when it was built from an ``.onnx`` file."""

    onnx_path: Path | None = None
    """The custom-domain ONNX the engine was built from."""
    plugin_nodes: int = 0
    """``t4d::block_sparse_attention`` plugin layers in the engine."""

    @property
    def sites_rewritten(self) -> int:
        return self.plugin_nodes if self.sites is None else super().sites_rewritten


def require_tensorrt() -> Any:
    """The tensorrt module with our plugin registered; ImportError naming the extra without it."""
    trt = plugins.require("tensorrt")
    plugins.register()
    return trt


def _attribute(node: Any, name: str) -> Any:
    import onnx

    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    raise ValueError(f"t4d.{ONNX_OP_TYPE} node {node.name!r} has no {name!r} attribute")


def to_plugin_nodes(model: Any, *, aot: bool = True) -> int:
    """Rewrite `model` (an ``onnx.ModelProto``, in place) for TensorRT; returns the nodes rewritten.

    Each ``t4d.BlockSparseAttention`` node must take its block table from initializers (as
    `export_onnx` writes it). Initializers no node reads any more are dropped. The plugin takes
    no key mask: a ``t4d.MaskedBlockSparseAttention`` node is refused (before anything is changed).
    """
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    masked = [node.name for node in graph.node if node.domain == ONNX_DOMAIN and node.op_type == ONNX_MASKED_OP_TYPE]
    if masked:
        raise ValueError(f"t4dopt.export.tensorrt: {len(masked)} t4d.{ONNX_MASKED_OP_TYPE} nodes ({masked[0]!r}, ...) "
                         f"carry a key mask, which the {plugins.PLUGIN_ID} TensorRT plugin does not take; run such a "
                         "model in ONNX Runtime (custom or portable ONNX) or with AOTInductor, or keep it unmasked")
    initializers = {init.name: init for init in graph.initializer}
    rewritten = 0
    for index, node in enumerate(graph.node):
        if node.domain != ONNX_DOMAIN or node.op_type != ONNX_OP_TYPE:
            continue
        missing = [name for name in node.input[3:6] if name not in initializers]
        if len(node.input) != 6 or missing:
            raise ValueError(f"t4d.{ONNX_OP_TYPE} node {node.name!r}: the block table must come in as initializers "
                             f"(as t4dopt.export.onnx writes it); {missing or list(node.input)} are not")
        tables = plugins.pack_tables(*(numpy_helper.to_array(initializers[name]) for name in node.input[3:6]))
        prefix = node.name or f"t4d_{index}"
        inputs = list(node.input[:3])
        for field, array in tables.arrays().items():
            graph.initializer.append(numpy_helper.from_array(array, f"{prefix}_{field}"))
            inputs.append(f"{prefix}_{field}")
        layout = _attribute(node, "layout")
        attributes = dict(block_size=int(_attribute(node, "block_size")), scale=float(_attribute(node, "scale")),
                          layout=layout.decode() if isinstance(layout, bytes) else layout,
                          block_m=tables.block_m, block_n=tables.block_n,
                          plugin_namespace=plugins.PLUGIN_NAMESPACE, plugin_version=plugins.PLUGIN_VERSION,
                          aot=int(aot))
        plugin_node = onnx.helper.make_node(plugins.PLUGIN_NAME, inputs, [node.output[0], f"{prefix}_lse"],
                                            name=prefix, **attributes)
        graph.node.remove(node)
        graph.node.insert(index, plugin_node)
        rewritten += 1
    used = {name for node in graph.node for name in node.input}
    for init in [init for init in graph.initializer if init.name not in used]:
        graph.initializer.remove(init)
    return rewritten


def _build_engine(trt: Any, onnx_path: Path, *, fp16: bool, workspace_gb: float) -> bytes:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(os.fspath(onnx_path)):
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"t4dopt.export.tensorrt: TensorRT's ONNX parser rejected {onnx_path}:\n{errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 2**30))
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise RuntimeError("t4dopt.export.tensorrt: TensorRT failed to build the engine (see its log above)")
    return bytes(engine)


def export_tensorrt(
    model_or_onnx: torch.nn.Module | str | os.PathLike,
    engine_path: str | os.PathLike,
    args: Sequence[Any] | torch.Tensor | None = None,
    *,
    options: Mapping[str, Any] | Options | None = None,
    fp16: bool = False,
    workspace_gb: float = 4.0,
    aot: bool = True,
    progress: Callable[[str], None] | None = None,
) -> TensorRTResult:
    """Build a serialized TensorRT engine at `engine_path`, the joint attention as our plugin.

    `model_or_onnx` is a model (called as ``model(*args)``, exported as `export_onnx` with
    ``ops="custom"`` and `options`, to ``engine_path`` with suffix ``.onnx``) or the path of such an
    ONNX file. `fp16` lets TensorRT run layers in float16; `workspace_gb` caps its scratch memory.
    `aot` (default) compiles our Triton kernel into the engine, which then runs without Python
    (``trtexec``, C++); ``aot=False`` uses the plugin's Python implementation. Needs tensorrt and
    a CUDA GPU.
    """
    say = progress or (lambda line: None)
    trt = require_tensorrt()
    require_cuda("t4dopt.export.tensorrt")
    engine_path = Path(engine_path)
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    sites = None
    if isinstance(model_or_onnx, torch.nn.Module):
        if args is None:
            raise ValueError("t4dopt.export.tensorrt: a model needs example `args`")
        from t4dopt.export.onnx_export import export_onnx

        exported = export_onnx(model_or_onnx, args, engine_path.with_suffix(".onnx"), options=options,
                               ops="custom", progress=say)
        onnx_path, sites = exported.path, exported.sites
    else:
        onnx_path = Path(model_or_onnx)
        if not onnx_path.is_file():
            raise FileNotFoundError(f"t4dopt.export.tensorrt: no ONNX file at {onnx_path}")

    import onnx

    model = onnx.load(os.fspath(onnx_path))
    nodes = to_plugin_nodes(model, aot=aot)
    say(f"{nodes} t4d.{ONNX_OP_TYPE} nodes mapped to the {plugins.PLUGIN_ID} TensorRT plugin")
    with tempfile.TemporaryDirectory(prefix="t4dopt-trt-") as folder:
        plugin_onnx = Path(folder) / "plugins.onnx"
        onnx.save(model, os.fspath(plugin_onnx), save_as_external_data=True)  # (models past 2 GiB)
        say(f"building the TensorRT engine ({'fp16' if fp16 else 'fp32'}; this takes a while)")
        engine_path.write_bytes(_build_engine(trt, plugin_onnx, fp16=fp16, workspace_gb=workspace_gb))
    result = TensorRTResult(engine_path, sites, onnx_path=onnx_path, plugin_nodes=nodes)
    say(f"wrote {engine_path} ({result.file_bytes / 2**20:.2f} MiB, {nodes} plugin layers)")
    return result


def run_engine(engine_path: str | os.PathLike, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Run the engine at `engine_path` once on CUDA: its outputs by name, for `inputs` by name."""
    trt = require_tensorrt()
    require_cuda("t4dopt.export.run_engine")
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
    if engine is None:
        raise RuntimeError(f"TensorRT could not deserialize the engine at {engine_path}")
    context = engine.create_execution_context()
    buffers: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        dtype = TORCH_DTYPES[engine.get_tensor_dtype(name).name]
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            if name not in inputs:
                raise KeyError(f"the engine takes an input {name!r}; got {sorted(inputs)}")
            buffers[name] = inputs[name].to("cuda", dtype).contiguous()
            context.set_input_shape(name, tuple(buffers[name].shape))
        else:
            buffers[name] = outputs[name] = torch.empty(tuple(context.get_tensor_shape(name)), dtype=dtype,
                                                        device="cuda")
        context.set_tensor_address(name, buffers[name].data_ptr())
    stream = torch.cuda.current_stream()
    if not context.execute_async_v3(stream.cuda_stream):
        raise RuntimeError(f"TensorRT failed to run the engine at {engine_path}")
    stream.synchronize()
    return outputs
