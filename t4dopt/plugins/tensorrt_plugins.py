"""TensorRT plugin ``t4d::block_sparse_attention``, written with ``tensorrt.plugin`` (quickly deployable plugins).

The plugin runs our Triton block-sparse forward kernel (`t4dopt.ops.triton_kernel`). That kernel
reads a *plan* of the block table (query tiles and their key chunks), not the table itself, and
TensorRT hands an AOT kernel nothing but the plugin's tensors and 32-bit integers. So the plan is
built once, on the host, when the network is built (`pack_tables`), and enters the plugin as four
constant int32 tensors::

    out, lse = t4d::block_sparse_attention(q, k, v, tiles, full_starts, partial_starts, partial_ends,
                                           block_size=, scale=, layout=, block_m=, block_n=)

q, k, v are [B, H, N, D] (v [B, H, N, Dv]); ``out`` is [B, H, N, Dv] in q's dtype and ``lse`` the
float32 log-sum-exp [B, H, N] the kernel also writes. ``block_size``, ``scale`` and ``layout`` are the
attributes of the ``t4d.BlockSparseAttention`` ONNX node; ``block_m`` and ``block_n`` the plan's tiles.

Two implementations of the same kernel:

* AOT (`register` -> ``trtp.aot_impl``): `compile_kernel` compiles `_plugin_kernel`, a thin Triton
  wrapper that calls our ``_forward_kernel`` in TensorRT's calling convention (input pointers, then
  output pointers; heads, lengths and strides are compile-time constants), to PTX. The engine then
  runs without Python.
* JIT (``trtp.impl``): `launch_kernel` launches the same wrapper from Python on TensorRT's stream.

Importing this module needs neither tensorrt nor a GPU; `register` needs tensorrt (and raises an
ImportError naming the extra to install otherwise). Its annotations are evaluated (no ``from
__future__ import annotations``): ``tensorrt.plugin`` reads the signature of the functions it
decorates to tell input tensors from attributes.
"""

import importlib
import math
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Tuple

import numpy as np
import torch

from t4dopt.ops import tables, triton_kernel

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: compile_kernel and launch_kernel say so
    triton = tl = None

PLUGIN_NAMESPACE = "t4d"
PLUGIN_NAME = "block_sparse_attention"
PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"
PLUGIN_VERSION = "1"
INSTALL_HINT = "pip install 't4dopt[tensorrt]'"

TENSOR_INPUTS = ("q", "k", "v", "tiles", "full_starts", "partial_starts", "partial_ends")
TABLE_INPUTS = TENSOR_INPUTS[3:]
OUTPUTS = ("out", "lse")

TRITON_TYPES: dict[torch.dtype, str] = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
"""The dtypes of q, k, v the plugin takes (the Triton kernel's), as Triton pointer element types."""
TRT_DTYPE_NAMES: dict[str, torch.dtype] = {"HALF": torch.float16, "BF16": torch.bfloat16, "FLOAT": torch.float32}
"""``tensorrt.DataType`` member names of those dtypes."""
AUTOTUNE_TYPES = "FP32|FP16|BF16, " * 3 + "INT32, " * 4 + "FP32|FP16|BF16, FP32"
"""Types of the plugin's inputs and outputs, position by position: q, k, v and out share one float type."""


def require(module: str) -> ModuleType:
    """``import module``, or an ImportError that names the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"t4dopt's TensorRT support needs the {module.split('.')[0]!r} package, which is "
                          f"not installed: {INSTALL_HINT} (TensorRT >= 10.8 for AOT plugins)") from error


def require_cuda(what: str) -> None:
    if not torch.cuda.is_available():
        raise RuntimeError(f"{what} needs a CUDA GPU: TensorRT builds and runs engines on NVIDIA GPUs only, "
                           "and torch sees none here")


def torch_dtype(trt_dtype: Any) -> torch.dtype:
    """The torch dtype of a ``tensorrt.DataType`` the plugin takes (ValueError for others)."""
    name = getattr(trt_dtype, "name", str(trt_dtype))
    if name not in TRT_DTYPE_NAMES:
        raise ValueError(f"{PLUGIN_ID}: TensorRT dtype {name} is not supported; the plugin takes "
                         + ", ".join(TRT_DTYPE_NAMES))
    return TRT_DTYPE_NAMES[name]


def unsupported_reason(dtype: torch.dtype, head_dim: int, head_dim_v: int, scale: float,
                       batch_heads: int | None = None) -> str | None:
    """None when the plugin's kernel runs q, k, v of this dtype and these head dims, else why not."""
    if dtype not in TRITON_TYPES:
        return f"dtype {dtype} (the plugin takes {', '.join(str(d).removeprefix('torch.') for d in TRITON_TYPES)})"
    for name, dim in (("q/k", head_dim), ("v", head_dim_v)):
        if dim not in triton_kernel.HEAD_DIMS:
            return f"{name} head dim {dim} (the plugin takes {', '.join(map(str, triton_kernel.HEAD_DIMS))})"
    if not scale > 0:
        return f"softmax scale {scale} (the kernel assumes a positive scale)"
    if batch_heads is not None and batch_heads > triton_kernel.MAX_BATCH_HEADS:
        return f"batch x heads = {batch_heads} (at most {triton_kernel.MAX_BATCH_HEADS}, CUDA's grid limit)"
    return None


