"""Tiny models trained on procedural 4D scenes (`examples/train_tiny.py`), shipped as safetensors.

Each file holds the weights plus JSON metadata: the architecture, its config, and the task
it was trained on (token grid and conditioning, see `t4dopt.data.tasks`), and the held-out
losses. A model trained with a joint-attention mask also stores the mask, tensor
``"joint_mask"``. Files with ``"library": "diffusers"`` hold a diffusers transformer
(`t4dopt.models.diffusers_testbeds`), built only where diffusers is installed.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from t4dopt.models.diffusers_testbeds import TESTBEDS, build_transformer, diffusers_class
from t4dopt.models.joint_mask import joint_mask, set_joint_mask
from t4dopt.models.scm_net import SCMConfig, SCMNet
from t4dopt.models.sculpt4d_dit import Sculpt4DConfig, Sculpt4DDiT

WEIGHTS = Path(__file__).parent / "weights"
PRETRAINED = ("scm-tiny", "joint-tiny", "joint-tiny-sculpt4d")
DIFFUSERS_PRETRAINED = tuple(TESTBEDS)  # diffusers transformers: "wan-tiny", "cogvideox-tiny"
_ARCHITECTURES: dict[str, tuple[type[nn.Module], type]] = {
    "SCMNet": (SCMNet, SCMConfig),
    "Sculpt4DDiT": (Sculpt4DDiT, Sculpt4DConfig),
}


def build(architecture: str, config: dict[str, Any]) -> nn.Module:
    """A freshly initialised model of `architecture` ("SCMNet" or "Sculpt4DDiT") with `config`."""
    if architecture not in _ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; known: {', '.join(_ARCHITECTURES)}")
    model_class, config_class = _ARCHITECTURES[architecture]
    return model_class(config_class(**config))


def save_pretrained(model: nn.Module, path: str | Path, info: dict[str, Any]) -> None:
    """Write weights, the joint mask if any, and `info` plus the architecture and config as metadata.

    The config is ``info["config"]`` where given (diffusers models: the arguments they were
    built with), else the model's config dataclass.
    """
    from safetensors.torch import save_file

    config = info["config"] if "config" in info else dataclasses.asdict(model.config)
    metadata = {**info, "architecture": type(model).__name__, "config": config}
    tensors = {name: value.detach().cpu().contiguous() for name, value in model.state_dict().items()}
    mask = joint_mask(model) if isinstance(model, Sculpt4DDiT) else None
    if mask is not None:
        tensors["joint_mask"] = mask.cpu().contiguous()
    save_file(tensors, str(path), metadata={"t4dopt": json.dumps(metadata)})


def pretrained(name: str, *, device: torch.device | str = "cpu") -> nn.Module:
    """A shipped trained model in eval mode; ``model.pretrained_info`` holds its metadata.

    Names: ``"scm-tiny"`` (`SCMNet`, [B, 4 views, 8 frames, 64 tokens, 12]),
    ``"joint-tiny"`` (`Sculpt4DDiT`, [B, 8 frames, 64 tokens, 12]) and ``"joint-tiny-sculpt4d"``
    (the same fine-tuned with the Sculpt4D mask, which it keeps; it runs 8 x 64 grids only).
    All take the clean tokens of view 0, frame 0, each with a code of its position
    (`t4dopt.data.tasks.position_code`), as conditioning: [B, 64, 24], as `scene_batch` makes it.

    With diffusers installed: ``"wan-tiny"`` (`WanTransformer3DModel`, video [B, 3, 8, 16, 16])
    and ``"cogvideox-tiny"`` (`CogVideoXTransformer3DModel`, video [B, 8, 3, 16, 16]), called as
    diffusers calls them with that same conditioning as ``encoder_hidden_states``; sample them
    with `t4dopt.models.sample_diffusers` (`t4dopt.models.diffusers_testbeds` has the task).

    All three draw recognisable, if blotchy, scenes from noise: ``"scm-tiny"`` has sinusoidal
    view, frame and token embeddings, the joint models a sinusoid of the token index within a
    frame and RoPE on the frame index (`bench/RESULTS.md` has their PSNR against the scene).

    turbo4d leaves attention that already has a mask dense; to run joint-tiny-sculpt4d through
    its block-sparse kernel, drop the mask (``set_joint_mask(model, None)``) and compile with
    ``"sparse": {"policy": "sculpt4d", "block_size": 16}``, which computes the same thing.
    """
    if name not in PRETRAINED + DIFFUSERS_PRETRAINED:
        raise ValueError(f"unknown pretrained model {name!r}; known: {', '.join(PRETRAINED + DIFFUSERS_PRETRAINED)}")
    if name in TESTBEDS:
        diffusers_class(TESTBEDS[name].architecture)  # without diffusers: an ImportError naming the extra
    return load(WEIGHTS / f"{name}.safetensors", device=device)


def load(path: str | Path, *, device: torch.device | str = "cpu") -> nn.Module:
    """The model `save_pretrained` wrote to `path`, in eval mode."""
    from safetensors import safe_open  # imported here so `t4dopt.models` imports without safetensors

    with safe_open(str(path), framework="pt") as file:
        info = json.loads(file.metadata()["t4dopt"])
        tensors = {key: file.get_tensor(key) for key in file.keys()}
    if info.get("library") == "diffusers":
        model = build_transformer(info["architecture"], info["config"])
    else:
        model = build(info["architecture"], info["config"])
    mask = tensors.pop("joint_mask", None)
    if mask is not None:
        set_joint_mask(model, mask)
    model.load_state_dict(tensors)
    model.pretrained_info = info
    return model.to(device).eval()
