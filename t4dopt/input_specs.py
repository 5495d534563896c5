"""What an exported artifact takes, input by input, and the check run on every call of one.

A deployment bundle (`t4dopt.deploy`) and an AOTInductor package (`t4dopt.export.load_aoti`) are
compiled for fixed shapes, dtypes and a device. Given anything else, a package returns a tensor of
the exported shape without complaint and a bundle fails deep inside a matmul; so both record one
`InputSpec` per tensor input at export and `check_inputs` refuses a mismatch before running,
naming the input and what it expects.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from t4dopt.errors import T4DInputError


@dataclass(frozen=True)
class InputSpec:
    """One tensor input as exported: its name, shape, dtype (``"float32"``) and device type (``"cpu"``).

    ``device`` is None in bundles written before it was recorded: any device is then accepted.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    device: str | None = None

    @classmethod
    def of(cls, name: str, value: torch.Tensor) -> InputSpec:
        return cls(name, tuple(value.shape), str(value.dtype).removeprefix("torch."), value.device.type)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "device": self.device}

    @classmethod
    def from_json(cls, data: Any) -> InputSpec:
        """The spec written by `to_json`; ValueError naming the field that is missing or malformed."""
        if not isinstance(data, dict):
            raise ValueError(f"expected an object with name, shape, dtype, got {data!r}")
        unknown = sorted(set(data) - {"name", "shape", "dtype", "device"})
        if unknown:
            raise ValueError(f"unknown field {unknown[0]!r}; known: name, shape, dtype, device")
        name, shape, dtype, device = data.get("name"), data.get("shape"), data.get("dtype"), data.get("device")
        if not isinstance(name, str) or not name:
            raise ValueError(f"name={name!r}: expected a non-empty string")
        if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                  for s in shape):
            raise ValueError(f"shape={shape!r}: expected a list of integers >= 0")
        if not isinstance(dtype, str) or not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"dtype={dtype!r}: expected a torch dtype name such as 'float32'")
        if device is not None and (not isinstance(device, str) or not _is_device_type(device)):
            raise ValueError(f"device={device!r}: expected a device type such as 'cpu' or 'cuda'")
        return cls(name, tuple(shape), dtype, device)

    def mismatch(self, value: Any) -> str | None:
        """What about `value` differs from this spec, or None when it matches."""
        if not isinstance(value, torch.Tensor):
            return f"must be a tensor, got {type(value).__name__}"
        if tuple(value.shape) != self.shape:
            return f"must have shape {list(self.shape)} (the shape it was exported with), got {list(value.shape)}"
        if str(value.dtype).removeprefix("torch.") != self.dtype:
            return (f"must have dtype {self.dtype} (the dtype it was exported with), got "
                    f"{str(value.dtype).removeprefix('torch.')}: convert it with .to(torch.{self.dtype})")
        if self.device is not None and value.device.type != self.device:
            return f"must be on {self.device} (the device it was exported on), got {value.device}"
        return None


def _is_device_type(name: str) -> bool:
    try:
        return torch.device(name).index is None
    except (RuntimeError, ValueError):
        return False


def input_names(forward: Callable[..., Any], count: int) -> list[str]:
    """The names of the first `count` positional parameters of `forward` (``input0``... where it has fewer)."""
    try:
        parameters = inspect.signature(forward).parameters.values()
    except (TypeError, ValueError):
        parameters = []
    names = [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return names[:count] if len(names) >= count else [f"input{i}" for i in range(count)]


def check_inputs(what: str, specs: Sequence[InputSpec | None], args: Sequence[Any]) -> None:
    """Refuse `args` unless they match `specs` one by one (None: an input that was no tensor, not checked):
    TypeError for their number, `T4DInputError` naming the first input that differs; `what` names the artifact."""
    if len(args) != len(specs):
        names = ", ".join(s.name if s is not None else f"input{i}" for i, s in enumerate(specs))
        raise TypeError(f"{what} takes {len(specs)} inputs ({names}), got {len(args)}")
    for spec, value in zip(specs, args):
        if spec is None:
            continue
        problem = spec.mismatch(value)
        if problem is not None:
            raise T4DInputError(f"{what}: input {spec.name!r} {problem}")
