"""Procedural 4D scenes: coloured primitives that move, spin and pulse, seen from cameras on an orbit.

Each scene holds `OBJECTS` flat primitives (disc, square, ellipse) with a 3-D centre moving at
constant velocity, an in-plane rotation, and a size that oscillates over time (the deformation).
View v looks at the scene from azimuth ``offset + 2 pi v / V`` about the vertical axis with a
weak-perspective camera, and objects are composited far to near (painter's algorithm), so
positions, sizes and occlusions all depend on the view. Everything is drawn from one CPU
generator seeded with `seed`, so a seed gives the same scenes on any device.
"""

from __future__ import annotations

import math

import torch

OBJECTS = 3
DISC, SQUARE, ELLIPSE = 0, 1, 2
CAMERA_DISTANCE = 4.0  # weak perspective: screen scale 1 / (1 + depth / CAMERA_DISTANCE)


def _uniform(generator: torch.Generator, shape: tuple[int, ...], low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator)


def _scene_parameters(batch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Per-scene, per-object random parameters, all [B, K, ...] except the scene-wide ones."""
    k = OBJECTS
    return {
        "shape": torch.randint(0, 3, (batch, k), generator=generator),
        "colour": _uniform(generator, (batch, k, 3), -1.0, 1.0),
        "start": _uniform(generator, (batch, k, 3), -0.35, 0.35),
        "velocity": _uniform(generator, (batch, k, 3), -0.35, 0.35),
        "size": _uniform(generator, (batch, k), 0.2, 0.35),
        "angle": _uniform(generator, (batch, k), 0.0, math.pi),
        "spin": _uniform(generator, (batch, k), -math.pi, math.pi),
        "pulse_amplitude": _uniform(generator, (batch, k), 0.0, 0.35),
        "pulse_phase": _uniform(generator, (batch, k), 0.0, 2 * math.pi),
        "background": _uniform(generator, (batch, 3), -1.0, 0.0),
        "camera_offset": _uniform(generator, (batch,), 0.0, 2 * math.pi),
    }


def render_scenes(
    batch: int,
    *,
    views: int = 4,
    frames: int = 8,
    size: int = 16,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Render `batch` random dynamic scenes: float32 [B, V, T, 3, size, size] in [-1, 1]."""
    for name, value in (("batch", batch), ("views", views), ("frames", frames), ("size", size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: expected an integer >= 1")
    p = {name: value.to(device) for name, value in _scene_parameters(batch, torch.Generator().manual_seed(seed)).items()}
    time = torch.linspace(0.0, 1.0, frames, device=device) if frames > 1 else torch.zeros(1, device=device)

    # Object state over time, [B, T, K, ...].
    centre = p["start"].unsqueeze(1) + p["velocity"].unsqueeze(1) * time.view(1, frames, 1, 1)
    angle = p["angle"].unsqueeze(1) + p["spin"].unsqueeze(1) * time.view(1, frames, 1)
    pulse = torch.sin(2 * math.pi * time.view(1, frames, 1) + p["pulse_phase"].unsqueeze(1))
    radius = p["size"].unsqueeze(1) * (1 + p["pulse_amplitude"].unsqueeze(1) * pulse)

    # Cameras: rotate about the vertical (y) axis, then weak perspective, [B, V, T, K].
    azimuth = p["camera_offset"].view(batch, 1) + 2 * math.pi * torch.arange(views, device=device) / views
    cos, sin = azimuth.cos().view(batch, views, 1, 1), azimuth.sin().view(batch, views, 1, 1)
    x, y, z = (centre[..., i].unsqueeze(1) for i in range(3))
    depth = -x * sin + z * cos
    scale = 1.0 / (1.0 + depth / CAMERA_DISTANCE)
    screen_x, screen_y = (x * cos + z * sin) * scale, -y * scale
    radius = radius.unsqueeze(1) * scale
    angle = angle.unsqueeze(1).expand_as(radius)

    # Each pixel's offset from each object centre, in the object's rotated frame: [B, V, T, K, H, W].
    axis = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) * 2 / size - 1
    dx = axis.view(1, 1, 1, 1, 1, size) - screen_x[..., None, None]
    dy = axis.view(1, 1, 1, 1, size, 1) - screen_y[..., None, None]
    c, s = angle.cos()[..., None, None], angle.sin()[..., None, None]
    u, w = dx * c + dy * s, -dx * s + dy * c
    r = radius[..., None, None]
    shape = p["shape"].view(batch, 1, 1, OBJECTS, 1, 1)
    # Normalised distance: < 1 inside, 1 on the outline.
    distance = torch.where(shape == DISC, torch.sqrt(u * u + w * w) / r,
                           torch.where(shape == SQUARE, torch.maximum(u.abs(), w.abs()) / r,
                                       torch.sqrt((u / r) ** 2 + (w / (0.5 * r)) ** 2)))
    pixel = 2.0 / size
    alpha = (0.5 + (1 - distance) * r / pixel).clamp(0.0, 1.0)  # one pixel of anti-aliasing

    order = depth.argsort(dim=-1, descending=True)  # far to near
    alpha = alpha.gather(3, order[..., None, None].expand_as(alpha))
    colour = p["colour"].view(batch, 1, 1, OBJECTS, 3).expand(batch, views, frames, OBJECTS, 3)
    colour = colour.gather(3, order.unsqueeze(-1).expand(-1, -1, -1, -1, 3))
    image = p["background"].view(batch, 1, 1, 3, 1, 1).expand(batch, views, frames, 3, size, size)
    for k in range(OBJECTS):
        a = alpha[:, :, :, k].unsqueeze(3)
        image = image * (1 - a) + a * colour[:, :, :, k, :, None, None]
    return image.contiguous()


def to_tokens(video: torch.Tensor, patch: int = 2) -> torch.Tensor:
    """[..., 3, H, W] -> [..., (H / patch) * (W / patch), 3 * patch * patch]: one token per patch, row-major."""
    *lead, channels, height, width = video.shape
    if height % patch or width % patch:
        raise ValueError(f"image {height}x{width} is not a multiple of patch={patch}")
    h, w = height // patch, width // patch
    x = video.reshape(-1, channels, h, patch, w, patch).permute(0, 2, 4, 1, 3, 5)  # [N, h, w, C, py, px]
    return x.reshape(*lead, h * w, channels * patch * patch)


def from_tokens(tokens: torch.Tensor, size: int, patch: int = 2) -> torch.Tensor:
    """Inverse of `to_tokens` for square images of `size` x `size` pixels."""
    *lead, count, features = tokens.shape
    h = w = size // patch
    channels = features // (patch * patch)
    if count != h * w or channels * patch * patch != features:
        raise ValueError(f"tokens [..., {count}, {features}] do not make a {size}x{size} image with patch={patch}")
    x = tokens.reshape(-1, h, w, channels, patch, patch).permute(0, 3, 1, 4, 2, 5)  # [N, C, h, py, w, px]
    return x.reshape(*lead, channels, size, size)
