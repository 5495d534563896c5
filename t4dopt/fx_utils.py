"""What the passes, the cache and export read off FX graphs: example values, shapes, dtypes, dynamo's names.

Dynamo records each node's value as ``meta["example_value"]``; torch.export and
``make_fx`` record ``meta["val"]``. Module paths and placeholder names follow dynamo's
habits (``L['self'].blocks.0``, ``l_self_modules_blocks_parameters_weight_``), read here
and nowhere else, so a change in those habits is mended in one place.
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch
import torch.fx as fx

CAST_METHODS = frozenset({"float", "to", "type", "half", "bfloat16", "type_as"})
"""Tensor methods that change only the dtype (with constant arguments)."""


def example_value(node: Any) -> Any:
    """The value recorded for `node` when the graph was traced (None for non-nodes or nodes without one)."""
    if not isinstance(node, fx.Node):
        return None
    return node.meta.get("example_value", node.meta.get("val"))


def example_tensor(node: Any) -> torch.Tensor | None:
    """`example_value` when it is a tensor, else None."""
    value = example_value(node)
    return value if isinstance(value, torch.Tensor) else None


def shape_of(node: Any) -> tuple[int, ...] | None:
    """The static shape of a tensor node (None when it has no tensor value or a symbolic size)."""
    value = example_tensor(node)
    if value is None:
        return None
    try:
        return tuple(int(s) for s in value.shape)
    except TypeError:
        return None


def sizes_of(node: Any) -> tuple | None:
    """The shape of a tensor node as recorded, symbolic sizes included (None without a tensor value)."""
    value = example_tensor(node)
    return tuple(value.shape) if value is not None else None


def dtype_of(node: Any) -> torch.dtype | None:
    value = example_tensor(node)
    return value.dtype if value is not None else None


def device_of(node: Any) -> torch.device:
    """The device of a tensor node's value (CPU when unknown)."""
    value = example_tensor(node)
    return value.device if value is not None else torch.device("cpu")


def is_size(value: object) -> bool:
    """Whether a recorded value is a size (an int, a SymInt, or a sequence of them), which carries no data."""
    if isinstance(value, (list, tuple)):
        return all(is_size(item) for item in value)
    return isinstance(value, (int, torch.SymInt))


def output_node(graph: fx.Graph) -> fx.Node:
    return next(node for node in reversed(graph.nodes) if node.op == "output")


def clean_module_path(path: str) -> str:
    """A module path as users write it (``blocks.0.attn``) from one dynamo recorded.

    Modules reached through a custom ``__getattr__`` (diffusers' ModelMixin) are recorded as
    ``L['self'].__dict__['_modules']['blocks'].0``; the root is ``L['self']`` or ``L__self__``.
    Under diffusers' hooks (context parallelism) a module is reached through its hooked forward,
    ``L['function_reference'].forward.__self__.blocks.0.forward.func.__closure__[0].cell_contents
    .forward.__self__.attn1``: the wrappers lead back to the module they wrap, and are dropped.
    """
    path = re.sub(r"\.?__dict__\['_modules'\]\['([^']+)'\]", r".\1", str(path))
    path = re.sub(r"\.forward(?:\.func)?\.__closure__\[\d+\]\.cell_contents", "", path)
    path = re.sub(r"\.forward\.__self__", "", path)
    return re.sub(r"^L\['self'\]\.?|^L__self___?|^L\['function_reference'\]\.?", "", path)


def module_path(node: fx.Node) -> str:
    """The path of the innermost module `node` was traced in ("" at the root or when unrecorded)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    return clean_module_path(list(stack.values())[-1][0])


def source_line(node: fx.Node) -> str:
    """``file.py:123`` of the user code that made `node` (from dynamo's stack trace), else the node's name."""
    found = re.findall(r'File "([^"]+)", line (\d+)', node.meta.get("stack_trace") or "")
    if not found:
        return node.name
    path, line = found[-1]
    return f"{os.path.basename(path)}:{line}"


def op_name(node: fx.Node) -> str:
    """The name of what a call node calls: the method name, or the function's ``__name__`` ("" for other nodes)."""
    if node.op == "call_method":
        return str(node.target)
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return ""


def source_path(source_name: str) -> str:
    """A dotted attribute path from a dynamo source name: ``L['self']._modules['norm1']._parameters['weight']``
    is ``norm1.weight`` (relative to the frame's ``self``)."""
    keys = re.findall(r"\[['\"]([^'\"]+)['\"]\]|\.(\w+)", re.sub(r"^L\['self'\]", "", source_name))
    parts = [a or b for a, b in keys]
    return ".".join(p for p in parts if p not in ("_modules", "_parameters", "_buffers", "__dict__"))


def graph_parameters(gm: fx.GraphModule) -> list[tuple[str, torch.Tensor]]:
    """(path relative to the compiled frame's module, the real tensor) of each parameter and buffer input of a
    dynamo graph, read while the backend compiles it (empty afterwards, or for other graphs)."""
    from t4dopt.compat import placeholder_origin

    found = []
    for node in gm.graph.nodes:
        if node.op == "placeholder" and is_parameter_input(node):
            origin = placeholder_origin(node)
            if origin is not None and isinstance(origin[1], torch.Tensor):
                found.append((source_path(origin[0]), origin[1]))
    return found


def is_parameter_input(placeholder: fx.Node) -> bool:
    """Whether a graph input is one of the module's parameters or buffers (dynamo names them so)."""
    return "_parameters_" in placeholder.name or "_buffers_" in placeholder.name


TIMESTEP_WORDS = ("timestep", "sigma", "l_t_")
"""Words in a placeholder's name that mark a timestep input (``l_t_`` is dynamo's name for ``t``)."""


def named_like_timestep(placeholder: fx.Node) -> bool:
    return any(word in placeholder.name for word in TIMESTEP_WORDS)
