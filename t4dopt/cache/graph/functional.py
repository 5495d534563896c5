"""Make in-place steps of a graph out-of-place where nothing could tell the difference, before its regions are cut.

The region analysis follows data edges, and an in-place step has none to the values that read
what it wrote: a graph changing tensors in place can be neither split into units nor run as
whole-call graphs. Two kinds of in-place step are rewritten, each only where it is proven
unobservable from the example values dynamo recorded (which share storage exactly where the
tensors do):

- `functional_residuals`: residual additions ``x += f(x)`` become ``x + f(x)``;
- `functional_writes`: item assignments ``b[index] = v`` into a buffer the graph made itself
  (``out = torch.empty_like(q); out[..., 0::2] = ...`` in a rotary embedding, a write into a
  projection's output) become `written` values, and in-place arithmetic on such a buffer
  (``omega /= n``, ``x.mul_(y)``) its out-of-place form, each later read of the buffer reading
  the newest value. A write into storage a graph input, a parameter or a buffer shares, or one
  another view of the same storage would see, is left in place, with the reason
  (`Writes.refused`).
"""

from __future__ import annotations

import operator
from typing import Any, NamedTuple

import torch
import torch.fx as fx
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree

from t4dopt.cache.graph.regions import is_in_place
from t4dopt.fx_utils import example_tensor, example_value, module_path


def storages(node: fx.Node) -> set[StorageWeakRef]:
    """The storages of every tensor in `node`'s recorded value (a tuple of views has several)."""
    found = set()
    for leaf in pytree.tree_leaves(example_value(node)):
        if isinstance(leaf, torch.Tensor):
            try:
                found.add(StorageWeakRef(leaf.untyped_storage()))
            except (NotImplementedError, RuntimeError):
                continue
    return found


def functional_residuals(graph: fx.Graph) -> int:
    """Rewrite in-place additions ``x += y`` into ``x + y`` where nothing could tell the difference.

    That holds when ``x`` is no graph input and no earlier value sharing its storage (found from
    the example values dynamo recorded) is used after the addition. Returns how many were
    rewritten.
    """
    order = {node: index for index, node in enumerate(graph.nodes)}
    stored = {node: storages(node) for node in graph.nodes}
    rewritten = 0
    for node in list(graph.nodes):
        in_place = ((node.op == "call_function" and node.target is operator.iadd)
                    or (node.op == "call_method" and node.target == "add_"))
        if not in_place or not isinstance(node.args[0], fx.Node) or len(stored[node.args[0]]) != 1:
            continue
        base = stored[node.args[0]]
        # Values made before the addition that share its storage; later ones already see the sum either way.
        aliases = [n for n, s in stored.items() if order[n] < order[node] and s & base]
        if any(n.op in ("placeholder", "get_attr") for n in aliases):
            continue
        if any(order[user] > order[node] for alias in aliases for user in alias.users if user is not node):
            continue
        if node.op == "call_function":
            node.target = operator.add
        else:
            node.target = "add"
        rewritten += 1
    return rewritten


OUT_OF_PLACE_OPERATORS = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                          operator.itruediv: operator.truediv, operator.ifloordiv: operator.floordiv,
                          operator.ipow: operator.pow, operator.imod: operator.mod}
OUT_OF_PLACE_METHODS = {"add_", "sub_", "mul_", "div_", "pow_", "clamp_", "clamp_min_", "clamp_max_", "neg_", "abs_",
                        "exp_", "sqrt_", "rsqrt_", "sigmoid_", "tanh_", "relu_", "masked_fill_"}
"""In-place methods whose out-of-place form (without the underscore) takes the same arguments."""


def _out_of_place(node: fx.Node) -> tuple[str, Any] | None:
    """The out-of-place form of an in-place `node` as (op, target), or None when there is none here."""
    if node.op == "call_function" and node.target is operator.setitem:
        return ("call_function", written)
    if node.op == "call_function" and node.target in OUT_OF_PLACE_OPERATORS:
        return ("call_function", OUT_OF_PLACE_OPERATORS[node.target])
    if node.op == "call_method" and node.target in OUT_OF_PLACE_METHODS and "out" not in node.kwargs:
        return ("call_method", node.target[:-1])
    return None


def written(base: torch.Tensor, index: Any, value: Any) -> torch.Tensor:
    """``base`` with ``base[index] = value`` applied, as a new tensor (same strides); `base` is unchanged."""
    result = base.clone()
    result[index] = value
    return result


