"""Heatmaps at run time: normalise each member's map, put it back on the image, average members.

A member's raw map (h x w, from the graph's `pneumoedge_heatmap` output) lies on the grid of
its feature layer. It is first brought to the member's input (height x width), undoing the
network's downsampling (a stride of 2^k whose cells may cover a little more or less than the
input, by `same` padding or floor pooling), then to the original image by undoing the spec's
resize, which stretches the whole image to the input size. Members of an ensemble differ in
input size, so each is stretched onto one working grid (the image's aspect, at most
`WORK_SIDE` pixels) and averaged there with the ensemble's weights; the original-size map is
made from it only when asked for.
"""

from __future__ import annotations

import math
from typing import Sequence

import cv2
import numpy as np

from pneumoedge.formats import inspect, jpeg_orientation
from pneumoedge.imageio import max_image_pixels

#: Longest side of the grid on which members' maps are averaged (the maps are coarse: 8-32 cells).
WORK_SIDE = 512


def normalise(raw: np.ndarray) -> np.ndarray:
    """A raw map (ReLU'd, any scale) to 0..1 by its maximum; an all-zero map stays all zero.

    An empty map is an answer: no region raises the explained score.
    """
    raw = np.nan_to_num(np.asarray(raw, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    raw = np.maximum(raw, 0.0)
    peak = float(raw.max()) if raw.size else 0.0
    if peak <= 0.0:
        return np.zeros_like(raw)
    return raw / np.float32(peak)


def _stride(cells: int, pixels: int) -> int:
    """The feature layer's stride along one axis: the power of two nearest pixels / cells."""
    if cells >= pixels:
        return 1
    return 2 ** max(0, round(math.log2(pixels / cells)))


def to_input_grid(cam: np.ndarray, height: int, width: int) -> np.ndarray:
    """A feature-grid map (h, w) onto the model input (height, width), cell by cell.

    Cell i covers input pixels [i*s, (i+1)*s): the map is upsampled to (h*s, w*s), then cropped
    or edge-padded to the input size (the network's border cells cover what floor pooling left).
    """
    h, w = cam.shape
    sy, sx = _stride(h, height), _stride(w, width)
    up = cv2.resize(cam, (w * sx, h * sy), interpolation=cv2.INTER_LINEAR)
    up = up[:height, :width]
    pad_y, pad_x = height - up.shape[0], width - up.shape[1]
    if pad_y or pad_x:
        up = cv2.copyMakeBorder(up, 0, pad_y, 0, pad_x, cv2.BORDER_REPLICATE)
    return up


def work_grid(original: tuple[int, int], side: int = WORK_SIDE) -> tuple[int, int]:
    """(height, width) of the averaging grid: the original's aspect, longest side at most `side`."""
    height, width = original
    scale = min(1.0, side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def combine(cams: Sequence[np.ndarray], inputs: Sequence[tuple[int, int]], weights: Sequence[float], grid: tuple[int, int]) -> np.ndarray:
    """Weighted mean of members' normalised maps on `grid`, from their raw feature-grid maps.

    Input and original are the same field of view (the resize stretches), so a map on the input
    grid is stretched onto the working grid.
    """
    total = np.zeros(grid, dtype=np.float32)
    weight_sum = float(sum(weights))
    for cam, (height, width), weight in zip(cams, inputs, weights):
        on_input = to_input_grid(normalise(cam), height, width)
        total += np.float32(weight / weight_sum) * cv2.resize(on_input, (grid[1], grid[0]), interpolation=cv2.INTER_LINEAR)
    return np.clip(total, 0.0, 1.0)


def to_original(grid_map: np.ndarray, original: tuple[int, int]) -> np.ndarray:
    """The working-grid map on the original image's pixel grid (height, width)."""
    height, width = original
    if grid_map.shape == (height, width):
        return grid_map.astype(np.float32, copy=True)
    return np.clip(cv2.resize(grid_map, (width, height), interpolation=cv2.INTER_LINEAR), 0.0, 1.0)


def original_size(data: bytes | None, decoded: np.ndarray, reduction: int) -> tuple[int, int]:
    """The source image's (height, width) as a viewer shows it.

    A JPEG decoded at 1/reduction scale is smaller than the file: its header gives the size,
    turned when its EXIF orientation swaps the axes (the decoded image is already turned).
    """
    height, width = decoded.shape[:2]
    if data is None or reduction == 1:
        return height, width
    header = inspect(data, max_pixels=max_image_pixels())
    if header.kind != "jpeg" or not header.width:
        return height, width
    if jpeg_orientation(data) in (5, 6, 7, 8):  # EXIF turns it by 90 degrees: the decode is already turned
        return header.width, header.height
    return header.height, header.width
