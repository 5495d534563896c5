import numpy as np
import pytest
import torch
from PIL import Image

from t4dopt import masks
from t4dopt.plotting import (
    CURVE,
    CURVE_COLOURS,
    KEPT,
    PREFIX_KEPT,
    PREFIX_SKIPPED,
    SKIPPED,
    SAMPLE_SIDE,
    block_center_pixel,
    draw_block_mask,
    draw_sample_gif,
    draw_sample_grid,
    draw_speed_quality_curve,
)


def block_centre_colors(image_path, num_blocks: int) -> np.ndarray:
    """uint8 [num_blocks, num_blocks, 3]: the colour at the centre of every drawn block."""
    pixels = np.asarray(Image.open(image_path).convert("RGB"))
    xs = [block_center_pixel(num_blocks, 0, col)[0] for col in range(num_blocks)]
    ys = [block_center_pixel(num_blocks, row, 0)[1] for row in range(num_blocks)]
    return pixels[np.array(ys)[:, None], np.array(xs)[None, :]]


def assert_colors(colors: np.ndarray, where: np.ndarray, expected) -> None:
    assert (colors[where] == np.array(expected, dtype=np.uint8)).all()


def test_block_mask_png_reflects_the_mask(tmp_path):
    layout = masks.sculpt4d(16, 4096, block_size=128)
    path = draw_block_mask(layout, tmp_path / "mask.png", frames=16, blocks_per_frame=32)
    assert path == tmp_path / "mask.png"
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert 512 <= image.width <= 1100 and 512 <= image.height <= 1150
    dense = layout.to_dense().numpy()
    colors = block_centre_colors(path, layout.num_blocks)
    assert_colors(colors, dense, KEPT)
    assert_colors(colors, ~dense, SKIPPED)


def test_small_layout_with_prefix(tmp_path):
    layout = masks.sculpt4d(4, 40, block_size=16, prefix_tokens=20)
    path = draw_block_mask(layout, str(tmp_path / "nested" / "small.png"), frames=4)
    dense = layout.to_dense().numpy()
    prefix = np.zeros(layout.num_blocks, dtype=bool)
    prefix[:2] = True
    prefix_cell = prefix[:, None] | prefix[None, :]
    colors = block_centre_colors(path, layout.num_blocks)
    assert_colors(colors, prefix_cell & dense, PREFIX_KEPT)
    assert_colors(colors, ~prefix_cell & dense, KEPT)
    assert_colors(colors, ~prefix_cell & ~dense, SKIPPED)
    assert (~prefix_cell & ~dense).any() and (prefix_cell & dense).any()
    assert not (prefix_cell & ~dense).any()
    with Image.open(path) as image:
        assert image.width <= 1100 and image.height <= 1100


def test_skipped_prefix_blocks_get_their_own_colour(tmp_path):
    layout = masks.from_rule(lambda i, u, j, v: u == v, 3, 32, block_size=16, prefix_tokens=16)
    dense = layout.to_dense().clone()
    dense[0, 3] = False
    layout = type(layout).from_dense(dense, layout.block_starts, layout.block_size, "edited")
    path = draw_block_mask(layout, tmp_path / "edited.png", blocks_per_frame=2, title="edited prefix")
    colors = block_centre_colors(path, layout.num_blocks)
    assert (colors[0, 3] == np.array(PREFIX_SKIPPED, dtype=np.uint8)).all()


def test_large_layout_is_shrunk(tmp_path):
    layout = masks.sculpt4d(64, 4096, block_size=128)
    path = draw_block_mask(layout, tmp_path / "large.png")
    with Image.open(path) as image:
        assert image.width <= 1100 and image.height <= 1150
    colors = block_centre_colors(path, layout.num_blocks)
    assert_colors(colors, np.s_[:, 0], KEPT)


@pytest.mark.parametrize(
    "frames, blocks_per_frame, message",
    [(13, None, "frames=13"), (3, 7, "frames=3, blocks_per_frame=7"), (0, None, "frames=0"),
     (None, -1, "blocks_per_frame=-1")],
)
def test_frames_that_do_not_fit_raise(tmp_path, frames, blocks_per_frame, message):
    layout = masks.sculpt4d(4, 40, block_size=16)
    with pytest.raises(ValueError, match=message):
        draw_block_mask(layout, tmp_path / "bad.png", frames=frames, blocks_per_frame=blocks_per_frame)


def test_speed_quality_curve(tmp_path):
    points = [("dense", 1.0, 41.2), ("sculpt4d", 2.6, 38.9), ("window", 3.1, 33.5), ("radial", 1.9, 39.4)]
    path = draw_speed_quality_curve(points, tmp_path / "curve.png", x_label="speedup (x)")
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert 300 <= image.width <= 1100 and 200 <= image.height <= 1100
        pixels = np.asarray(image.convert("RGB"))
    curve = (pixels == np.array(CURVE, dtype=np.uint8)).all(axis=-1)
    assert curve.sum() > 100
    assert (pixels.sum(axis=-1) < 150).sum() > 100