def check_supported(dtype: torch.dtype, head_dim: int, head_dim_v: int, scale: float,
                    batch_heads: int | None = None) -> None:
    """ValueError with `unsupported_reason` unless the plugin runs these inputs."""
    reason = unsupported_reason(dtype, head_dim, head_dim_v, scale, batch_heads)
    if reason is not None:
        raise ValueError(f"{PLUGIN_ID} does not run {reason}")


# ------------------------------------------------------------------------------------- the tables

@dataclass(frozen=True)
class PluginTables:
    """The block table packed for the plugin: the Triton kernel's plan as int32 arrays and its tiles."""

    tiles: np.ndarray
    """int32 [tiles, 6]: query tokens (start, end), full chunks (begin, end), partial chunks (begin, end)."""
    full_starts: np.ndarray
    partial_starts: np.ndarray
    partial_ends: np.ndarray
    block_m: int
    block_n: int
    seq_len: int

    def arrays(self) -> dict[str, np.ndarray]:
        """The four plugin inputs after q, k, v, by input name."""
        return dict(zip(TABLE_INPUTS, (self.tiles, self.full_starts, self.partial_starts, self.partial_ends)))

    def plan(self, device: torch.device | str = "cpu") -> triton_kernel.Plan:
        """The `triton_kernel.Plan` these arrays encode (the inverse of `pack_tables`)."""
        tensors = (torch.from_numpy(np.ascontiguousarray(a, dtype=np.int32)).to(device)
                   for a in (self.tiles, self.full_starts, self.partial_starts, self.partial_ends))
        return triton_kernel.Plan(self.block_m, self.block_n, self.seq_len, *tensors)


def pack_tables(kv_counts: np.ndarray | torch.Tensor, kv_indices: np.ndarray | torch.Tensor,
                block_starts: np.ndarray | torch.Tensor) -> PluginTables:
    """The block table of the op (``BlockLayout.tensors()``, or the ONNX node's initializers), packed.

    The table is checked and planned exactly as the op's CUDA forward plans it, with the same tiles.
    """
    table = tables.decode(*(torch.as_tensor(np.array(t)) for t in (kv_counts, kv_indices, block_starts)))
    plan = table.triton_plan(torch.device("cpu"))

    def as_array(t: torch.Tensor) -> np.ndarray:
        return np.ascontiguousarray(t.numpy(), dtype=np.int32)

    return PluginTables(*(as_array(t) for t in (plan.tiles, plan.full_starts, plan.partial_starts, plan.partial_ends)),
                        block_m=plan.block_m, block_n=plan.block_n, seq_len=plan.seq_len)


# ------------------------------------------------------------------------------------- the kernel

_forward_kernel = triton_kernel._forward_kernel

if triton is not None:  # (defined only with triton: its parameters are annotated with tl.constexpr)
    @triton.jit
    def _plugin_kernel(Q, K, V, tiles, full_starts, partial_starts, partial_ends, Out, Lse,
                       QK_SCALE: tl.constexpr, HEADS: tl.constexpr, SEQ_LEN: tl.constexpr, HEAD_DIM: tl.constexpr,
                       HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       PRECISION: tl.constexpr):
        """``_forward_kernel`` on contiguous q, k, v, out, lse, with TensorRT's argument order.

        TensorRT launches an AOT kernel with the input pointers, its extra 32-bit integers, then the
        output pointers. Everything else is a constant of the compiled kernel: contiguous
        [B, H, N, D] strides do not depend on the batch, so only the grid does. No key mask: the
        plugin has no input for one (`t4dopt.export.tensorrt` refuses masked nodes), so the
        kernel is compiled without HAS_BIAS and its bias pointer (Lse here) is never read.
        """
        _forward_kernel(Q, K, V, Out, Lse, Lse, tiles, full_starts, partial_starts, partial_ends, QK_SCALE, HEADS,
                        HEADS * SEQ_LEN * HEAD_DIM, SEQ_LEN * HEAD_DIM, HEAD_DIM,
                        HEADS * SEQ_LEN * HEAD_DIM, SEQ_LEN * HEAD_DIM, HEAD_DIM,
                        HEADS * SEQ_LEN * HEAD_DIM_V, SEQ_LEN * HEAD_DIM_V, HEAD_DIM_V,
                        HEADS * SEQ_LEN * HEAD_DIM_V, SEQ_LEN * HEAD_DIM_V, HEAD_DIM_V,
                        HEADS * SEQ_LEN, SEQ_LEN, 0,
                        HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N, PRECISION, False)