class Refusal(NamedTuple):
    """An in-place write left in place: the node, its module, and why."""

    node: str
    module: str
    reason: str


class Writes(NamedTuple):
    """What `functional_writes` did: how many writes it rewrote, and the ones it left in place."""

    rewritten: int
    refused: list[Refusal]


def _refusal(writes: list[fx.Node], base: fx.Node, order: dict[fx.Node, int],
             stored: dict[fx.Node, set[StorageWeakRef]], writes_set: set[fx.Node]) -> str:
    """Why the writes into `base` cannot be rewritten, or "" when they can."""
    storage = stored[base]
    if len(storage) != 1:
        return f"the storage {base.name} is written to is not known from its example value"
    first, last = order[writes[0]], order[writes[-1]]
    for write in writes:
        if _out_of_place(write) is None:
            return f"{write.name} changes {base.name} in place by {getattr(write.target, '__name__', write.target)}"
    for node, found in stored.items():
        if not found & storage or node in writes_set:
            continue
        if node.op in ("placeholder", "get_attr"):
            return f"{base.name} shares its storage with the graph input {node.name}"
        if node is base:
            continue
        if order[node] > last:
            continue  # made from the final value: it reads the newest write once reads are redirected
        users = [user for user in node.users if order[user] >= first]
        if users:
            return (f"{node.name} shares {base.name}'s storage and is read by {users[0].name} after a write into it: "
                    "it would see the write")
    return ""


def functional_writes(graph: fx.Graph) -> Writes:
    """Rewrite item assignments into buffers the graph made itself as `written` values (see the module doc).

    Every in-place step into the same storage is handled together: all of them are item
    assignments into one node ``b``; no graph input, parameter or buffer shares that storage;
    no other value sharing it is read at or after the first write unless it was made after
    the last one. Then each write becomes ``b_i = written(b_{i-1}, index, value)`` and every
    node after it reads ``b_i`` where it read ``b``.
    """
    order = {node: index for index, node in enumerate(graph.nodes)}
    stored = {node: storages(node) for node in graph.nodes}
    by_storage: dict[StorageWeakRef, list[fx.Node]] = {}
    refused: list[Refusal] = []
    in_place = [node for node in graph.nodes if is_in_place(node)]
    for node in in_place:
        target = node.args[0] if node.args else None
        found = stored.get(target, set()) if isinstance(target, fx.Node) else set()
        if len(found) != 1:
            refused.append(Refusal(node.name, module_path(node), "what it changes has no recorded storage"))
            continue
        by_storage.setdefault(next(iter(found)), []).append(node)
    rewritten = 0
    for writes in by_storage.values():
        bases = {write.args[0] for write in writes}
        if len(bases) != 1:
            reason = "it writes into one storage through several views (" + ", ".join(sorted(b.name for b in bases)) + ")"
        else:
            reason = _refusal(writes, bases.pop(), order, stored, set(writes))
        if reason:
            refused += [Refusal(w.name, module_path(w), reason) for w in writes]
            continue
        rewritten += _rewrite(graph, writes, order)
    return Writes(rewritten, refused)


def _rewrite(graph: fx.Graph, writes: list[fx.Node], order: dict[fx.Node, int]) -> int:
    """Each write a new value; an in-place step keeps its tensor's dtype, so a promoted result is cast back."""
    base = current = writes[0].args[0]
    dtype = example_tensor(base).dtype
    for write in writes:
        op, target = _out_of_place(write)
        args = (current, *write.args[1:])
        with graph.inserting_before(write):
            new = graph.create_node(op, target, args, dict(write.kwargs))
            new.meta = {k: v for k, v in write.meta.items() if k not in ("example_value", "val")}
            new.meta["example_value"] = _fake_result(new)
            if new.meta["example_value"].dtype != dtype:
                new = graph.call_method("to", (new, dtype))
                new.meta = {**new.args[0].meta, "example_value": new.args[0].meta["example_value"].to(dtype)}
        # The write's own result (``x += y`` returns x) and every later read of the old value read the new one.
        write.replace_all_uses_with(new)
        for user in list(current.users):
            if user is not new and user is not new.args[0] and order.get(user, -1) > order[write]:
                user.replace_input_with(current, new)
        graph.erase_node(write)
        current = new
    return len(writes)


def _fake_result(node: fx.Node) -> torch.Tensor:
    """`node`'s value computed on the recorded values of its arguments (fake tensors: no data)."""
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), example_value)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    if node.target is written:
        return args[0].clone()
    return node.target(*args, **kwargs)
