"""How much work each part of a graph does per call, in FLOPs estimated from its shapes.

The cache report counts attention FLOPs per unit; the share of a call's work a cache
setting computes (what `t4dopt.calibrate` reports) also needs the work outside the units:
sublayers that are no unit, embeddings, the output projection. Matrix products, linear
layers and convolutions count 2 FLOPs per multiply-add, read off their example values;
attention sites count their own (`SiteDecision`: dense FLOPs times the mask's density).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Mapping

import torch
import torch.fx as fx
import torch.nn.functional as F

from t4dopt.fx_utils import example_tensor, shape_of

_PRODUCTS = {torch.matmul, torch.bmm, torch.baddbmm, torch.addmm, torch.mm, operator.matmul}
_PRODUCT_METHODS = {"matmul", "bmm", "mm"}
_CONVOLUTIONS = {F.conv1d, F.conv2d, F.conv3d}


def _numel(node: fx.Node) -> int:
    shape = shape_of(node)
    return math.prod(shape) if shape is not None else 0


def _inner(node: object) -> int:
    """The contracted size of a product's first operand (its last dimension), 0 when unknown."""
    shape = shape_of(node) if isinstance(node, fx.Node) else None
    return shape[-1] if shape else 0


def node_flops(node: fx.Node, modules: Mapping[str, torch.nn.Module]) -> float:
    """FLOPs of one matrix product, linear layer or convolution node (0 for anything else)."""
    if node.op == "call_module":
        module = modules.get(node.target)
        if isinstance(module, torch.nn.Linear):
            return 2.0 * _numel(node) * module.in_features
        if isinstance(module, torch.nn.modules.conv._ConvNd):
            return 2.0 * _numel(node) * module.weight[0].numel()
        return 0.0
    if node.op == "call_function" and node.target is F.linear:
        weight = example_tensor(node.args[1]) if len(node.args) > 1 else None
        return 2.0 * _numel(node) * weight.shape[-1] if weight is not None else 0.0
    if node.op == "call_function" and node.target in _CONVOLUTIONS:
        weight = example_tensor(node.args[1]) if len(node.args) > 1 else None
        return 2.0 * _numel(node) * weight[0].numel() if weight is not None else 0.0
    if node.op == "call_function" and node.target is F.scaled_dot_product_attention:
        query, key, value = (shape_of(a) if isinstance(a, fx.Node) else None for a in node.args[:3])
        if query is None or key is None or value is None:
            return 0.0
        return 2.0 * math.prod(query[:-1]) * key[-2] * (query[-1] + value[-1])
    if (node.op == "call_function" and node.target in _PRODUCTS) or (
            node.op == "call_method" and node.target in _PRODUCT_METHODS):
        # addmm / baddbmm take the added term first.
        first = node.args[1] if node.target in (torch.addmm, torch.baddbmm) else node.args[0]
        return 2.0 * _numel(node) * _inner(first)
    return 0.0


def flops(nodes: Iterable[fx.Node], modules: Mapping[str, torch.nn.Module], attention: Mapping[fx.Node, float]) -> float:
    """FLOPs of `nodes`: their products and layers (`node_flops`), and the attention outputs among them."""
    return sum(attention[n] if n in attention else node_flops(n, modules) for n in nodes)
