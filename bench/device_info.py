"""What a benchmark ran on: device, library versions, and whether FlashAttention-4 is there."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import sys
from typing import Any

import torch

FA4_DISTRIBUTION = "flash-attn-4"
FA4_MODULE = "flash_attn.cute"
"""What FlexAttention's ``BACKEND="FLASH"`` imports (``torch._inductor.kernel.flex.flex_flash_attention``)."""


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def fa4_unavailable(device: torch.device) -> str | None:
    """None when FlexAttention's FLASH backend (FlashAttention-4) can run on `device`, else why not."""
    if device.type != "cuda":
        return f"FlashAttention-4 runs on CUDA only (device {device.type})"
    try:
        found = importlib.util.find_spec(FA4_MODULE) is not None
    except ImportError:  # the parent package flash_attn is missing
        found = False
    if not found:
        return (f"FlashAttention-4 is not installed ({FA4_MODULE} not importable); "
                "bench/carry_fa4.sh prepares its wheels for the GPU machine")
    return None


def describe(device: torch.device) -> dict[str, Any]:
    """Device and versions, for the header of a results file."""
    info: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "platform": sys.platform,
        "triton": _version("triton"), "flash-attn-4": _version(FA4_DISTRIBUTION),
        "nvidia-cutlass-dsl": _version("nvidia-cutlass-dsl"), "device": device.type,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device=torch.cuda.get_device_name(device), capability=f"{props.major}.{props.minor}",
                    multiprocessors=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    else:
        info.update(device=f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads")
    return info