def kernel_constexprs(dtype: torch.dtype, *, heads: int, seq_len: int, head_dim: int, head_dim_v: int,
                      block_m: int, block_n: int, scale: float) -> dict[str, Any]:
    """The compile-time constants of `_plugin_kernel` for one plugin instance."""
    return dict(QK_SCALE=float(scale) * triton_kernel.LOG2_E, HEADS=int(heads), SEQ_LEN=int(seq_len),
                HEAD_DIM=int(head_dim), HEAD_DIM_V=int(head_dim_v), BLOCK_M=int(block_m), BLOCK_N=int(block_n),
                PRECISION="ieee" if dtype == torch.float32 else "tf32")


def kernel_signature(dtype: torch.dtype) -> dict[str, str]:
    """Triton types of `_plugin_kernel`'s parameters, in declaration order (constants: ``constexpr``)."""
    element = TRITON_TYPES[dtype]
    types = {"Q": f"*{element}", "K": f"*{element}", "V": f"*{element}", "Out": f"*{element}", "Lse": "*fp32",
             **{name: "*i32" for name in TABLE_INPUTS}}
    names = ("Q", "K", "V", *TABLE_INPUTS, "Out", "Lse")
    constants = ("QK_SCALE", "HEADS", "SEQ_LEN", "HEAD_DIM", "HEAD_DIM_V", "BLOCK_M", "BLOCK_N", "PRECISION")
    return {**{name: types[name] for name in names}, **{name: "constexpr" for name in constants}}


def launch_grid(num_tiles: int, batch: Any, heads: Any) -> tuple[Any, Any, int]:
    """(tiles, batch x heads, 1): the kernel's grid, tiles fastest (see `triton_kernel`).

    `batch` and `heads` may be TensorRT shape expressions (a dynamic batch); the CUDA limit on the
    second dimension is checked where they are integers.
    """
    batch_heads = batch * heads
    if isinstance(batch_heads, int) and not 0 < batch_heads <= triton_kernel.MAX_BATCH_HEADS:
        raise ValueError(f"{PLUGIN_ID}: batch x heads = {batch_heads} must lie in "
                         f"[1, {triton_kernel.MAX_BATCH_HEADS}] (CUDA's grid limit)")
    if num_tiles < 1:
        raise ValueError(f"{PLUGIN_ID}: the plan has no query tiles")
    return int(num_tiles), batch_heads, 1


@dataclass(frozen=True)
class CompiledKernel:
    """`_plugin_kernel` compiled to PTX for one dtype, shape and GPU architecture."""

    name: str
    ptx: str
    num_warps: int
    shared_bytes: int
    arch: int


def compile_kernel(dtype: torch.dtype, *, heads: int, seq_len: int, head_dim: int, head_dim_v: int,
                   block_m: int, block_n: int, scale: float, arch: int | None = None) -> CompiledKernel:
    """Compile `_plugin_kernel` to PTX (needs triton, not a GPU when `arch` is given, e.g. 90 for H100).

    Raises when Triton's compiled kernel needs launch features TensorRT does not provide (global or
    profile scratch memory, clusters): TensorRT passes null for the trailing scratch parameters
    Triton appends, which is right only while their size is zero.
    """
    if triton is None:
        raise ImportError(f"{PLUGIN_ID}'s AOT implementation compiles a Triton kernel; install triton")
    check_supported(dtype, head_dim, head_dim_v, scale, None)
    from triton.backends.compiler import GPUTarget

    if arch is None:
        major, minor = torch.cuda.get_device_capability()
        arch = major * 10 + minor
    config = triton_kernel.default_config(max(head_dim, head_dim_v), dtype)
    constants = kernel_constexprs(dtype, heads=heads, seq_len=seq_len, head_dim=head_dim, head_dim_v=head_dim_v,
                                  block_m=block_m, block_n=block_n, scale=scale)
    source = triton.compiler.ASTSource(_plugin_kernel, kernel_signature(dtype), constexprs=constants)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    metadata = compiled.metadata
    for field in ("global_scratch_size", "profile_scratch_size"):
        if getattr(metadata, field, 0):
            raise RuntimeError(f"{PLUGIN_ID}: the compiled Triton kernel needs {field}={getattr(metadata, field)}, "
                               "which TensorRT's AOT plugins do not allocate")
    if getattr(metadata, "num_ctas", 1) != 1:
        raise RuntimeError(f"{PLUGIN_ID}: the compiled Triton kernel uses thread-block clusters")
    return CompiledKernel(metadata.name, compiled.asm["ptx"], metadata.num_warps, metadata.shared, arch)


