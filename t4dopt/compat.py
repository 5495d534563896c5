"""Every private torch API t4dopt uses, looked up here, guarded, with what happens without it.

``import t4dopt`` never fails because a torch internal moved: each lookup is made when first
needed, and a missing one either falls back to a public API or raises `T4DCompatError`
naming the internal and the torch version. `report()` lists them all with their status.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


class T4DCompatError(RuntimeError):
    """A private torch API t4dopt needs is missing from this torch build."""


def _lookup(path: str) -> Any | None:
    """The object at dotted `path` (modules imported on the way), or None when any part is missing."""
    parts = path.split(".")
    value: Any = importlib.import_module(parts[0])
    for index, part in enumerate(parts[1:], start=2):
        try:
            value = getattr(value, part)
        except (AttributeError, RuntimeError):
            try:
                value = importlib.import_module(".".join(parts[:index]))
            except ImportError:
                return None
    return value


def missing(what: str) -> T4DCompatError:
    return T4DCompatError(f"t4dopt needs {what}, which torch {torch.__version__} does not have")


def sdpa_functions() -> frozenset:
    """Every callable dynamo may record for scaled dot-product attention."""
    private = _lookup("torch._C._nn.scaled_dot_product_attention")
    return frozenset(f for f in (F.scaled_dot_product_attention, private) if f is not None)


FUSED_SDPA_OPS = (
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_fused_attention_overrideable",
)
"""aten's fused attention kernels, under ``torch.ops.aten``. Each returns a tuple whose item 0 is the output
([B, H, Nq, Dv]) and item 1 the log-sum-exp (``logsumexp`` / ``log_sumexp``, [B, H, Nq] or padded); diffusers'
context-parallel paths (its ``_native_flash`` / ``_native_cudnn`` / ``_native_efficient`` backends under ring
or Ulysses) call them directly, once per key/value chunk of a ring."""


@functools.cache
def fused_sdpa_functions() -> dict[Any, str]:
    """Every target dynamo may record for a fused aten attention call (the op and each of its overloads), with the
    op's name (``aten._scaled_dot_product_flash_attention``); ops this torch lacks are left out."""
    found: dict[Any, str] = {}
    for name in FUSED_SDPA_OPS:
        packet = _lookup(f"torch.ops.aten.{name}")
        if packet is None:
            continue
        found[packet] = f"aten.{name}"
        for overload in packet.overloads():
            found[getattr(packet, overload)] = f"aten.{name}"
    return found


def op_arguments(target: Any, args: tuple, kwargs: dict) -> dict[str, Any] | None:
    """The arguments of a call of the aten op `target` (an OpOverload or its packet) by their schema names, defaults
    filled in (None where the schema has none); None when the schema is not readable."""
    overload = getattr(target, "default", target)
    schema = getattr(overload, "_schema", None)
    if schema is None:
        return None
    try:
        bound = {a.name: (a.default_value if a.has_default_value() else None) for a in schema.arguments}
        bound.update(zip((a.name for a in schema.arguments), args))
    except (AttributeError, TypeError):
        return None
    bound.update(kwargs)
    return bound


@functools.cache
def cpu_flash_attention() -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """``(q, k, v, scale, attn_mask=None) -> (out, logsumexp)`` on CPU: torch's CPU flash kernel, or SDPA
    plus a log-sum-exp. `attn_mask` is additive and broadcasts to [B, H, Nq, Nk]."""
    flash = _lookup("torch.ops.aten._scaled_dot_product_flash_attention_for_cpu")
    if flash is not None and hasattr(flash, "default"):
        kernel = flash.default
        return lambda q, k, v, scale, attn_mask=None: kernel(q, k, v, 0.0, False, attn_mask=attn_mask,
                                                              scale=scale)[:2]

    def fallback(q, k, v, scale, attn_mask=None):
        dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        scores = (q.to(dtype) @ k.to(dtype).transpose(-2, -1)) * scale
        if attn_mask is not None:
            scores = scores + attn_mask
            attn_mask = attn_mask.to(q.dtype)
        lse = torch.logsumexp(scores, dim=-1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale), lse
    return fallback


