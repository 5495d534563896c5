"""Pictures for reports: a layout's block mask and a speed / quality curve, drawn with Pillow.

`draw_block_mask` draws the block table the way the Sculpt4D paper shows its masks: query blocks
as rows, key blocks as columns, computed blocks dark and skipped blocks light, with thin lines
between frames. `draw_speed_quality_curve` plots (speedup, quality) points of several runs.
`draw_sample_grid` and `draw_sample_gif` show sampled videos of several methods next to each other.
"""

from __future__ import annotations

import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from t4dopt.block_layout import BlockLayout

Color = tuple[int, int, int]

MARGIN = 16
TITLE_BAND = 40
MAX_MASK_SIDE = 1024
MAX_CELL = 24

BACKGROUND: Color = (255, 255, 255)
KEPT: Color = (28, 45, 82)
SKIPPED: Color = (238, 240, 244)
PREFIX_KEPT: Color = (176, 96, 28)
PREFIX_SKIPPED: Color = (250, 228, 204)
FRAME_LINE: Color = (150, 156, 168)
BORDER: Color = (90, 90, 90)
TEXT: Color = (20, 20, 20)
CURVE: Color = (31, 92, 168)
CURVE_COLOURS: tuple[Color, ...] = (CURVE, (200, 60, 40), (40, 150, 70), (140, 90, 180), (230, 140, 20),
                                     (20, 170, 180), (120, 120, 120), (210, 90, 160), (150, 110, 50), (100, 180, 60),
                                     (60, 60, 150), (200, 180, 40), (0, 0, 0), (170, 30, 90))
AXIS: Color = (60, 60, 60)
GRID: Color = (228, 228, 228)

SAMPLE_SIDE = 96  # frames are upscaled (nearest) to at least this many pixels
SAMPLE_GAP = 4
LABEL_BAND = 16


