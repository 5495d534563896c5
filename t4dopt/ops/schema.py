"""The ``t4d`` ops' names and arguments, shared by the op, the graph rewrites, export and the plugins."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

OP_NAME = "t4d::block_sparse_attention"
BACKWARD_OP_NAME = "t4d::block_sparse_attention_backward"
PLANNED_OP_NAME = "t4d::block_sparse_attention_planned"
CHUNK_OP_NAME = "t4d::block_sparse_attention_chunk"
CHUNK_BACKWARD_OP_NAME = "t4d::block_sparse_attention_chunk_backward"
"""One chunk pair of a layout (ring attention): queries and keys given as offsets into the global layout."""
TABLE_ARGUMENTS = ("kv_counts", "kv_indices", "block_starts")

ONNX_DOMAIN = "t4d"
ONNX_OP_TYPE = "BlockSparseAttention"
ONNX_MASKED_OP_TYPE = "MaskedBlockSparseAttention"
ONNX_DOMAIN_VERSION = 1
"""The op as an ONNX node: ``t4d.BlockSparseAttention``, opset 1 of the ``t4d`` domain; with a key
mask, ``t4d.MaskedBlockSparseAttention`` (the same inputs and a seventh, the additive key bias).
Two node types rather than an optional input: ONNX Runtime's Python custom ops (onnxruntime-
extensions) take a fixed list of inputs."""


def default_scale(head_dim: int) -> float:
    """The softmax scale SDPA uses when none is given: ``1 / sqrt(head_dim)``."""
    return 1.0 / math.sqrt(head_dim)


def resolve_scale(scale: float | None, head_dim: int) -> float:
    return default_scale(head_dim) if scale is None else float(scale)


class OpArguments(NamedTuple):
    """The arguments of one call of ``t4d::block_sparse_attention``, by name (tensors, FX nodes or arrays)."""

    q: Any
    k: Any
    v: Any
    kv_counts: Any
    kv_indices: Any
    block_starts: Any
    block_size: int
    scale: float | None = None
    key_mask: Any = None
    """bool or additive [B, N] per key (see `t4dopt.ops.key_mask`), or None."""

    @classmethod
    def of_call(cls, args: tuple, kwargs: dict | None = None) -> OpArguments:
        """From a call's positional and keyword arguments (an FX node's ``args`` / ``kwargs``)."""
        kwargs = dict(kwargs or {})
        named = dict(zip(cls._fields, args))
        for name in cls._fields[len(args):]:
            if name in kwargs:
                named[name] = kwargs.pop(name)
        if kwargs:
            raise TypeError(f"{OP_NAME}: unexpected arguments {sorted(kwargs)}")
        return cls(**named)

    @property
    def tables(self) -> tuple[Any, Any, Any]:
        """(kv_counts, kv_indices, block_starts)."""
        return self.kv_counts, self.kv_indices, self.block_starts