def test_speed_quality_curves_get_their_own_colours(tmp_path):
    curves = {"ours": [("0.1", 2.0, 38.0), ("0.3", 3.2, 36.0)], "baseline": [("0.2", 4.0, 32.0), ("0.4", 6.0, 26.0)]}
    path = draw_speed_quality_curve(curves, tmp_path / "curves.png")
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
    for colour in CURVE_COLOURS[:2]:
        assert (pixels == np.array(colour, dtype=np.uint8)).all(axis=-1).sum() > 50


def test_speed_quality_curve_single_point(tmp_path):
    path = draw_speed_quality_curve([("dense", 1.0, 40.0)], tmp_path / "one.png")
    with Image.open(path) as image:
        assert image.size[0] > 0


@pytest.mark.parametrize(
    "points, message",
    [([], "points is empty"), ([("same", 1.0, float("inf"))], "'same'"), ([("nan", float("nan"), 30.0)], "'nan'")],
)
def test_speed_quality_curve_rejects_bad_points(tmp_path, points, message):
    with pytest.raises(ValueError, match=message):
        draw_speed_quality_curve(points, tmp_path / "bad.png")


def solid_video(frames: int, colours: list[tuple[float, float, float]], size: int = 16) -> torch.Tensor:
    """[frames, 3, size, size] in [-1, 1], frame t filled with colours[t]."""
    return torch.tensor(colours, dtype=torch.float32)[:frames].view(frames, 3, 1, 1).expand(frames, 3, size, size)


def count_colour(pixels: np.ndarray, colour) -> int:
    return int((pixels == np.array(colour, dtype=np.uint8)).all(axis=-1).sum())


def test_sample_grid_has_a_row_per_method_and_upscaled_frames(tmp_path):
    red, green = solid_video(3, [(1, -1, -1)] * 3), solid_video(3, [(-1, 1, -1)] * 3)
    path = draw_sample_grid({"dense": red, "turbo4d": green}, tmp_path / "grid.png")
    with Image.open(path) as image:
        assert image.format == "PNG"
        pixels = np.asarray(image.convert("RGB"))
    side = SAMPLE_SIDE  # 16 px frames upscaled by 6 with nearest neighbours
    assert count_colour(pixels, (255, 0, 0)) == 3 * side * side
    assert count_colour(pixels, (0, 255, 0)) == 3 * side * side
    red_rows = np.nonzero((pixels == [255, 0, 0]).all(axis=-1).any(axis=1))[0]
    green_rows = np.nonzero((pixels == [0, 255, 0]).all(axis=-1).any(axis=1))[0]
    assert red_rows.max() < green_rows.min(), "rows follow the order of the mapping"
    first_frame_x = np.nonzero((pixels == [255, 0, 0]).all(axis=-1).any(axis=0))[0].min()
    assert (pixels[:, :first_frame_x].sum(axis=-1) < 150).sum() > 20, "labels are drawn left of the frames"


def test_sample_grid_keeps_pixels_sharp_and_stacks_views(tmp_path):
    video = torch.full((2, 2, 3, 16, 16), -1.0)  # [views, frames, ...], black
    video[1, :, 0, 0, 0] = 1.0  # one red source pixel in view 1, both frames
    path = draw_sample_grid({"views": video}, tmp_path / "views.png")
    pixels = np.asarray(Image.open(path).convert("RGB"))
    scale = SAMPLE_SIDE // 16
    assert count_colour(pixels, (255, 0, 0)) == 2 * scale * scale, "nearest upscaling, no blur"
    assert count_colour(pixels, (0, 0, 0)) == 2 * (2 * SAMPLE_SIDE * SAMPLE_SIDE - scale * scale)
    black_ys = np.nonzero((pixels == 0).all(axis=-1).any(axis=1))[0]
    red_ys = np.nonzero((pixels == [255, 0, 0]).all(axis=-1).any(axis=1))[0]
    assert red_ys.min() > black_ys.min() + SAMPLE_SIDE, "view 1 sits below view 0"


def test_sample_gif_plays_the_frames_side_by_side(tmp_path):
    colours = [(-1, -1, 1), (1, 1, -1), (1, -1, 1)]
    rows = {"dense": solid_video(3, colours), "sparse": solid_video(3, colours)}
    path = draw_sample_gif(rows, tmp_path / "nested" / "samples.gif", frame_ms=80)
    with Image.open(path) as image:
        assert image.format == "GIF" and image.n_frames == 3
        assert image.info["duration"] == 80 and image.info["loop"] == 0
        expected = [(0, 0, 255), (255, 255, 0), (255, 0, 255)]
        for frame, colour in enumerate(expected):
            image.seek(frame)
            pixels = np.asarray(image.convert("RGB"))
            assert count_colour(pixels, colour) == 2 * SAMPLE_SIDE * SAMPLE_SIDE


@pytest.mark.parametrize(
    "rows, message",
    [({}, "rows is empty"),
     ({"a": torch.zeros(2, 3, 16, 16), "b": torch.zeros(3, 3, 16, 16)}, "same shape"),
     ({"a": torch.zeros(2, 4, 16, 16)}, r"\[T, 3, H, W\]")],
)
def test_sample_pictures_reject_bad_videos(tmp_path, rows, message):
    with pytest.raises(ValueError, match=message):
        draw_sample_grid(rows, tmp_path / "bad.png")
    with pytest.raises(ValueError, match=message):
        draw_sample_gif(rows, tmp_path / "bad.gif")