@dataclass(frozen=True)
class _MaskScale:
    """Cells are `pixels` pixels wide, or, for very large layouts, `blocks` blocks share a pixel."""

    pixels: int
    blocks: int

    @classmethod
    def for_blocks(cls, num_blocks: int) -> _MaskScale:
        if num_blocks <= MAX_MASK_SIDE:
            return cls(pixels=max(1, min(MAX_CELL, MAX_MASK_SIDE // max(num_blocks, 1))), blocks=1)
        return cls(pixels=1, blocks=math.ceil(num_blocks / MAX_MASK_SIDE))

    def offset(self, block: int) -> int:
        """Pixel offset, inside the mask, of the first pixel of `block`."""
        return block * self.pixels // self.blocks

    def side(self, num_blocks: int) -> int:
        return math.ceil(num_blocks * self.pixels / self.blocks)


def block_center_pixel(num_blocks: int, row: int, col: int) -> tuple[int, int]:
    """(x, y) of the pixel `draw_block_mask` paints at the centre of block (row, col).

    Useful to annotate a picture or to check one: the mask sits at (MARGIN, MARGIN + TITLE_BAND).
    """
    scale = _MaskScale.for_blocks(num_blocks)
    center = scale.pixels // 2
    return MARGIN + scale.offset(col) + center, MARGIN + TITLE_BAND + scale.offset(row) + center


def _frame_structure(num_blocks: int, frames: int | None, blocks_per_frame: int | None) -> tuple[int, int, int]:
    """(prefix blocks, frames, blocks per frame); (0, 0, 0) when neither is given."""
    if frames is None and blocks_per_frame is None:
        return 0, 0, 0
    for name, value in (("frames", frames), ("blocks_per_frame", blocks_per_frame)):
        if value is not None and value < 1:
            raise ValueError(f"{name}={value}: expected an integer >= 1")
    if frames is None:
        frames = num_blocks // blocks_per_frame
    elif blocks_per_frame is None:
        blocks_per_frame = num_blocks // frames
    if frames < 1 or blocks_per_frame < 1 or frames * blocks_per_frame > num_blocks:
        raise ValueError(
            f"frames={frames}, blocks_per_frame={blocks_per_frame} do not fit a layout of {num_blocks} blocks"
        )
    return num_blocks - frames * blocks_per_frame, frames, blocks_per_frame


def _mask_pixels(dense: np.ndarray, prefix: int, scale: _MaskScale) -> Image.Image:
    """RGB image of the block mask, one colour per block, scaled to `scale`."""
    num_blocks = dense.shape[0]
    is_prefix = np.zeros(num_blocks, dtype=bool)
    is_prefix[:prefix] = True
    prefix_cell = is_prefix[:, None] | is_prefix[None, :]
    colors = np.empty((num_blocks, num_blocks, 3), dtype=np.uint8)
    colors[...] = SKIPPED
    colors[dense] = KEPT
    colors[prefix_cell & dense] = PREFIX_KEPT
    colors[prefix_cell & ~dense] = PREFIX_SKIPPED
    if scale.blocks == 1:
        colors = colors.repeat(scale.pixels, axis=0).repeat(scale.pixels, axis=1)
        return Image.fromarray(colors)
    side = scale.side(num_blocks)
    return Image.fromarray(colors).resize((side, side), Image.Resampling.BOX)


def _text_width(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=font)
    return int(right - left)


def _text_height(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> int:
    _, top, _, bottom = draw.textbbox((0, 0), text, font=font)
    return int(bottom - top)


def _save(image: Image.Image, path: str | os.PathLike) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path


def draw_block_mask(
    layout: BlockLayout,
    path: str | os.PathLike,
    *,
    frames: int | None = None,
    blocks_per_frame: int | None = None,
    title: str | None = None,
) -> pathlib.Path:
    """Write a PNG of ``layout.to_dense()``: query blocks as rows, key blocks as columns.

    Computed blocks are dark and skipped blocks light. Given `frames` and/or `blocks_per_frame`
    (a missing one is derived from the other; the blocks left over before the first frame are
    prefix blocks), thin lines separate the frames and prefix rows and columns get their own
    colours. Each block is a square of up to `MAX_CELL` pixels, chosen so the mask is at most
    `MAX_MASK_SIDE` pixels wide; larger layouts are averaged down. The title band shows `title`
    (default: the layout's description) and the density. Returns the path written.
    """
    dense = layout.to_dense().numpy()
    num_blocks = dense.shape[0]
    prefix, frames, blocks_per_frame = _frame_structure(num_blocks, frames, blocks_per_frame)
    scale = _MaskScale.for_blocks(num_blocks)
    mask = _mask_pixels(dense, prefix, scale)
    side = mask.width

    font = ImageFont.load_default()
    heading = title or layout.description or "custom layout"
    shape = f"{num_blocks} x {num_blocks} blocks of {layout.block_size} tokens"
    if frames:
        shape += f", {frames} frames" + (f" + {prefix} prefix blocks" if prefix else "")
    details = f"density {layout.density:.3f}  ({shape}; dark = computed, light = skipped)"
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_width = max(_text_width(measure, heading, font), _text_width(measure, details, font))
    width = 2 * MARGIN + max(side, text_width)
    image = Image.new("RGB", (width, 2 * MARGIN + TITLE_BAND + side), BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.text((MARGIN, MARGIN), heading, fill=TEXT, font=font)
    draw.text((MARGIN, MARGIN + TITLE_BAND // 2), details, fill=TEXT, font=font)

    left, top = MARGIN, MARGIN + TITLE_BAND
    image.paste(mask, (left, top))
    frame_starts = [prefix + f * blocks_per_frame for f in range(frames)]
    for start in filter(None, frame_starts):
        offset = scale.offset(start)
        draw.line([(left + offset, top), (left + offset, top + side - 1)], fill=FRAME_LINE)
        draw.line([(left, top + offset), (left + side - 1, top + offset)], fill=FRAME_LINE)
    draw.rectangle([left - 1, top - 1, left + side, top + side], outline=BORDER)
    return _save(image, path)


def _nice_ticks(low: float, high: float, count: int = 5) -> tuple[list[float], int]:
    """Round tick values covering [low, high] and the decimals to print them with."""
    if high - low < 1e-12:
        pad = abs(low) * 0.1 or 1.0
        low, high = low - pad, high + pad
    raw_step = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw_step))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw_step)
    first = math.floor(low / step + 1e-9)
    last = math.ceil(high / step - 1e-9)
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    return [round(k * step, decimals) for k in range(first, last + 1)], decimals


def draw_speed_quality_curve(
    points: Sequence[tuple[str, float, float]] | Mapping[str, Sequence[tuple[str, float, float]]],
    path: str | os.PathLike,
    *,
    x_label: str = "speedup",
    y_label: str = "PSNR (dB)",
) -> pathlib.Path:
    """Write a PNG plotting labelled (label, x, y) points, joined in order of x.

    `points` is one curve, or named curves (a dict name -> points), each drawn in its own
    colour with a legend. Axes get round tick values and the labels `x_label` and `y_label`;
    each point is marked and annotated with its label. Raises ValueError for no points or a
    non-finite coordinate (an infinite PSNR, say, from comparing a run with itself). Returns
    the path written.
    """
    curves = dict(points) if isinstance(points, Mapping) else {"": points}
    points = [p for curve in curves.values() for p in curve]
    if not points:
        raise ValueError("points is empty: nothing to plot")
    for label, x, y in points:
        if not (math.isfinite(x) and math.isfinite(y)):
            raise ValueError(f"point {label!r} has a non-finite coordinate ({x}, {y})")

    width, height = 720, 480
    left, right, top, bottom = 72, width - 32, 24, height - 56
    x_ticks, x_decimals = _nice_ticks(min(p[1] for p in points), max(p[1] for p in points))
    y_ticks, y_decimals = _nice_ticks(min(p[2] for p in points), max(p[2] for p in points))

    def to_pixel(x: float, y: float) -> tuple[float, float]:
        px = left + (x - x_ticks[0]) / (x_ticks[-1] - x_ticks[0]) * (right - left)
        py = bottom - (y - y_ticks[0]) / (y_ticks[-1] - y_ticks[0]) * (bottom - top)
        return px, py

    font = ImageFont.load_default()
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for tick in x_ticks:
        px, _ = to_pixel(tick, y_ticks[0])
        text = f"{tick:.{x_decimals}f}"
        draw.line([(px, top), (px, bottom)], fill=GRID)
        draw.line([(px, bottom), (px, bottom + 4)], fill=AXIS)
        draw.text((px - _text_width(draw, text, font) / 2, bottom + 8), text, fill=TEXT, font=font)
    for tick in y_ticks:
        _, py = to_pixel(x_ticks[0], tick)
        text = f"{tick:.{y_decimals}f}"
        draw.line([(left, py), (right, py)], fill=GRID)
        draw.line([(left - 4, py), (left, py)], fill=AXIS)
        draw.text((left - 8 - _text_width(draw, text, font), py - _text_height(draw, text, font) / 2 - 2),
                  text, fill=TEXT, font=font)
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=AXIS)

    draw.text(((left + right - _text_width(draw, x_label, font)) / 2, bottom + 30), x_label, fill=TEXT, font=font)
    label_image = Image.new("RGB", (_text_width(draw, y_label, font) + 4, 16), BACKGROUND)
    ImageDraw.Draw(label_image).text((2, 1), y_label, fill=TEXT, font=font)
    label_image = label_image.rotate(90, expand=True)
    image.paste(label_image, (12, int((top + bottom - label_image.height) / 2)))

    for index, (name, curve) in enumerate(curves.items()):
        colour = CURVE_COLOURS[index % len(CURVE_COLOURS)]
        pixels = [to_pixel(x, y) for _, x, y in sorted(curve, key=lambda p: p[1])]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=2)
        for label, x, y in curve:
            px, py = to_pixel(x, y)
            draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=colour, outline=BACKGROUND)
            text_x = min(px + 7, width - 4 - _text_width(draw, label, font))
            text_y = max(py - 18, 2)
            draw.text((text_x, text_y), label, fill=TEXT, font=font)
        if name:
            legend_y = top + 4 + 16 * index
            draw.line([(right - 150, legend_y + 6), (right - 130, legend_y + 6)], fill=colour, width=3)
            draw.text((right - 124, legend_y), name, fill=TEXT, font=font)
    return _save(image, path)


def _video_pixels(video: torch.Tensor, value_range: tuple[float, float]) -> np.ndarray:
    """[T, 3, H, W] or [V, T, 3, H, W] -> uint8 [V, T, H, W, 3], `value_range` mapped to 0..255."""
    if video.dim() == 4:
        video = video.unsqueeze(0)
    if video.dim() != 5 or video.shape[2] != 3:
        raise ValueError(f"expected a video [T, 3, H, W] or [V, T, 3, H, W], got {tuple(video.shape)}")
    low, high = value_range
    scaled = ((video.detach().float().cpu() - low) / (high - low)).clamp(0, 1)
    return (scaled * 255).round().to(torch.uint8).permute(0, 1, 3, 4, 2).numpy()


def _sample_pixels(rows: Mapping[str, torch.Tensor], value_range: tuple[float, float]) -> dict[str, np.ndarray]:
    """Every video as upscaled uint8 [V, T, H', W', 3]; all must share one shape."""
    if not rows:
        raise ValueError("rows is empty: nothing to draw")
    videos = {label: _video_pixels(video, value_range) for label, video in rows.items()}
    shapes = {label: video.shape for label, video in videos.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"all videos must have the same shape, got {shapes}")
    side = max(next(iter(videos.values())).shape[2:4])
    scale = max(1, math.ceil(SAMPLE_SIDE / side))
    return {label: video.repeat(scale, axis=2).repeat(scale, axis=3) for label, video in videos.items()}


def _views_stacked(video: np.ndarray, frame: int) -> np.ndarray:
    """One frame of every view, stacked top to bottom with a gap: uint8 [H, W, 3]."""
    views, _, height, width, _ = video.shape
    out = np.full((views * height + (views - 1) * SAMPLE_GAP, width, 3), BACKGROUND, dtype=np.uint8)
    for v in range(views):
        out[v * (height + SAMPLE_GAP): v * (height + SAMPLE_GAP) + height] = video[v, frame]
    return out


def draw_sample_grid(
    rows: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    value_range: tuple[float, float] = (-1.0, 1.0),
) -> pathlib.Path:
    """Write a PNG with one row per labelled video and its frames across, for comparing methods.

    Each video is [T, 3, H, W] or [V, T, 3, H, W] (views stacked inside the row), values in
    `value_range` (default: the [-1, 1] of `t4dopt.data`). Frames are upscaled with nearest
    neighbours to at least `SAMPLE_SIDE` pixels, so 16 x 16 frames stay sharp and visible.
    Returns the path written.
    """
    videos = _sample_pixels(rows, value_range)
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_width = max(_text_width(measure, label, font) for label in videos) + SAMPLE_GAP * 2
    tiles = {label: [_views_stacked(video, t) for t in range(video.shape[1])] for label, video in videos.items()}
    tile_h, tile_w = next(iter(tiles.values()))[0].shape[:2]
    frames = len(next(iter(tiles.values())))
    width = 2 * MARGIN + label_width + frames * tile_w + (frames - 1) * SAMPLE_GAP
    height = 2 * MARGIN + LABEL_BAND + len(tiles) * tile_h + (len(tiles) - 1) * SAMPLE_GAP
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    left = MARGIN + label_width
    for t in range(frames):
        draw.text((left + t * (tile_w + SAMPLE_GAP), MARGIN), f"t={t}", fill=TEXT, font=font)
    for row, (label, row_tiles) in enumerate(tiles.items()):
        top = MARGIN + LABEL_BAND + row * (tile_h + SAMPLE_GAP)
        draw.text((MARGIN, top + (tile_h - _text_height(draw, label, font)) // 2), label, fill=TEXT, font=font)
        for t, tile in enumerate(row_tiles):
            image.paste(Image.fromarray(tile), (left + t * (tile_w + SAMPLE_GAP), top))
    return _save(image, path)


def draw_sample_gif(
    rows: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    frame_ms: int = 150,
    value_range: tuple[float, float] = (-1.0, 1.0),
) -> pathlib.Path:
    """Write an animated GIF that plays the labelled videos side by side, `frame_ms` per frame.

    Videos as for `draw_sample_grid`; the GIF loops forever. Returns the path written.
    """
    if frame_ms < 1:
        raise ValueError(f"frame_ms={frame_ms}: expected an integer >= 1")
    videos = _sample_pixels(rows, value_range)
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    first = _views_stacked(next(iter(videos.values())), 0)
    column = max(first.shape[1], *(_text_width(measure, label, font) for label in videos))
    frames = next(iter(videos.values())).shape[1]
    width = 2 * MARGIN + len(videos) * column + (len(videos) - 1) * SAMPLE_GAP * 2
    height = 2 * MARGIN + LABEL_BAND + first.shape[0]
    pictures = []
    for t in range(frames):
        image = Image.new("RGB", (width, height), BACKGROUND)
        draw = ImageDraw.Draw(image)
        for index, (label, video) in enumerate(videos.items()):
            left = MARGIN + index * (column + SAMPLE_GAP * 2)
            draw.text((left, MARGIN), label, fill=TEXT, font=font)
            image.paste(Image.fromarray(_views_stacked(video, t)), (left, MARGIN + LABEL_BAND))
        pictures.append(image)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pictures[0].save(path, format="GIF", save_all=True, append_images=pictures[1:], duration=frame_ms, loop=0)
    return path