def launch_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tiles: torch.Tensor,
                  full_starts: torch.Tensor, partial_starts: torch.Tensor, partial_ends: torch.Tensor,
                  out: torch.Tensor, lse: torch.Tensor, *, scale: float, block_m: int, block_n: int) -> None:
    """Run `_plugin_kernel` into `out` and `lse` on the current stream (the plugin's JIT implementation).

    All tensors contiguous and on one CUDA device (or on CPU under ``TRITON_INTERPRET=1``).
    """
    if triton is None:
        raise ImportError(f"{PLUGIN_ID} runs a Triton kernel; install triton")
    batch, heads, seq_len, head_dim = q.shape
    check_supported(q.dtype, head_dim, v.shape[-1], scale, batch * heads)
    for name, x in zip(TENSOR_INPUTS + OUTPUTS, (q, k, v, tiles, full_starts, partial_starts, partial_ends, out, lse)):
        if not x.is_contiguous():
            raise ValueError(f"{PLUGIN_ID}: {name} must be contiguous")
    config = triton_kernel.default_config(max(head_dim, v.shape[-1]), q.dtype)
    constants = kernel_constexprs(q.dtype, heads=heads, seq_len=seq_len, head_dim=head_dim,
                                  head_dim_v=v.shape[-1], block_m=block_m, block_n=block_n, scale=scale)
    grid = launch_grid(tiles.shape[0], batch, heads)
    _plugin_kernel[grid](q, k, v, tiles, full_starts, partial_starts, partial_ends, out, lse, **constants,
                         num_warps=config.num_warps, num_stages=config.num_stages)


# --------------------------------------------------------------------------------- registration

_registered = False


def _constant(expr: Any, what: str) -> int:
    if not expr.is_constant:
        raise ValueError(f"{PLUGIN_ID}: {what} must be static (only the batch may be dynamic)")
    return int(expr.constant_value())


def register() -> None:
    """Register the plugin with TensorRT's plugin registry (once; later calls do nothing).

    Raises ImportError naming ``t4dopt[tensorrt]`` when tensorrt is not installed.
    """
    global _registered
    if _registered:
        return
    trt = require("tensorrt")
    trtp = require("tensorrt.plugin")

    @trtp.register(PLUGIN_ID)
    def _describe(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, tiles: trtp.TensorDesc,
                  full_starts: trtp.TensorDesc, partial_starts: trtp.TensorDesc, partial_ends: trtp.TensorDesc,
                  block_size: int, scale: float, layout: str, block_m: int, block_n: int,
                  ) -> Tuple[trtp.TensorDesc, trtp.TensorDesc]:
        # out is [B, H, N, Dv]: v's shape (self-attention, v has q's N) and dtype (q's).
        lse = trtp.from_shape_expr((q.shape_expr[0], q.shape_expr[1], q.shape_expr[2]), dtype=trt.float32)
        return v.like(), lse

    @trtp.autotune(PLUGIN_ID)
    def _autotune(q, k, v, tiles, full_starts, partial_starts, partial_ends, outputs):
        return [trtp.AutoTuneCombination(AUTOTUNE_TYPES)]

    @trtp.impl(PLUGIN_ID)
    def _run(q, k, v, tiles, full_starts, partial_starts, partial_ends,
             block_size: int, scale: float, layout: str, block_m: int, block_n: int, outputs, stream: int) -> None:
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            tensors = [torch.as_tensor(t, device="cuda")
                       for t in (q, k, v, tiles, full_starts, partial_starts, partial_ends, *outputs)]
            launch_kernel(*tensors, scale=scale, block_m=block_m, block_n=block_n)

    @trtp.aot_impl(PLUGIN_ID)
    def _compile(q, k, v, tiles, full_starts, partial_starts, partial_ends,
                 scale: float, block_m: int, block_n: int, outputs, tactic: int):
        shape, value_shape = q.shape_expr, v.shape_expr
        kernel = compile_kernel(
            torch_dtype(q.dtype), heads=_constant(shape[1], "heads"), seq_len=_constant(shape[2], "N"),
            head_dim=_constant(shape[3], "D"), head_dim_v=_constant(value_shape[3], "Dv"),
            block_m=block_m, block_n=block_n, scale=scale)
        grid = launch_grid(_constant(tiles.shape_expr[0], "the number of tiles"), shape[0], shape[1])
        params = trtp.KernelLaunchParams()
        params.grid_x, params.grid_y, params.grid_z = grid
        params.block_x = kernel.num_warps * 32
        params.shared_mem = kernel.shared_bytes
        return kernel.name, kernel.ptx, params, trtp.SymIntExprs(0)

    _registered = True