def force_dispatch_keys(include: Any, exclude: Any) -> Any:
    guard = getattr(torch._C, "_ForceDispatchKeyGuard", None)
    if guard is None:
        raise missing("torch._C._ForceDispatchKeyGuard (the CUDA backward of t4d::block_sparse_attention)")
    return guard(include, exclude)


def dispatch_key_sets() -> tuple[Any, Any]:
    """(the thread's included dispatch keys, its excluded keys without autograd's): autograd inside an op kernel."""
    include = getattr(torch._C, "_dispatch_tls_local_include_set", None)
    exclude = getattr(torch._C, "_dispatch_tls_local_exclude_set", None)
    if include is None or exclude is None:
        raise missing("torch._C._dispatch_tls_local_include_set (the CUDA backward of t4d::block_sparse_attention)")
    keys = torch._C.DispatchKey
    return include(), exclude().remove(keys.AutogradFunctionality).remove(keys.ADInplaceOrView)


def register_graph_buffer_source(gm: torch.fx.GraphModule, name: str) -> None:
    """Tell dynamo where a buffer added to its graph module comes from (dynamo's graph modules only)."""
    sources = getattr(gm, "_param_name_to_source", None)
    if sources is None:
        return
    try:
        from torch._dynamo.source import ConstantSource
    except ImportError:
        return
    sources[name] = ConstantSource(name)


def graph_break_of(gm: torch.fx.GraphModule) -> tuple[str, list] | None:
    """Why dynamo ended this graph at a graph break: (its reason text, the user frames at the break), else None.

    dynamo records it as ``gm.compile_subgraph_reason`` (a GraphCompileReason); without it, breaks are not known.
    """
    reason = getattr(gm, "compile_subgraph_reason", None)
    if reason is None or not getattr(reason, "graph_break", False):
        return None
    return str(getattr(reason, "reason", "")), list(getattr(reason, "user_stack", None) or [])


def placeholder_origin(node: torch.fx.Node) -> tuple[str, Any] | None:
    """(dynamo's source name, the real object) of a graph input while the backend compiles it, else None.

    Read off ``node.meta["grapharg"]`` (GraphArg.source.name and GraphArg.example), which dynamo keeps
    only until the backend returns.
    """
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    if grapharg is None or source is None:
        return None
    try:
        name = source.name() if callable(source.name) else source.name
        return str(name), grapharg.example
    except Exception:  # a weak reference gone, or a source that cannot name itself
        return None


def process_group_rank(group_name: str) -> tuple[int, int] | None:
    """(this process's rank, the group's size) of the process group a functional collective names, else None."""
    group = process_group(group_name)
    if group is None:
        return None
    try:
        return int(group.rank()), int(group.size())
    except Exception:  # a group this process is not part of
        return None


def add_diffusers_backend_name(value: str) -> Any:
    """diffusers' ``AttentionBackendName`` member for `value`, added to that enum when it has none.

    diffusers looks every backend up by ``AttentionBackendName(name)``, an Enum that cannot be extended
    by its public API; the member is made as Enum makes its own and entered in the enum's lookup tables.
    """
    from diffusers.models.attention_dispatch import AttentionBackendName

    try:
        return AttentionBackendName(value)
    except ValueError:
        pass
    member = str.__new__(AttentionBackendName, value)
    member._name_, member._value_ = value.upper(), value
    try:
        AttentionBackendName._value2member_map_[value] = member
        AttentionBackendName._member_map_[value.upper()] = member
        AttentionBackendName._member_names_.append(value.upper())
    except AttributeError as error:
        raise T4DCompatError(f"cannot add the attention backend {value!r} to this diffusers' "
                             f"AttentionBackendName: {error}") from error
    return member


def process_group(group_name: str) -> Any | None:
    """The process group a functional collective names (``_c10d_functional`` ops take its name), else None."""
    resolve = _lookup("torch.distributed.distributed_c10d._resolve_process_group")
    if resolve is None:
        return None
    try:
        return resolve(group_name)
    except Exception:  # no such group in this process, or no distributed backend
        return None


def dynamo_export() -> Callable:
    export = _lookup("torch._dynamo.export")
    if export is None:
        raise missing("torch._dynamo.export (capturing a model as one torch-level graph)")
    return export


def inductor_compile_fx() -> Callable:
    """Inductor's backend entry (a dynamo graph and its example inputs -> a callable)."""
    try:
        from torch._inductor.compile_fx import compile_fx
    except ImportError as error:
        raise missing("torch._inductor.compile_fx.compile_fx (target='inductor')") from error
    return compile_fx


def inductor_compile() -> Callable:
    """Inductor for a plain FX graph outside dynamo (the cache's segments)."""
    try:
        from torch._inductor import compile as compile_graph
    except ImportError as error:
        raise missing("torch._inductor.compile (target='inductor' with the cache)") from error
    return compile_graph


def treespec_dumps(spec: Any) -> str:
    from torch.utils import _pytree as pytree

    if not hasattr(pytree, "treespec_dumps"):
        raise missing("torch.utils._pytree.treespec_dumps (writing bundles)")
    return pytree.treespec_dumps(spec)


def treespec_loads(text: str) -> Any:
    from torch.utils import _pytree as pytree

    if not hasattr(pytree, "treespec_loads"):
        raise missing("torch.utils._pytree.treespec_loads (reading bundles)")
    return pytree.treespec_loads(text)


@dataclass(frozen=True)
class PrivateAPI:
    """One private torch API: where t4dopt uses it and what happens on a torch without it."""

    name: str
    used_by: str
    without: str

    @property
    def present(self) -> bool:
        return all(_lookup(path) is not None for path in self.name.split(" + "))


PRIVATE_APIS = (
    PrivateAPI("torch._C._nn.scaled_dot_product_attention", "passes/spellings.py (an SDPA spelling)",
               "that spelling is not recognised; F.scaled_dot_product_attention still is"),
    PrivateAPI(" + ".join(f"torch.ops.aten.{name}" for name in FUSED_SDPA_OPS),
               "passes/spellings.py (fused aten attention calls, reported and left dense; their arguments read by "
               "OpOverload._schema)", "a missing op is not recognised: its calls run dense without a report"),
    PrivateAPI("torch.ops.aten._scaled_dot_product_flash_attention_for_cpu", "ops/cpu_kernel.py (each dense piece)",
               "pieces run as a float32 softmax with its log-sum-exp (slower, same result)"),
    PrivateAPI("torch._C._dispatch_tls_local_include_set + torch._C._dispatch_tls_local_exclude_set"
               " + torch._C._ForceDispatchKeyGuard", "ops/flex_path.py (CUDA backward)",
               "the CUDA backward raises T4DCompatError"),
    PrivateAPI("torch._dynamo.source.ConstantSource", "passes/rewrite.py (the source of buffers added to "
               "dynamo's graph module, in its _param_name_to_source)", "buffers are added without a source"),
    PrivateAPI("torch._dynamo.output_graph.GraphCompileReason", "compat.graph_break_of (a graph break hiding an "
               "attention, in explain)", "graph breaks are not reported"),
    PrivateAPI("torch._dynamo.variables.builder.GraphArg", "compat.placeholder_origin (full module paths of "
               "sites in graphs dynamo cut out of a model, in explain)", "sites of such graphs keep the path "
               "inside their graph, with the graph's index"),
    PrivateAPI("torch.distributed.distributed_c10d._resolve_process_group", "compat.process_group_rank (the "
               "sequence traced through an all-to-all, Ulysses context parallelism)",
               "sites behind an all-to-all stay dense"),
    PrivateAPI("torch.distributed._functional_collectives.all_gather_tensor_autograd",
               "context_parallel.py (the ring backend's all-gather)", "ring attention raises T4DCompatError"),
    PrivateAPI("torch._dynamo.export", "export/capture.py (the torch-level graph export rewrites)",
               "export raises T4DCompatError"),
    PrivateAPI("torch._inductor.compile_fx.compile_fx", "lowering.py (target='inductor')",
               "target='inductor' raises T4DCompatError; target='eager' still works"),
    PrivateAPI("torch._inductor.compile", "lowering.py (target='inductor' under the cache)",
               "target='inductor' with a cache raises T4DCompatError"),
    PrivateAPI("torch.utils._pytree.treespec_dumps + torch.utils._pytree.treespec_loads",
               "cache/program.py (output structure in bundle manifests)",
               "bundles cannot be written or read; the compiled cache is unaffected"),
)


def report() -> list[tuple[PrivateAPI, bool]]:
    """Each private API with whether this torch has it."""
    return [(api, api.present) for api in PRIVATE_APIS]
